"""The conversational recommender: ``ChatAgent.respond(session_id, message) -> Turn``.

Each turn: clean the message, read it (rules + LLM intent), resolve titles to catalogue ids, update the
session (likes, dislikes, rejections, constraints), then recommend from the session (liked items as the
history, mood text as the query, constraints as filters) or answer a question from metadata. Nothing here
depends on a particular model: the LLM is reached only through ``LLMBackend``.

Reasons: every item first gets a template reason naming its own evidence (the liked item the system's signals tie
to it, :mod:`retrieval.evidence`); with the LLM on (``ChatConfig.llm_explain``), the explainer
(:mod:`agent.explain`) then writes one sentence per item, all decoded as one batch, and each replaces its
template once it passes the metadata checks. :meth:`ChatAgent.respond_stream` streams them as they come; reasons
not written by the turn's deadline (or when the consumer goes away) stay templates, and the turn says so.
"""

from __future__ import annotations

import logging
import re
import secrets
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import prompts
from agent.chat import reply as rp
from agent.chat.config import ChatConfig
from agent.chat.intent import GenreLexicon, Intent, LLMIntent, llm_intent, merge, parse_rules
from agent.chat.models import ChatItem, PendingChoice, SessionState, Turn, TurnItems, TurnRecord
from agent.chat.state import SessionNotFoundError, SessionStore, valid_session_id
from agent.chat.titles import Resolution, TitleResolver, normalise_title
from agent.explain import Reason
from agent.service import Ranked, RecommenderService, UnknownUserError
from retrieval.filters import Filters

logger = logging.getLogger(__name__)
_SPLIT_AND = re.compile(r"\s+(?:and|&|or|y|et|und)\s+", re.I)
_ALSO = re.compile(r"\b(also|too|as well|and|plus)\b", re.I)
_ORDINALS = {"first": 0, "second": 1, "third": 2, "fourth": 3, "fifth": 4, "sixth": 5, "seventh": 6,
             "eighth": 7, "ninth": 8, "tenth": 9, "last": -1}
_ORDINAL = re.compile(
    r"^(?:is\s+)?(?:the\s+)?(?:(?P<word>" + "|".join(_ORDINALS) + r")|(?:number\s+|#)?(?P<n>\d{1,2})(?:st|nd|rd|th)?)"
    r"(?:\s+(?:one|pick|film|movie|suggestion))?$",
    re.I,
)

#: What :meth:`ChatAgent.respond_stream` yields: reply chunks (str), the items with their template reasons
#: (:class:`TurnItems`), each item's final reason (:class:`agent.explain.Reason`), then the :class:`Turn`.
ChatEvent = str | TurnItems | Reason | Turn


@dataclass
class _Notes:
    """What the reply should mention besides the picks."""

    lines: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)


@dataclass
class _Reasons:
    """A turn's reasons still to be written by the LLM: the ranked list they rest on, the turn's items (template
    reasons until replaced) and the turn's deadline."""

    ranked: Ranked
    items: list[ChatItem]
    deadline: float


class ChatAgent:
    def __init__(self, service: RecommenderService, store: SessionStore, config: ChatConfig | None = None) -> None:
        self.service = service
        self.store = store
        self.config = config or ChatConfig()
        self.catalog = service.catalog
        self.genres = GenreLexicon(self.catalog.all_genres)
        self._resolver: TitleResolver | None = None

    # --- public ----------------------------------------------------------------------
    @property
    def resolver(self) -> TitleResolver:
        if self._resolver is None:
            store = self.service.index.store
            self._resolver = TitleResolver(
                self.catalog,
                accept=self.config.fuzzy_accept,
                minimum=self.config.fuzzy_min,
                margin=self.config.ambiguity_margin,
                vector_query=lambda text, n: store.query_text(text, n),
                vector_min=self.config.vector_min_similarity,
            )
        return self._resolver

    def respond(self, session_id: str | None, message: str, user_id: str | None = None,
                cancelled: Callable[[], bool] | None = None, explain: bool = True) -> Turn:
        """One turn, its items' reasons written. Raises only SessionNotFoundError (an explicit unknown or expired
        ``session_id``). ``explain`` False: template reasons only (no LLM sentences this turn)."""
        turn: Turn | None = None
        for event in self._run(session_id, message, user_id, cancelled, explain, stream=False):
            if isinstance(event, Turn):
                turn = event
        assert turn is not None
        return turn

    def respond_stream(self, session_id: str | None, message: str, user_id: str | None = None,
                       cancelled: Callable[[], bool] | None = None, explain: bool = True) -> Iterator[ChatEvent]:
        """The turn as events (:data:`ChatEvent`): the reply in word chunks (composed first, then streamed); the
        items (:class:`TurnItems`) with template reasons, when the turn has items; one final :class:`Reason` per
        item as the LLM writes it (``source`` "llm"), or its template when the LLM's sentence failed a check or was
        not written in time (``source`` "template"); then the :class:`Turn`, whose items carry the final reasons.
        The session (with the final reasons) is saved before the Turn is yielded.

        ``cancelled()`` true (the consumer went away): the reasons still being written stop at the next decoding
        step and their items keep their templates. Without the LLM (or ``explain`` False) no reasons are
        written and no :class:`Reason` events come."""
        yield from self._run(session_id, message, user_id, cancelled, explain, stream=True)

    def _run(self, session_id: str | None, message: str, user_id: str | None,
             cancelled: Callable[[], bool] | None, explain: bool, stream: bool) -> Iterator[ChatEvent]:
        t0 = time.perf_counter()
        lease_id = session_id if session_id is not None else secrets.token_urlsafe(12)
        if not valid_session_id(lease_id):
            raise SessionNotFoundError(lease_id)
        # the turn is one read-modify-write: its lease (shared by every replica) is held from read to save
        with self.store.lease(lease_id):
            state, notes = self._load(session_id, user_id, new_id=lease_id)
            before = state.model_copy(deep=True)
            job: _Reasons | None = None
            try:
                turn, job = self._turn(state, message if isinstance(message, str) else str(message), notes,
                                       explain)
            except Exception as exc:  # never let a turn crash the conversation; the session stays as it was
                logger.exception("chat turn failed session=%s error=%s", state.session_id, exc)
                state = before
                turn = Turn(
                    session_id=state.session_id,
                    reply="Sorry, something went wrong on my side. Your conversation is unchanged; please try again.",
                    degraded=True,
                    reason=f"internal error: {type(exc).__name__}",
                    decided_by="rules",
                )
                state.turns.append(
                    TurnRecord(user=prompts.clean_text(message, 500), reply=turn.reply, kind="error", at=time.time())
                )
            try:
                if stream:
                    yield from rp.chunks(turn.reply, self.config.stream_chunk_words)
                    if turn.items:
                        yield TurnItems(session_id=turn.session_id, items=[i.model_copy(deep=True) for i in turn.items])
                if job is not None:
                    for reason in self._write_reasons(state, turn, job, cancelled):
                        if stream:
                            yield reason
            finally:  # also when the consumer closes the stream early: the session keeps what was decided
                state.turns = state.turns[-self.config.max_turns_kept :]
                self.store.save(state)
        logger.info(
            "chat turn session=%s kind=%s decided_by=%s items=%d llm_reasons=%d degraded=%s ms=%.0f",
            turn.session_id,
            (turn.intent or {}).get("kind"),
            turn.decided_by,
            len(turn.items),
            sum(i.reason_source == "llm" for i in turn.items),
            turn.degraded,
            (time.perf_counter() - t0) * 1000,
        )
        yield turn

    # --- sessions ----------------------------------------------------------------------
    def _load(self, session_id: str | None, user_id: str | None, new_id: str) -> tuple[SessionState, _Notes]:
        """The session to continue, or a new one (id ``session_id``, else ``new_id``). Called under its lease."""
        notes = _Notes()
        if session_id is not None:
            state = self.store.get(session_id)
            if state is not None and state.catalog == self.catalog.name:
                return state, notes
            if not (self.config.allow_unknown_session_ids and valid_session_id(session_id)):
                raise SessionNotFoundError(session_id)
        state = self.store.new(self.catalog.name, user_id=user_id, session_id=session_id or new_id)
        if user_id is not None and self.config.seed_history:
            try:
                history = self.service.user_history(str(user_id))
            except UnknownUserError:
                notes.lines.append(
                    f"I don't know user {prompts.clean_text(user_id, 40)!r} in this catalogue, so "
                    "we start from scratch."
                )
            else:
                seed = list(dict.fromkeys(reversed(history)))[: self.config.seed_history][::-1]
                state.liked, state.seeded = list(seed), list(seed)
        logger.info("session created session=%s user=%s seeded=%d", state.session_id, user_id, len(state.liked))
        return state, notes

    # --- one turn ----------------------------------------------------------------------
    def _clean(self, message: str, notes: _Notes) -> str:
        text = prompts.clean_text(message, 10**7)
        limit = self.config.max_message_chars
        if len(text) > limit:
            text = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
            notes.lines.append(f"(Your message was long; I read the first {len(text)} characters.)")
        return text

    def _llm_enabled(self) -> bool:
        return self.config.use_llm and self.config.llm_intent != "never" and self.service.backend is not None

    def _read(self, state: SessionState, message: str, notes: _Notes) -> tuple[Intent, str]:
        rules = parse_rules(message, self.genres)
        llm: LLMIntent | None = None
        wanted = self.config.llm_intent == "always" or not rules.signals()
        if self._llm_enabled() and wanted and rules.kind not in ("empty", "meta", "smalltalk"):
            assert self.service.backend is not None
            last = [self.resolver.label(i) for i in state.last_items]
            try:
                llm = llm_intent(
                    self.service.backend,
                    message,
                    last,
                    self.catalog.all_genres,
                    max_tokens=self.config.intent_max_tokens,
                )
            except Exception as exc:  # LLMError, invalid output, timeouts: the rules carry on
                reason = f"{type(exc).__name__}: {exc}"[:200]
                logger.warning("llm intent failed session=%s error=%s", state.session_id, reason)
                notes.degraded.append(f"intent LLM failed ({reason}); rules used")
        intent, decided_by = merge(rules, llm, message, self.catalog.all_genres)
        if intent.kind in ("recommend", "critique") and not (intent.liked or intent.disliked):
            for text, item_id in self.resolver.scan(message):  # titles written without a cue
                if item_id not in state.last_items:
                    intent.liked.append(text)
                    intent.scanned = True
        logger.info(
            "intent session=%s kind=%s decided_by=%s rules=%s llm=%s",
            state.session_id,
            intent.kind,
            decided_by,
            rules.model_dump(exclude_defaults=True),
            None if llm is None else llm.model_dump(exclude_defaults=True),
        )
        return intent, decided_by

    def _turn(self, state: SessionState, raw: str, notes: _Notes, explain: bool = True) -> tuple[Turn, _Reasons | None]:
        message = self._clean(raw, notes)
        resolved: dict[str, list[str]] = {}
        if state.pending is not None and (choice := self._pending_choice(state, message)) is not None:
            intent, decided_by = Intent(kind="recommend"), "rules"
            notes.lines.append(f"Got it: {self.resolver.label(choice)}.")
        else:
            state.pending = None
            intent, decided_by = self._read(state, message, notes)
        items: list[ChatItem] = []
        job: _Reasons | None = None
        degraded_reasons = list(notes.degraded)
        if intent.kind == "empty":
            text = rp.EMPTY
        elif intent.kind == "meta":
            text = rp.META
        elif intent.kind == "smalltalk":
            text = rp.smalltalk_reply(message)
        elif intent.kind in ("why", "about"):
            text = self._answer(state, intent, resolved)
        else:
            self._update(state, intent, message, notes, resolved)
            text, items, why_degraded, job = self._recommend(state, notes, explain)
            if why_degraded:
                degraded_reasons.append(why_degraded)
        reply = " ".join([*notes.lines, text]).strip()
        intent_out: dict[str, object] = {
            **intent.model_dump(exclude_defaults=True),
            "kind": intent.kind,
            "resolved": resolved,
        }
        state.turns.append(
            TurnRecord(
                user=prompts.clean_text(message, 500),
                reply=reply,
                items=[i.item_id for i in items],
                kind=intent.kind,
                decided_by=decided_by,
                at=time.time(),
            )
        )
        turn = Turn(
            session_id=state.session_id,
            reply=reply,
            items=items,
            degraded=bool(degraded_reasons),
            reason="; ".join(degraded_reasons) or None,
            intent=intent_out,
            decided_by=decided_by,
        )
        return turn, job

    # --- titles ----------------------------------------------------------------------
    def _resolve_segment(self, segment: str, prefer: list[str] | None = None) -> list[Resolution]:
        whole = self.resolver.resolve(segment, prefer=prefer)
        if whole.item_id is not None and whole.via == "fuzzy" and whole.score >= self.config.fuzzy_accept:
            return [whole]
        parts = [p for p in _SPLIT_AND.split(segment) if p.strip()]
        if len(parts) > 1:
            each = [self.resolver.resolve(p, prefer=prefer) for p in parts]
            if all(r.item_id is not None for r in each):
                return each
        return [whole]

    def _resolve_mentions(
        self,
        mentions: list[str],
        slot: str,
        state: SessionState,
        notes: _Notes,
        resolved: dict[str, list[str]],
    ) -> list[str]:
        ids: list[str] = []
        for mention in mentions:
            for res in self._resolve_segment(mention):
                if res.item_id is None:
                    notes.lines.append(f'I couldn\'t find "{prompts.clean_text(res.mention, 60)}" in the catalogue.')
                    continue
                ids.append(res.item_id)
                if res.ambiguous:
                    options = [res.item_id, *res.alternatives]
                    labels = [self.resolver.label(i) for i in options]
                    notes.lines.append(
                        f'By "{prompts.clean_text(res.mention, 60)}" did you mean '
                        f"{rp.join_words(labels, 'or')}? I went with {labels[0]}; "
                        "name the other one to switch."
                    )
                    state.pending = _pending(res, slot)
                elif res.via == "vector":
                    notes.lines.append(
                        f'I took "{prompts.clean_text(res.mention, 60)}" to mean {self.resolver.label(res.item_id)}.'
                    )
        resolved.setdefault(slot, []).extend(ids)
        return ids

    def _pending_choice(self, state: SessionState, message: str) -> str | None:
        """When the message names one of the offered alternatives, switch to it."""
        pending = state.pending
        assert pending is not None
        key, year = normalise_title(message)
        best, best_score = None, 0.0
        for option in pending.options:
            okey, _ = normalise_title(str(self.catalog.item(option)["title"]))
            score = 100.0 if key == okey else 0.0
            if year is not None and self.catalog.item(option)["year"] == year and key in okey:
                score = 100.0
            if score > best_score:
                best, best_score = option, score
        state.pending = None
        if best is None:
            return None
        slot = state.liked if pending.slot == "liked" else state.disliked
        if pending.chosen in slot and best != pending.chosen:
            slot[slot.index(pending.chosen)] = best
            state.named.append(best)
        return best

    # --- state ----------------------------------------------------------------------
    def _update(
        self, state: SessionState, intent: Intent, message: str, notes: _Notes, resolved: dict[str, list[str]]
    ) -> None:
        liked = self._resolve_mentions(intent.liked, "liked", state, notes, resolved)
        disliked = self._resolve_mentions(intent.disliked, "disliked", state, notes, resolved)
        for i in liked:
            state.liked = [x for x in state.liked if x != i] + [i]
            state.disliked = [x for x in state.disliked if x != i]
        for i in disliked:
            state.disliked = [x for x in state.disliked if x != i] + [i]
            state.liked = [x for x in state.liked if x != i]
        state.named = list(dict.fromkeys(state.named + liked + disliked))
        rejected: list[str] = []
        if intent.reject_last and state.last_items:
            rejected.append(state.last_items[0])
        for title in intent.reject:
            res = self.resolver.resolve(title, prefer=state.last_items)
            if res.item_id is not None and res.item_id in state.recommended and res.score >= self.config.fuzzy_min:
                rejected.append(res.item_id)
        for i in rejected:
            if i not in state.rejected:
                state.rejected.append(i)
            notes.lines.append(f"Okay, not {self.resolver.label(i)}.")
        resolved["rejected"] = rejected
        self._update_constraints(state, intent, message)

    def _update_constraints(self, state: SessionState, intent: Intent, message: str) -> None:
        c = state.constraints
        if intent.exclude_genres:
            c.exclude_genres = list(dict.fromkeys(c.exclude_genres + intent.exclude_genres))
            c.genres = [g for g in c.genres if g not in intent.exclude_genres]
        if intent.genres:
            keep = c.genres if _ALSO.search(message) else []
            c.genres = list(dict.fromkeys(keep + intent.genres))
            c.exclude_genres = [g for g in c.exclude_genres if g not in intent.genres]
        if intent.era:
            ref = [self.catalog.item(i)["year"] for i in (state.last_items or state.liked)]
            years = [int(y) for y in ref if isinstance(y, int)]
            if not years:
                years = [int(y) for y in self.catalog.years_by_pos if y == y]
            pivot = int(statistics.median(years)) if years else 1990
            if intent.era == "older":
                c.year_max = pivot - 1
                if c.year_min is not None and c.year_min > c.year_max:
                    c.year_min = None
            else:
                c.year_min = pivot + 1
                if c.year_max is not None and c.year_max < c.year_min:
                    c.year_max = None
        if intent.year_min is not None or intent.year_max is not None:
            c.year_min, c.year_max = intent.year_min, intent.year_max
        if c.year_min is not None and c.year_max is not None and c.year_min > c.year_max:
            c.year_min = None
        if intent.mood:
            c.mood = intent.mood

    # --- answers ----------------------------------------------------------------------
    def facts(self, item_id: str) -> rp.ItemFacts:
        item = self.catalog.item(item_id)
        year = item["year"]
        meta = item.get("metadata")
        extra = {}
        if isinstance(meta, dict):
            extra = {
                str(k): prompts.clean_text(v, 80)
                for k, v in meta.items()
                if isinstance(v, str | int | float) and not str(v).startswith("http") and "date" not in str(k)
            }
        return rp.ItemFacts(
            item_id=item_id,
            label=self.resolver.label(item_id),
            genres=list(item["genres"]),  # type: ignore[call-overload]
            year=year if isinstance(year, int) else None,
            description=str(item["description"] or ""),
            extra=dict(list(extra.items())[:3]),
        )

    def _answer(self, state: SessionState, intent: Intent, resolved: dict[str, list[str]]) -> str:
        ordinal = _ORDINAL.match(intent.target.strip()) if intent.target else None
        if ordinal is not None and state.last_items:  # "why the second one?": a position in the last list
            n = _ORDINALS[ordinal["word"].lower()] if ordinal["word"] else int(ordinal["n"]) - 1
            if not -len(state.last_items) <= n < len(state.last_items):
                return f"I only suggested {len(state.last_items)} this time."
            target = state.last_items[n]
        elif intent.target:
            res = self.resolver.resolve(intent.target, prefer=state.last_items + state.recommended)
            if res.item_id is None:
                return f'I couldn\'t find "{prompts.clean_text(intent.target, 60)}" in the catalogue.'
            target = res.item_id
        elif state.last_items:
            target = state.last_items[0]
        else:
            return "I haven't recommended anything yet. " + rp.ASK
        resolved["target"] = [target]
        if target not in state.recommended:
            state.named = list(dict.fromkeys([*state.named, target]))
        facts = self.facts(target)
        if intent.kind == "about":
            return rp.about_answer(facts)
        likes = [self.facts(i) for i in state.liked]
        given = state.reasons.get(target)
        text = rp.why_answer(facts, given, likes, set(state.liked) - set(state.seeded))
        # the stored reason passed its checks when it was given (templates by construction, LLM sentences by the
        # explainer's and this agent's checks); what is composed now is checked here
        if not rp.claims_hold(text.replace(given, " ") if given else text, [facts, *likes], self.catalog.all_genres):
            logger.error("why answer failed the metadata check session=%s item=%s", state.session_id, target)
            return f"{facts.label} is {rp.join_words(facts.genres)}."
        return text

    def _recommend(
        self, state: SessionState, notes: _Notes, explain: bool = True
    ) -> tuple[str, list[ChatItem], str | None, _Reasons | None]:
        """The picks with template reasons, and the reasons the LLM is still to write (None without the LLM)."""
        c = state.constraints
        filters = Filters(genres=c.genres, exclude_genres=c.exclude_genres, year_min=c.year_min, year_max=c.year_max)
        query = " ".join(x for x in [c.mood, *c.genres] if x).strip() or None
        if not state.liked and query is None and filters.is_empty():
            return rp.ASK, [], None, None
        excluded = state.excluded()
        use_llm = self.config.use_llm and self.service.reranker is not None
        deadline = time.monotonic() + self.config.turn_deadline_s
        degraded: str | None = None

        def rank(use_llm: bool, **llm_options: Any) -> Ranked:
            return self.service.rank(state.liked, k=self.config.k, filters=filters, query=query,
                                     exclude=sorted(excluded), use_llm=use_llm, **llm_options)

        try:
            ranked = rank(use_llm, mode=self.config.rerank_mode, deadline=deadline)
        except Exception as exc:  # the reranker degrades by itself; this is a last resort
            logger.warning("recommend failed session=%s error=%s; retrieval only", state.session_id, exc)
            ranked = rank(False)
            ranked.answer.degraded, ranked.answer.reason = True, f"recommend failed: {type(exc).__name__}"
            use_llm = False
        answer = ranked.answer
        if answer.degraded:
            degraded = answer.reason or "LLM rerank failed; retrieval order"
        kept = []
        for rec in answer.items:
            if (
                rec.item_id in excluded
                or not self.catalog.has_item(rec.item_id)
                or not _passes(rec.genres, rec.year, filters)
            ):
                logger.error("dropped an item that breaks the session rules item=%s", rec.item_id)
                continue
            kept.append(rec)
        by_id = {cand.item_id: cand for cand in ranked.candidates}
        links = self.service.explainer.links(ranked.history, [by_id[r.item_id] for r in kept if r.item_id in by_id])
        likes = [self.facts(i) for i in state.liked]
        stated = set(state.liked) - set(state.seeded)
        items: list[ChatItem] = []
        for rec in kept:
            facts = self.facts(rec.item_id)
            link = links.get(rec.item_id)
            if link is not None and link.evidence not in state.liked:
                link = None
            reason, evidence = rp.compose_reason(
                facts, likes, stated, c, [s.source for s in rec.sources],
                link=self.facts(link.evidence) if link is not None else None,
                signal=link.signal if link is not None else None,
            )
            items.append(
                ChatItem(
                    item_id=rec.item_id,
                    title=rec.title,
                    reason=reason,
                    evidence=evidence,
                    genres=facts.genres,
                    year=facts.year,
                    score=rec.score,
                    reason_source="template",
                )
            )
        state.recommended = list(dict.fromkeys(state.recommended + [i.item_id for i in items]))
        state.last_items = [i.item_id for i in items]
        state.reasons.update({i.item_id: i.reason for i in items})
        if not items:
            return rp.NOTHING_FOUND, [], degraded, None
        job = None
        if use_llm and explain and self.config.llm_explain:
            job = _Reasons(Ranked(answer.model_copy(update={"items": kept}), ranked.history, ranked.candidates),
                           items, deadline)
        picks = rp.join_words([self.resolver.label(i.item_id) for i in items])
        return f"{self._lead(state)}{picks}.", items, degraded, job

    def _write_reasons(self, state: SessionState, turn: Turn, job: _Reasons,
                       cancelled: Callable[[], bool] | None) -> Iterator[Reason]:
        """The LLM's reasons for the turn's items (:meth:`RecommenderService.reasons`), each one final as it
        comes: an LLM sentence replaces the item's template when its claims hold against the metadata (the
        explainer's checks, then :func:`rp.claims_hold` over the item and the liked items it cites); otherwise the
        template stays. Items left at the deadline, on cancellation or on an LLM failure keep their templates and
        the turn is flagged degraded. Updates the items, the turn and the session's stored reasons in place."""
        by_id = {i.item_id: i for i in job.items}
        final: set[str] = set()

        def stop() -> bool:
            return time.monotonic() > job.deadline or (cancelled is not None and cancelled())

        failed: str | None = None
        try:
            reasons = self.service.reasons(job.ranked, cancelled=stop) if not stop() else iter(())
            for got in reasons:
                if time.monotonic() > job.deadline:  # written too late: the turn's deadline holds
                    break
                item = by_id.get(got.item_id)
                if item is None or item.item_id in final:
                    continue
                if got.source == "llm" and self._llm_reason_holds(got, item, state):
                    item.reason = prompts.clean_text(got.reason, 220)
                    item.evidence = list(got.evidence)
                    item.reason_source = "llm"
                    state.reasons[item.item_id] = item.reason
                elif got.source == "llm" or got.rejected:
                    logger.info("llm reason refused session=%s item=%s check=%s", state.session_id, item.item_id,
                                got.rejected or "chat metadata check")
                final.add(item.item_id)
                yield Reason(item.item_id, item.reason, list(item.evidence), item.reason_source)
        except Exception as exc:  # LLMError, timeouts, anything from the backend: the templates stay
            logger.warning("chat reasons failed session=%s error=%s", state.session_id, exc)
            failed = f"reasons: LLM failed ({type(exc).__name__})"
        missing = [i for i in job.items if i.item_id not in final]
        if not missing:
            return
        if failed is None:
            if time.monotonic() > job.deadline:
                failed = f"deadline exceeded ({self.config.turn_deadline_s:g}s) while writing reasons"
            elif cancelled is not None and cancelled():
                failed = "reasons stopped (the reply was cancelled)"
            else:
                failed = "reasons: the LLM wrote none for some items"
        why = f"{failed}: {len(missing)} of {len(job.items)} reasons from templates"
        turn.degraded = True
        turn.reason = f"{turn.reason}; {why}" if turn.reason else why
        for item in missing:  # their templates are final too, so a stream lists every item's reason
            yield Reason(item.item_id, item.reason, list(item.evidence), item.reason_source)

    def _llm_reason_holds(self, got: Reason, item: ChatItem, state: SessionState) -> bool:
        """An LLM sentence is served only when it cites liked items and every genre and year it names belongs to
        the item or to those liked items (titles, with or without their year, are not claims)."""
        if not got.evidence or not all(e in state.liked for e in got.evidence):
            return False
        facts = [self.facts(i) for i in (item.item_id, *got.evidence)]
        plain = [replace(f, label=prompts.natural_title(self.catalog.item(f.item_id)["title"])) for f in facts]
        return rp.claims_hold(got.reason, [*facts, *plain], self.catalog.all_genres)

    def _lead(self, state: SessionState) -> str:
        stated = [i for i in state.liked if i not in state.seeded]
        constraint = rp.constraint_text(state.constraints)
        n = len(state.last_items)
        picks = "here is a pick" if n == 1 else f"here are {n} picks"
        within = f" ({constraint})" if constraint else ""
        if stated:
            liked = rp.join_words([self.resolver.label(i) for i in stated[-3:]])
            return f"Since you liked {liked}{within}, {picks}: "
        if state.seeded:
            return f"Going by your recent favourites{within}, {picks}: "
        if constraint:
            return f"For {constraint}, {picks}: "
        return f"{picks.capitalize()}: "


def _pending(res: Resolution, slot: str) -> PendingChoice:
    return PendingChoice(
        mention=prompts.clean_text(res.mention, 60),
        chosen=str(res.item_id),
        options=[str(res.item_id), *res.alternatives],
        slot="liked" if slot == "liked" else "disliked",
    )


def _passes(genres: list[str], year: int | None, filters: Filters) -> bool:
    if filters.genres and not set(filters.genres) & set(genres):
        return False
    if set(filters.exclude_genres) & set(genres):
        return False
    if filters.year_min is not None and (year is None or year < filters.year_min):
        return False
    return not (filters.year_max is not None and (year is None or year > filters.year_max))
