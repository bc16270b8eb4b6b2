"""Code checks of explanations (no LLM): claims against metadata, evidence, emptiness, repetition, list rates;
and the shape of the shipped set of author-written reference labels on constructed cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import explanation_checks as xc

FACTS = {f.item_id: f for f in [
    xc.make_facts({"item_id": "50", "title": "Star Wars (1977)", "year": 1977,
                   "genres": ["Action", "Adventure", "Romance", "Sci-Fi", "War"]}),
    xc.make_facts({"item_id": "1", "title": "Toy Story (1995)", "year": 1995,
                   "genres": ["Animation", "Children's", "Comedy"]}),
    xc.make_facts({"item_id": "202", "title": "Groundhog Day (1993)", "year": 1993, "genres": ["Comedy", "Romance"]}),
    xc.make_facts({"item_id": "183", "title": "Alien (1979)", "year": 1979,
                   "genres": ["Action", "Horror", "Sci-Fi", "Thriller"],
                   "description": "A tense voyage: the crew of a spaceship in deep space meets a deadly creature."}),
    xc.make_facts({"item_id": "181", "title": "Return of the Jedi (1983)", "year": 1997,
                   "genres": ["Action", "Adventure", "Romance", "Sci-Fi", "War"],
                   "description": "The rebels' space adventure ends on the forest moon."}),
    xc.make_facts({"item_id": "127", "title": "Godfather, The (1972)", "year": 1972,
                   "genres": ["Action", "Crime", "Drama"]}),
]}
HISTORY = ["50", "1", "202", "127"]


def checks(item: str, reason: str, evidence: list[str] | None = None, history: list[str] | None = None) -> set[str]:
    hist = HISTORY if history is None else history
    return {v.check for v in xc.check_explanation(hist, item, reason, evidence or [], FACTS)}


def test_a_faithful_grounded_reason_passes() -> None:
    assert checks("183", "Because you liked Star Wars (1977), Alien is a 1979 sci-fi thriller set in space.",
                  ["50"]) == set()


def test_genre_claims_about_the_item_are_checked_against_its_metadata() -> None:
    assert "genre_claim" in checks("183", "Because you liked Groundhog Day, Alien is a romantic comedy.", ["202"])
    # the same genres, said of the history item in the clause that names it, are fine
    assert checks("183", "Because you liked the romantic comedy Groundhog Day, Alien is a tense thriller.",
                  ["202"]) == set()


def test_titles_are_not_read_as_claims() -> None:
    # "Star Wars" is no War claim, "(1977)" and "Godfather" no year or crime claim of the item
    assert checks("183", "Fans of Star Wars (1977) and The Godfather will like this horror film.", ["50", "127"]) \
        == set()


def test_content_words_must_come_from_the_items_text() -> None:
    # nothing in Alien's metadata speaks of a dystopian future, nor in Star Wars' (the item the clause compares with)
    found = xc.check_explanation(HISTORY, "183", "You may enjoy Alien because, like Star Wars, it's a film about a "
                                 "dystopian future.", ["50"], FACTS)
    assert [v.check for v in found] == ["content_claim"] and "dystopian" in found[0].detail
    # the same sentence shape, with words of Alien's own description, passes
    assert checks("183", "You may enjoy Alien because, like Star Wars, it's a film about a spaceship crew.",
                  ["50"]) == set()
    # a word said of the compared item holds only in the clause that names it
    assert checks("183", "You may enjoy Alien because, like Return of the Jedi with its rebels, it is set in space.",
                  ["181"], HISTORY + ["181"]) == set()
    assert "content_claim" in checks("183", "You may enjoy Alien because it is about rebels.", ["50"])


@pytest.mark.parametrize("reason", ["You may enjoy Alien because, like Star Wars, it's a film about a young.",
                                    "You may enjoy Alien because, like Star Wars, it is.",
                                    "You may enjoy Alien because, like Star Wars, it's a film about a crew who."])
def test_sentences_cut_off_mid_way_are_incomplete(reason: str) -> None:
    assert "incomplete" in checks("183", reason, ["50"])


@pytest.mark.parametrize("reason", ["You may enjoy Alien because, like Star Wars, it's a film.",
                                    "You may enjoy Alien because, like Star Wars, it is a film from the decade."])
def test_a_reason_that_claims_nothing_fails(reason: str) -> None:
    assert checks("183", reason, ["50"]) == {"says_nothing"}
    assert checks("183", reason.replace("a film", "a sci-fi film"), ["50"]) == set()


def test_genres_inside_a_compound_are_claims() -> None:
    assert xc.genre_claims("a comedy-drama film", ["Comedy", "Drama", "Horror"]) == {"comedy", "drama"}
    assert xc.genre_claims("a sci-fi film", ["Sci-Fi", "Horror"]) == {"sci-fi"}
    assert "genre_claim" in checks("183", "You may enjoy Alien because, like Star Wars, it's a comedy-horror film.",
                                   ["50"])
    assert checks("183", "You may enjoy Alien because, like Star Wars, it's a sci-fi-action film.", ["50"]) == set()


def test_year_and_decade_claims() -> None:
    assert "year_claim" in checks("183", "Because you liked Star Wars, Alien is a 1985 sci-fi film.", ["50"])
    assert "year_claim" in checks("183", "Alien is a 90s sci-fi horror film for you.", ["50"])
    assert checks("183", "Alien is a late-1970s sci-fi horror film for you.", ["50"]) == set()
    # re-releases: the metadata year (1997) and the title year (1983) both count
    assert checks("181", "A 1983 space adventure like the one you watched.", ["50"]) == set()


def test_evidence_outside_history_already_seen_and_unknown_items() -> None:
    assert "evidence_not_in_history" in checks("183", "A tense sci-fi horror film in space.", ["181"])
    assert "already_seen" in checks("50", "You will enjoy this space adventure again.", ["50"])
    assert "unknown_item" in checks("999", "A film you will enjoy, trust me.", [])
    assert "unknown_history_item" in checks("183", "A tense sci-fi horror film in space.", [], ["50", "nope"])


@pytest.mark.parametrize("reason", ["", "  ", "Good.", "ok ok", "!!!!!!!!!!!!!!"])
def test_empty_reasons(reason: str) -> None:
    assert "empty" in checks("183", reason)


@pytest.mark.parametrize("reason", ["Alien Alien Alien is a film.", "a great film a great film for you",
                                    "good film good film good film good film"])
def test_repetition(reason: str) -> None:
    assert "repetition" in checks("183", reason)


def test_list_checks_and_rates() -> None:
    counts = xc.list_checks(["a", "b", "a", "h1", "zz"], history=["h1"], allowed=["a", "b", "h1"])
    assert counts == {"items": 5, "invalid": 1, "duplicates": 1, "already_seen": 1}
    rates = xc.list_rates([counts, {"items": 5, "invalid": 0, "duplicates": 0, "already_seen": 0}], [True, False])
    assert rates["invalid_rate"] == pytest.approx(0.1) and rates["invalid_output_rate"] == 0.5
    v = [xc.check_explanation(HISTORY, "183", "Good.", [], FACTS), []]
    r = xc.violation_rates(v)
    assert r["empty"] == 0.5 and r["any"] == 0.5 and r["genre_claim"] == 0.0


LABELS = Path(__file__).resolve().parents[1] / "eval" / "data" / "judge_labels.jsonl"


def test_the_author_labelled_reference_set_is_well_formed() -> None:
    rows = [json.loads(line) for line in LABELS.read_text().splitlines() if line.strip()]
    assert 35 <= len(rows) <= 60
    assert (LABELS.parent / "LABELING_GUIDE.md").exists()
    for r in rows:
        assert set(r["labels"]) == {"relevance", "faithfulness", "specificity", "persuasiveness"}
        assert all(isinstance(v, int) and 1 <= v <= 5 for v in r["labels"].values())
        assert isinstance(r["history"], list) and r["history"] and isinstance(r["item_id"], str)
    for criterion in ("relevance", "faithfulness", "specificity", "persuasiveness"):
        assert len({r["labels"][criterion] for r in rows}) >= 3  # the set spans good and bad cases


def test_catalogue_style_titles_with_colons_and_articles_are_removed_before_checking() -> None:
    facts = dict(FACTS)
    lost = xc.make_facts({"item_id": "252", "title": "Lost World: Jurassic Park, The (1997)", "year": 1997,
                          "genres": ["Action", "Adventure", "Sci-Fi", "Thriller"]})
    facts["252"] = lost
    found = xc.check_explanation(["252"], "183", "Because you liked Lost World: Jurassic Park, The (1997): it is "
                                 "also Action, Sci-Fi, Thriller.", ["252"], facts)
    assert found == []
