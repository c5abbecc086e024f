"""The tool-calling chat of ``medvlm ask`` (agents.chat) against a scripted fake OpenAI-compatible server.

Fast tests use a fake grounding agent whose regions have known boxes (original pixels of a 120 x 100 image);
the slow ones use the embedded Med-VLM on a real JSRT chest X-ray.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from agents.chat import MAX_TURNS, chat_answer
from agents.grounders.base import GroundingResult
from agents.llm import LLMError, OpenAIChatClient
from agents.pipeline import Answer
from agents.text import extract_target
from medvlm.errors import InputError, MissingDependencyError
from medvlm.io import MedicalImage
from medvlm.types import Box, Region
from tests.conftest import data_dir
from tests.fake_http import serve_json

PNX = "right apical pneumothorax"
QUESTION = f"where is the {PNX}?"
#: the fake grounder's answers: phrase -> box (pixel xyxy of the original 120 x 100 image)
BOXES = {PNX: (10.0, 5.0, 40.0, 30.0), "heart": (50.0, 40.0, 90.0, 80.0), "left lung": (65.0, 10.0, 110.0, 85.0)}


# ------------------------------------------------------------------------------------------------ fake server


def completion(content: str | None = None, calls: Sequence[tuple[str, Any]] = ()) -> dict[str, Any]:
    """A chat completion; ``calls``: ``(name, args)`` with ``args`` a dict (sent as JSON text) or raw text."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{"id": f"call_{k}", "type": "function",
                                  "function": {"name": name, "arguments": args if isinstance(args, str)
                                               else json.dumps(args)}}
                                 for k, (name, args) in enumerate(calls)]
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "fake",
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}]}


class FakeServer:
    """Replies, in order, with the queued ``(status, body)`` (then an empty text answer); records each request
    body in :attr:`requests`."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.replies: list[tuple[int, dict[str, Any]]] = []
        self.base_url = ""

    def say(self, content: str) -> None:
        self.replies.append((200, completion(content)))

    def call(self, *calls: tuple[str, Any]) -> None:
        self.replies.append((200, completion(None, calls)))

    def fail(self, status: int = 500) -> None:
        self.replies.append((status, {"error": {"message": "engine crashed"}}))


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()

    def respond(path: str, headers: dict[str, str], body: Any) -> tuple[int, bytes]:
        fake.requests.append(body)
        status, reply = fake.replies.pop(0) if fake.replies else (200, completion(""))
        return status, json.dumps(reply).encode()

    with serve_json(respond) as url:
        fake.base_url = url
        yield fake


@pytest.fixture(autouse=True)
def _no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


# ------------------------------------------------------------------------------------------------- fake agent


class FakeAgent:
    """The GroundingAgent surface the chat uses, with fixed regions from :data:`BOXES`."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.grounder = SimpleNamespace(name="fake")
        self.grounded: list[str] = []
        self.asked: list[str] = []

    def ground_phrases(self, image: Any, phrases: Sequence[str]) -> list[tuple[GroundingResult, list[Region]]]:
        out = []
        for phrase in phrases:
            self.grounded.append(phrase)
            box = BOXES.get(phrase.lower())
            regions = [Region(Box(*box), label=phrase, score=0.9, checks={"action": "none"},
                              provenance={"grounder": "fake"})] if box else []
            out.append((GroundingResult(phrase, regions, note="" if box else "not in the fake's table"), regions))
        return out

    def extract_phrase(self, question: str) -> str:
        return extract_target(question)

    def ask(self, image: Any, question: str) -> Answer:
        self.asked.append(question)
        phrase = self.extract_phrase(question)
        [(_, regions)] = self.ground_phrases(image, [phrase])
        return Answer(question=question, phrase=phrase, text="rule-based answer", regions=regions, grounder="fake",
                      meta={"parsed": {}})


@pytest.fixture
def image() -> MedicalImage:
    return MedicalImage(pixels=np.random.default_rng(0).random((100, 120), dtype=np.float32), modality="DX")


@pytest.fixture
def agent(server: FakeServer) -> FakeAgent:
    return FakeAgent(OpenAIChatClient(server.base_url, "fake", timeout_s=10))


def tool_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in request["messages"] if m["role"] == "tool"]


# ------------------------------------------------------------------------------------------------------ tests


def test_tool_call_then_answer(server: FakeServer, agent: FakeAgent, image: MedicalImage) -> None:
    server.call(("ground", {"phrase": PNX}))
    server.say("There is a right apical pneumothorax at [10, 5, 40, 30].")
    answer = chat_answer(agent, image, QUESTION)

    assert answer.text == "There is a right apical pneumothorax at [10, 5, 40, 30]."
    assert answer.phrase == PNX and answer.grounder == "fake" and answer.note == ""
    assert [r.box.to_list() for r in answer.regions] == [list(BOXES[PNX])]
    assert answer.meta["chat"]["turns"] == 2 and answer.meta["chat"]["stopped"] == "answered"
    assert answer.meta["chat"]["tool_calls"] == [{"name": "ground", "args": {"phrase": PNX}}]
    assert agent.grounded == [PNX] and agent.asked == []

    first, second = server.requests
    assert {t["function"]["name"] for t in first["tools"]} == {"ground", "segment", "link_report"}
    assert first["tool_choice"] == "auto" and first["model"] == "fake"
    system, user = first["messages"]
    assert system["role"] == "system" and "120 x 100" in system["content"]
    image_part, text_part = user["content"]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,") and text_part["text"] == QUESTION
    # the second request replays the assistant's tool call and answers it with the JSON summary
    assistant = second["messages"][2]
    assert assistant["role"] == "assistant" and assistant["tool_calls"][0]["id"] == "call_0"
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"phrase": PNX}
    [tool] = tool_messages(second)
    assert tool["tool_call_id"] == "call_0"
    summary = json.loads(tool["content"])
    assert summary["phrase"] == PNX and summary["found"] == 1 and summary["note"] == ""
    assert summary["regions"] == [{"label": PNX, "box": [10, 5, 40, 30], "score": 0.9, "check": "none"}]
    assert summary["image_size_px"] == {"width": 120, "height": 100}


def test_model_without_tool_calls_still_grounds_the_phrase(server: FakeServer, agent: FakeAgent,
                                                           image: MedicalImage) -> None:
    server.say("I see a small apical pneumothorax on the right.")
    answer = chat_answer(agent, image, QUESTION)

    assert answer.text == "I see a small apical pneumothorax on the right."
    assert len(server.requests) == 1
    assert [r.box.to_list() for r in answer.regions] == [list(BOXES[PNX])] and answer.phrase == PNX
    assert answer.meta["chat"]["auto_grounded"] == PNX and answer.meta["chat"]["tool_calls"] == []
    assert "called no grounding tool" in answer.note


def test_malformed_tool_calls_go_back_to_the_model(server: FakeServer, agent: FakeAgent,
                                                   image: MedicalImage) -> None:
    server.call(("locate", {"phrase": "heart"}), ("ground", '{"phrase": "heart"'), ("ground", {"text": "heart"}))
    server.call(("ground", {"phrase": "heart"}))
    server.say("The heart is at [50, 40, 90, 80].")
    answer = chat_answer(agent, image, "where is the heart?")

    errors = [json.loads(m["content"])["error"] for m in tool_messages(server.requests[1])]
    assert len(errors) == 3
    assert "unknown tool 'locate'" in errors[0] and "ground, segment, link_report" in errors[0]
    # valid calls run first, then the malformed ones (the order of tool messages does not matter to the server)
    assert "ground failed" in errors[1] and "phrase Field required" in errors[1]  # the missing argument is named
    assert "not valid JSON" in errors[2]
    # the malformed call is replayed verbatim so that its tool message answers an id the server has seen
    replayed = server.requests[1]["messages"][2]["tool_calls"]
    assert [c["id"] for c in replayed] == ["call_0", "call_2", "call_1"]
    assert replayed[2]["function"]["arguments"] == '{"phrase": "heart"'
    assert answer.text == "The heart is at [50, 40, 90, 80]." and agent.grounded == ["heart"]
    assert [r.box.to_list() for r in answer.regions] == [list(BOXES["heart"])]
    assert [c["name"] for c in answer.meta["chat"]["tool_calls"]] == ["locate", "ground", "ground", "ground"]
    assert answer.meta["chat"]["turns"] == 3


def test_server_error_mid_conversation_falls_back_to_ask(server: FakeServer, agent: FakeAgent,
                                                         image: MedicalImage) -> None:
    server.call(("ground", {"phrase": PNX}))
    server.fail(500)
    answer = chat_answer(agent, image, QUESTION)

    assert answer.text == "rule-based answer" and agent.asked == [QUESTION]
    assert "chat fallback" in answer.note and "HTTP 500" in answer.note and "engine crashed" in answer.note
    assert [r.box.to_list() for r in answer.regions] == [list(BOXES[PNX])]
    chat = answer.meta["chat"]
    assert chat["turns"] == 2 and chat["tool_calls"] == [{"name": "ground", "args": {"phrase": PNX}}]
    assert "HTTP 500" in chat["fallback"] and answer.meta["parsed"] == {}


def test_empty_answer_without_grounding_falls_back_to_ask(server: FakeServer, agent: FakeAgent,
                                                           image: MedicalImage) -> None:
    server.say("")
    answer = chat_answer(agent, image, QUESTION)
    assert answer.text == "rule-based answer" and agent.asked == [QUESTION]
    assert "gave no answer and grounded nothing" in answer.note and answer.meta["chat"]["turns"] == 1


def test_question_naming_nothing_keeps_the_model_text(server: FakeServer, agent: FakeAgent,
                                                      image: MedicalImage) -> None:
    server.say("Where is what? Name a finding or a structure.")
    answer = chat_answer(agent, image, "where is?")
    assert answer.text == "Where is what? Name a finding or a structure."
    assert answer.regions == [] and agent.grounded == [] and answer.phrase == ""
    assert "names nothing to ground" in answer.note and "auto_grounded" not in answer.meta["chat"]


def test_fallback_when_ask_also_needs_the_failed_llm(server: FakeServer, agent: FakeAgent,
                                                     image: MedicalImage, monkeypatch: pytest.MonkeyPatch) -> None:
    # GroundingAgent.ask extracts the phrase with the same LLM: when that fails too, the rules pick the phrase
    def ask(image: Any, question: str) -> Answer:
        raise LLMError("LLM server down")

    monkeypatch.setattr(agent, "ask", ask)
    server.fail(503)
    answer = chat_answer(agent, image, QUESTION)
    assert answer.phrase == PNX and answer.text.startswith(f'"{PNX}" is in')
    assert [r.box.to_list() for r in answer.regions] == [list(BOXES[PNX])] and "HTTP 503" in answer.note


def test_turn_cap_answers_with_what_was_grounded(server: FakeServer, agent: FakeAgent, image: MedicalImage) -> None:
    for _ in range(MAX_TURNS + 2):
        server.call(("ground", {"phrase": "heart"}))
    answer = chat_answer(agent, image, "where is the heart?")

    assert len(server.requests) == MAX_TURNS
    assert [r["tool_choice"] for r in server.requests] == ["auto"] * (MAX_TURNS - 1) + ["none"]
    assert agent.grounded == ["heart"] * (MAX_TURNS - 1)
    assert len(answer.regions) == 1 and answer.phrase == "heart"  # the same region three times, kept once
    assert answer.text.startswith('"heart" is in') and "no final text" in answer.note
    assert answer.meta["chat"]["stopped"] == "turn_cap" and answer.meta["chat"]["turns"] == MAX_TURNS


def test_segment_and_link_report_tools(server: FakeServer, agent: FakeAgent, image: MedicalImage) -> None:
    report = "Right apical pneumothorax. No pleural effusion."
    server.call(("segment", {"structure": "left lung"}), ("link_report", {"report": report}))
    server.say("Done.")
    answer = chat_answer(agent, image, "outline the left lung and link this report")

    lung, linked = (json.loads(m["content"]) for m in tool_messages(server.requests[1]))
    assert lung["regions"][0]["box"] == [65, 10, 110, 85]
    assert [(s["number"], s["status"]) for s in linked["sentences"]] == [(1, "grounded"), (2, "negated")]
    assert linked["sentences"][0]["regions"][0]["box"] == [10, 5, 40, 30]
    assert [r.box.to_list() for r in answer.regions] == [list(BOXES["left lung"]), list(BOXES[PNX])]
    assert answer.phrase == "left lung; Right apical pneumothorax"
    assert answer.regions[1].provenance["sentence"] == 1


def test_chat_needs_a_tool_calling_llm(image: MedicalImage) -> None:
    with pytest.raises(InputError, match="--no-chat"):
        chat_answer(FakeAgent(None), image, QUESTION)


def test_missing_langgraph_names_the_install(agent: FakeAgent, image: MedicalImage,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "langgraph.graph", None)  # makes `from langgraph.graph import` fail
    with pytest.raises(MissingDependencyError, match="pip install langgraph langchain-core"):
        chat_answer(agent, image, QUESTION)


# ------------------------------------------------------------------------------------------- real Med-VLM


def _jsrt_image() -> Path:
    path = data_dir("cxr_jsrt_scr") / "images" / "JPCLN011.png"
    if not path.is_file():
        pytest.skip(f"real image {path} is absent")
    return path


@pytest.mark.slow
@pytest.mark.data
def test_real_medvlm_grounds_on_the_patients_right(server: FakeServer) -> None:
    from agents.pipeline import GroundingAgent
    from medvlm.io import load_image

    real = load_image(_jsrt_image())
    server.call(("ground", {"phrase": PNX}))
    server.say("A right apical pneumothorax is outlined.")
    agent = GroundingAgent("medvlm", llm=OpenAIChatClient(server.base_url, "fake", timeout_s=10))
    answer = chat_answer(agent, real, QUESTION)

    assert answer.text == "A right apical pneumothorax is outlined." and answer.grounder == "medvlm"
    assert answer.regions, answer.note
    for region in answer.regions:  # radiographic display: the patient's right is on the image left
        assert region.box.center[0] < real.width / 2, region.box
    summary = json.loads(tool_messages(server.requests[1])[0]["content"])
    assert summary["found"] == len(answer.regions) and summary["image_size_px"]["width"] == real.width


@pytest.mark.slow
@pytest.mark.data
def test_cli_ask_with_the_chat(server: FakeServer, tmp_path: Path) -> None:
    from medvlm.app.cli import main

    path = _jsrt_image()
    server.call(("ground", {"phrase": "heart"}))
    server.say("The heart is outlined in the centre of the chest.")
    assert main(["ask", str(path), "where is the heart?", "--llm-url", server.base_url, "--llm-model", "fake",
                 "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "JPCLN011.json").read_text())
    assert payload["answer"] == "The heart is outlined in the centre of the chest."
    assert payload["phrase"] == "heart" and len(payload["regions"]) == 1
    assert payload["chat"]["tool_calls"] == [{"name": "ground", "args": {"phrase": "heart"}}]
