"""Turn the stages of `recagent eval all` into ``metrics.json``, PNG plots and ``report.md``.

``analyse`` computes every number (bootstrap intervals, paired differences, check rates, judge agreement);
``write_report`` renders them. Timings live under ``latency`` and ``provenance`` only, so two runs with the same
seed give identical metrics apart from those keys.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent import explanation_checks as xc
from eval.judge import CRITERIA, LABELS_DESCRIPTION, pairwise_summary, rubric_summary, validity
from eval.metrics import bootstrap_ci, paired_bootstrap_diff
from eval.plots import plot_position_bias, pyplot, save
from eval.suite import pairwise_results, template_reason

logger = logging.getLogger(__name__)
REFERENCE = "retrieval order (top-20)"
METRICS = ("ndcg@10", "recall@10")
VOLATILE = ("latency", "provenance")  # keys that hold measured times, dates and machine facts


def _ci(values: Sequence[float], n_boot: int, seed: int) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(arr, n_boot=n_boot, seed=seed)
    return {"mean": float(arr.mean()) if arr.size else float("nan"), "lo": lo, "hi": hi}


def _group(name: str) -> str:
    if name.startswith("baseline:") or name in (REFERENCE, "random order (top-20)"):
        return "baseline"
    return "ablation" if name.startswith("ablation:") else "llm"


def _diff(a: Mapping[str, Any], b: Mapping[str, Any], metric: str, n_boot: int, seed: int) -> dict[str, float]:
    """Paired difference a - b over the users both rows have."""
    pos = {u: i for i, u in enumerate(b["users"])}
    common = [(i, pos[u]) for i, u in enumerate(a["users"]) if u in pos]
    x = np.array([a[metric][i] for i, _ in common], dtype=np.float64)
    y = np.array([b[metric][j] for _, j in common], dtype=np.float64)
    if not common:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    mean, lo, hi = paired_bootstrap_diff(x, y, n_boot=n_boot, seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(common)}


def metric_rows(per_user: Mapping[str, Mapping[str, Any]], n_boot: int, seed: int) -> tuple[dict[str, Any], str]:
    """Rows with intervals and paired differences against the retrieval order and the best baseline."""
    full_n = len(per_user[REFERENCE]["users"]) if REFERENCE in per_user else 0
    # the strongest competitor other than the system's own retrieval order (the first comparison)
    baselines = [r for r in per_user if _group(r) == "baseline" and len(per_user[r]["users"]) == full_n
                 and r not in (REFERENCE, "baseline: fused")]
    best = max(baselines, key=lambda r: float(np.mean(per_user[r]["ndcg@10"]))) if baselines else REFERENCE
    rows: dict[str, Any] = {}
    for name, pu in per_user.items():
        row: dict[str, Any] = {"group": _group(name), "n": len(pu["users"])}
        for m in METRICS:
            row[m] = _ci(pu[m], n_boot, seed)
        if REFERENCE in per_user and name != REFERENCE:
            row["diff_vs_retrieval"] = {m: _diff(pu, per_user[REFERENCE], m, n_boot, seed) for m in METRICS}
        if best in per_user and name != best:
            row["diff_vs_best_baseline"] = {m: _diff(pu, per_user[best], m, n_boot, seed) for m in METRICS}
        rows[name] = row
    return rows, best


def check_explanations(records: Sequence[Mapping[str, Any]], catalog: Any) -> tuple[dict[str, float], list[dict]]:
    results: list[list[xc.Violation]] = []
    examples: list[dict[str, Any]] = []
    for r in records:
        facts = xc.facts_for(catalog, [*r["history"], r["item_id"], *r["evidence"]])
        v = xc.check_explanation(r["history"], r["item_id"], r["reason"], r["evidence"], facts,
                                 genre_vocabulary=catalog.all_genres)
        results.append(v)
        if v and len(examples) < 6:
            examples.append({"item_id": r["item_id"], "reason": r["reason"],
                             "violations": [x.model_dump() for x in v]})
    rates = xc.violation_rates(results)
    rates["n"] = len(results)
    return rates, examples


def _latency(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"n": 0}
    return {"n": int(arr.size), "mean_s": float(arr.mean()), "p50_s": float(np.median(arr)),
            "p95_s": float(np.quantile(arr, 0.95))}


def analyse(results: Mapping[str, Any], config: Any, catalog: Any) -> dict[str, Any]:
    n_boot, seed = config.n_boot, config.seed
    per_user: dict[str, Any] = {}
    for stage in ("retrieval", "score", "generate"):
        per_user.update(results[stage].get("rows", {}))
    rows, best = metric_rows(per_user, n_boot, seed)
    out: dict[str, Any] = {"rows": rows, "reference": REFERENCE, "best_baseline": best,
                           "users": len(results.get("_users", [])), "n_boot": n_boot, "seed": seed}
    score = results["score"]
    out["score"] = {"alpha": score.get("alpha"), "rates": score.get("rates"), "perms": score.get("perms"),
                    "calibrate": score.get("calibrate"), "alpha_sensitivity_test": score["ablations"].get(
                        "alpha_sensitivity_test")}
    out["position_bias"] = results["bias"].get("curves") or {"skipped": results["bias"].get("skipped")}
    checks: dict[str, Any] = {}
    expl = results["explain"].get("explanations", []) + results["generate"].get("explanations", [])
    systems = sorted({e["system"] for e in expl})
    shares: dict[str, float] = {}
    for system in systems:
        recs = [e for e in expl if e["system"] == system]
        shares[system] = sum(e.get("reason_source") == "llm" for e in recs) / len(recs)
        for source in ("llm", "template"):  # checks of LLM-written and template reasons, apart
            part = [e for e in recs if e.get("reason_source", "template") == source]
            if part:
                rates, examples = check_explanations(part, catalog)
                checks[f"{system}, {source}-written"] = {"rates": rates, "examples": examples}
    out["llm_reason_share"] = shares
    tmpl = []
    for e in (x for x in expl if x["system"] == "score+explain"):
        reason, evidence = template_reason(e["history"], e["item_id"], catalog)
        tmpl.append({**e, "reason": reason, "evidence": evidence})
    if tmpl:
        rates, examples = check_explanations(tmpl, catalog)
        checks["template (code only)"] = {"rates": rates, "examples": examples}
    out["explanation_checks"] = checks
    lists = results["generate"].get("lists", [])
    out["generate_lists"] = xc.list_rates(lists, [bool(x["degraded"]) for x in lists]) if lists else {}
    out["explain_failures"] = {"failures": results["explain"].get("failures", 0),
                               "users": results["explain"].get("users", 0)}
    out["judge"] = _judge(results, n_boot, seed)
    chat = results.get("chat", {})
    out["chat"] = {"skipped": chat["skipped"]} if "skipped" in chat else {
        k: chat.get(k) for k in ("users", "max_turns", "k", "results", "success_diff_llm_minus_retrieval")}
    chat_ms = {}  # measured times go to the latency section, so the chat metrics repeat exactly
    for agent, r in (out["chat"].get("results") or {}).items():
        r = dict(r)
        chat_ms[agent] = r.pop("ms_per_turn", None)
        out["chat"]["results"][agent] = r
    out["latency"] = {"score_per_user": _latency(score.get("latency_s", [])),
                      "generate_per_user": _latency(results["generate"].get("latency_s", [])),
                      "explain_per_user": _latency(results["explain"].get("latency_s", [])),
                      "judge_per_call": _latency(results["judge"].get("latency_s", [])),
                      "chat_ms_per_turn": chat_ms, "stage_seconds": results.get("_seconds", {})}
    return out


def _judge(results: Mapping[str, Any], n_boot: int, seed: int) -> dict[str, Any]:
    judge = results["judge"]
    out: dict[str, Any] = {}
    if "skipped" in judge:
        out["skipped"] = judge["skipped"]
    else:
        systems = sorted({r["system"] for r in judge["rubric"]})
        out["rubric"] = {s: rubric_summary([r for r in judge["rubric"] if r["system"] == s], n_boot, seed)
                         for s in systems}
        out["pairwise"] = {**pairwise_summary(pairwise_results(judge), n_boot, seed),
                           "a": judge["pair_systems"]["a"], "b": judge["pair_systems"]["b"]}
        out["failures"] = judge["failures"]
        out["meta"] = judge["meta"]
    val = results["validity"]
    if "skipped" in val:
        out["validity"] = {"skipped": val["skipped"], "trustworthy": False,
                           "verdict": f"Judge validity not measured ({val['skipped']}); do not trust its scores."}
    else:
        out["validity"] = validity([{"labels": lab} for lab in val["labels"]], val["judged"], n_boot, seed)
    return out


def no_nan(obj: Any) -> Any:
    """NaN -> None, recursively (metrics.json stays strict JSON)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [no_nan(v) for v in obj]
    return obj


def stable(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics without measured times and provenance (what must repeat for the same seed)."""
    return dict(no_nan({k: v for k, v in metrics.items() if k not in VOLATILE}))


# --- rendering -------------------------------------------------------------------------------------------------

def _fmt(ci: Mapping[str, float] | None, signed: bool = False, digits: int = 3) -> str:
    if not ci or ci.get("mean") is None or (isinstance(ci["mean"], float) and math.isnan(ci["mean"])):
        return "–"
    s = "+" if signed else ""
    return f"{ci['mean']:{s}.{digits}f} [{ci['lo']:{s}.{digits}f}, {ci['hi']:{s}.{digits}f}]"


COLORS = {"baseline": "#7f7f7f", "llm": "#1f77b4", "ablation": "#ff7f0e"}


def plot_metrics(rows: Mapping[str, Any], path: Path) -> None:
    plt = pyplot()
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.38 * len(names) + 1.5), sharey=True)
    for ax, m in zip(axes, METRICS, strict=True):
        for y, name in enumerate(names):
            r = rows[name][m]
            ax.errorbar(r["mean"], y, xerr=[[r["mean"] - r["lo"]], [r["hi"] - r["mean"]]], fmt="o",
                        color=COLORS[rows[name]["group"]], capsize=3)
        ax.set_title(f"{m.upper()} (mean, bootstrap 95% CI)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), [f"{n} (n={rows[n]['n']})" for n in names])
    axes[0].invert_yaxis()
    save(fig, path)


def plot_diffs(rows: Mapping[str, Any], best: str, path: Path) -> None:
    plt = pyplot()
    names = [n for n in rows if "diff_vs_retrieval" in rows[n] and rows[n]["group"] != "baseline"]
    if not names:
        return
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.5))
    for y, name in enumerate(names):
        for off, key, color in ((-0.15, "diff_vs_retrieval", "#1f77b4"), (0.15, "diff_vs_best_baseline", "#d62728")):
            d = rows[name].get(key, {}).get("ndcg@10")
            if d and d["n"]:
                ax.errorbar(d["mean"], y + off, xerr=[[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]], fmt="o",
                            color=color, capsize=3)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference in NDCG@10 (95% CI)")
    ax.set_title(f"vs retrieval order (blue) and vs best baseline '{best}' (red)")
    save(fig, path)


def plot_latency(results: Mapping[str, Any], path: Path) -> None:
    plt = pyplot()
    series = {"score mode, per user": results["score"].get("latency_s", []),
              "generate mode, per user": results["generate"].get("latency_s", []),
              "explanations, per user": results["explain"].get("latency_s", []),
              "judge, per call": results["judge"].get("latency_s", [])}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
    for ax, (name, vals) in zip(axes[0], series.items(), strict=True):
        ax.hist(vals, bins=20, color="#1f77b4")
        ax.axvline(float(np.median(vals)), color="black", ls="--", label=f"p50 {np.median(vals):.2f}s")
        ax.set_title(name)
        ax.set_xlabel("seconds")
        ax.legend()
    save(fig, path)


def plot_checks(checks: Mapping[str, Any], path: Path) -> None:
    plt = pyplot()
    if not checks:
        return
    names = [*xc.CHECKS, "any"]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    width = 0.8 / len(checks)
    for i, (system, c) in enumerate(checks.items()):
        ax.bar(np.arange(len(names)) + i * width, [c["rates"][n] for n in names], width,
               label=f"{system} (n={c['rates']['n']})")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=20)
    ax.set_ylabel("share of explanations failing")
    ax.set_title("Code checks of explanations")
    ax.legend()
    save(fig, path)


def plot_judge(judge: Mapping[str, Any], path: Path) -> None:
    plt = pyplot()
    val = judge.get("validity", {})
    has_val = "skipped" not in val
    if "rubric" not in judge and not has_val:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
    for i, (system, s) in enumerate(judge.get("rubric", {}).items()):
        x = np.arange(len(CRITERIA)) + i * 0.25
        ax = axes[0]
        ax.errorbar(x, [s[c]["mean"] for c in CRITERIA], yerr=[[s[c]["mean"] - s[c]["lo"] for c in CRITERIA],
                    [s[c]["hi"] - s[c]["mean"] for c in CRITERIA]], fmt="o", capsize=3, label=f"{system} (n={s['n']})")
    axes[0].set_xticks(np.arange(len(CRITERIA)) + 0.1, CRITERIA)
    axes[0].set_ylim(0.8, 5.2)
    axes[0].set_title("Judge rubric scores (1-5, 95% CI)")
    axes[0].legend(fontsize=8)
    if has_val:
        sp = [val[c]["spearman"] for c in CRITERIA]
        kp = [val[c]["kappa_quadratic"] for c in CRITERIA]
        xs = np.arange(len(CRITERIA))
        axes[1].bar(xs - 0.2, np.nan_to_num(sp), 0.4, label="Spearman")
        axes[1].bar(xs + 0.2, np.nan_to_num(kp), 0.4, label="weighted kappa")
        axes[1].axhline(val["thresholds"]["spearman"], color="red", ls="--", lw=1, label="trust bar")
        axes[1].set_xticks(xs, CRITERIA)
        axes[1].set_ylim(-1, 1)
        axes[1].set_title("Judge agreement with author-written labels\non constructed cases (NaN drawn as 0)",
                          fontsize=10)
        axes[1].legend(fontsize=8)
    save(fig, path)


def plot_alpha(grid: Mapping[str, float], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    xs = [float(a) for a in grid]
    ax.plot(xs, list(grid.values()), marker="o")
    ax.set_xlabel("alpha (weight of the LLM)")
    ax.set_ylabel("NDCG@10")
    ax.set_title("Score mode: sensitivity to alpha (test users; not used for tuning)")
    save(fig, path)


def write_plots(run_dir: Path, metrics: Mapping[str, Any], results: Mapping[str, Any]) -> list[str]:
    made = []
    jobs = [("metrics.png", lambda p: plot_metrics(metrics["rows"], p)),
            ("diffs.png", lambda p: plot_diffs(metrics["rows"], metrics["best_baseline"], p)),
            ("latency.png", lambda p: plot_latency(results, p)),
            ("checks.png", lambda p: plot_checks(metrics["explanation_checks"], p)),
            ("judge.png", lambda p: plot_judge(metrics["judge"], p))]
    if "skipped" not in metrics["position_bias"]:
        jobs.append(("position_bias.png", lambda p: plot_position_bias(metrics["position_bias"], p)))
    if metrics["score"].get("alpha_sensitivity_test"):
        jobs.append(("alpha.png", lambda p: plot_alpha(metrics["score"]["alpha_sensitivity_test"], p)))
    for name, fn in jobs:
        path = run_dir / name
        path.unlink(missing_ok=True)
        fn(path)
        if path.exists():
            made.append(name)
    return made


def write_report(run_dir: Path, metrics: dict[str, Any], results: Mapping[str, Any]) -> Path:
    plots = write_plots(run_dir, metrics, results)
    (run_dir / "metrics.json").write_text(json.dumps(no_nan(metrics), indent=2, default=str, allow_nan=False) + "\n")
    path = run_dir / "report.md"
    path.write_text(markdown(metrics, plots))
    return path


def _row_line(name: str, r: Mapping[str, Any]) -> str:
    d1 = r.get("diff_vs_retrieval", {}).get("ndcg@10")
    d2 = r.get("diff_vs_best_baseline", {}).get("ndcg@10")
    return (f"| {name} | {r['n']} | {_fmt(r['ndcg@10'])} | {_fmt(r['recall@10'])} | {_fmt(d1, True)} | "
            f"{_fmt(d2, True)} |")


def markdown(m: Mapping[str, Any], plots: Sequence[str]) -> str:
    prov = m.get("provenance", {})
    judge = m["judge"]
    val = judge["validity"]
    lines = [f"# Offline evaluation: {prov.get('catalog', '')}, {m['users']} test users, seed {prov.get('seed')}",
             "", f"Command: `{prov.get('command', '')}`", "",
             f"Split: {prov.get('split', {}).get('description', 'not recorded')}.", "",
             "| system | users | NDCG@10 [95% CI] | Recall@10 [95% CI] | Δ NDCG@10 vs retrieval order | "
             f"Δ NDCG@10 vs best baseline ({m['best_baseline']}) |", "|---|---|---|---|---|---|"]
    lines += [_row_line(n, r) for n, r in m["rows"].items() if r["group"] != "ablation"]
    lines += ["", f"**Judge: {'trustworthy' if val.get('trustworthy') else 'NOT trustworthy'}.** {val['verdict']}", ""]
    checks = m["explanation_checks"]
    if m.get("llm_reason_share"):
        lines.append("Share of served reasons written by the LLM (the rest are metadata templates): " + "; ".join(
            f"{s} {v:.0%}" for s, v in m["llm_reason_share"].items()) + ".")
    if checks:
        lines.append("Explanations failing at least one code check: " + "; ".join(
            f"{s} {c['rates']['any']:.0%} (n={c['rates']['n']})" for s, c in checks.items()) + ".")
    chat = m["chat"]
    if "skipped" in chat:
        lines.append(f"Chat simulation: {chat['skipped']}.")
    else:
        key = f"success@{chat['max_turns']}"
        lines.append("Chat simulation: " + "; ".join(f"{a} {key} {_fmt(r.get(key))}"
                                                     for a, r in (chat.get("results") or {}).items()) + ".")
    lines += ["", f"All intervals are percentile bootstrap 95% intervals over users ({m['n_boot']} resamples, seed "
              f"{m['seed']}); Δ are paired bootstrap differences over the same users. Rows over a "
              "subset of users are compared on that subset. NDCG@10 and Recall@10 are of the single held-out item;"
              " LLM rows reorder the retrieved top-20, so the target must have been retrieved to count.", ""]
    if "metrics.png" in plots:
        lines += ["## Metrics", "", "![metrics](metrics.png)", ""]
    lines += ["### All rows, ablations included", "", "| system | users | NDCG@10 [95% CI] | Recall@10 [95% CI] | "
              "Δ NDCG@10 vs retrieval order | Δ NDCG@10 vs best baseline |", "|---|---|---|---|---|---|"]
    lines += [_row_line(n, r) for n, r in m["rows"].items()] + [""]
    if "diffs.png" in plots:
        lines += ["![paired differences](diffs.png)", ""]
    sc = m["score"]
    lines += ["## Score mode", "", f"- alpha in use: {sc['alpha']} (from the index's rerank.json, default 0: the final "
              f"list then equals the retrieval order); permutations {sc['perms']}, calibration {sc['calibrate']}",
              f"- rates: {json.dumps({k: round(v, 4) for k, v in (sc.get('rates') or {}).items()})}", ""]
    if "alpha.png" in plots:
        lines += ["![alpha sensitivity](alpha.png)", "", "Sensitivity only: alpha is never chosen on test users.", ""]
    if "position_bias.png" in plots:
        lines += ["## Position bias", "", "A validation user's held-out item is moved to fixed slots among its "
                  "other candidates; the curve is how often the LLM then ranks it first (a diagnostic of the "
                  "model, which is why it may see the held-out item).", "", "![position bias](position_bias.png)", ""]
    lines += ["## Explanations: code checks (no LLM)", "",
              "| system | n | " + " | ".join(xc.CHECKS) + " | any |", "|---|---|" + "---|" * (len(xc.CHECKS) + 1)]
    for s, c in checks.items():
        lines.append(f"| {s} | {c['rates']['n']} | " + " | ".join(f"{c['rates'][k]:.0%}" for k in (*xc.CHECKS, "any"))
                     + " |")
    gl = m.get("generate_lists") or {}
    if gl:
        lines += ["", "Generate mode, raw model lists before the reranker's guards: " + ", ".join(
            f"{k} {v:.1%}" for k, v in gl.items()) + "."]
    ef = m.get("explain_failures", {})
    lines += ["", f"Explanation passes that failed: {ef.get('failures', 0)} of {ef.get('users', 0)} users.", ""]
    if "checks.png" in plots:
        lines += ["![checks](checks.png)", ""]
    for s, c in checks.items():
        for ex in c["examples"][:3]:
            lines.append(f"- {s}, item {ex['item_id']}: \"{ex['reason']}\" -> " + "; ".join(
                f"{v['check']}: {v['detail']}" for v in ex["violations"]))
    lines += ["", "## LLM-as-judge", ""]
    if "skipped" in judge:
        lines += [f"Not run: {judge['skipped']}.", ""]
    else:
        meta = judge["meta"]
        lines += [f"- judge: {meta['backend']} / {meta['model']}, temperature {meta['temperature']}, prompts "
                  + ", ".join(f"{k} ({v})" for k, v in meta["prompts"].items())
                  + f", reasons clipped to {meta['reason_chars']} characters; failures {judge['failures']}", ""]
        if prov.get("judge", {}).get("same_as_recommender"):
            lines += ["The judge is the same model that wrote the explanations: set RECAGENT_JUDGE_LLM, "
                      "RECAGENT_JUDGE_MODEL and RECAGENT_JUDGE_URL to judge with another one.", ""]
        lines += [
                  "| system | n | " + " | ".join(CRITERIA) + " |", "|---|---|" + "---|" * len(CRITERIA)]
        for s, r in judge["rubric"].items():
            lines.append(f"| {s} | {r['n']} | " + " | ".join(_fmt(r[c], digits=2) for c in CRITERIA) + " |")
        pw = judge["pairwise"]
        lines += ["", f"Pairwise, {pw['a']} (a) vs {pw['b']} (b), each pair judged in both orders: n={pw['n']}, "
                  f"consistency rate {pw['consistency_rate']:.0%}, a wins {pw['a_wins']}, b wins {pw['b_wins']}, "
                  f"ties {pw['ties']}, inconsistent {pw['inconsistent']}; net preference for a "
                  f"{_fmt(pw['net_preference_a'], True, 2)}; longer explanation wins {pw['longer_wins_rate']:.0%} of "
                  f"decisive verdicts; length-matched pairs: n={pw['length_matched']['n']}, a win rate "
                  f"{pw['length_matched']['a_win_rate']:.0%}.", ""]
    lines += [f"### Judge validity ({LABELS_DESCRIPTION}, eval/data/judge_labels.jsonl)", ""]
    if "skipped" in val:
        lines += [val["verdict"], ""]
    else:
        lines += [f"{val['n_judged']} of {val['n_labels']} labelled explanations judged (failures "
                  f"{val['judge_failures']}). The explanations and their labels were written by the evaluation's "
                  "author to span good and bad cases (one labeller, no inter-annotator figure); the figures below "
                  "are the judge's agreement with those author-written labels on constructed cases, not with "
                  "users' or outside raters' judgements.", "",
                  "| criterion | Spearman with author labels [95% CI] | weighted kappa with author labels | exact | "
                  "distinct judge scores |", "|---|---|---|---|---|"]
        for c in CRITERIA:
            a = val[c]
            lines.append(f"| {c} | {a['spearman']:.2f} [{a['spearman_lo']:.2f}, {a['spearman_hi']:.2f}] | "
                         f"{a['kappa_quadratic']:.2f} | {a['exact']:.0%} | {a['judge_distinct_scores']} |")
        lines += ["", f"**{val['verdict']}**", ""]
    if "judge.png" in plots:
        lines += ["![judge](judge.png)", ""]
    if "skipped" not in chat:
        lines += ["## Chat simulation", "", "```", json.dumps(chat, indent=1, default=str)[:3000], "```", ""]
    lines += ["## Latency", ""]
    for k, v in m["latency"].items():
        if k == "chat_ms_per_turn":
            lines.append("- chat ms per turn: " + json.dumps(v))
        elif k != "stage_seconds":
            lines.append(f"- {k}: " + ", ".join(f"{a} {b:.2f}" if isinstance(b, float) else f"{a} {b}"
                                               for a, b in v.items()))
    lines.append("- stage seconds: " + json.dumps(m["latency"]["stage_seconds"]))
    if "latency.png" in plots:
        lines += ["", "![latency](latency.png)"]
    lines += ["", "## Provenance", "", "```json", json.dumps(prov, indent=1, default=str), "```", ""]
    return "\n".join(lines) + "\n"
