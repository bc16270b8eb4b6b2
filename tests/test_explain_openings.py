"""A reason that says "like <history item>, it ..." claims what follows of both items; where the two share no
genre, the reason names the link instead and speaks of the recommended item alone."""

from __future__ import annotations

from agent import explanation_checks as xc
from agent.explain import Explainer
from agent.llm.base import TextRequest
from agent.rerank import RankInput
from retrieval.evidence import Link
from tests.fakes import ScriptedBackend

TOY_STORY = RankInput("1", "Toy Story (1995)", "", genres=["Animation", "Children's", "Comedy"], year=1995)
LION_KING = RankInput("71", "Lion King, The (1994)", "", genres=["Animation", "Children's", "Musical"], year=1994)
ALADDIN = RankInput("95", "Aladdin (1992)", "", 0.9, genres=["Animation", "Children's", "Comedy"], year=1992)
BABE = RankInput("8", "Babe (1995)", "", 0.6, genres=["Children's", "Comedy", "Drama"], year=1995)
HEAT = RankInput("6", "Heat (1995)", "", 0.8, genres=["Action", "Crime", "Thriller"], year=1995)
LINKS = {"95": Link("95", "1", "cf", 1.0), "8": Link("8", "71", "cf", 1.0), "6": Link("6", "1", "cf", 1.0)}


class Says(ScriptedBackend):
    """Continues every reason with the same words."""

    def __init__(self, words: str) -> None:
        super().__init__()
        self.words = words

    def complete(self, request: TextRequest) -> str:
        return self.words


def test_openings_follow_what_the_two_items_share() -> None:
    jobs = {j.item.item_id: j for j in Explainer(None, None).requests([TOY_STORY, LION_KING], [ALADDIN, BABE, HEAT],
                                                                       LINKS)}
    assert jobs["95"].request.answer_prefix.endswith("You may enjoy Aladdin because, like Toy Story, it")
    assert jobs["8"].request.answer_prefix.endswith("You may enjoy Babe because, like The Lion King, it")
    assert jobs["6"].request.answer_prefix.endswith("You may enjoy Heat, watched by the same people as Toy Story: it")
    # after "like", only the shared genres may be named: Babe's comedy and drama are not The Lion King's
    assert jobs["8"].facts.genres == ("Children's",)
    assert {"comedy", "drama"} <= set(jobs["8"].request.banned) and "children's" not in jobs["8"].request.banned
    # without "like", the item's own genres (without an index, the only genres known are the item's)
    assert jobs["6"].facts.genres == ("Action", "Crime", "Thriller") and not jobs["6"].request.banned


def test_a_claim_about_the_item_alone_fails_after_like() -> None:
    says = Explainer(Says("is a comedy film"), None)
    reasons = {r.item_id: r for r in says.stream([TOY_STORY], [ALADDIN])}
    reasons |= {r.item_id: r for r in says.stream([LION_KING], [BABE])}  # linked by their one shared genre
    assert reasons["95"].source == "llm"  # Toy Story is a comedy too
    assert reasons["8"].source == "template"  # The Lion King is not
    assert reasons["8"].rejected is not None and reasons["8"].rejected.startswith("genre_claim")
    assert reasons["8"].rejected.endswith("[checked against what it shares with The Lion King]")
    assert reasons["8"].draft == "You may enjoy Babe because, like The Lion King, it is a comedy film."
    explainer = Explainer(Says("is a crime thriller"), None)
    (job,) = explainer.requests([TOY_STORY], [HEAT], LINKS)  # a CF link: Heat shares no genre with Toy Story
    (heat,) = explainer._decode([TOY_STORY], [job], None)
    assert heat.source == "llm", heat.rejected
    assert heat.reason == "You may enjoy Heat, watched by the same people as Toy Story: it is a crime thriller."


def test_shared_facts_and_love_stories() -> None:
    babe, lion = (xc.make_facts({"item_id": i.item_id, "title": i.title, "genres": i.genres, "year": i.year})
                  for i in (BABE, LION_KING))
    shared = xc.shared_facts(babe, lion)
    assert shared.genres == ("Children's",) and shared.years == () and shared.title == babe.title
    assert {"love story", "romantic"} <= set(xc.genre_words("Romance"))


def test_genres_left_without_their_noun_get_one() -> None:
    """The token limit (or the model) stops after the genres ("it is an action"): the noun is added, once."""
    casino = RankInput("1008", "Casino (1995)", "", genres=["Crime", "Drama"], year=1995)
    says = Explainer(Says("is a crime"), None)
    (reason,) = list(says.stream([casino], [HEAT]))
    assert (reason.source, reason.reason) == ("llm", "You may enjoy Heat because, like Casino, it is a crime film.")
    explainer = Explainer(None, None)
    names = ["action", "crime", "comedy"]
    assert explainer.finish("It", "is an action and crime", names) == "It is an action and crime film."
    assert explainer.finish("It", "is a comedy", names) == "It is a comedy film."
    assert explainer.finish("It", "is a comedy film", names) == "It is a comedy film."
    assert explainer.finish("It", "is a crime story", names) == "It is a crime story."
    assert explainer.finish("It", "is a classic", names) == "It is a classic."
