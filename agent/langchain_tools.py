"""The recommender as LangChain components, for any LangChain or LangGraph application.

Everything here is a thin adapter over :class:`agent.service.RecommenderService`; no ranking, filtering or
explanation logic lives in this module:

* :class:`RecagentRetriever` (a ``BaseRetriever``; build it with :func:`recagent_retriever`): a free-text query
  -> ``Document`` objects, one per catalogue item, with ``item_id``, ``title``, ``year``, ``genres`` and
  ``score`` in their metadata. Without a user it is the service's search (:meth:`RecommenderService.search`);
  with a ``user_id`` or ``history`` the query steers that user's recommendations (:meth:`RecommenderService.rank`).
* :func:`recagent_tools` -> three ``StructuredTool`` objects with pydantic argument schemas:
  ``search_items`` (free text -> items), ``recommend`` (a user or a history, filters, an optional reference item
  whose item-item neighbours seed the list -> items) and ``explain`` (a history and an item -> the reason the
  service gives, resting on history items chosen by its collaborative-filtering and embedding links,
  :mod:`agent.explain`).

Tool outputs are plain JSON-serialisable dicts. Bad arguments (an unknown item, user or genre, an empty query,
``year_min`` above ``year_max``, a wrong type) come back to the model as an error ``ToolMessage`` naming the
argument (``handle_tool_error`` / ``handle_validation_error`` are set); called directly, :class:`RecagentToolError`
(a ``ToolException``) carries the argument in ``.argument``. Items may be named by catalogue id or by title
(resolved with :class:`agent.chat.titles.TitleResolver`, as the chat agent does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from agent.service import RecommenderService, UnknownUserError
from retrieval.candidates import UnknownItemsError
from retrieval.filters import Filters
from retrieval.item_text import item_text

if TYPE_CHECKING:
    from agent.chat.titles import TitleResolver

MAX_K = 50
MAX_HISTORY = 500


class RecagentToolError(ToolException):
    """A bad tool or retriever argument; ``argument`` names it (e.g. ``"genres"``, ``"reference"``)."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument


# --- argument schemas -------------------------------------------------------------------------------------------


def _ids(value: object) -> object:
    """Ids as strings: models often send catalogue ids such as 50 as numbers."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list):
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


class FilterArgs(BaseModel):
    """Metadata filters (the fields of :class:`retrieval.filters.Filters`)."""

    model_config = ConfigDict(extra="forbid")

    genres: list[str] = Field(default_factory=list, description="keep only items having any of these genres")
    exclude_genres: list[str] = Field(default_factory=list, description="drop items having any of these genres")
    year_min: int | None = Field(default=None, ge=0, le=3000, description="earliest release year (inclusive)")
    year_max: int | None = Field(default=None, ge=0, le=3000, description="latest release year (inclusive)")


class SearchItemsArgs(FilterArgs):
    """Find catalogue items matching a free-text description (title words, plot, mood, genre)."""

    query: str = Field(min_length=1, description="free text, e.g. 'space adventure with aliens'")
    k: int = Field(default=5, ge=1, le=MAX_K, description="how many items to return")


class UserArgs(BaseModel):
    """Who the list is for: a known user, an explicit history, or both (the history is appended)."""

    model_config = ConfigDict(extra="forbid")

    user_id: str | None = Field(default=None, description="a user id of the catalogue; their history is used")
    history: list[str] = Field(default_factory=list, max_length=MAX_HISTORY,
                               description="item ids the user liked, oldest first (added after the user's own)")

    @field_validator("user_id", "history", mode="before")
    @classmethod
    def _as_ids(cls, value: object) -> object:
        return _ids(value)


class RecommendArgs(UserArgs, FilterArgs):
    """Recommend catalogue items for a user or a history of liked items, optionally filtered, optionally seeded by
    a reference item ("more like X"): then the list is built from that item's item-item neighbours and leaves out
    everything in the user's history."""

    reference: str | None = Field(default=None, description="an item id or title: recommend items like this one")
    query: str | None = Field(default=None, description="optional free text steering the list (mood, theme)")
    k: int = Field(default=5, ge=1, le=MAX_K, description="how many items to return")
    explain: bool = Field(default=False, description="add a short reason and its evidence to every item")

    @field_validator("reference", mode="before")
    @classmethod
    def _reference_id(cls, value: object) -> object:
        return _ids(value)


class ExplainArgs(UserArgs):
    """Explain why an item suits a user: the reason rests on items of the user's history chosen by the
    recommender's own signals (collaborative filtering, else content similarity)."""

    item_id: str = Field(min_length=1, description="the item to explain: a catalogue id or a title")

    @field_validator("item_id", mode="before")
    @classmethod
    def _item_id(cls, value: object) -> object:
        return _ids(value)


# --- the adapter ------------------------------------------------------------------------------------------------


class Recagent:
    """What the tools and the retriever share: the service, argument checks and item records."""

    def __init__(self, service: RecommenderService) -> None:
        self.service = service
        self.catalog = service.catalog
        self._resolver: TitleResolver | None = None

    @property
    def resolver(self) -> TitleResolver:
        """The chat agent's title resolver with its default thresholds (fuzzy titles, then the vector store)."""
        if self._resolver is None:
            from agent.chat.config import ChatConfig
            from agent.chat.titles import TitleResolver

            cfg = ChatConfig()
            store = self.service.index.store
            self._resolver = TitleResolver(self.catalog, accept=cfg.fuzzy_accept, minimum=cfg.fuzzy_min,
                                           margin=cfg.ambiguity_margin,
                                           vector_query=lambda text, n: store.query_text(text, n),
                                           vector_min=cfg.vector_min_similarity)
        return self._resolver

    # --- arguments ----------------------------------------------------------------------------------------------
    def filters(self, args: FilterArgs) -> Filters | None:
        """The catalogue's :class:`Filters` (genre names matched case-insensitively), or None when empty."""
        known = self.catalog.all_genres
        for name in ("genres", "exclude_genres"):
            try:
                Filters(**{name: getattr(args, name)}).canonical(known)
            except ValueError as exc:
                raise RecagentToolError(name, str(exc)) from None
        try:
            filters = Filters(genres=args.genres, exclude_genres=args.exclude_genres, year_min=args.year_min,
                              year_max=args.year_max)
        except ValidationError as exc:
            raise RecagentToolError("year_min", _first_error(exc)) from None
        return None if filters.is_empty() else filters.canonical(known)

    def history(self, args: UserArgs) -> list[str]:
        """The user's history (when ``user_id`` is given) followed by the given ``history`` ids."""
        own: list[str] = []
        if args.user_id is not None:
            try:
                own = self.service.user_history(args.user_id)
            except UnknownUserError as exc:
                raise RecagentToolError("user_id", str(exc)) from None
        unknown = [i for i in args.history if not self.catalog.has_item(i)]
        if unknown:
            raise RecagentToolError("history", str(UnknownItemsError(unknown, self.catalog.name)))
        return [*own, *args.history]

    def item_id(self, ref: str, argument: str) -> tuple[str, dict[str, Any]]:
        """A catalogue id for an id or a title, and how it was resolved."""
        ref = ref.strip()
        if self.catalog.has_item(ref):
            return ref, {"given": ref, "item_id": ref, "via": "id"}
        res = self.resolver.resolve(ref)
        if res.item_id is None:
            raise RecagentToolError(argument, f"no item of catalogue '{self.catalog.name}' has the id or a title "
                                              f"like {ref!r}")
        return res.item_id, {"given": ref, "item_id": res.item_id, "via": f"title ({res.via})",
                             "title": self.resolver.label(res.item_id),
                             "alternatives": [self.record(a) for a in res.alternatives]}

    # --- outputs ------------------------------------------------------------------------------------------------
    def record(self, item_id: str, score: float | None = None) -> dict[str, Any]:
        """An item as plain JSON: id, title, year, genres (and score when given)."""
        item = self.catalog.item(item_id)
        year = item["year"]
        out: dict[str, Any] = {"item_id": item_id, "title": str(item["title"]),
                               "year": year if isinstance(year, int) else None,
                               "genres": [str(g) for g in item["genres"]]}  # type: ignore[attr-defined]
        if score is not None:
            out["score"] = round(float(score), 6)
        return out

    def document(self, item_id: str, score: float) -> Document:
        item = self.catalog.item(item_id)
        meta = self.record(item_id, score)
        text = item_text(meta["title"], meta["year"], meta["genres"], str(item.get("description") or ""))
        return Document(page_content=text, metadata=meta, id=item_id)

    # --- operations ---------------------------------------------------------------------------------------------
    def search(self, query: str, k: int, filters: Filters | None = None) -> list[tuple[str, float]]:
        if not query.strip():
            raise RecagentToolError("query", "empty; describe what to look for")
        with _argument_errors():
            hits = self.service.search(query, k=k, filters=filters)
        return [(str(h["item_id"]), float(h["score"])) for h in hits]  # type: ignore[arg-type]

    def search_items(self, args: SearchItemsArgs) -> dict[str, Any]:
        filters = self.filters(args)
        hits = self.search(args.query, args.k, filters)
        return {"query": args.query, "filters": _shown(filters),
                "items": [self.record(i, s) for i, s in hits]}

    def recommend(self, args: RecommendArgs) -> dict[str, Any]:
        filters = self.filters(args)
        history = self.history(args)
        reference = None
        seed, exclude = history, []
        if args.reference is not None:
            ref_id, reference = self.item_id(args.reference, "reference")
            seed, exclude = [ref_id], [i for i in history if i != ref_id]
        query = (args.query or "").strip() or None
        if not seed and query is None:
            raise RecagentToolError("user_id", "give a user_id, a history or a reference item (or a query)")
        with _argument_errors():
            ranked = self.service.rank(seed, k=args.k, filters=filters, query=query, exclude=exclude)
            answer = self.service.explained(ranked) if args.explain else ranked.answer
        items = []
        for rec in answer.items:
            row = {**self.record(rec.item_id, rec.score), "rank": rec.rank}
            if args.explain:
                row |= {"reason": rec.reason, "reason_source": rec.reason_source, "evidence": list(rec.evidence)}
            items.append(row)
        return {"items": items, "seeded_by": seed, "reference": reference, "excluded_history": len(exclude),
                "filters": _shown(filters), "query": query, "model": answer.model, "degraded": answer.degraded,
                "note": answer.reason}

    def explain(self, args: ExplainArgs) -> dict[str, Any]:
        history = self.history(args)
        if not history:
            raise RecagentToolError("history", "empty; an explanation rests on the user's history (give user_id "
                                               "or history)")
        item_id, resolved = self.item_id(args.item_id, "item_id")
        if item_id in set(history):
            raise RecagentToolError("item_id", f"item '{item_id}' is already in the user's history")
        with _argument_errors():
            ranked = self.service.rank_given(history, [item_id], k=1, use_llm=False)
            answer = self.service.explained(ranked)
        rec = answer.items[0]
        return {"item": self.record(item_id), "resolved": resolved, "reason": rec.reason,
                "reason_source": rec.reason_source, "evidence": [self.record(e) for e in rec.evidence],
                "history_length": len(history), "degraded": answer.degraded, "note": answer.reason}


@contextmanager
def _argument_errors() -> Iterator[None]:
    """Turn the service's own argument errors into :class:`RecagentToolError` naming the argument."""
    try:
        yield
    except UnknownItemsError as exc:
        raise RecagentToolError(exc.field, str(exc)) from None
    except UnknownUserError as exc:
        raise RecagentToolError("user_id", str(exc)) from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return str(err.get("msg", "invalid")).removeprefix("Value error, ")


def _shown(filters: Filters | None) -> dict[str, Any] | None:
    return None if filters is None else filters.model_dump(exclude_defaults=True)


def validation_message(exc: Exception) -> str:
    """A tool-argument validation error as one line naming each bad argument (for ``handle_validation_error``)."""
    errors = exc.errors() if isinstance(exc, ValidationError) else []
    if not errors:
        return f"invalid arguments: {exc}"
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ())) or "arguments"
        parts.append(f"{where}: {str(err.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return "invalid arguments: " + "; ".join(parts)


# --- LangChain objects ------------------------------------------------------------------------------------------


class RecagentRetriever(BaseRetriever):
    """Documents for a free-text query: the catalogue's items with ``item_id``, ``title``, ``year``, ``genres`` and
    ``score`` in their metadata, best first.

    With ``user_id`` or ``history`` set, the query steers that user's recommendations (items in the history are
    not returned); otherwise it is a plain search. ``rerank`` lets the service's LLM rerank the user's list (off:
    retrieval order, no LLM call). Bad arguments raise :class:`RecagentToolError`.
    """

    service: RecommenderService
    k: int = Field(default=5, ge=1, le=MAX_K)
    user_id: str | None = None
    history: list[str] = Field(default_factory=list)
    filters: FilterArgs = Field(default_factory=FilterArgs)
    rerank: bool = False
    _adapter: Recagent | None = PrivateAttr(default=None)

    @property
    def adapter(self) -> Recagent:
        if self._adapter is None:
            self._adapter = Recagent(self.service)
        return self._adapter

    def check(self) -> RecagentRetriever:
        """Raise :class:`RecagentToolError` now for an unknown user, item or genre (rather than on first use)."""
        self.adapter.filters(self.filters)
        self.adapter.history(UserArgs(user_id=self.user_id, history=list(self.history)))
        return self

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        a = self.adapter
        filters = a.filters(self.filters)
        history = a.history(UserArgs(user_id=self.user_id, history=list(self.history)))
        if not history:
            if not query.strip():
                return []
            return [a.document(i, s) for i, s in a.search(query, self.k, filters)]
        with _argument_errors():
            ranked = self.service.rank(history, k=self.k, filters=filters, query=query.strip() or None,
                                       use_llm=self.rerank)
        return [a.document(r.item_id, r.score) for r in ranked.answer.items]


def recagent_retriever(service: RecommenderService, *, k: int = 5, user_id: str | int | None = None,
                       history: Sequence[str | int] = (), genres: Sequence[str] = (),
                       exclude_genres: Sequence[str] = (), year_min: int | None = None, year_max: int | None = None,
                       rerank: bool = False) -> RecagentRetriever:
    """A :class:`RecagentRetriever` over ``service``, its arguments checked now (:class:`RecagentToolError`)."""
    try:
        users = UserArgs(user_id=user_id, history=list(history))  # type: ignore[arg-type]
        filters = FilterArgs(genres=list(genres), exclude_genres=list(exclude_genres), year_min=year_min,
                             year_max=year_max)
    except ValidationError as exc:
        raise RecagentToolError(str(exc.errors()[0]["loc"][0]), _first_error(exc)) from None
    return RecagentRetriever(service=service, k=k, user_id=users.user_id, history=users.history, filters=filters,
                             rerank=rerank).check()


def _tool(name: str, schema: type[BaseModel], run: Callable[[Any], dict[str, Any]]) -> StructuredTool:
    def call(**kwargs: Any) -> dict[str, Any]:
        return run(schema.model_validate(kwargs))

    call.__name__ = name
    return StructuredTool.from_function(func=call, name=name, description=_describe(schema), args_schema=schema,
                                        handle_tool_error=True, handle_validation_error=validation_message)


def _describe(schema: type[BaseModel]) -> str:
    return " ".join((schema.__doc__ or "").split())


def recagent_tools(service: RecommenderService) -> list[BaseTool]:
    """``search_items``, ``recommend`` and ``explain`` over ``service`` (see the module docstring)."""
    a = Recagent(service)
    return [_tool("search_items", SearchItemsArgs, a.search_items), _tool("recommend", RecommendArgs, a.recommend),
            _tool("explain", ExplainArgs, a.explain)]


__all__ = ["ExplainArgs", "FilterArgs", "Recagent", "RecagentRetriever", "RecagentToolError", "RecommendArgs",
           "SearchItemsArgs", "recagent_retriever", "recagent_tools", "validation_message"]
