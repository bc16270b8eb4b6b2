"""Explanations benchmark (``recagent eval explain``): speed, coverage and code checks of per-item reasons, and
whether explain traffic slows score requests down (head-of-line blocking), all in one run.

Parts, each on the served index and LLM (the default in-process model unless ``RECAGENT_LLM`` says otherwise):

1. **Explain the top-k** per user, in process: the ranked list (score mode), then the reasons streamed by the
   explainer. Per user: seconds from the ranked list to the last reason, and to the first reason; the share of
   reasons the LLM wrote; code checks (:mod:`agent.explanation_checks`) of the served reasons, LLM-written and
   template reasons reported apart, and how many LLM sentences the checks replaced by templates.
2. **Through the API with the default settings** (a real uvicorn server, default deadline): ``explain: true``
   requests; how many answers lack a reason on any item, how many are degraded, the LLM share.
3. **Head-of-line blocking**: score requests (no explanations) one after another, alone, then while one explain
   request per second is sent; p50 of both and their ratio, in the same run.
4. **Generate mode** (the model lists the top-k, in the configured listing style, then the same batched
   reasons): seconds per user, the raw duplicate rate of the model's lists (repeats are dropped and the list
   completed in retrieval order; the letters style cannot repeat), and Kendall's tau between the model's order
   and the retrieval order it was shown; with ``--baseline-users``, the JSON listing timed in the same run.

Users are test users of the leave-last-out split (their history without the held-out item); no held-out item is
used by anything measured here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from agent import explanation_checks as xc
from agent.explain import Reason
from agent.service import RecommenderService
from retrieval.splits import SplitSpec, split_catalog


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.quantile(values, q)) if values else None


def sample_users(service: RecommenderService, users: int, spec: SplitSpec) -> list[tuple[str, list[str]]]:
    """``users`` seeded test users and their histories without the held-out item."""
    cases = split_catalog(service.catalog, spec).test
    rng = random.Random(spec.seed)
    chosen = rng.sample(cases, min(users, len(cases)))
    return [(c.user_id, list(c.history)) for c in chosen]


def _checks(service: RecommenderService, history: Sequence[str], items: Sequence[Any]) -> dict[str, list[bool]]:
    """Whether each served reason fails any code check, by who wrote it."""
    catalog = service.catalog
    facts = xc.facts_for(catalog, [*history, *(i.item_id for i in items)])
    out: dict[str, list[bool]] = {"llm": [], "template": []}
    for item in items:
        failed = xc.check_explanation(list(history), item.item_id, item.reason, item.evidence, facts,
                                      catalog.all_genres)
        out[item.reason_source or "template"].append(bool(failed))
    return out


def explain_in_process(service: RecommenderService, cases: Sequence[tuple[str, list[str]]], k: int,
                       progress: bool = True) -> dict[str, Any]:
    total, first, share, rejected, llm_written = [], [], [], 0, 0
    rejected_by: Counter[str] = Counter()
    rejected_examples: list[str] = []
    fails: dict[str, list[bool]] = {"llm": [], "template": []}
    examples: list[dict[str, Any]] = []
    for user, history in tqdm(cases, desc="explain top-k", unit="user", disable=not progress):
        ranked = service.rank(history, k=k)
        t0 = time.perf_counter()
        reasons: dict[str, Reason] = {}
        first_s = None
        for reason in service.reasons(ranked):
            first_s = first_s if first_s is not None else time.perf_counter() - t0
            reasons[reason.item_id] = reason
            rejected += reason.rejected is not None
            if reason.rejected is not None:
                rejected_by[reason.rejected.split(":", 1)[0]] += 1
                if len(rejected_examples) < 6:
                    rejected_examples.append(f"{reason.draft} ({reason.rejected[:240]})")
            llm_written += reason.source == "llm" or reason.rejected is not None
        service.explainer.fill(ranked.answer, ranked.history, ranked.candidates, reasons)
        total.append(time.perf_counter() - t0)
        first.append(first_s or 0.0)
        items = ranked.answer.items
        share.append(sum(i.reason_source == "llm" for i in items) / max(len(items), 1))
        for who, flags in _checks(service, history, items).items():
            fails[who] += flags
        if len(examples) < 5:
            examples += [{"user": user, "rank": i.rank, "title": i.title, "reason": i.reason,
                          "reason_source": i.reason_source} for i in items[:2]]
    return {
        "users": len(cases), "k": k,
        "explain_p50_s": _pct(total, 0.5), "explain_p95_s": _pct(total, 0.95),
        "first_reason_p50_s": _pct(first, 0.5), "first_reason_p95_s": _pct(first, 0.95),
        "llm_share": float(np.mean(share)) if share else None,
        "llm_sentences": llm_written, "llm_sentences_rejected": rejected,
        "llm_rejected_rate": rejected / llm_written if llm_written else None,
        "llm_rejected_by": dict(rejected_by.most_common()), "llm_rejected_examples": rejected_examples,
        "served_llm_reasons": len(fails["llm"]), "served_template_reasons": len(fails["template"]),
        "check_fail_rate_llm": float(np.mean(fails["llm"])) if fails["llm"] else None,
        "check_fail_rate_template": float(np.mean(fails["template"])) if fails["template"] else None,
        "latencies_s": total, "examples": examples,
    }


def json_baseline(service: RecommenderService, cases: Sequence[tuple[str, list[str]]], k: int,
                  progress: bool = True) -> dict[str, Any]:
    """The previous design, timed in the same run for a ratio: one constrained JSON document holding the reasons
    of the whole top-k (``prompts/explain.v1``; ids, reasons and evidence under a schema)."""
    import json

    import prompts

    assert service.backend is not None
    seconds, valid = [], 0
    for _user, history in tqdm(cases, desc="JSON baseline", unit="user", disable=not progress):
        ranked = service.rank(history, k=k)
        hist = ranked.history[-8:]
        by_id = {c.item_id: c for c in ranked.candidates}
        top = [by_id[i.item_id] for i in ranked.answer.items]
        rendered = prompts.load("explain", "v1").render(
            history=[{"item_id": h.item_id, "text": f"{h.title} ({', '.join(h.genres[:3])})"} for h in hist],
            candidates=[{"item_id": c.item_id, "text": f"{c.title} ({', '.join(c.genres[:3])})"} for c in top])
        entry = {"type": "object", "additionalProperties": False, "required": ["item_id", "reason", "evidence"],
                 "properties": {"item_id": {"type": "string", "enum": [c.item_id for c in top]},
                                "reason": {"type": "string", "minLength": 10, "maxLength": 120},
                                "evidence": {"type": "array", "maxItems": 2,
                                             "items": {"type": "string", "enum": [h.item_id for h in hist]}}}}
        schema = {"type": "object", "additionalProperties": False, "required": ["explanations"],
                  "properties": {"explanations": {"type": "array", "items": entry, "minItems": len(top),
                                                  "maxItems": len(top)}}}
        t0 = time.perf_counter()
        try:
            raw = service.backend.generate_json(rendered.messages, schema,  # type: ignore[arg-type]
                                                max_tokens=len(top) * 96 + 32)
            valid += isinstance(json.loads(raw).get("explanations"), list)
        except Exception:  # counted as invalid
            pass
        seconds.append(time.perf_counter() - t0)
    return {"users": len(cases), "k": k, "p50_s": _pct(seconds, 0.5), "p95_s": _pct(seconds, 0.95),
            "valid": valid}


def generate_mode(service: RecommenderService, cases: Sequence[tuple[str, list[str]]], k: int,
                  progress: bool = True, style: str | None = None) -> dict[str, Any]:
    """Generate mode with reasons, per user: seconds, the raw duplicate rate of the model's lists, and how far
    the model's order departs from the retrieval order it was shown (Kendall's tau between the items' LLM and
    retrieval scores; 1: the model copied the order). ``style`` overrides the configured listing style."""
    from scipy.stats import kendalltau

    assert service.reranker is not None
    config = service.reranker.config
    kept = config.generate_style
    config.generate_style = style or kept  # type: ignore[assignment]
    seconds, duplicates, listed, degraded, share, taus = [], 0, 0, 0, [], []
    try:
        prompt = config.generate_prompt_id()
        for _user, history in tqdm(cases, desc=f"generate mode ({config.generate_style})", unit="user",
                                   disable=not progress):
            t0 = time.perf_counter()
            answer = service.recommend(history, k=k, mode="generate", explain=True)
            seconds.append(time.perf_counter() - t0)
            degraded += answer.degraded
            if answer.raw_duplicates is not None:
                duplicates += answer.raw_duplicates
                listed += k
            share.append(sum(i.reason_source == "llm" for i in answer.items) / max(len(answer.items), 1))
            llm = [i.llm_score for i in answer.items]
            if not answer.degraded and len(llm) > 1 and all(x is not None for x in llm):
                tau = kendalltau(llm, [i.retrieval_score for i in answer.items]).statistic
                if np.isfinite(tau):
                    taus.append(float(tau))
    finally:
        config.generate_style = kept
    return {"users": len(cases), "k": k, "style": style or kept, "prompt": prompt,
            "p50_s": _pct(seconds, 0.5), "p95_s": _pct(seconds, 0.95),
            "raw_duplicate_rate": duplicates / listed if listed else None, "listed_ids": listed,
            "degraded": degraded, "llm_share": float(np.mean(share)) if share else None,
            "kendall_tau_mean": float(np.mean(taus)) if taus else None}


async def _api_parts(url: str, users: Sequence[str], k: int, requests: int, hol_requests: int,
                     progress: Callable[[str], None]) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def post(user: str, explain: bool) -> tuple[float, dict[str, Any]]:
            t0 = time.perf_counter()
            r = await client.post("/v1/recommendations", json={"user_id": user, "k": k, "explain": explain})
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()

        progress("API explain requests (default settings)")
        missing, degraded, lat, share = 0, 0, [], []
        for i in range(requests):
            took, body = await post(users[i % len(users)], True)
            lat.append(took)
            missing += any(not item.get("reason") for item in body["items"]) or not body["items"]
            degraded += bool(body["degraded"])
            share.append(sum(i.get("reason_source") == "llm" for i in body["items"]) / max(len(body["items"]), 1))
        api = {"requests": requests, "without_reasons": missing, "degraded": degraded,
               "p50_s": _pct(lat, 0.5), "p95_s": _pct(lat, 0.95), "llm_share": float(np.mean(share))}

        progress("score requests alone")
        alone = [(await post(users[i % len(users)], False))[0] for i in range(hol_requests)]
        progress("score requests while one explain request per second runs")
        stop = asyncio.Event()
        explain_lat: list[float] = []

        async def explain_traffic() -> None:
            tasks, n = [], 0
            while not stop.is_set():
                user = users[(n * 7 + 3) % len(users)]
                tasks.append(asyncio.create_task(post(user, True)))
                n += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
            for took, _ in await asyncio.gather(*tasks):
                explain_lat.append(took)

        traffic = asyncio.create_task(explain_traffic())
        await asyncio.sleep(1.5)  # the first explain requests are running
        loaded = [(await post(users[i % len(users)], False))[0] for i in range(hol_requests)]
        stop.set()
        await traffic
    hol = {"requests": hol_requests, "alone_p50_s": statistics.median(alone),
           "alone_p95_s": _pct(alone, 0.95), "loaded_p50_s": statistics.median(loaded),
           "loaded_p95_s": _pct(loaded, 0.95), "ratio_p50": statistics.median(loaded) / statistics.median(alone),
           "explain_requests": len(explain_lat), "explain_p50_s": _pct(explain_lat, 0.5),
           "alone_s": alone, "loaded_s": loaded}
    return {"api": api, "hol": hol}


def through_api(service: RecommenderService, users: Sequence[str], k: int, requests: int, hol_requests: int,
                progress: Callable[[str], None]) -> dict[str, Any]:
    """Parts 2 and 3 against a real uvicorn server over ``service``'s index and model, with the default settings
    (its backend wrapped as ``recagent serve`` wraps it: micro-batched score passes)."""
    from agent.metrics import Metrics
    from agent.runtime import serving_backend
    from agent.settings import Settings
    from serve import create_app, running_server

    settings = Settings()
    if service.backend is not None:
        service = RecommenderService(service.index, backend=serving_backend(service.backend, settings, Metrics()))
    app = create_app(settings, service=service)
    with running_server(app) as url:
        result = asyncio.run(_api_parts(url, users, k, requests, hol_requests, progress))
    result["settings"] = {"deadline_s": settings.deadline_s, "workers": settings.workers,
                          "explain_workers": settings.explain_workers, "micro_batch": settings.micro_batch}
    return result


def plot(result: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.hist(result["explain"]["latencies_s"], bins=20, color="#4c72b0")
    a.axvline(3.0, color="grey", ls="--", lw=1)
    a.set_title(f"explain top-{result['explain']['k']}: seconds per user")
    a.set_xlabel("seconds from the ranked list to the last reason")
    hol = result["hol"]
    b.boxplot([hol["alone_s"], hol["loaded_s"]], tick_labels=["score alone", "score + 1 explain/s"])
    b.set_ylabel("seconds per request")
    b.set_title(f"head-of-line: p50 ratio {hol['ratio_p50']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


def _rate(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _target(ok: bool) -> str:
    return "met" if ok else "**missed**"


def markdown(r: dict[str, Any], plot_file: str | None) -> str:
    e = r["explain"]
    lines = [f"# Explanations: {r['catalog']}", "",
             f"Model `{r['model']}` (backend {r['llm']}, ranker {r.get('ranker', 'zero-shot')}, reasons prompt "
             f"`{r.get('explain_prompt', 'explain_item')}`), {r['date']}. "
             "Users: test users of the split "
             f"({r['split']['description']}), their histories without the held-out item; nothing measured here "
             "uses a held-out item. Evidence links use the served index. Reasons: one sentence per item, written "
             "by the LLM about the history item the system's CF/embedding signals link to it, all items decoded "
             "as one batch; each LLM sentence passes the code checks or is replaced by a template. A sentence "
             "that goes on \"because, like <history item>, it\" claims what follows of both items, so it is "
             "checked against what they share (a pair that shares no genre gets \"watched by the same people as "
             "<history item>: it\" instead, and what follows is checked against the item).", "",
             f"## 1. Explain the top-{e['k']} ({e['users']} users, in process)", "",
             "| measure | value | target |", "|---|---|---|",
             f"| seconds from the ranked list to the last reason, p50 | {_s(e['explain_p50_s'])} | <= 3 s: "
             f"{_target((e['explain_p50_s'] or 99) <= 3)} |",
             f"| same, p95 | {_s(e['explain_p95_s'])} | <= 5 s: {_target((e['explain_p95_s'] or 99) <= 5)} |",
             f"| first reason after the ranked list, p50 / p95 | {_s(e['first_reason_p50_s'])} / "
             f"{_s(e['first_reason_p95_s'])} | <= 1.5 s: p50 {_target((e['first_reason_p50_s'] or 99) <= 1.5)}, "
             f"p95 {_target((e['first_reason_p95_s'] or 99) <= 1.5)} |",
             f"| share of served reasons written by the LLM | {_rate(e['llm_share'])} | |",
             f"| LLM sentences replaced by templates because a code check failed | {e['llm_sentences_rejected']} "
             f"of {e['llm_sentences']} ({_rate(e['llm_rejected_rate'])}) | <= 5%: "
             f"{_target((e['llm_rejected_rate'] or 0) <= 0.05)} |",
             f"| served LLM reasons failing a code check | {_rate(e['check_fail_rate_llm'])} of "
             f"{e['served_llm_reasons']} | |",
             f"| served template reasons failing a code check | {_rate(e['check_fail_rate_template'])} of "
             f"{e['served_template_reasons']} | |", ""]
    if e.get("llm_rejected_by"):
        lines += ["LLM sentences replaced, by the first check they failed (`agent/explanation_checks.py`): "
                  + ", ".join(f"{check} {n}" for check, n in e["llm_rejected_by"].items()) + ". For example:", ""]
        lines += [f"- {x}" for x in e.get("llm_rejected_examples", [])] + [""]
    if "api" in r:
        a, h, st = r["api"], r["hol"], r["settings"]
        lines += [f"## 2. Through the API, default settings (deadline {st['deadline_s']:g} s, "
                  f"{st['workers']} score workers, {st['explain_workers']} explain workers)", "",
                  "| measure | value | target |", "|---|---|---|",
                  f"| `explain: true` answers with an item without a reason | {a['without_reasons']} of "
                  f"{a['requests']} | 0: {_target(a['without_reasons'] == 0)} |",
                  f"| answers flagged degraded | {a['degraded']} of {a['requests']} | |",
                  f"| latency p50 / p95 (ranking + reasons) | {_s(a['p50_s'])} / {_s(a['p95_s'])} | |",
                  f"| share of reasons written by the LLM | {_rate(a['llm_share'])} | |", "",
                  "## 3. Head-of-line blocking (same server, same run)", "",
                  "The model lock serves score passes first, then the ranking passes of explain requests, then "
                  "decoding steps; a waiting score pass goes ahead between two layers of a lower-priority pass "
                  "(`agent/llm/priority.py`).", "",
                  "| score requests (no explanations) | p50 | p95 |", "|---|---|---|",
                  f"| alone ({h['requests']} requests, one at a time) | {_s(h['alone_p50_s'])} | "
                  f"{_s(h['alone_p95_s'])} |",
                  f"| while one explain request per second runs ({h['explain_requests']} explain requests, "
                  f"p50 {_s(h['explain_p50_s'])}) | {_s(h['loaded_p50_s'])} | {_s(h['loaded_p95_s'])} |", "",
                  f"p50 ratio loaded / alone: **{h['ratio_p50']:.2f}** (target <= 1.5: "
                  f"{_target(h['ratio_p50'] <= 1.5)}).", ""]
    if "baseline" in r:
        b = r["baseline"]
        ratio = (b["p50_s"] or 0) / (e["explain_p50_s"] or 1)
        lines += [f"## Same run: the previous design ({b['users']} users)", "",
                  f"One constrained JSON document with the reasons of the whole top-{b['k']} (`explain.v1`): p50 "
                  f"{_s(b['p50_s'])}, p95 {_s(b['p95_s'])} per user ({b['valid']} of {b['users']} parsed). The "
                  f"batched per-item reasons above take {_s(e['explain_p50_s'])} p50: **{ratio:.1f}x faster** on "
                  "this machine in this run.", ""]
    if "generate" in r:
        g = r["generate"]
        how = ("the model writes the candidates' letters one per line, each step restricted to the letters not "
               "yet written" if g.get("style", "json") == "letters"
               else "the model writes one JSON list of candidate ids")
        lines += [f"## 4. Generate mode ({g['users']} users, top-{g['k']}, `{g.get('prompt', 'rerank_generate')}`: "
                  f"{how}; then the batched reasons)", "",
                  "| measure | value | target |", "|---|---|---|",
                  f"| seconds per user p50 / p95 (list + reasons) | {_s(g['p50_s'])} / {_s(g['p95_s'])} | "
                  f"p50 <= 8 s: {_target((g['p50_s'] or 99) <= 8)} |",
                  f"| raw duplicate rate of the model's lists | {_rate(g['raw_duplicate_rate'])} of "
                  f"{g['listed_ids']} listed"
                  f"{' (none possible: a written letter is not offered again)' if g.get('style') == 'letters' else ''}"
                  " | reported |",
                  f"| agreement of the model's order with the retrieval order shown to it (Kendall's tau, mean; "
                  f"1 = copied) | {_num(g.get('kendall_tau_mean'))} | |",
                  f"| answers degraded (LLM failed) | {g['degraded']} | |",
                  f"| share of reasons written by the LLM | {_rate(g['llm_share'])} | |", ""]
        if "generate_baseline" in r:
            b = r["generate_baseline"]
            lines += [f"Same run, the previous design (`{b['prompt']}`, one JSON list of item ids under a schema, "
                      f"{b['users']} users): p50 {_s(b['p50_s'])} per user, raw duplicate rate "
                      f"{_rate(b['raw_duplicate_rate'])} of {b['listed_ids']} listed ids, Kendall's tau "
                      f"{_num(b.get('kendall_tau_mean'))}.", ""]
    lines += ["## Examples", ""] + [f"- #{x['rank']} {x['title']} ({x['reason_source']}): {x['reason']}"
                                     for x in e["examples"]]
    if plot_file:
        lines += ["", f"![latencies]({plot_file})"]
    lines += ["", f"- command: `{r['command']}`", f"- machine: {r['machine']}"]
    return "\n".join(lines) + "\n"
