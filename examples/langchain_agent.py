"""The recommender from LangChain, in-process (no server): one retriever query and one tool call.

    .venv/bin/python examples/langchain_agent.py                     # the catalogue and LLM `recagent serve` uses
    .venv/bin/python examples/langchain_agent.py --no-llm --query "space adventure with aliens"

The service is built the way `recagent serve` builds it (``agent.runtime.Runtime.build``): the ``RECAGENT_*``
settings pick the catalogue (default movielens-100k, fetched on first use) and the LLM backend (``RECAGENT_LLM``,
``none`` for retrieval only). The retriever returns LangChain ``Document`` objects; the ``recommend`` tool is
called with a ``ToolCall`` as a chat model would emit it, and answers with a ``ToolMessage`` whose content is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.service import RecommenderService
    from agent.settings import Settings


def build_service(settings: Settings | None = None, use_llm: bool | None = None) -> RecommenderService:
    """The catalogue, its index and (unless the settings or ``use_llm`` say no) the LLM backend, as `recagent
    serve` loads them (without the server's micro-batching, which only helps concurrent requests)."""
    from agent.service import build_service as load
    from agent.settings import Settings
    from retrieval.home import configure_offline_environment

    configure_offline_environment()
    settings = settings or Settings()
    use = settings.use_llm if use_llm is None else use_llm
    backend = None
    if use:
        from agent.llm.config import LLMConfig
        from agent.llm.registry import make_backend

        backend = make_backend(LLMConfig.from_env().model_copy(update={"backend": settings.llm}))
    return load(settings.catalog, use_llm=use, backend=backend)


def main(service: RecommenderService | None = None, query: str = "space adventure with aliens", k: int = 3,
         genres: Sequence[str] = (), echo: Callable[[str], object] = sys.stdout.write) -> dict[str, Any]:
    """Search with the retriever, then ask the ``recommend`` tool for items like the top hit; print both and
    return ``{"documents": [...], "tool_message": {...}}``."""
    from langchain_core.messages import ToolCall

    from agent.langchain_tools import recagent_retriever, recagent_tools

    service = service or build_service()
    retriever = recagent_retriever(service, k=k)
    documents = retriever.invoke(query)
    echo(f"retriever.invoke({query!r}) -> {len(documents)} documents\n")
    for doc in documents:
        echo(f"  {json.dumps(doc.metadata)}\n")
    tools = {t.name: t for t in recagent_tools(service)}
    args: dict[str, Any] = {"k": k, "genres": list(genres)}
    if documents:
        args["reference"] = documents[0].metadata["title"]  # by title: the tool resolves it to an id
    else:
        args["query"] = query
    call = ToolCall(name="recommend", args=args, id="call-1", type="tool_call")
    message = tools["recommend"].invoke(call)
    echo(f"recommend({json.dumps(args)}) -> ToolMessage status={message.status}\n")
    result = json.loads(message.content) if message.status == "success" else {"error": message.content}
    echo(json.dumps(result, indent=1) + "\n")
    return {"documents": [{"page_content": d.page_content, "metadata": d.metadata} for d in documents],
            "tool_message": {"tool_call_id": message.tool_call_id, "status": message.status, "result": result}}


def cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--query", default="space adventure with aliens")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--genre", action="append", default=[], help="keep only these genres (repeatable)")
    parser.add_argument("--no-llm", action="store_true", help="retrieval only (RECAGENT_LLM=none does the same)")
    ns = parser.parse_args(argv)
    main(build_service(use_llm=False if ns.no_llm else None), query=ns.query, k=ns.k, genres=ns.genre)


if __name__ == "__main__":
    cli()
