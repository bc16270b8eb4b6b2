"""Leave-last-out split: per user, last interaction = test, second-last = validation, the rest = train."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    user_id: str
    history: list[str]  # what inference may see
    target: str  # the held-out item (never passed to inference)


@dataclass(frozen=True)
class Split:
    train: dict[str, list[str]]
    validation: list[Case]
    test: list[Case]

    def fit_histories(self, part: str) -> dict[str, list[str]]:
        """Interactions a model may be fitted on when evaluating ``part``: train for validation,
        train + validation for test."""
        if part == "validation":
            return self.train
        if part == "test":
            val = {c.user_id: c.target for c in self.validation}
            return {u: h + [val[u]] if u in val else h for u, h in self.train.items()}
        raise ValueError(f"unknown split part '{part}' (choose validation or test)")

    def cases(self, part: str) -> list[Case]:
        if part == "validation":
            return self.validation
        if part == "test":
            return self.test
        raise ValueError(f"unknown split part '{part}' (choose validation or test)")


def leave_last_out(histories: Mapping[str, Sequence[str]], min_train: int = 1) -> Split:
    """Users with fewer than ``min_train + 2`` interactions stay in train only."""
    train: dict[str, list[str]] = {}
    validation: list[Case] = []
    test: list[Case] = []
    for user, items in histories.items():
        items = list(items)
        if len(items) < min_train + 2:
            train[user] = items
            continue
        train[user] = items[:-2]
        validation.append(Case(user, items[:-2], items[-2]))
        test.append(Case(user, items[:-1], items[-1]))
    return Split(train=train, validation=validation, test=test)
