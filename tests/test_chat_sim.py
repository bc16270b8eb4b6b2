"""The simulated-user evaluation on the tiny catalogue (retrieval-only agent, so it is fast)."""

from __future__ import annotations

from agent.service import RecommenderService
from eval.chat_sim import GENRE_DESCRIPTIONS, OPENINGS, Episode, evaluate_chat, markdown, sample_users, summarise_agent
from retrieval.catalog import Catalog
from retrieval.index import Index


def test_simulator_never_reveals_the_target(tiny_catalog: Catalog) -> None:
    users = sample_users(tiny_catalog, 8, seed=1)
    assert users
    for user in users:
        title = str(tiny_catalog.item(user.target)["title"]).lower()
        for message in [user.opening(), *(user.answer(t) for t in range(2, 7))]:
            assert title not in message.lower() and user.target not in message.split()
        genres = [str(g) for g in tiny_catalog.item(user.target)["genres"]]  # type: ignore[attr-defined]
        # the first hint names one of the target's genres, or describes one in the simulator's words
        described = [p for g in genres for p in GENRE_DESCRIPTIONS.get(g, ())]
        assert user.hints and (any(g.lower() in user.hints[0].lower() for g in genres)
                               or any(p in user.hints[0] for p in described))
    # both kinds occur: the genre named, and described in words the rules' lexicon mostly lacks
    assert {any(p in u.hints[0] for ps in GENRE_DESCRIPTIONS.values() for p in ps) for u in users} == {True, False}


def test_simulated_users_vary_their_phrasing_reproducibly(tiny_catalog: Catalog) -> None:
    users = sample_users(tiny_catalog, 8, seed=1)
    again = sample_users(tiny_catalog, 8, seed=1)
    assert [(u.opening(), u.hints) for u in users] == [(u.opening(), u.hints) for u in again]  # seeded
    openings = {u.opening_template for u in users}
    assert len(openings) > 1 and any(t not in OPENINGS[:1] for t in openings)
    assert len({u.hints[0].split()[0] for u in users if u.hints}) > 1  # not one template for every user


def test_evaluate_chat_report(tiny_index: Index) -> None:
    payload = evaluate_chat(RecommenderService(tiny_index), n_users=6, max_turns=3, n_boot=50, k=2)
    assert set(payload["results"]) == {"retrieval_only"}  # no backend: the LLM agent is left out
    result = payload["results"]["retrieval_only"]
    assert 0.0 <= result["success@3"]["mean"] <= 1.0
    curve = result["success_by_turn"]
    assert len(curve) == 3 and curve == sorted(curve) and curve[-1] == result["success@3"]["mean"]
    assert len(payload["episodes"]["retrieval_only"]) == payload["users"] == 6
    text = markdown(payload, ["note"])
    assert "success@3" in text and "retrieval_only" in text


def test_validation_users_hold_validation_targets_and_settings_reach_both_agents(tiny_index: Index) -> None:
    from retrieval.splits import SplitSpec, split_catalog

    split = split_catalog(tiny_index.catalog, SplitSpec(seed=0))
    users = sample_users(tiny_index.catalog, 6, seed=0, part="validation")
    assert users and {(u.user_id, u.target) for u in users} <= {(c.user_id, c.target) for c in split.validation}
    payload = evaluate_chat(RecommenderService(tiny_index), n_users=3, max_turns=2, n_boot=20, k=2,
                            part="validation", settings={"together_weight": 0.0})
    assert payload["part"] == "validation" and payload["settings"] == {"together_weight": 0.0}
    assert "validation targets" in markdown(payload, []) and "together_weight" in markdown(payload, [])


def test_genres_the_llm_read_are_counted_against_the_target() -> None:
    episodes = [Episode("u1", 2, 2, [1.0, 1.0], ["rules", "both"], 0, [True]),
                Episode("u2", None, 3, [1.0] * 3, ["both", "llm", "rules"], 0, [False, True])]
    summary = summarise_agent(episodes, 3, n_boot=10)
    assert summary["llm_genre_turns"] == {"turns": 3, "in_target_genres": 2}
    assert summary["decided_by"] == {"rules": 2, "both": 2, "llm": 1}
