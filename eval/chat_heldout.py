"""The held-out chat test set (``eval/data/chat_heldout.jsonl``): short conversations whose every user turn says
what a correct answer must satisfy, checked here against the catalogue's metadata.

The set was written by hand as constructed cases (see its header line), in phrasing of its own rather than the
rule lexicon's, so it measures how well the agent understands requests, not only whether its filters work. A
turn's ``must`` may hold:

- ``genres_any``: every item has at least one of these genres (a hard genre request);
- ``some_genres``: at least one item has one of these genres (a soft preference shows);
- ``exclude_genres``: no item has any of these genres;
- ``year_min`` / ``year_max``: every item's year lies within (items without a year fail);
- ``similar_to``: a catalogue title; it is not itself returned and at least half of the items share a genre
  with it;
- ``not_items``: ``"previous"``: no item was shown earlier in the conversation;
- ``not_titles``: catalogue titles that must not be returned;
- ``items``: ``"some"`` or ``"none"`` (default: ``"some"`` when any item check is given); ``min_items``: at least
  this many items;
- ``answers_item``: the reply is about the item at this position (1-based) of the previous turn's list (for
  "why the second one?", "what's the first one about?"): it names that item;
- ``kind`` / ``kind_not``: what the agent took the turn for (``why``, ``about``, ``meta``, ...) / must not;
- ``reply_mentions`` (all), ``reply_mentions_any`` (one of), ``reply_not_mentions`` (none): text in the reply,
  case-insensitive.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.chat.agent import ChatAgent
from agent.chat.config import ChatConfig
from agent.chat.models import Turn
from agent.chat.state import SQLiteSessionStore
from agent.chat.titles import normalise_title
from agent.service import RecommenderService
from retrieval.catalog import Catalog

DATA = Path(__file__).parent / "data" / "chat_heldout.jsonl"
ITEM_KEYS = {"genres_any", "some_genres", "exclude_genres", "year_min", "year_max", "similar_to", "not_items",
             "not_titles"}
LIST_KEYS = {"genres_any", "some_genres", "exclude_genres", "not_titles", "reply_mentions", "reply_mentions_any",
             "reply_not_mentions"}
KINDS = {"recommend", "critique", "why", "about", "smalltalk", "meta", "empty"}
MUST_KEYS = ITEM_KEYS | LIST_KEYS | {"items", "kind", "kind_not", "min_items", "answers_item"}


@dataclass
class HeldoutTurn:
    user: str
    must: dict[str, Any]


@dataclass
class Conversation:
    id: str
    turns: list[HeldoutTurn]
    batch: str = ""


@dataclass
class HeldoutSet:
    header: dict[str, Any]
    conversations: list[Conversation] = field(default_factory=list)

    @property
    def n_turns(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


def load(path: Path = DATA) -> HeldoutSet:
    """The set: its header (the first line, a ``_header`` object) and its conversations, one a line."""
    header: dict[str, Any] = {}
    conversations: list[Conversation] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "_header" in row:
            header = row
            continue
        try:
            turns = [HeldoutTurn(user=str(t["user"]), must=dict(t["must"])) for t in row["turns"]]
            conversations.append(Conversation(id=str(row["id"]), turns=turns, batch=str(row.get("batch", ""))))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a conversation ({exc!r})") from exc
    return HeldoutSet(header, conversations)


def title_index(catalog: Catalog) -> dict[str, str]:
    """Exact catalogue title -> item id (the first item of a duplicated title)."""
    out: dict[str, str] = {}
    for item_id, title in zip(catalog.item_ids, catalog.titles_by_pos, strict=True):
        out.setdefault(str(title), str(item_id))
    return out


def validate(data: HeldoutSet, catalog: Catalog | None = None) -> list[str]:
    """Problems with the set: unknown keys, wrong types, unknown genres or titles (with ``catalog``)."""
    problems: list[str] = []
    if not data.header.get("_header"):
        problems.append("no header line")
    ids = [c.id for c in data.conversations]
    if len(set(ids)) != len(ids):
        problems.append("duplicate conversation ids")
    titles = title_index(catalog) if catalog is not None else None
    genres = set(catalog.all_genres) if catalog is not None else None
    for conv in data.conversations:
        if not conv.turns:
            problems.append(f"{conv.id}: no turns")
        for i, turn in enumerate(conv.turns, 1):
            where = f"{conv.id}.{i}"
            must = turn.must
            if not turn.user.strip():
                problems.append(f"{where}: empty message")
            if not must:
                problems.append(f"{where}: nothing to check")
            for key in set(must) - MUST_KEYS:
                problems.append(f"{where}: unknown key {key!r}")
            for key in LIST_KEYS & set(must):
                if not isinstance(must[key], list) or not must[key] or not all(isinstance(v, str) for v in must[key]):
                    problems.append(f"{where}: {key} must be a non-empty list of strings")
            for key in ("year_min", "year_max", "min_items", "answers_item"):
                if key in must and not isinstance(must[key], int):
                    problems.append(f"{where}: {key} must be an integer")
            if must.get("items", "some") not in ("some", "none"):
                problems.append(f"{where}: items must be 'some' or 'none'")
            if must.get("items") == "none" and ITEM_KEYS & set(must):
                problems.append(f"{where}: item checks on a turn that wants no items")
            if must.get("not_items", "previous") != "previous":
                problems.append(f"{where}: not_items must be 'previous'")
            for key in ("kind", "kind_not"):
                if key in must and must[key] not in KINDS:
                    problems.append(f"{where}: {key} {must[key]!r} is not one of {sorted(KINDS)}")
            if genres is not None:
                for key in ("genres_any", "some_genres", "exclude_genres"):
                    problems += [f"{where}: unknown genre {g!r}" for g in must.get(key, []) if g not in genres]
            if titles is not None:
                named = [*must.get("not_titles", []), *([must["similar_to"]] if "similar_to" in must else [])]
                problems += [f"{where}: unknown title {t!r}" for t in named if t not in titles]
    return problems


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def check_turn(turn: Turn, must: dict[str, Any], catalog: Catalog, previous: set[str],
               titles: dict[str, str], last: Sequence[str] = ()) -> list[str]:
    """What ``turn`` gets wrong against ``must`` (empty: the turn passes). ``previous``: every item shown earlier
    in the conversation; ``last``: the previous turn's items, in order."""
    failures: list[str] = []
    items = [i.item_id for i in turn.items]
    facts = {i: catalog.item(i) for i in items}
    genres = {i: set(f["genres"]) for i, f in facts.items()}  # type: ignore[call-overload]
    label = {i: str(f["title"]) for i, f in facts.items()}
    want_items = must.get("items", "some" if ITEM_KEYS & set(must) else None)
    if want_items == "some" and not items:
        failures.append("no items")
    if want_items == "none" and items:
        failures.append(f"items given: {[label[i] for i in items]}")
    if len(items) < must.get("min_items", 0):
        failures.append(f"{len(items)} items, wanted at least {must['min_items']}")
    if "answers_item" in must:
        n = must["answers_item"]
        if not 1 <= n <= len(last):
            failures.append(f"no item {n} in the previous list ({len(last)} items)")
        elif normalise_title(str(catalog.item(last[n - 1])["title"]))[0] not in _words(turn.reply):
            failures.append(f"reply is not about item {n} ({catalog.item(last[n - 1])['title']})")
    kind = str((turn.intent or {}).get("kind", ""))
    if "kind" in must and kind != must["kind"]:
        failures.append(f"kind {kind!r}, wanted {must['kind']!r}")
    if "kind_not" in must and kind == must["kind_not"]:
        failures.append(f"kind {kind!r}")
    if must.get("genres_any"):
        wanted = set(must["genres_any"])
        bad = [label[i] for i in items if not genres[i] & wanted]
        if bad:
            failures.append(f"not {'/'.join(sorted(wanted))}: {bad}")
    if must.get("some_genres") and items:
        wanted = set(must["some_genres"])
        if not any(genres[i] & wanted for i in items):
            failures.append(f"no item is {'/'.join(sorted(wanted))}")
    if must.get("exclude_genres"):
        unwanted = set(must["exclude_genres"])
        bad = [label[i] for i in items if genres[i] & unwanted]
        if bad:
            failures.append(f"excluded genre in {bad}")
    for key, ok in (("year_min", lambda y, b: y >= b), ("year_max", lambda y, b: y <= b)):
        if key in must:
            bad = [label[i] for i in items
                   if not isinstance(facts[i]["year"], int) or not ok(facts[i]["year"], must[key])]
            if bad:
                failures.append(f"{key} {must[key]} broken by {bad}")
    if "similar_to" in must:
        ref = titles[must["similar_to"]]
        ref_genres = set(catalog.item(ref)["genres"])  # type: ignore[call-overload]
        if ref in items:
            failures.append(f"returned the reference {must['similar_to']}")
        sharing = sum(bool(genres[i] & ref_genres) for i in items)
        if items and sharing < math.ceil(len(items) / 2):
            failures.append(f"only {sharing} of {len(items)} items share a genre with {must['similar_to']}")
    if must.get("not_items") == "previous":
        again = [label[i] for i in items if i in previous]
        if again:
            failures.append(f"repeated {again}")
    if must.get("not_titles"):
        banned = {titles[t] for t in must["not_titles"]}
        bad = [label[i] for i in items if i in banned]
        if bad:
            failures.append(f"returned {bad}")
    reply = turn.reply.lower()
    missing = [m for m in must.get("reply_mentions", []) if m.lower() not in reply]
    if missing:
        failures.append(f"reply lacks {missing}")
    if must.get("reply_mentions_any") and not any(m.lower() in reply for m in must["reply_mentions_any"]):
        failures.append(f"reply names none of {must['reply_mentions_any']}")
    present = [m for m in must.get("reply_not_mentions", []) if m.lower() in reply]
    if present:
        failures.append(f"reply mentions {present}")
    return failures


def run_set(agent: ChatAgent, data: HeldoutSet, progress: Callable[[int, int], None] | None = None
            ) -> list[dict[str, Any]]:
    """Every conversation through ``agent`` (a fresh session each); one record per turn."""
    catalog = agent.catalog
    titles = title_index(catalog)
    records: list[dict[str, Any]] = []
    for n, conv in enumerate(data.conversations, 1):
        session: str | None = None
        shown: set[str] = set()
        last: list[str] = []
        for i, hturn in enumerate(conv.turns, 1):
            t0 = time.perf_counter()
            turn = agent.respond(session, hturn.user, explain=False)
            ms = (time.perf_counter() - t0) * 1000
            session = turn.session_id
            failures = check_turn(turn, hturn.must, catalog, shown, titles, last)
            shown |= {i.item_id for i in turn.items}
            last = [i.item_id for i in turn.items] or last
            records.append({
                "conversation": conv.id, "batch": conv.batch, "turn": i, "user": hturn.user,
                "decided_by": turn.decided_by, "kind": (turn.intent or {}).get("kind"), "passed": not failures,
                "failures": failures, "reply": turn.reply, "items": [str(it.title) for it in turn.items],
                "ms": round(ms, 1),
            })
        if progress is not None:
            progress(n, len(data.conversations))
    return records


def cluster_ci(records: Sequence[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the pass rate, conversations resampled (turns of one conversation are
    not independent)."""
    by_conv: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_conv[r["conversation"]].append(bool(r["passed"]))
    if not by_conv:
        return (float("nan"), float("nan"))
    passed = np.array([sum(v) for v in by_conv.values()], dtype=np.float64)
    total = np.array([len(v) for v in by_conv.values()], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(passed), size=(n_boot, len(passed)))
    rates = passed[idx].sum(axis=1) / total[idx].sum(axis=1)
    return float(np.quantile(rates, 0.025)), float(np.quantile(rates, 0.975))


def summarise(records: Sequence[dict[str, Any]], n_boot: int = 1000) -> dict[str, Any]:
    def rate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {"turns": len(rows), "passed": sum(bool(r["passed"]) for r in rows),
                "rate": sum(bool(r["passed"]) for r in rows) / len(rows) if rows else float("nan")}

    lo, hi = cluster_ci(records, n_boot=n_boot)
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {"decided_by": defaultdict(list), "batch": defaultdict(list)}
    for r in records:
        groups["decided_by"][r["decided_by"]].append(r)
        groups["batch"][r["batch"] or "-"].append(r)
    ms = [r["ms"] for r in records]
    return {
        **rate(records), "lo": lo, "hi": hi,
        "by_decided_by": {k: rate(v) for k, v in sorted(groups["decided_by"].items())},
        "by_batch": {k: rate(v) for k, v in sorted(groups["batch"].items())},
        "failures": dict(Counter(f.split(" ")[0] for r in records for f in r["failures"]).most_common()),
        "ms_per_turn": {"mean": float(np.mean(ms)) if ms else 0.0,
                        "p95": float(np.percentile(ms, 95)) if ms else 0.0},
    }


def evaluate_heldout(service: RecommenderService, agents: dict[str, ChatConfig] | None = None, k: int = 5,
                     path: Path = DATA, n_boot: int = 1000,
                     progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """The set through each agent (default: the rules-only agent, and the LLM agent when the service has a
    backend); the payload of the report's held-out section."""
    data = load(path)
    problems = validate(data, service.catalog)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems[:10]))
    if agents is None:
        agents = {"rules_only": ChatConfig(k=k, use_llm=False)}
        if service.backend is not None:
            agents["llm_agent"] = ChatConfig(k=k, use_llm=True, llm_explain=False)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="chat-heldout-") as tmp:
        for name, config in agents.items():
            agent = ChatAgent(service, SQLiteSessionStore(Path(tmp) / f"{name}.sqlite"), config)

            def tick(done: int, total: int, name: str = name) -> None:
                if progress is not None:
                    progress(name, done, total)

            records = run_set(agent, data, tick)
            results[name] = {"summary": summarise(records, n_boot=n_boot), "turns": records}
    return {"catalog": service.catalog.name, "path": str(path), "conversations": len(data.conversations),
            "turns": data.n_turns,
            "header": data.header.get("_header", ""), "results": results}


def markdown(payload: dict[str, Any], failures_shown: int = 12) -> list[str]:
    """The report's held-out section."""
    lines = [
        "## Held-out conversations",
        "",
        f"{payload['turns']} user turns in {payload['conversations']} conversations (`{Path(payload['path']).name}`),"
        " each checked against the catalogue's metadata. The set was written by the project's author as "
        "constructed cases, not by users.",
        "",
        "| agent | pass rate [95% CI, conversations resampled] | by decided_by | by batch | ms/turn (mean, p95) |",
        "|---|---|---|---|---|",
    ]
    for name, r in payload["results"].items():
        s = r["summary"]
        by = "; ".join(f"{k}: {v['passed']}/{v['turns']}" for k, v in s["by_decided_by"].items())
        batch = "; ".join(f"{k}: {v['passed']}/{v['turns']}" for k, v in s["by_batch"].items())
        lines.append(f"| {name} | {s['rate']:.3f} ({s['passed']}/{s['turns']}) [{s['lo']:.3f}, {s['hi']:.3f}] | "
                     f"{by} | {batch} | {s['ms_per_turn']['mean']:.0f}, {s['ms_per_turn']['p95']:.0f} |")
    for name, r in payload["results"].items():
        failed = [t for t in r["turns"] if not t["passed"]]
        if not failed:
            continue
        lines += ["", f"Failed turns ({name}, {len(failed)}; first {min(len(failed), failures_shown)}):", ""]
        for t in failed[:failures_shown]:
            lines.append(f"- {t['conversation']}.{t['turn']} \"{t['user']}\" ({t['decided_by']}): "
                         + "; ".join(t["failures"]))
    return lines + [""]
