"""Training and validation examples for the trained ranker.

A training example is (a prefix of a user's *training* history, the retriever's top-``window`` candidates for
it, the index of the item that came next). Only ``Split.train`` reaches this module for training examples, so no
validation or test item of any user can enter an example. The retriever that builds them is fitted without the
example's own future: users are dealt into folds, and the candidates of a fold's users come from CF fitted on
the other folds' training histories (a retriever fitted on everyone's training part has memorised those
transitions: the next item was in its top-20 for 64% of training examples against 26% when serving).

When the next item was not retrieved it is put in (``insert_missing``) at a slot drawn from where retrieved
targets sit, displacing the window's last candidate, so an inserted target looks like a retrieved one (it takes
the retrieval score of the candidate it precedes). Without ``insert_missing`` such steps are dropped: the ranker
then learns only where serving can use it, inside a window that holds the next item.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from retrieval.cf import CFModels
from retrieval.index import Index
from retrieval.splits import Case


@dataclass(frozen=True)
class Example:
    user_id: str
    history: list[str]  # what the ranker sees, oldest first
    candidates: list[str]  # retrieval order
    target: int | None  # index of the next item among the candidates (None: not retrieved)
    inserted: bool = False
    scores: tuple[float, ...] = ()  # retrieval scores (the fusion with the ranker, and the residual loss, use them)


@dataclass
class ExampleStats:
    examples: int = 0
    retrieved: int = 0
    inserted: int = 0

    @property
    def hit_rate(self) -> float:
        return self.retrieved / self.examples if self.examples else 0.0


def user_folds(users: Sequence[str], folds: int, seed: int) -> dict[str, int]:
    order = sorted(users)
    random.Random(seed).shuffle(order)
    return {u: i % folds for i, u in enumerate(order)}


def training_examples(index: Index, train: Mapping[str, Sequence[str]], window: int, per_user: int = 8,
                      min_history: int = 3, folds: int = 4, seed: int = 0, insert_missing: bool = True,
                      fit: Callable[[Mapping[str, Sequence[str]]], CFModels] | None = None,
                      progress: bool = True) -> tuple[list[Example], ExampleStats]:
    """Examples from the last ``per_user`` next-item steps of each training history (``train`` must be the
    split's training part). ``fit`` fits CF on histories (default: the index's own fitting)."""
    fit = fit or index.fit_cf
    fold_of = user_folds(list(train), folds, seed)
    raw: list[Example] = []
    bar = tqdm(total=sum(min(per_user, max(0, len(h) - min_history)) for h in train.values()),
               desc="building ranker examples", unit="ex", disable=not progress)
    for fold in range(folds):
        others = {u: list(h) for u, h in train.items() if fold_of[u] != fold}
        retriever = index.retriever("fused", cf=fit(others))
        for user, hist in train.items():
            if fold_of[user] != fold:
                continue
            for t in range(max(min_history, len(hist) - per_user), len(hist)):
                found = retriever.retrieve(hist[:t], k=window)
                ids = [c.item_id for c in found]
                target = ids.index(hist[t]) if hist[t] in ids else None
                raw.append(Example(user, list(hist[:t]), ids, target, scores=tuple(c.score for c in found)))
                bar.update()
    bar.close()
    stats = ExampleStats(examples=len(raw), retrieved=sum(e.target is not None for e in raw))
    rng = random.Random(seed)
    slots = [e.target for e in raw if e.target is not None] or [0]
    out: list[Example] = []
    for e in raw:
        if e.target is None:
            if not insert_missing:
                continue
            slot = min(rng.choice(slots), len(e.candidates))
            nxt = train[e.user_id][len(e.history)]
            cands = (e.candidates[:slot] + [nxt] + e.candidates[slot:])[:window]
            filler = e.scores[min(slot, len(e.scores) - 1)] if e.scores else 0.0
            scores = (e.scores[:slot] + (filler,) + e.scores[slot:])[:window]
            e = Example(e.user_id, e.history, cands, slot, inserted=True, scores=scores)
            stats.inserted += 1
        out.append(e)
    rng.shuffle(out)
    return out, stats


def evaluation_examples(index: Index, cases: Sequence[Case], fit_histories: Mapping[str, Sequence[str]],
                        window: int) -> list[Example]:
    """Validation (or test) users as the ranker will see them when serving: CF fitted on what the part may see,
    the top-``window`` candidates, the target's index when it was retrieved (used only for metrics)."""
    retriever = index.retriever("fused", cf=index.fit_cf(fit_histories))
    out = []
    for case in cases:
        cands = retriever.retrieve(case.history, k=window)
        ids = [c.item_id for c in cands]
        out.append(Example(case.user_id, list(case.history), ids,
                           ids.index(case.target) if case.target in ids else None,
                           scores=tuple(c.score for c in cands)))
    return out
