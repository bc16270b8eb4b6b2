"""Paired, per user: the served retriever (the live index's weights, SASRec epochs and start) minus a configuration
served before it, on all 943 users of each part of ML-100k (ties in time broken at random, seed 0). SASRec is trained
on each part's training histories on this host (no held-out item reaches it; one fit per distinct recipe); the other
sources' lists are shared.

- ``--compare sasrec-start`` (default): against GPT-2's random init, 17 epochs, sequential 1, SLIT .5, SASRec 1.5,
  EASE 1, content .2 (the configuration before SASRec started from the tuned encoder's item vectors) ->
  reports/sasrec-start-paired-movielens-100k.json.
- ``--compare weight-grid``: the same SASRec, weighted as the coarse grid chose (sequential 1, SLIT 1, SASRec 1.5,
  EASE 1, content 0, MostPop 0) before the finer grid of ``eval retrieval --tune`` -> reports/weight-grid-paired-
  movielens-100k.json.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/sasrec_start_paired.py [--compare weight-grid]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from eval import retrieval_eval as rv
from eval.machine import machine_line
from eval.metrics import paired_bootstrap_diff, per_user_table
from retrieval.catalog_store import ensure_catalog
from retrieval.index import load_index, position_histories
from retrieval.sasrec import SASRecConfig, fit_sasrec
from retrieval.splits import SplitSpec, split_catalog

BEFORE_WEIGHTS = {"content": 0.2, "ease": 1.0, "mostpop": 0.0, "sasrec": 1.5, "sequential": 1.0, "slit": 0.5}
COARSE_WEIGHTS = {"content": 0.0, "ease": 1.0, "mostpop": 0.0, "sasrec": 1.5, "sequential": 1.0, "slit": 1.0}
OUT = {"sasrec-start": Path("reports/sasrec-start-paired-movielens-100k.json"),
       "weight-grid": Path("reports/weight-grid-paired-movielens-100k.json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", choices=sorted(OUT), default="sasrec-start")
    compare = parser.parse_args().compare
    torch.set_num_threads(2)
    catalog = ensure_catalog("movielens-100k")
    index = load_index(catalog)
    spec = SplitSpec(ties="random", seed=0)
    split = split_catalog(catalog, spec)
    cf = index.manifest.cf
    served = cf.sasrec.model_copy(update={"epochs": cf.sasrec_epochs, "max_minutes": math.inf})
    before = ((SASRecConfig(init_scale=0.0, epochs=17, max_minutes=math.inf), False, BEFORE_WEIGHTS)
              if compare == "sasrec-start" else (served, True, COARSE_WEIGHTS))
    variants = {"before": before, "now": (served, True, dict(index.manifest.fusion.weights))}
    report: dict[str, Any] = {"split": spec.provenance(), "machine": machine_line(), "command": (
        "HF_HUB_OFFLINE=1 .venv/bin/python scripts/sasrec_start_paired.py --compare " + compare),
        "weights": {name: w for name, (_, _, w) in variants.items()}}
    for part in rv.PARTS:
        shared = rv.collect_lists(index, split, part, progress=False, cf_config=rv.without_sasrec(cf))
        histories = position_histories(catalog, split.fit_histories(part))
        tables, fitted = {}, {}
        for name, (config, content_start, weights) in variants.items():
            key = (config.model_dump_json(), content_start)
            if key not in fitted:
                model, _ = fit_sasrec(histories, catalog.n_items, config, progress=False,
                                      item_vectors=index.item_vectors if content_start else None)
                fitted[key] = rv.with_sasrec_lists(index, split, part, shared, cf, model, config.epochs)
            tables[name] = per_user_table(fitted[key].ranks(weights))
        report[part] = {}
        for metric in ("ndcg@10", "recall@50"):
            mean, lo, hi = paired_bootstrap_diff(tables["now"][metric], tables["before"][metric], n_boot=1000, seed=0)
            report[part][metric] = {"now": float(tables["now"][metric].mean()),
                                    "before": float(tables["before"][metric].mean()),
                                    "now_minus_before": mean, "lo": lo, "hi": hi, "users": len(tables["now"][metric])}
        OUT[compare].write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))  # noqa: T201


if __name__ == "__main__":
    main()
