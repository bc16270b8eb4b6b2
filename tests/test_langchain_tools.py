"""The recommender as LangChain components (agent.langchain_tools) on the real in-process stack: the tiny
catalogue's real index and RecommenderService, driven by LangChain's own fake chat model in a tool-calling loop,
and the LangChain example run against the same stack."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from agent.langchain_tools import RecagentRetriever, RecagentToolError, recagent_retriever, recagent_tools
from agent.service import RecommenderService
from retrieval.index import Index
from tests.conftest import TINY_HISTORIES, TINY_ITEMS
from tests.fakes import ScriptedBackend

ITEMS = {str(i["item_id"]): i for i in TINY_ITEMS}


@pytest.fixture(scope="module")
def service(tiny_index: Index) -> RecommenderService:
    return RecommenderService(tiny_index)


@pytest.fixture(scope="module")
def tools(service: RecommenderService) -> dict[str, BaseTool]:
    return {t.name: t for t in recagent_tools(service)}


class Seen(BaseCallbackHandler):
    """Records the messages every chat-model call was sent."""

    def __init__(self) -> None:
        self.calls: list[list[BaseMessage]] = []

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID,
                            **kwargs: Any) -> None:
        self.calls.append(list(messages[0]))


def run_agent(model: FakeMessagesListChatModel, tools: dict[str, BaseTool], question: str) -> tuple[
        list[BaseMessage], Seen]:
    """A minimal tool-calling loop: the model answers; its tool calls run; their ToolMessages go back to it."""
    seen = Seen()
    messages: list[BaseMessage] = [HumanMessage(question)]
    for _ in range(5):
        ai = model.invoke(messages, config={"callbacks": [seen]})
        assert isinstance(ai, AIMessage)
        messages.append(ai)
        if not ai.tool_calls:
            break
        for call in ai.tool_calls:
            result = tools[call["name"]].invoke(call)
            assert isinstance(result, ToolMessage)
            messages.append(result)
    return messages, seen


def calls(*tool_calls: tuple[str, dict[str, Any]]) -> FakeMessagesListChatModel:
    first = AIMessage(content="", tool_calls=[{"name": n, "args": a, "id": f"call-{i}", "type": "tool_call"}
                                              for i, (n, a) in enumerate(tool_calls)])
    return FakeMessagesListChatModel(responses=[first, AIMessage(content="Here are my picks.")])


def assert_catalogue_record(row: dict[str, Any]) -> None:
    item = ITEMS[row["item_id"]]  # KeyError: not a catalogue id
    assert row["title"] == item["title"] and row["year"] == item["year"] and row["genres"] == item["genres"]


# --- tools in a tool-calling loop -------------------------------------------------------------------------------


def test_fake_model_calls_recommend_and_gets_filtered_catalogue_items(tools: dict[str, BaseTool]) -> None:
    # u3 watched s1, s2, s3 and a1; among the rest only a3 (2007) and a4 (2009) are Animation from 2005 on, and a4
    # is Children's: so exactly one item passes.
    args = {"user_id": "u3", "genres": ["animation"], "exclude_genres": ["children's"], "year_min": 2005, "k": 3}
    messages, seen = run_agent(calls(("recommend", args)), tools, "Something animated, not for kids, after 2005?")
    replies = [m for m in messages if isinstance(m, ToolMessage)]
    assert len(replies) == 1 and replies[0].tool_call_id == "call-0" and replies[0].status == "success"
    result = json.loads(str(replies[0].content))
    assert [r["item_id"] for r in result["items"]] == ["a3"]
    for row in result["items"]:
        assert_catalogue_record(row)
        assert "Animation" in row["genres"] and "Children's" not in row["genres"] and row["year"] >= 2005
        assert row["item_id"] not in TINY_HISTORIES["u3"]
    assert result["filters"] == {"genres": ["Animation"], "exclude_genres": ["Children's"], "year_min": 2005}
    assert result["seeded_by"] == TINY_HISTORIES["u3"]
    # the tool's answer went back to the model on its second call, and the loop ended on its plain reply
    assert len(seen.calls) == 2 and any(isinstance(m, ToolMessage) and m.tool_call_id == "call-0"
                                        for m in seen.calls[1])
    assert messages[-1].content == "Here are my picks."


def test_recommend_from_a_history_without_filters_returns_k_unseen_catalogue_items(
        tools: dict[str, BaseTool]) -> None:
    result = tools["recommend"].invoke({"history": ["d1", "d2"], "k": 4, "explain": True})
    json.dumps(result)  # plain JSON
    ids = [r["item_id"] for r in result["items"]]
    assert len(ids) == 4 == len(set(ids)) and not {"d1", "d2"} & set(ids)
    assert ids[0] == "d3"  # everyone who watched d1 then d2 watched d3 next
    for row in result["items"]:
        assert_catalogue_record(row)
        assert row["reason"] and set(row["evidence"]) <= {"d1", "d2"} and row["reason_source"] == "template"


def test_reference_item_by_title_seeds_the_list_and_the_users_history_is_left_out(
        tools: dict[str, BaseTool]) -> None:
    alone = tools["recommend"].invoke({"reference": "star voyager", "k": 3})
    assert alone["reference"]["item_id"] == "s1" and alone["seeded_by"] == ["s1"]
    assert [r["item_id"] for r in alone["items"]][0] == "s2"  # s1's strongest item-item neighbour
    assert "s1" not in {r["item_id"] for r in alone["items"]}
    with_user = tools["recommend"].invoke({"reference": "s1", "user_id": "u2", "k": 3})
    ids = [r["item_id"] for r in with_user["items"]]
    assert not set(ids) & set(TINY_HISTORIES["u2"]) and ids[0] == "s4"
    assert with_user["excluded_history"] == len(set(TINY_HISTORIES["u2"]) - {"s1"})


def test_search_items_and_explain(tools: dict[str, BaseTool]) -> None:
    found = tools["search_items"].invoke({"query": "a shy dragon befriends a cartoon princess", "k": 2})
    assert found["items"][0]["item_id"] == "a2"
    for row in found["items"]:
        assert_catalogue_record(row)
    why = tools["explain"].invoke({"user_id": "u7", "item_id": "Witness for the Court"})
    assert why["item"]["item_id"] == "d4" and why["resolved"]["via"].startswith("title")
    assert why["reason"] and why["evidence"] and {e["item_id"] for e in why["evidence"]} <= set(TINY_HISTORIES["u7"])
    assert why["evidence"][0]["title"] in why["reason"]  # the reason names the history item it rests on


def test_with_an_llm_backend_the_tools_rerank_and_explain_through_the_service(tiny_index: Index) -> None:
    backend = ScriptedBackend()
    tools = {t.name: t for t in recagent_tools(RecommenderService(tiny_index, backend=backend))}
    got = tools["recommend"].invoke({"user_id": "u5", "genres": ["Animation"], "k": 2, "explain": True})
    assert got["model"] == "scripted-test-model" and "score" in backend.calls
    assert [r["item_id"] for r in got["items"]] == ["a4"]  # the one Animation item u5 has not watched
    assert all(r["reason"] and set(r["evidence"]) <= set(TINY_HISTORIES["u5"]) for r in got["items"])
    why = tools["explain"].invoke({"history": ["s1", "s2"], "item_id": "s3"})
    assert why["reason_source"] in ("llm", "template") and "complete" in backend.calls
    assert [e["item_id"] for e in why["evidence"]][0] in {"s1", "s2"}


def test_tool_schemas_expose_the_arguments_to_a_model(tools: dict[str, BaseTool]) -> None:
    spec = convert_to_openai_tool(tools["recommend"])["function"]
    props = spec["parameters"]["properties"]
    assert {"user_id", "history", "genres", "exclude_genres", "year_min", "year_max", "reference", "k"} <= set(props)
    assert spec["name"] == "recommend" and "reference" in spec["description"]
    assert set(convert_to_openai_tool(tools["explain"])["function"]["parameters"]["properties"]) == {
        "user_id", "history", "item_id"}


@pytest.mark.parametrize(("name", "args", "argument", "words"), [
    ("recommend", {"user_id": "u1", "genres": ["Western"]}, "genres", "unknown genre 'Western'"),
    ("recommend", {"user_id": "u1", "exclude_genres": ["Noir"]}, "exclude_genres", "unknown genre 'Noir'"),
    ("recommend", {"user_id": "nobody"}, "user_id", "nobody"),
    ("recommend", {"history": ["s1", "zz9"]}, "history", "'zz9'"),
    ("recommend", {"reference": "qqqqqqqq xxxxxxxx"}, "reference", "qqqqqqqq"),
    ("recommend", {"user_id": "u1", "year_min": 2000, "year_max": 1990}, "year_min", "greater than year_max"),
    ("recommend", {}, "user_id", "give a user_id"),
    ("recommend", {"user_id": "u1", "k": 0}, "k", "greater than or equal to 1"),
    ("recommend", {"user_id": "u1", "colour": "red"}, "colour", "Extra inputs"),
    ("search_items", {"query": "   "}, "query", "empty"),
    ("explain", {"history": ["s1"], "item_id": "s1"}, "item_id", "already in the user's history"),
    ("explain", {"item_id": "s1"}, "history", "empty"),
])
def test_bad_arguments_come_back_as_error_tool_messages_naming_the_argument(
        tools: dict[str, BaseTool], name: str, args: dict[str, Any], argument: str, words: str) -> None:
    reply = tools[name].invoke({"name": name, "args": args, "id": "bad-1", "type": "tool_call"})
    assert isinstance(reply, ToolMessage) and reply.status == "error" and reply.tool_call_id == "bad-1"
    text = str(reply.content)
    assert f"{argument}: " in text and words in text, text


def test_a_bad_call_inside_the_loop_does_not_stop_it(tools: dict[str, BaseTool]) -> None:
    model = calls(("recommend", {"user_id": "u1", "genres": ["Western"]}), ("search_items", {"query": "trial"}))
    messages, _ = run_agent(model, tools, "westerns?")
    replies = [m for m in messages if isinstance(m, ToolMessage)]
    assert [r.status for r in replies] == ["error", "success"]
    assert all(r["item_id"] in ITEMS for r in json.loads(str(replies[1].content))["items"])


# --- the retriever ----------------------------------------------------------------------------------------------


def test_retriever_returns_documents_whose_metadata_match_the_catalogue(service: RecommenderService) -> None:
    docs = recagent_retriever(service, k=3).invoke("astronauts stranded inside a nebula repair their ship")
    assert len(docs) == 3 and all(isinstance(d, Document) for d in docs)
    assert docs[0].metadata["item_id"] == "s2"
    for d in docs:
        assert_catalogue_record(d.metadata)
        assert d.page_content.startswith(str(ITEMS[d.metadata["item_id"]]["title"]))
        assert d.id == d.metadata["item_id"]
    scores = [d.metadata["score"] for d in docs]
    assert scores == sorted(scores, reverse=True)


def test_retriever_filters_and_user_history(service: RecommenderService) -> None:
    old = recagent_retriever(service, k=5, year_max=1990).invoke("a tense courtroom trial")
    assert {d.metadata["item_id"] for d in old} == {"d1", "d2", "d3"}  # d4 has no year, so it cannot pass
    personal = RecagentRetriever(service=service, k=2, user_id="u7").invoke("courtroom")
    ids = [d.metadata["item_id"] for d in personal]
    assert ids and not set(ids) & set(TINY_HISTORIES["u7"]) and ids[0] == "d4"


def test_retriever_rejects_bad_arguments_by_name(service: RecommenderService) -> None:
    with pytest.raises(RecagentToolError) as bad_genre:
        recagent_retriever(service, genres=["Western"])
    assert bad_genre.value.argument == "genres"
    with pytest.raises(RecagentToolError) as bad_user:
        recagent_retriever(service, user_id="nobody")
    assert bad_user.value.argument == "user_id"
    with pytest.raises(RecagentToolError) as bad_k:
        RecagentRetriever(service=service, history=["nope"]).invoke("anything")
    assert bad_k.value.argument == "history"


# --- the example ------------------------------------------------------------------------------------------------


def test_the_langchain_example_runs_against_the_in_process_stack(service: RecommenderService) -> None:
    from examples.langchain_agent import main

    printed: list[str] = []
    out = main(service, query="starship crew explores a distant galaxy", k=2, echo=printed.append)
    docs = out["documents"]
    assert docs and docs[0]["metadata"]["item_id"] == "s1"
    message = out["tool_message"]
    assert message["status"] == "success" and message["tool_call_id"] == "call-1"
    assert message["result"]["reference"]["item_id"] == "s1"
    ids = [r["item_id"] for r in message["result"]["items"]]
    assert len(ids) == 2 and "s1" not in ids and all(i in ITEMS for i in ids)
    assert any("ToolMessage status=success" in line for line in printed)
