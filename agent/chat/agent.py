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
from dataclasses import dataclass, field
from functools import cached_property
from itertools import zip_longest
from typing import TYPE_CHECKING, Any

import numpy as np

import prompts
from agent.chat import lexicon as lx
from agent.chat import reply as rp
from agent.chat.config import ChatConfig
from agent.chat.genre_reader import GenreReader
from agent.chat.intent import GenreLexicon, Intent, LLMIntent, llm_intent, merge, mood_words, parse_rules
from agent.chat.models import ChatItem, Constraints, PendingChoice, SessionState, Turn, TurnItems, TurnRecord
from agent.chat.state import SessionNotFoundError, SessionStore, valid_session_id
from agent.chat.titles import Resolution, TitleResolver, normalise_title
from agent.explain import Reason
from agent.reason_text import join_words
from agent.schemas import RecommendedItem
from agent.service import Ranked, RecommenderService, UnknownUserError
from retrieval.filters import Filters

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

logger = logging.getLogger(__name__)
_SPLIT_AND = re.compile(r"\s+(?:and|&|or|y|et|und)\s+", re.I)
_ALSO = re.compile(r"\b(also|too|as well|and|plus)\b", re.I)
_ALSO_MOOD = re.compile(r"\b(also|too|as well|plus|even more)\b", re.I)
_ORDINALS = {"first": 0, "second": 1, "third": 2, "fourth": 3, "fifth": 4, "sixth": 5, "seventh": 6,
             "eighth": 7, "ninth": 8, "tenth": 9, "last": -1}
_ORDINAL = re.compile(
    r"^(?:is\s+)?(?:the\s+)?(?:(?P<word>" + "|".join(_ORDINALS) + r")|(?:number\s+|#)?(?P<n>\d{1,2})(?:st|nd|rd|th)?)"
    r"(?:\s+(?:one|pick|film|movie|suggestion))?$",
    re.I,
)

_ORDINAL_IN = re.compile(
    r"\b(?:the\s+)?(?:(?P<word>" + "|".join(_ORDINALS) + r")|(?:number\s+|#)?(?P<n>\d{1,2})(?:st|nd|rd|th)?)"
    r"(?:\s+(?:one|pick|film|movie|suggestion))?\b",
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
    message: str = ""  # the turn's cleaned message
    decided_by: str | None = None  # set when a later stage (the tool-calling loop) decided the picks


@dataclass
class _Reasons:
    """A turn's reasons still to be written by the LLM: the ranked list they rest on, the turn's items (template
    reasons until replaced) and the turn's deadline."""

    ranked: Ranked
    items: list[ChatItem]
    deadline: float


class ChatAgent:
    def __init__(self, service: RecommenderService, store: SessionStore, config: ChatConfig | None = None,
                 chat_model: BaseChatModel | None = None) -> None:
        """``chat_model``: the LangChain chat model the LLM reads with (default: the service's backend through
        :class:`agent.llm.langchain_chat.RecagentChatModel`); with ``config.tool_calling`` and a model that makes
        tool calls, it also picks the items through the recommender's tools."""
        self.service = service
        self.chat_model = chat_model
        self.store = store
        self.config = config or ChatConfig()
        self.catalog = service.catalog
        self.genres = GenreLexicon(self.catalog.all_genres)
        self._resolver: TitleResolver | None = None
        self._unit: np.ndarray | None = None  # unit item vectors, for a reference's content neighbours

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
        # a catalogue title written in the message is something the rules understood (below it becomes a like), so
        # the fallback LLM is not asked to read it: on the held-out chat set the small model, asked about two such
        # messages, answered with no items both times
        scanned = self.resolver.scan(message)  # titles written without a cue
        understood = rules.signals() or (rules.kind in ("recommend", "critique") and bool(scanned))
        wanted = self.config.llm_intent == "always" or not understood
        # the LLM reads through LangChain: a chat model set on the agent (``agent.chat_model``, e.g. ChatOpenAI), else
        # the service's backend as a LangChain chat model (agent.llm.langchain_chat), under the intent form's schema
        chat_model = self.chat_model
        enabled = self._llm_enabled() or (
            chat_model is not None and self.config.use_llm and self.config.llm_intent != "never"
        )
        if enabled and wanted and rules.kind not in ("empty", "meta", "smalltalk"):
            model = chat_model if chat_model is not None else self.service.backend
            assert model is not None
            last = [self.resolver.label(i) for i in state.last_items]
            try:
                llm = llm_intent(
                    model,
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
        if decided_by == "llm" and intent.kind in ("why", "about") and not state.last_items and not scanned:
            # a question about a pick, with no pick to ask about and no catalogue title in the message: the small
            # model misreads requests ("Surprise me") this way, and the turn would answer nothing; the rules'
            # reading stands (the title it names, if any, is its own invention: fuzzy matching finds one anyway)
            logger.info("llm intent refused session=%s kind=%s: nothing to ask about", state.session_id, intent.kind)
            intent, decided_by = rules, "rules"
        if intent.kind in ("recommend", "critique") and not (intent.liked or intent.disliked):
            for text, item_id in scanned:
                if item_id not in state.last_items:
                    intent.liked.append(text)
                    intent.scanned = True
        rules_read = decided_by != "llm" and intent.signals()  # free text the rules kept as a mood, years, ...
        if self._read_genre(state, message, intent, notes):
            decided_by = "both" if rules_read else "llm"
        logger.info(
            "intent session=%s kind=%s decided_by=%s rules=%s llm=%s",
            state.session_id,
            intent.kind,
            decided_by,
            rules.model_dump(exclude_defaults=True),
            None if llm is None else llm.model_dump(exclude_defaults=True),
        )
        return intent, decided_by

    @cached_property
    def genre_reader(self) -> GenreReader | None:
        """The LLM's reading of a genre into words the lexicon lacks (None without an in-process or served backend,
        or with ``ChatConfig.llm_genres`` off)."""
        if not (self.config.use_llm and self.config.llm_genres) or self.service.backend is None:
            return None
        return GenreReader(self.service.backend, self.catalog.all_genres, self.config.genre_reader)

    def _read_genre(self, state: SessionState, message: str, intent: Intent, notes: _Notes) -> bool:
        """A request in words the rules found no genre in ("I'm in the mood for sheriffs and saloons"): the LLM
        reads one (:mod:`agent.chat.genre_reader`) and it becomes the turn's genre, as a genre word of the lexicon
        would, and the reply says so. Not for turns that name titles (a reference item brings its own genres) or
        state any genre. Whether a genre was read."""
        free_text = bool(intent.mood) or (intent.kind == "recommend" and not intent.signals())
        if (intent.kind not in ("recommend", "critique") or not free_text or intent.genres or intent.boost
                or intent.exclude_genres or intent.liked or intent.reference or self.genre_reader is None):
            return False
        try:
            reading = self.genre_reader.read(message)
        except Exception as exc:  # LLMError, timeouts: the text query carries on
            logger.warning("llm genre reading failed session=%s error=%s", state.session_id,
                           f"{type(exc).__name__}: {exc}"[:200])
            return False
        if reading is None:
            return False
        logger.info("llm genre session=%s genre=%s margin=%.2f runner_up=%s", state.session_id, reading.genre,
                    reading.margin, reading.runner_up)
        intent.genres = [reading.genre]
        notes.lines.append(f"I take that as {reading.genre}.")
        return True

    def _turn(self, state: SessionState, raw: str, notes: _Notes, explain: bool = True) -> tuple[Turn, _Reasons | None]:
        message = self._clean(raw, notes)
        notes.message = message
        resolved: dict[str, list[str]] = {}
        choice = self._pending_choice(state, message) if state.pending is not None else None
        pending = choice is not None
        if choice is not None:
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
            self._update(state, intent, message, notes, resolved, free_text=not pending)
            text, items, why_degraded, job = self._recommend(state, notes, explain)
            if why_degraded:
                degraded_reasons.append(why_degraded)
            degraded_reasons += [d for d in notes.degraded if d not in degraded_reasons]
            decided_by = notes.decided_by or decided_by
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
        missing: list[str] | None = None,
    ) -> list[str]:
        """Catalogue ids of ``mentions``; a mention that matches no title is said in the reply, or, with
        ``missing``, left there for the caller."""
        ids: list[str] = []
        for mention in mentions:
            for res in self._resolve_segment(mention):
                if res.item_id is None:
                    if missing is not None:
                        missing.append(res.mention)
                    else:
                        notes.lines.append(
                            f'I couldn\'t find "{prompts.clean_text(res.mention, 60)}" in the catalogue.')
                    continue
                ids.append(res.item_id)
                if res.ambiguous:
                    options = [res.item_id, *res.alternatives]
                    labels = [self.resolver.label(i) for i in options]
                    notes.lines.append(
                        f'By "{prompts.clean_text(res.mention, 60)}" did you mean '
                        f"{join_words(labels, 'or')}? I went with {labels[0]}; "
                        "name the other one to switch."
                    )
                    state.pending = _pending(res, slot)
                elif res.via == "vector":
                    notes.lines.append(
                        f'I took "{prompts.clean_text(res.mention, 60)}" to mean {self.resolver.label(res.item_id)}.'
                    )
        resolved.setdefault(slot, []).extend(ids)
        return ids

    def _as_description(self, state: SessionState, intent: Intent, mentions: list[str], notes: _Notes,
                        alone: bool) -> None:
        """Reference mentions that match no title ("more like cops chasing a gang of robbers") describe what is
        wanted: their words join the text query and, when no other reference came with them, the LLM may read a
        genre in them (:meth:`_read_genre`). The reply says so."""
        intent.liked = [m for m in intent.liked if m not in mentions]
        intent.reference = [m for m in intent.reference if m not in mentions]
        words = mood_words(" ".join(mentions), self.genres)
        quoted = join_words([f'"{prompts.clean_text(m, 60)}"' for m in mentions])
        if not words:
            notes.lines.append(f"I couldn't find {quoted} in the catalogue.")
            return
        intent.mood = prompts.clean_text(f"{intent.mood} {words}".strip(), 80)
        notes.lines.append(f"I found no film called {quoted}, so I looked for it as a description.")
        if alone and self._read_genre(state, f"I want {' and '.join(mentions)}.", intent, notes):
            notes.decided_by = "both"  # the rules took the words as a description, the LLM read the genre

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
            if pending.chosen in state.reference:
                state.reference[state.reference.index(pending.chosen)] = best
        return best

    # --- state ----------------------------------------------------------------------
    def _update(
        self, state: SessionState, intent: Intent, message: str, notes: _Notes, resolved: dict[str, list[str]],
        free_text: bool = True,
    ) -> None:
        # a reference ("something like Heat", or a title written beside "similar" / "more like that") is liked too
        refs = intent.liked if intent.scanned and lx.SIMILAR_HINT.search(message) else intent.reference
        missing: list[str] = []
        reference = self._resolve_mentions([m for m in intent.liked if m in refs], "liked", state, notes, resolved,
                                           missing=missing)
        if missing:
            self._as_description(state, intent, missing, notes, alone=not reference)
        liked = reference + self._resolve_mentions(
            [m for m in intent.liked if m not in refs], "liked", state, notes, resolved
        )
        disliked = self._resolve_mentions(intent.disliked, "disliked", state, notes, resolved)
        for i in liked:
            state.liked = [x for x in state.liked if x != i] + [i]
            state.disliked = [x for x in state.disliked if x != i]
        for i in disliked:
            state.disliked = [x for x in state.disliked if x != i] + [i]
            state.liked = [x for x in state.liked if x != i]
        state.named = list(dict.fromkeys(state.named + liked + disliked))
        if reference:  # retrieval starts from the reference's neighbours
            state.reference = list(dict.fromkeys(reference))
            resolved["reference"] = state.reference
        elif liked:  # a plain like: back to everything liked
            state.reference = []
        rejected: list[str] = []
        if intent.reject_all and state.last_items:
            rejected.extend(state.last_items)
            notes.lines.append("Okay, none of those.")
        elif intent.reject_last and state.last_items:
            rejected.append(state.last_items[0])
        for title in intent.reject:
            res = self.resolver.resolve(title, prefer=state.last_items)
            if res.item_id is not None and res.item_id in state.recommended and res.score >= self.config.fuzzy_min:
                rejected.append(res.item_id)
        for i in dict.fromkeys(rejected):
            if i not in state.rejected:
                state.rejected.append(i)
            if not intent.reject_all or i not in state.last_items:
                notes.lines.append(f"Okay, not {self.resolver.label(i)}.")
        resolved["rejected"] = list(dict.fromkeys(rejected))
        kept, dropped = self._update_constraints(state, intent, message, new_reference=bool(reference),
                                                 free_text=free_text)
        if reference and (kept or dropped):
            said = [f"Keeping: {kept}" if kept else "", f"dropped: {join_words(dropped)}" if dropped else ""]
            note = "; ".join(s for s in said if s)
            notes.lines.append(note[0].upper() + note[1:] + ".")

    def _update_constraints(self, state: SessionState, intent: Intent, message: str, new_reference: bool = False,
                            free_text: bool = True) -> tuple[str, list[str]]:
        """Apply the turn's constraints. Genres and years the user states are hard filters; moods ("funnier") are
        soft boosts. A new reference item drops the earlier genre requests and moods the message does not restate
        (genres stated as a must, exclusions and years stay). Returns (what is kept, what was dropped) for the
        reply."""
        c = state.constraints
        dropped: list[str] = []
        if new_reference:
            dropped += [g for g in c.genres if g not in intent.genres and g not in c.strict]
            c.genres = [g for g in c.genres if g in c.strict]
            dropped += [f"leaning {g}" for g in c.boost if g not in intent.boost and g not in intent.genres]
            c.boost = []
            if c.mood and not intent.mood:
                dropped.append(f'"{prompts.clean_text(c.mood, 40)}"')
                c.mood = ""
        if intent.exclude_genres:
            c.exclude_genres = list(dict.fromkeys(c.exclude_genres + intent.exclude_genres))
            c.genres = [g for g in c.genres if g not in intent.exclude_genres]
            c.strict = [g for g in c.strict if g not in intent.exclude_genres]
        if intent.genres:
            keep = c.genres if _ALSO.search(message) else [g for g in c.genres if g in c.strict]
            c.genres = list(dict.fromkeys(keep + intent.genres))
            c.exclude_genres = [g for g in c.exclude_genres if g not in intent.genres]
        c.strict = list(dict.fromkeys([g for g in c.strict if g in c.genres] + intent.strict))
        if intent.boost:
            keep = c.boost if _ALSO_MOOD.search(message) and not intent.reject_all else []
            c.boost = list(dict.fromkeys(keep + intent.boost))
        c.boost = [g for g in c.boost if g not in c.exclude_genres]
        if intent.era:
            ref = [self.catalog.item(i)["year"] for i in (state.last_items or state.liked)]
            years = [int(y) for y in ref if isinstance(y, int)]
            if not years:
                years = [int(y) for y in self.catalog.years_by_pos if y == y]
            pivot = int(statistics.median(years)) if years else 1990
            # older / newer than the last picks: the other bound (a decade asked for before) no longer holds
            if intent.era == "older":
                c.year_min, c.year_max = None, pivot - 1
            else:
                c.year_min, c.year_max = pivot + 1, None
        # a decade or a range sets both bounds; one bound ("before 2000") keeps the other unless they cross
        if intent.year_min is not None and intent.year_max is not None:
            c.year_min, c.year_max = intent.year_min, intent.year_max
        elif intent.year_min is not None:
            c.year_min = intent.year_min
            if c.year_max is not None and c.year_max < c.year_min:
                c.year_max = None
        elif intent.year_max is not None:
            c.year_max = intent.year_max
            if c.year_min is not None and c.year_min > c.year_max:
                c.year_min = None
        if intent.mood:
            c.mood = intent.mood
        elif free_text and intent.kind == "recommend" and not intent.signals():
            # nothing understood ("sword and sorcery, dragons"): the message's own words are the text query
            words = [w for w in re.findall(r"[A-Za-z][\w'-]+", message) if w.lower() not in lx.STOPWORDS]
            if words:
                c.mood = prompts.clean_text(" ".join(words), 80)
        return rp.constraint_text(c, together=self.config.together_weight > 0), dropped

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
        asked = intent.target.strip()
        ordinal = _ORDINAL.match(asked) if asked else None
        target: str | None = None
        if ordinal is None and asked:
            res = self.resolver.resolve(asked, prefer=state.last_items + state.recommended)
            sure = res.item_id is not None and res.via == "fuzzy" and res.score >= self.config.fuzzy_accept
            target = res.item_id
            if not sure:  # "is the second one any good": a position said among other words wins a weak match
                ordinal = _ORDINAL_IN.search(asked)
                if ordinal is not None:
                    target = None
                elif target is None:
                    return f'I couldn\'t find "{prompts.clean_text(asked, 60)}" in the catalogue.'
        if ordinal is not None:  # "why the second one?": a position in the last list
            if not state.last_items:
                return "I haven't recommended anything yet. " + rp.ASK
            n = _ORDINALS[ordinal["word"].lower()] if ordinal["word"] else int(ordinal["n"]) - 1
            if not -len(state.last_items) <= n < len(state.last_items):
                return f"I only suggested {len(state.last_items)} this time."
            target = state.last_items[n]
        elif target is None and state.last_items:
            target = state.last_items[0]
        elif target is None:
            return "I haven't recommended anything yet. " + rp.ASK
        resolved["target"] = [target]
        if target not in state.recommended:
            state.named = list(dict.fromkeys([*state.named, target]))
        facts = self.facts(target)
        if intent.kind == "about":
            return rp.about_answer(facts)
        likes = [self.facts(i) for i in state.liked]
        stated = set(state.liked) - set(state.seeded)
        given = state.reasons.get(target)
        liked = target in state.liked and target not in state.recommended
        evidence = None if liked else self._evidence(state, target)
        because = None
        if evidence is not None:  # the item's own evidence, in the words the picks' reasons use
            because, _ = rp.compose_reason(facts, likes, stated, Constraints(), [], link=evidence[0],
                                           signal=evidence[1])
        text = rp.why_answer(facts, given, likes, stated, because=because,
                             because_of=evidence[0] if evidence else None, liked=liked)
        # the stored reason passed its checks when it was given (templates by construction, LLM sentences by the
        # explainer's and this agent's checks); what is composed now is checked here
        if not rp.claims_hold(text.replace(given, " ") if given else text, [facts, *likes], self.catalog.all_genres):
            logger.error("why answer failed the metadata check session=%s item=%s", state.session_id, target)
            if evidence is not None:
                return f"I suggested {facts.label} because you liked {evidence[0].label}."
            return f"{facts.label} is {join_words(facts.genres)}."
        return text

    def _evidence(self, state: SessionState, target: str) -> tuple[rp.ItemFacts, str] | None:
        """The liked item ``target`` rests on and by which signal ("cf" or "content"): the evidence its reason cited
        when it was suggested, else its strongest link to the liked items (:mod:`retrieval.evidence`, through the
        explainer, as the picks' reasons are built)."""
        history = [i for i in state.evidence.get(target, []) if i in state.liked]
        history = history or [i for i in state.liked if i != target]
        if not history or not self.catalog.has_item(target):
            return None
        try:
            links = self.service.explainer.links(self.service.history_inputs(history),
                                                 self.service.history_inputs([target]))
        except Exception as exc:  # evidence is a courtesy in an answer, never fatal
            logger.warning("why evidence failed session=%s item=%s error=%s", state.session_id, target, exc)
            return None
        link = links.get(target)
        if link is None or link.evidence not in state.liked:
            return None
        return self.facts(link.evidence), link.signal

    def _recommend(
        self, state: SessionState, notes: _Notes, explain: bool = True
    ) -> tuple[str, list[ChatItem], str | None, _Reasons | None]:
        """The picks with template reasons, and the reasons the LLM is still to write (None without the LLM).

        Retrieval starts from the reference items when the user named some ("something like Heat"), else from
        everything liked. Genres and years are filters; genres stated as a must filter alone (the others of the
        request then lean, as moods do). Moods ("funnier") and the reference's genres re-rank a wider pool of
        candidates softly (:func:`_soft_order`): nothing is filtered by them."""
        c = state.constraints
        hard = c.strict or c.genres
        mood = list(c.boost)
        asked = [g for g in c.genres if g not in hard and g not in mood]  # beside a must, a request's genres lean
        filters = Filters(genres=hard, exclude_genres=c.exclude_genres, year_min=c.year_min, year_max=c.year_max)
        query = " ".join(x for x in [c.mood, *c.genres] if x).strip() or None
        references = [i for i in state.reference if i in state.liked]
        history = references or state.liked
        if not history and query is None and filters.is_empty() and not mood:
            return rp.ASK, [], None, None
        ref_genres = {g for i in references for g in self.facts(i).genres}
        # several genres asked for together ("action and adventure"): the filter lets any of them pass, and the
        # items that have more of them come first (soft, so a rare combination never empties the list)
        together = list(hard) if len(hard) >= 2 and self.config.together_weight > 0 else []
        soft = bool(mood or asked or ref_genres or together)
        pool = max(self.config.k, self.config.soft_pool) if soft else self.config.k
        excluded = state.excluded()
        use_llm = self.config.use_llm and self.service.reranker is not None
        deadline = time.monotonic() + self.config.turn_deadline_s
        degraded: str | None = None

        tool_ids = self._tool_picks(state, notes, deadline) if self.config.tool_calling else []
        if tool_ids:  # the tool-calling LLM chose the items: ranked as it listed them, no soft re-rank
            soft, use_llm = False, False

        def rank(use_llm: bool, **llm_options: Any) -> Ranked:
            if tool_ids:
                given = self.service.rank_given(history, tool_ids, k=len(tool_ids), use_llm=False)
                order = {item_id: n for n, item_id in enumerate(tool_ids)}
                given.answer.items.sort(key=lambda rec: order.get(rec.item_id, len(order)))
                return given
            if soft:  # a mood, a reference or genres asked together: candidates gathered here (see _soft_pool)
                ids = self._soft_pool(history, filters, query, excluded, pool, mood, reference=bool(ref_genres),
                                      together=together)
                return self.service.rank_given(history, ids, k=max(len(ids), 1), use_llm=use_llm, **llm_options)
            return self.service.rank(history, k=pool, filters=filters, query=query,
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
        if soft:
            kept = _soft_order(kept, set(mood), set(asked), ref_genres, self.config.mood_boost,
                               self.config.reference_weight, set(together), self.config.together_weight)
        kept = [rec.model_copy(update={"rank": n}) for n, rec in enumerate(kept[: self.config.k], 1)]
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
        state.evidence.update({i.item_id: list(i.evidence) for i in items})
        if not items:
            return rp.NOTHING_FOUND, [], degraded, None
        job = None
        if use_llm and explain and self.config.llm_explain:
            job = _Reasons(Ranked(answer.model_copy(update={"items": kept}), ranked.history, ranked.candidates),
                           items, deadline)
        picks = join_words([self.resolver.label(i.item_id) for i in items])
        return f"{self._lead(state)}{picks}.", items, degraded, job

    def _tool_picks(self, state: SessionState, notes: _Notes, deadline: float) -> list[str]:
        """The items a tool-calling chat model picks through the recommender's LangChain tools
        (:func:`agent.chat.tool_loop.tool_turn`): catalogue ids its tools returned, minus the session's exclusions
        and anything breaking its constraints. Empty (the usual path decides) without such a model or when the loop
        fails; a failure is noted as degraded."""
        from agent.chat.tool_loop import tool_turn
        from agent.llm.langchain_chat import supports_tool_calls

        model = self.chat_model
        if model is None or not self.config.use_llm or not supports_tool_calls(model):
            return []
        try:
            result = tool_turn(self.service, state, notes.message, model, k=self.config.k, deadline=deadline,
                               first_tool_choice=self.config.first_tool_choice)
        except Exception as exc:  # the loop catches tool errors itself; this is the model or the server failing
            notes.degraded.append(f"tool-calling LLM failed ({type(exc).__name__}); rules used")
            return []
        if result.stopped in ("error", "deadline") and not result.items:
            notes.degraded.append(f"tool-calling LLM stopped ({result.stopped}: {result.error or 'no items'}); "
                                  "rules used")
        if result.items:
            notes.decided_by = result.decided_by
        logger.info("tool loop session=%s stopped=%s steps=%d items=%s dropped=%s", state.session_id,
                    result.stopped, result.steps, result.items, result.dropped)
        return list(result.items)

    def _soft_pool(self, history: list[str], filters: Filters, query: str | None, excluded: set[str], n: int,
                   lean: list[str], reference: bool, together: list[str] | None = None) -> list[str]:
        """The candidates a soft re-rank orders (:func:`_soft_order`), in retrieval order: the service retriever's
        neighbours of ``history``, interleaved, for a reference (``reference``), with its content neighbours and its
        neighbours that share its genres, with a few neighbours that have the mood's genres (``lean``), so that a
        mood has something to lift, and with the neighbours that have all the genres asked for together
        (``together``). All pass the filters; none is excluded."""
        retriever = self.service.retriever
        want = n + len(excluded)
        skip = excluded | set(history)
        # a combination asked for together can be rare among the nearest neighbours: one deeper retrieval serves
        # both the nearest neighbours (its head) and those having all of the genres (from all of it)
        depth = max(10 * want, 200) if together else want
        found = retriever.retrieve(history, k=depth, filters=filters, query=query)
        lists = [[c.item_id for c in found[:want] if c.item_id not in skip]]
        hard = set(filters.genres)

        ref_genres = {g for i in history for g in self.facts(i).genres} if reference else set()

        def within(genres: list[str], limit: int) -> list[str]:
            """The retriever's neighbours that have one of ``genres``, those sharing more of the reference's genres
            first."""
            narrowed = filters.model_copy(update={"genres": genres})
            ids = [c.item_id for c in retriever.retrieve(history, k=want, filters=narrowed, query=query)
                   if c.item_id not in skip and (not hard or hard & set(self.facts(c.item_id).genres))]
            if ref_genres:
                ids.sort(key=lambda i: -len(ref_genres & set(self.facts(i).genres)))
            return ids[:limit]

        if reference:  # its neighbours in content, and its neighbours that share its genres
            lists.append(self._content_neighbours(history, filters, excluded, n))
            lists.append(within(sorted(ref_genres), n))
        if lean:
            lists.append(within(lean, max(2, n // 4)))
        if together:
            wanted = set(together)
            lists.append([c.item_id for c in found
                          if c.item_id not in skip and wanted <= set(self.facts(c.item_id).genres)][:n])
        merged = [i for row in zip_longest(*lists) for i in row if i is not None]
        return list(dict.fromkeys(merged))[: n + max(2, n // 4) * (len(lists) - 1)]

    def _content_neighbours(self, history: list[str], filters: Filters, excluded: set[str], n: int) -> list[str]:
        """The items closest to ``history`` in the index's item embeddings (the vectors the evidence's "content"
        signal compares), 2n of them that pass the filters, the better-known first (the retriever's popularity):
        a reference's neighbours in content, which the fusion weights may mute for histories."""
        index = self.service.index
        if self._unit is None or len(self._unit) != len(index.item_vectors):
            norms = np.linalg.norm(index.item_vectors, axis=1, keepdims=True)
            self._unit = index.item_vectors / np.where(norms > 0, norms, 1.0)
        positions = [self.catalog.item_index[h] for h in history if self.catalog.has_item(h)]
        if not positions:
            return []
        sims = self._unit @ self._unit[positions].mean(axis=0)
        skip = excluded | set(history)
        found: list[int] = []
        for pos in np.argsort(-sims)[: max(5000, 50 * n)]:
            item_id = self.catalog.item_ids[int(pos)]
            facts = self.catalog.item(item_id)
            year = facts["year"]
            if item_id in skip or not _passes(list(facts["genres"]), year if isinstance(year, int) else None,  # type: ignore[call-overload]
                                              filters):
                continue
            found.append(int(pos))
            if len(found) >= 2 * n:
                break
        popularity = getattr(self.service.retriever, "popularity", None)
        if popularity is not None:
            found.sort(key=lambda p: -float(popularity[p]))
        return [self.catalog.item_ids[p] for p in found[:n]]

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
                    state.evidence[item.item_id] = list(item.evidence)
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
        facts = [self.facts(i) for i in (item.item_id, *got.evidence)]  # labels stripped with and without years
        return rp.claims_hold(got.reason, facts, self.catalog.all_genres)

    def _lead(self, state: SessionState) -> str:
        stated = [i for i in state.liked if i not in state.seeded]
        constraint = rp.constraint_text(state.constraints, together=self.config.together_weight > 0)
        n = len(state.last_items)
        picks = "here is a pick" if n == 1 else f"here are {n} picks"
        within = f" ({constraint})" if constraint else ""
        reference = [i for i in state.reference if i in state.liked]
        if reference:
            like = join_words([self.resolver.label(i) for i in reference[-3:]])
            return f"For films like {like}{within}, {picks}: "
        if stated:
            liked = join_words([self.resolver.label(i) for i in stated[-3:]])
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


def _soft_order(recs: list[RecommendedItem], mood: set[str], asked: set[str], ref_genres: set[str], boost: float,
                ref_weight: float, together: set[str] | None = None, together_weight: float = 0.0
                ) -> list[RecommendedItem]:
    """The candidates re-ranked softly: each keeps its rank as a score (1 for the first, falling evenly), plus
    ``boost`` when it has one of the mood's genres (``mood``), half that for one of the other genres asked for beside
    a must (``asked``), ``ref_weight`` times the share of the reference items' genres it has, and
    ``together_weight`` times the share of the genres asked for together (``together``) it has. Nothing is
    dropped, so a mood never empties the list or overrides a strong neighbour."""
    n = max(len(recs), 1)

    def score(pos: int, rec: RecommendedItem) -> float:
        genres = set(rec.genres)
        s = 1.0 - pos / n
        if mood & genres:
            s += boost
        elif asked & genres:
            s += boost / 2
        if ref_genres:
            s += ref_weight * len(ref_genres & genres) / len(ref_genres)
        if together:
            s += together_weight * len(together & genres) / len(together)
        return s

    order = sorted(range(len(recs)), key=lambda p: (-score(p, recs[p]), p))
    return [recs[p] for p in order]
