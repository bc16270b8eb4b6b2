"""Leave-last-out split: per user, last interaction = test, second-last = validation, the rest = train.

A split is made from a catalogue's time-ordered histories under a :class:`SplitSpec`, which names how ties in
time are broken (see ``Catalog.sorted_interactions``) and is recorded in every report that uses the split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from retrieval.catalog import TIE_RULES, Catalog, check_ties, describe_order


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


class SplitSpec(BaseModel):
    """How a split is made from a catalogue: the provenance every report states."""

    model_config = ConfigDict(frozen=True)

    ties: str = "random"
    seed: int = 0
    protocol: str = "leave-last-out by time"

    @field_validator("ties")
    @classmethod
    def _known_rule(cls, ties: str) -> str:
        return check_ties(ties)

    def describe(self) -> str:
        """One line for reports."""
        return f"{describe_order(self.ties, self.seed)}; last = test, second-last = validation"

    def provenance(self) -> dict[str, Any]:
        """The spec and its description, for JSON reports."""
        return {**self.model_dump(), "description": self.describe()}

    def other_rule(self) -> SplitSpec:
        """The same spec under the other tie rule (for sensitivity rows)."""
        (other,) = (t for t in TIE_RULES if t != self.ties)
        return self.model_copy(update={"ties": other})


def split_catalog(catalog: Catalog, spec: SplitSpec | None = None) -> Split:
    """The leave-last-out split of ``catalog``'s histories ordered as ``spec`` says (default: SplitSpec())."""
    spec = spec or SplitSpec()
    return leave_last_out(catalog.histories(spec.ties, spec.seed))
