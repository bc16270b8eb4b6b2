"""Chat routes: /v1/chat (JSON and SSE) and the OpenAI-compatible /v1/chat/completions, over the real chat agent
on the tiny catalogue."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from retrieval.index import Index

pytest.importorskip("agent.chat.agent")
sys.path.insert(0, str(Path(__file__).parent))
from test_api_fakes import FakeBackend, make_client  # noqa: E402


def sse_events(text: str) -> list[tuple[str, str]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        events.append((name, "\n".join(data)))
    return events


@pytest.fixture(scope="module")
def client(tiny_index: Index) -> Any:
    with make_client(tiny_index) as c:
        yield c


def test_chat_turns_keep_the_session(client: Any) -> None:
    r = client.post("/v1/chat", json={"message": "I loved Star Voyager, what should I watch next?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["session_id"] and body["reply"]
    assert body["items"] and all(i["reason"] for i in body["items"])
    fields = {"item_id", "title", "reason", "evidence", "genres", "year", "score", "reason_source"}
    assert fields <= set(body["items"][0])
    assert all(i["reason_source"] == "template" for i in body["items"])  # no LLM on this server
    again = client.post("/v1/chat", json={"session_id": body["session_id"], "message": "something else please"})
    assert again.status_code == 200 and again.json()["session_id"] == body["session_id"]


def test_unknown_session_is_404(client: Any) -> None:
    r = client.post("/v1/chat", json={"session_id": "no-such-session", "message": "hi"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "session_id"
    r = client.post("/v1/chat", json={"session_id": "no-such-session", "message": "hi"},
                    headers={"Accept": "text/event-stream"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "session_id"
    assert client.post("/v1/chat", json={"message": ""}).status_code == 422


def test_chat_streams_tokens_then_items(client: Any) -> None:
    r = client.post("/v1/chat", json={"message": "recommend an animated fairy tale"},
                    headers={"Accept": "text/event-stream"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    names = [n for n, _ in events]
    assert names[0] == "token" and names[-2:] == ["items", "done"], names
    streamed = "".join(json.loads(d)["text"] for n, d in events if n == "token")
    done = json.loads(events[-1][1])
    assert streamed.strip() == done["reply"].strip()
    assert json.loads(events[-2][1])["items"] == done["items"] and done["items"]


def test_chat_streams_items_then_reasons_then_done(tiny_index: Index) -> None:
    with make_client(tiny_index, backend=FakeBackend()) as c:
        r = c.post("/v1/chat", json={"message": "I loved Star Voyager, what next?"},
                   headers={"Accept": "text/event-stream"})
        assert r.status_code == 200, r.text
        events = sse_events(r.text)
        names = [n for n, _ in events]
        at = names.index("items")
        shown = json.loads(events[at][1])["items"]
        assert set(names[:at]) == {"token"} and names[at + 1:] == ["reason"] * len(shown) + ["done"], names
        assert shown and all(i["reason"] and i["reason_source"] == "template" for i in shown)
        reasons = [json.loads(d) for n, d in events if n == "reason"]
        assert all(set(x) == {"item_id", "rank", "reason", "evidence", "reason_source"} for x in reasons)
        assert [x["item_id"] for x in reasons] == [i["item_id"] for i in shown]
        assert [x["rank"] for x in reasons] == list(range(1, len(shown) + 1))
        done = json.loads(events[-1][1])
        assert not done["degraded"], done["reason"]
        assert [(i["item_id"], i["reason"], i["evidence"], i["reason_source"]) for i in done["items"]] == [
            (x["item_id"], x["reason"], x["evidence"], x["reason_source"]) for x in reasons]
        assert all(x["reason_source"] == "llm" and x["evidence"] == ["s1"] for x in reasons)
        assert len({x["reason"] for x in reasons}) == len(reasons)  # one sentence per card, not one for all
        why = c.post("/v1/chat", json={"session_id": done["session_id"], "message": "why the first one?"})
        assert why.status_code == 200 and reasons[0]["reason"] in why.json()["reply"]
        plain = c.post("/v1/chat", json={"message": "I loved Twelve Verdicts"}).json()
        assert plain["items"] and all(i["reason_source"] == "llm" for i in plain["items"])
        s = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "I loved Star Voyager"}],
                                                 "stream": True})
        chunks = sse_events(s.text)
        assert chunks[-1][1] == "[DONE]"
        last = json.loads(chunks[-2][1])
        assert last["recommendations"] and all(i["reason_source"] == "llm" for i in last["recommendations"])


def test_openai_completion(client: Any) -> None:
    first = [{"role": "system", "content": "be brief"},
             {"role": "user", "content": "I want a courtroom drama"}]
    r = client.post("/v1/chat/completions", json={"model": "recagent", "messages": first})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    reply = body["choices"][0]["message"]["content"]
    assert reply and body["recommendations"] and body["usage"]["total_tokens"] > 0
    convo = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "another one"}]
    again = client.post("/v1/chat/completions", json={"model": "recagent", "messages": convo}).json()
    assert again["choices"][0]["message"]["content"]
    assert again["session_id"] not in ("", body["session_id"])  # rebuilt in a new session, never looked up
    assert client.get("/v1/models").json()["data"][0]["id"] == "recagent"
    err = client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
    assert err.status_code == 422 and err.json()["error"]["field"] == "messages"


def test_openai_streaming(client: Any) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "space adventure"}],
                                                  "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip()
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop" and last["recommendations"] and last["session_id"]


def test_openai_python_client_talks_to_the_facade(tiny_index: Index) -> None:
    import openai

    with make_client(tiny_index) as c:
        oc = openai.OpenAI(base_url=str(c.base_url) + "/v1", api_key="unused", http_client=c)
        out = oc.chat.completions.create(model="recagent", messages=[{"role": "user", "content": "sci-fi please"}])
        assert out.choices[0].message.content
        extra = out.model_extra or {}
        assert extra.get("recommendations")
        stream = oc.chat.completions.create(model="recagent", stream=True,
                                            messages=[{"role": "user", "content": "a fairy tale"}])
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices).strip()


def test_chat_with_failing_llm_still_answers(tiny_index: Index) -> None:
    with make_client(tiny_index, backend=FakeBackend(fail=True)) as c:
        r = c.post("/v1/chat", json={"message": "recommend a space movie"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["reply"] and body["degraded"], body
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "space movie"}]})
        assert r.status_code == 200 and r.json()["degraded"]
        s = c.post("/v1/chat", json={"message": "a courtroom drama"}, headers={"Accept": "text/event-stream"})
        assert s.status_code == 200 and json.loads(sse_events(s.text)[-1][1])["degraded"]


def test_chat_unavailable_is_503(tiny_index: Index) -> None:
    with make_client(tiny_index, chat=False) as c:
        r = c.post("/v1/chat", json={"message": "hi"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
