"""The thread governor: measured choice between one thread and all of them, per kind of forward pass."""

from __future__ import annotations

import pytest

from agent.llm.threads import LARGE_PASS_TOKENS, SHORT_PASS_TOKENS, ThreadGovernor, pass_kind


def _run(governor: ThreadGovernor, kind: str, seconds_per_token: dict[int, float], passes: int) -> list[int]:
    chosen = []
    for _ in range(passes):
        n = governor.choose(kind)
        governor.record(kind, n, 100, 100 * seconds_per_token[n])
        chosen.append(n)
    return chosen


def test_tries_both_then_keeps_the_faster_and_re_explores() -> None:
    governor = ThreadGovernor(2, explore_every=10)
    chosen = _run(governor, "small", {1: 0.001, 2: 0.002}, 40)
    assert chosen[:4] == [2, 2, 1, 1]  # a warm-up and a measured pass each, most threads first
    steady = chosen[4:]
    assert steady.count(1) > 0.8 * len(steady) and 2 in steady  # mostly the faster, the other re-tried
    assert governor.snapshot()["small"] == {1: pytest.approx(1.0), 2: pytest.approx(2.0)}


def test_follows_a_change_of_load() -> None:
    governor = ThreadGovernor(2, explore_every=5, max_explore_every=5)
    assert _run(governor, "small", {1: 0.002, 2: 0.001}, 30)[-12:].count(1) == 2  # one re-try in every 6 passes
    # another process takes a core: two threads become slow, one thread wins
    assert _run(governor, "small", {1: 0.002, 2: 0.010}, 30)[-12:].count(2) == 2


def test_confirmed_choices_are_re_tried_less_often() -> None:
    governor = ThreadGovernor(2, explore_every=4, max_explore_every=64)
    chosen = _run(governor, "small", {1: 0.001, 2: 0.003}, 200)
    retries = [i for i, n in enumerate(chosen) if n == 2 and i >= 4]
    gaps = [b - a for a, b in zip(retries, retries[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[-1] > 4 * gaps[0], gaps


def test_kinds_are_measured_separately() -> None:
    governor = ThreadGovernor(2, explore_every=50)
    _run(governor, "small", {1: 0.001, 2: 0.002}, 10)
    _run(governor, "large", {1: 0.002, 2: 0.001}, 10)
    assert governor.choose("small") == 1 and governor.choose("large") == 2
    assert pass_kind(LARGE_PASS_TOKENS - 1) == "small" and pass_kind(LARGE_PASS_TOKENS) == "large"
    assert pass_kind(SHORT_PASS_TOKENS - 1) == "short" and pass_kind(SHORT_PASS_TOKENS) == "small"


def test_one_thread_machines_have_nothing_to_choose() -> None:
    governor = ThreadGovernor(1)
    assert {governor.choose("small") for _ in range(5)} == {1}
    with pytest.raises(ValueError, match="max_threads"):
        ThreadGovernor(0)
