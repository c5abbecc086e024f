"""`medvlm serve` as an OpenAI-compatible server, driven by real clients over HTTP: the official `openai` Python
client (models.list / models.retrieve, chat completions non-streamed and streamed as server-sent events), raw SSE
framing, the bearer API key as the client sends it, and LangChain's ChatOpenAI when `langchain-openai` is
installed. The server is a real uvicorn on 127.0.0.1 (ephemeral port) running the real app with the light fake
models of tests/server_fakes.py: the protocol is under test here, not the models."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from medvlm.app.server.app import CHAT_MODELS, create_app
from medvlm.app.server.config import ServerConfig
from tests.server_fakes import fake_services, png_bytes, uvicorn_server

openai = pytest.importorskip("openai")

KEY = "test-key-0123456789abcdef"
MODEL = CHAT_MODELS[0]
IMAGE = png_bytes((np.arange(48 * 64).reshape(48, 64) % 251).astype(np.uint8))
IMAGE_URL = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
QUESTION = "where is the heart?"


def _messages(question: str = QUESTION) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "You are a radiologist."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE_URL}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("serve_openai"), api_key=KEY, request_timeout_s=30)
    with uvicorn_server(create_app(config, fake_services())) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url: str) -> Any:
    return openai.OpenAI(base_url=server_url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def test_models_list_in_openai_shape(server_url: str, client: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == list(CHAT_MODELS)
    card = models.data[0]
    assert card.object == "model" and card.owned_by == "medvlm" and isinstance(card.created, int)
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    raw = httpx.get(server_url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert set(raw) == {"object", "data"} and raw["object"] == "list"
    assert set(raw["data"][0]) == {"id", "object", "created", "owned_by"}


def test_chat_completion_non_streamed(client: Any) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=_messages(), temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == MODEL
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.content == f"{QUESTION} is in the centre."
    extra = reply.model_extra or {}
    assert extra["regions"] and extra["regions"][0]["box"] == [16.0, 12.0, 48.0, 36.0]
    assert extra["result_id"] and extra["downloads"]["json"].endswith(".json")


def test_chat_completion_streamed_with_the_openai_client(client: Any) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=_messages())
    stream = client.chat.completions.create(model=MODEL, messages=_messages(), stream=True)
    chunks = list(stream)
    assert len(chunks) >= 4 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == plain.choices[0].message.content
    assert sum(1 for p in pieces if p) == len(plain.choices[0].message.content.split())  # one piece per word
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop" and all(c.choices[0].finish_reason is None for c in chunks[:-1])
    regions = (last.model_extra or {})["regions"]
    plain_regions = (plain.model_extra or {})["regions"]
    assert regions == plain_regions and regions[0]["mask"]["size"] == [48, 64]
    # with stream_options.include_usage: a last chunk with no choices and the usage
    chunks = list(client.chat.completions.create(model=MODEL, messages=_messages(), stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-2].choices[0].finish_reason == "stop"


def test_chat_stream_is_server_sent_events(server_url: str) -> None:
    body = {"model": MODEL, "messages": _messages(), "stream": True}
    with httpx.stream("POST", server_url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    objects = [json.loads(e[len("data: "):]) for e in events[:-1]]
    final = objects[-1]
    assert final["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert {"regions", "result_id", "phrase", "downloads"} <= set(final)
    # an error before the stream starts is still an HTTP status with the API's JSON error
    bad = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "stream": True}
    r = httpx.post(server_url + "/v1/chat/completions", json=bad, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "missing_image"


def test_api_key_as_the_openai_client_sends_it(server_url: str) -> None:
    wrong = openai.OpenAI(base_url=server_url + "/v1", api_key="not-the-key-123", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert info.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=_messages())
    r = httpx.get(server_url + "/v1/models", timeout=10)  # no header at all
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert set(r.json()["error"]) == {"type", "message", "expected", "fix"} and KEY not in r.text
    assert httpx.get(server_url + "/healthz", timeout=10).status_code == 200  # open
    assert httpx.get(server_url + "/", timeout=10).status_code == 200  # the web page, open


def test_unknown_model_is_404(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=_messages())
    assert "/v1/models" in str(info.value)


def test_langchain_chat_openai_streams(server_url: str, tmp_path: Path) -> None:
    pytest.importorskip("langchain_openai", reason="langchain-openai is not installed in .venv (pip install "
                        "langchain-openai); langchain-core alone has no OpenAI chat model")
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server_url + "/v1", api_key=KEY, streaming=True, max_retries=0,
                     timeout=30)
    messages = [SystemMessage("You are a radiologist."),
                HumanMessage(content=[{"type": "image_url", "image_url": {"url": IMAGE_URL}},
                                      {"type": "text", "text": QUESTION}])]
    pieces = [chunk.content for chunk in llm.stream(messages)]
    assert "".join(str(p) for p in pieces) == f"{QUESTION} is in the centre." and len(pieces) > 2
    assert llm.invoke(messages).content == f"{QUESTION} is in the centre."
