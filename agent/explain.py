"""Per-item reasons for a ranked list: chosen evidence, one short LLM sentence each, decoded as one batch.

For every item the evidence comes first, from the system's own signals (:mod:`retrieval.evidence`: the history
item with the strongest item-item CF weight to it, else the most similar embedding). The LLM then writes one
sentence about that given pair (``prompts/explain_item.*``): the prompt's shared part (instructions and the
user's history) is the same for every item, so the backend computes it once and decodes all the items' sentences
together (``LLMBackend.complete_batch``). The answer prefix names the evidence, so every sentence names it: "You
may enjoy X because, like Y, it" where the two share a genre (what the model adds is then a claim about both, and
is checked against what they share), else "You may enjoy X, watched by the same people as Y: it" (a claim about X).

Each LLM sentence is checked by code (:mod:`agent.explanation_checks`: genre and year claims, evidence inside the
history, known items) before it is served; a sentence that fails, or one the LLM did not finish before the
deadline, is replaced by a metadata sentence (:func:`template_reason`). Every item says who wrote its reason
(``reason_source``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

import prompts
from agent import explanation_checks as xc
from agent.llm.base import LLMBackend, TextRequest
from agent.reason_text import because_you_liked
from agent.schemas import RecommendationAnswer
from retrieval.evidence import Link, strongest_links
from retrieval.item_text import natural_title

if TYPE_CHECKING:
    from agent.rerank import RankInput
    from retrieval.index import Index

logger = logging.getLogger(__name__)
ReasonSource = Literal["llm", "template"]
#: last words dropped from a sentence the token limit cut: those that leave it unfinished (the checks' list),
#: "released" / "made" before a year the model may not write, and "sci", the first token of "sci-fi"
DANGLING = xc.UNFINISHED | {"released", "made", "sci"}
#: an article and the genre names after it that end a sentence ("an action and crime")
_BARE_GENRES = re.compile(r"\b(?:an?)\s+(?P<genres>[\w'-]+(?:(?:,\s*|\s+(?:and|or)\s+)[\w'-]+)*)$", re.I)
LINK_WORDS = {"cf": "watched by the same people", "content": "similar in content"}
#: how a reason names the link when the two items share nothing it could say "like" about
LINKED_AS = {"cf": "watched by the same people as", "content": "close in content to"}


class ExplainConfig(BaseModel):
    prompt: str = Field(default="v3", description="version of prompts/explain_item.*.jinja (v2 and v3 name the "
                        "genres the two items share; v3 asks for them; chosen by `recagent eval explain --prompt`)")
    max_tokens: int = Field(default=8, ge=4, le=128, description="tokens the model may add to one sentence")
    first_batch: int = Field(default=1, ge=0, description="the top items decoded first on their own, so that the "
                             "first reason arrives early; the rest follow as one batch")
    text_chars: int = Field(default=80, ge=10, description="item text cut to this many characters in prompts")
    reason_chars: int = Field(default=220, ge=40, description="longest reason served")


@dataclass
class Job:
    """One item's sentence to write: the item, the history item it rests on, the link between them, the prompt,
    and the facts what the model adds must be true of (what the two share, after "like <evidence>, it")."""

    item: RankInput
    evidence: RankInput
    link: Link
    request: TextRequest
    facts: xc.ItemFacts
    shared: bool  # ``facts`` are what the item shares with the evidence


@dataclass
class Reason:
    """One item's reason, as the explainer produced it."""

    item_id: str
    reason: str
    evidence: list[str]
    source: ReasonSource
    rejected: str | None = None  # why an LLM sentence was replaced by the template (check that failed)
    draft: str | None = None  # that replaced LLM sentence


def _label(item: RankInput) -> str:
    return prompts.clean_text(natural_title(item.title) if item.title else item.text, 80)


def template_reason(item: RankInput, history: Sequence[RankInput], link: Link | None = None) -> tuple[str, list[str]]:
    """(reason, evidence ids) from metadata and the system's signals alone, no LLM: the linked history item
    (:mod:`retrieval.evidence`) when known, else the history item sharing most genres with the item."""
    by_id = {h.item_id: h for h in history}
    evidence = by_id.get(link.evidence) if link is not None else None
    if evidence is None:
        shared_most = _most_shared_genres(item, history)
        evidence = shared_most[0] if shared_most is not None else None
    if evidence is None:
        return "Often chosen by people with a history like yours.", []
    shared = [g for g in item.genres if g in set(evidence.genres)]
    cf = link is not None and link.evidence == evidence.item_id and link.signal == "cf"
    return because_you_liked(_label(evidence), shared, "cf" if cf else None) + ".", [evidence.item_id]


def _most_shared_genres(item: RankInput, history: Sequence[RankInput]) -> tuple[RankInput, int] | None:
    """The history item sharing most genres with ``item`` (the latest among ties), and how many; None if none."""
    best: tuple[RankInput, int] | None = None
    for h in history:
        overlap = len(set(h.genres) & set(item.genres))
        if overlap and (best is None or overlap >= best[1]):
            best = (h, overlap)
    return best


class Explainer:
    """Writes the reasons of a ranked list (see the module docstring)."""

    def __init__(self, backend: LLMBackend | None, index: Index | None, config: ExplainConfig | None = None) -> None:
        """``backend`` None: every reason comes from the templates."""
        self.backend = backend
        self.index = index
        self.config = config or ExplainConfig()

    def links(self, history: Sequence[RankInput], items: Sequence[RankInput]) -> dict[str, Link]:
        """Each item's evidence: from the index's CF and embeddings (:func:`retrieval.evidence.strongest_links`);
        for items outside the catalogue (or without an index), the history item sharing most genres."""
        links: dict[str, Link] = {}
        if self.index is not None:
            catalog = self.index.catalog
            links = strongest_links(self.index.cf, self.index.item_vectors, catalog.item_index, catalog.item_ids,
                                    [h.item_id for h in history], [i.item_id for i in items])
        for item in items:
            if item.item_id not in links:
                shared = _most_shared_genres(item, history)
                if shared is not None:
                    links[item.item_id] = Link(item.item_id, shared[0].item_id, "content", float(shared[1]))
        return links

    def _text(self, item: RankInput) -> str:
        """An item in the prompt: its title, then its genres and year as words."""
        facts = ", ".join(g.lower() for g in item.genres[:3])
        year = f" from {item.year}" if item.year else ""
        article = "an" if facts[:1] in ("a", "e", "i", "o", "u") else "a"
        about = f", {article} {facts} film{year}" if facts else (f", a film{year}" if year else "")
        return prompts.clean_text(f"{_label(item)}{about}", self.config.text_chars)

    def requests(self, history: Sequence[RankInput], items: Sequence[RankInput], links: dict[str, Link]) -> list[Job]:
        """One prompt per item that has a link (items without one get a template reason): the static
        instructions (their KV cache is kept between calls), then the item and its linked history item. Where the
        two share a genre, the sentence goes on "because, like <history item>, it", so what the model adds is
        checked against what they share; else it names the link ("watched by the same people as <history item>:
        it") and what follows is about the item alone. Decoding never writes digits nor genre words the facts
        lack."""
        tpl = prompts.load("explain_item", self.config.prompt)
        by_id = {h.item_id: h for h in history}
        out = []
        for item in items:
            link = links.get(item.item_id)
            evidence = by_id.get(link.evidence) if link is not None else None
            if link is None or evidence is None:
                continue
            facts = xc.shared_facts(_facts(item), _facts(evidence))
            opening = f"You may enjoy {_label(item)} because, like {_label(evidence)}, it"
            shared = bool(facts.genres)
            if not shared:
                facts = _facts(item)
                opening = f"You may enjoy {_label(item)}, {LINKED_AS[link.signal]} {_label(evidence)}: it"
            rendered = tpl.render(item={"text": self._text(item)}, evidence={"text": self._text(evidence)},
                                  link=LINK_WORDS[link.signal], opening=opening,
                                  shared=prompts.clean_text(" and ".join(g.lower() for g in facts.genres), 80)
                                  if shared else "")
            wrong = sorted({w for g in self._genres(item) if g not in facts.genres for w in xc.genre_words(g)})
            request = TextRequest(messages=rendered.messages, answer_prefix=rendered.answer_prefix,  # type: ignore[arg-type]
                                  max_tokens=self.config.max_tokens, stop=("\n", ". ", "!", "?", ","),
                                  banned=tuple(wrong), no_digits=True)
            out.append(Job(item, evidence, link, request, facts, shared))
        return out

    def _genres(self, item: RankInput) -> Sequence[str]:
        """The genres a sentence about ``item`` may be decoded and finished with: the catalogue's, or without an
        index the item's own."""
        return self.index.catalog.all_genres if self.index is not None else item.genres

    def finish(self, prefix: str, continuation: str, genres: Iterable[str] = ()) -> str:
        """The served sentence: the prefix and the model's words, one sentence, closed by a full stop (a
        dangling last word, such as "from" before a year the model may not write or "who" before words the token
        limit cut, is dropped). Genres named after an article and left without their noun, where the token limit
        or the model stopped ("it is an action and crime"), get it ("film")."""
        words = " ".join(continuation.split()).rstrip(" ,;:-")
        while words.split() and words.split()[-1].lower() in DANGLING:
            words = words.rsplit(" ", 1)[0] if " " in words else ""
        ending = _BARE_GENRES.search(words)
        if ending:
            names = {n for g in genres for n in xc.genre_words(g)}
            if all(w in names for w in re.split(r"\s+(?:and|or)\s+|,\s*", ending["genres"].lower())):
                words += " film"
        glue = "" if words.startswith(("'", ",")) else " "
        text = f"{prefix}{glue}{words}".strip()
        text = text if text.endswith((".", "!", "?")) else text + "."
        return prompts.clean_text(text, self.config.reason_chars)

    def check(self, history: Sequence[RankInput], job: Job, text: str,
              history_facts: Mapping[str, xc.ItemFacts] | None = None) -> str | None:
        """The first failed code check of an LLM sentence (None when it passes), the item taken as ``job.facts``;
        ``history_facts``: the history's facts, when the caller made them once for all its sentences."""
        item, evidence = job.item, job.evidence
        facts = dict(history_facts) if history_facts is not None else {h.item_id: _facts(h) for h in history}
        facts[item.item_id] = job.facts
        vocabulary = (list(self.index.catalog.all_genres) if self.index is not None
                      else sorted({g for f in facts.values() for g in f.genres} | set(item.genres)))
        found = xc.check_explanation([h.item_id for h in history], item.item_id, text, [evidence.item_id], facts,
                                     vocabulary)
        if not found:
            return None
        shared = f" [checked against what it shares with {_label(evidence)}]" if job.shared else ""
        return f"{found[0].check}: {found[0].detail}{shared}"

    def stream(self, history: Sequence[RankInput], items: Sequence[RankInput],
               cancelled: Callable[[], bool] | None = None) -> Iterator[Reason]:
        """Each item's reason as it is ready: template reasons for items without a link first, then LLM
        sentences as the batch finishes them (checked; a failing one comes back as a template, flagged). Items
        left when ``cancelled()`` turns true are not yielded (the caller fills them with :meth:`fill`)."""
        links = self.links(history, items)
        jobs = self.requests(history, items, links)
        asked = {job.item.item_id for job in jobs}
        for item in items:
            if item.item_id not in asked:
                reason, ids = template_reason(item, history, links.get(item.item_id))
                yield Reason(item.item_id, reason, ids, "template")
        if self.backend is None:
            for job in jobs:
                reason, ids = template_reason(job.item, history, job.link)
                yield Reason(job.item.item_id, reason, ids, "template")
            return
        stages = [jobs[: self.config.first_batch], jobs[self.config.first_batch:]]
        for stage in (s for s in stages if s):
            if cancelled is not None and cancelled():
                return
            yield from self._decode(history, stage, cancelled)

    def _decode(self, history: Sequence[RankInput], jobs: Sequence[Job],
                cancelled: Callable[[], bool] | None) -> Iterator[Reason]:
        assert self.backend is not None
        history_facts = {h.item_id: _facts(h) for h in history}  # once for the batch, not once per sentence
        for index, continuation in self.backend.complete_batch([j.request for j in jobs], cancelled=cancelled):
            job = jobs[index]
            item, evidence, link = job.item, job.evidence, job.link
            text = self.finish(job.request.answer_prefix, continuation, self._genres(item))
            failed = self.check(history, job, text, history_facts)
            if failed is None:
                yield Reason(item.item_id, text, [evidence.item_id], "llm")
            else:
                reason, ids = template_reason(item, history, link)
                yield Reason(item.item_id, reason, ids, "template", rejected=failed, draft=text)

    def fill(self, answer: RecommendationAnswer, history: Sequence[RankInput], candidates: Sequence[RankInput],
             reasons: dict[str, Reason]) -> None:
        """Put ``reasons`` on the answer's items; every item still without one gets a template reason."""
        by_id = {c.item_id: c for c in candidates}
        links: dict[str, Link] | None = None
        for item in answer.items:
            got = reasons.get(item.item_id)
            if got is None:
                if links is None:
                    links = self.links(history, [by_id[i.item_id] for i in answer.items if i.item_id in by_id])
                candidate = by_id.get(item.item_id)
                if candidate is None:
                    continue
                text, evidence = template_reason(candidate, history, links.get(item.item_id))
                got = Reason(item.item_id, text, evidence, "template")
            item.reason, item.evidence, item.reason_source = got.reason, got.evidence, got.source
        answer.reasons_llm = sum(i.reason_source == "llm" for i in answer.items)

    def explain(self, answer: RecommendationAnswer, history: Sequence[RankInput], candidates: Sequence[RankInput],
                cancelled: Callable[[], bool] | None = None) -> RecommendationAnswer:
        """Reasons for every item of ``answer`` (in place); LLM failures and cancellation leave templates and say
        so in ``answer.reason``."""
        t0 = time.perf_counter()
        by_id = {c.item_id: c for c in candidates}
        items = [by_id[i.item_id] for i in answer.items if i.item_id in by_id]
        reasons: dict[str, Reason] = {}
        try:
            for r in self.stream(history, items, cancelled):
                reasons[r.item_id] = r
        except Exception as exc:  # the LLM failed: templates fill in, and the answer says so
            logger.warning("explain failed error=%s", exc)
            note_degraded(answer, f"explanations: LLM failed ({type(exc).__name__}); templates used")
        self.fill(answer, history, candidates, reasons)
        missing = sum(1 for i in items if i.item_id not in reasons)
        if missing and (cancelled is not None and cancelled()):
            note_degraded(answer, f"explanations stopped: {missing} of {len(items)} reasons from templates")
        answer.timings.explain_ms = round((time.perf_counter() - t0) * 1000, 2)
        return answer


def note_degraded(answer: RecommendationAnswer, why: str) -> None:
    answer.degraded = True
    answer.reason = why if not answer.reason else f"{answer.reason}; {why}"


def _facts(item: RankInput) -> xc.ItemFacts:
    return xc.make_facts({"item_id": item.item_id, "title": item.title, "genres": item.genres, "year": item.year,
                          "text": item.text})


__all__ = ["ExplainConfig", "Explainer", "Reason", "template_reason"]
