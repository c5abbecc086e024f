"""OpenAIGrounder and OpenAIChatClient against a local fake OpenAI-compatible server (no network, no model).

The image is H=1000 x W=2000; with max_side=1024 it is sent as H=512 x W=1024, so a pixel of the sent image is
2000/1024 = 1000/512 = 1.953125 original pixels on both axes.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agents.grounders.base import build_grounder
from agents.grounders.openai import TOKEN_ANSWER_REGEX, OpenAIGrounder
from agents.llm import LLMError, OpenAIChatClient, image_data_url, with_image
from agents.parsing import response_format
from medvlm.errors import InputError
from medvlm.io import MedicalImage
from medvlm.tokens import decode_box, encode_box
from medvlm.types import Box
from tests.fake_http import serve_json

S = 2000 / 1024  # original pixels per sent pixel


class FakeServer:
    """Replies, in order, with the queued ``(status, body)``; ``body`` is a dict (sent as JSON), a str (sent raw)
    or ``("sleep", seconds)``. Every request is recorded as ``{"path", "headers", "body"}``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.replies: list[tuple[int, Any]] = []
        self.base_url = ""

    def reply(self, content: str | None) -> None:
        self.replies.append((200, completion(content)))


def completion(content: str | None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()

    def respond(path: str, headers: dict[str, str], body: Any) -> tuple[int, bytes]:
        fake.requests.append({"path": path, "headers": headers, "body": body})
        status, reply = fake.replies.pop(0) if fake.replies else (200, completion(""))
        if isinstance(reply, tuple):
            time.sleep(reply[1])
            reply = completion("")
        return status, reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()

    with serve_json(respond) as url:
        fake.base_url = url
        yield fake


@pytest.fixture
def image() -> MedicalImage:
    rng = np.random.default_rng(0)
    return MedicalImage(pixels=rng.random((1000, 2000), dtype=np.float32) * 100.0, modality="DX")


@pytest.fixture(autouse=True)
def _no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def grounder(server: FakeServer, **kwargs: Any) -> OpenAIGrounder:
    return OpenAIGrounder(server.base_url, "fake-vlm", max_side=1024, **kwargs)


def box(result: Any, i: int = 0) -> list[float]:
    return [round(v, 4) for v in result.regions[i].box.to_list()]


# ------------------------------------------------------------------------------------------------ request contents


def test_structured_reply_and_the_request_sent(server: FakeServer, image: MedicalImage) -> None:
    server.reply(json.dumps({"regions": [{"label": "heart", "box": [100, 50, 300, 250], "points": [[200, 150]],
                                          "score": 0.9}]}))
    (result,) = grounder(server).ground_many(image, ["heart"])

    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer EMPTY"
    body = request["body"]
    assert body["model"] == "fake-vlm" and body["temperature"] == 0.0
    assert body["response_format"] == response_format()
    system, user = body["messages"]
    assert system["role"] == "system" and "patient's right is on the IMAGE left" in system["content"]
    image_part, text_part = user["content"]
    url = image_part["image_url"]["url"]
    assert image_part["type"] == "image_url" and url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.format == "PNG" and sent.size == (1024, 512)
    assert "heart" in text_part["text"] and "1024x512" in text_part["text"]

    assert result.phrase == "heart" and result.note == "" and len(result.regions) == 1
    region = result.regions[0]
    assert box(result) == [round(100 * S, 4), round(50 * S, 4), round(300 * S, 4), round(250 * S, 4)]
    assert region.points is not None and region.points.positive.tolist() == [[200 * S, 150 * S]]
    assert region.label == "heart" and region.score == 0.9
    prov = region.provenance
    assert prov["grounder"] == "openai" and prov["model"] == "fake-vlm" and prov["format"] == "json"
    assert prov["structured_output"] is True and prov["sent_size"] == [512, 1024] and prov["warnings"] == []
    assert json.loads(prov["raw"])["regions"][0]["label"] == "heart"


def test_one_request_per_phrase_with_the_same_image(server: FakeServer, image: MedicalImage) -> None:
    server.reply('{"regions": [{"label": "a", "box": [0, 0, 10, 10]}]}')
    server.reply('{"regions": []}')
    results = grounder(server).ground_many(image, ["left lung", " right lung "])
    assert [r.phrase for r in results] == ["left lung", "right lung"]
    assert len(results[0].regions) == 1 and results[1].regions == []
    urls = [r["body"]["messages"][1]["content"][0]["image_url"]["url"] for r in server.requests]
    assert len(urls) == 2 and urls[0] == urls[1]
    assert "right lung" in server.requests[1]["body"]["messages"][1]["content"][1]["text"]


def test_unstructured_grounder_sends_no_response_format(server: FakeServer, image: MedicalImage) -> None:
    server.reply("(100,200),(300,400)")
    (result,) = grounder(server, structured=False).ground_many(image, ["heart"])
    assert "response_format" not in server.requests[0]["body"]
    assert result.regions[0].provenance["structured_output"] is False


def test_unstructured_grounder_sends_neither_constraint(server: FakeServer, image: MedicalImage) -> None:
    server.reply("(100,200),(300,400)")
    server.reply("heart: <box><loc0000><loc0000><loc0511><loc0511></box>")
    grounder(server, structured=False).ground_many(image, ["heart"])
    grounder(server, structured=False, answer="tokens").ground_many(image, ["heart"])
    for request in server.requests:
        assert "response_format" not in request["body"] and "structured_outputs" not in request["body"]


# ------------------------------------------------------------------------------------------------ token answers


def test_token_answer_request_and_reply_in_original_pixels(server: FakeServer, image: MedicalImage) -> None:
    truth = Box(500.0, 250.0, 1000.0, 500.0)
    reply = f"heart: {encode_box(truth, 1000, 2000)}"  # bins of the ORIGINAL image, whatever size was sent
    server.reply(reply)
    (result,) = grounder(server, answer="tokens").ground_many(image, ["heart"])

    body = server.requests[0]["body"]
    assert body["structured_outputs"] == {"regex": TOKEN_ANSWER_REGEX} and "response_format" not in body
    (user,) = body["messages"]  # no system message: the fine-tuned model was trained without one
    assert user["role"] == "user"
    image_part, text_part = user["content"]
    assert image_part["type"] == "image_url" and image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert text_part == {"type": "text", "text": "Locate the heart in this image."}

    assert result.note == "" and len(result.regions) == 1
    region = result.regions[0]
    assert region.box == decode_box(reply, 1000, 2000) and region.label == "heart"
    assert all(abs(a - b) <= 2000 / 1024 for a, b in zip(region.box.to_list(), truth.to_list()))  # one bin
    assert result.meta["format"] == "medvlm" and result.meta["template"] == "grounding_tokens/v1"
    assert result.meta["structured_output"] is True and result.meta["sent_size"] == [512, 1024]
    assert result.meta["raw"] == reply and result.meta["warnings"] == []


def test_token_answer_regex_accepts_the_trained_syntax_only() -> None:
    box = "<box><loc0012><loc0345><loc0678><loc1023></box>"
    for good in (f"heart: {box}", f"left lung: {box}; right lung: {box}", f"right upper lobe nodule: {box}"):
        assert re.fullmatch(TOKEN_ANSWER_REGEX, good), good
    for bad in ('{"regions": [{"label": "heart", "box": [1, 2, 3, 4]}]}', box,  # JSON; no label
                "heart: <box><loc0012><loc0345><loc0678></box>",  # 3 bins
                "heart: <box><loc12><loc345><loc678><loc1023></box>",  # not 4 digits
                f"heart: {box} ", f"heart:{box}", f"heart: {box};right lung: {box}", "",
                "; ".join([f"rib {k}: {box}" for k in range(9)])):  # at most 8 boxes
        assert re.fullmatch(TOKEN_ANSWER_REGEX, bad) is None, bad
    assert re.fullmatch(TOKEN_ANSWER_REGEX, "; ".join([f"rib {k}: {box}" for k in range(8)]))


def test_token_answer_several_boxes_keep_their_labels(server: FakeServer, image: MedicalImage) -> None:
    server.reply("left lung: <box><loc0000><loc0000><loc0511><loc0511></box>; "
                 "right lung: <box><loc0512><loc0000><loc1023><loc1023></box>")
    (result,) = grounder(server, answer="tokens").ground_many(image, ["lungs"])
    assert [r.label for r in result.regions] == ["left lung", "right lung"]
    assert result.regions[0].box.x1 < result.regions[1].box.x0 < 1001.0


def test_token_answer_without_a_box_is_not_read_in_another_format(server: FakeServer, image: MedicalImage) -> None:
    server.reply('{"regions": [{"label": "heart", "box": [100, 50, 300, 250]}]}')  # not what a token model says
    (result,) = grounder(server, answer="tokens", structured=False).ground_many(image, ["heart"])
    assert result.regions == [] and result.meta["format"] == "unparsed"


def test_rejected_structured_outputs_is_retried_without_it(server: FakeServer, image: MedicalImage) -> None:
    server.replies.append((400, {"object": "error", "message": "Unknown field: structured_outputs", "code": 400}))
    server.reply("heart: <box><loc0000><loc0000><loc0511><loc0511></box>")
    server.reply("liver: <box><loc0512><loc0512><loc1023><loc1023></box>")
    g = grounder(server, answer="tokens")
    results = g.ground_many(image, ["heart", "liver"])
    assert len(server.requests) == 3  # 1 refused + 1 retry, then the second phrase goes straight without it
    assert server.requests[0]["body"]["structured_outputs"] == {"regex": TOKEN_ANSWER_REGEX}
    assert all("structured_outputs" not in r["body"] and "response_format" not in r["body"]
               for r in server.requests[1:])
    assert server.requests[1]["body"]["messages"] == server.requests[0]["body"]["messages"]
    assert g.client.response_format_rejected is True
    assert [r.meta["structured_output"] for r in results] == [False, False]
    assert [r.regions[0].label for r in results] == ["heart", "liver"]


def test_unknown_answer_format_raises() -> None:
    with pytest.raises(InputError, match="answer"):
        OpenAIGrounder("http://localhost:8000/v1", "m", answer="bogus")


# ------------------------------------------------------------------------------------------------ reply formats


def test_qwen2vl_text_reply(server: FakeServer, image: MedicalImage) -> None:
    server.reply("<|object_ref_start|>the heart<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>")
    (result,) = grounder(server).ground_many(image, ["heart"])
    assert box(result) == [200.0, 200.0, 600.0, 400.0]  # per mille of the original, whatever was sent
    assert result.regions[0].label == "the heart" and result.regions[0].provenance["format"] == "qwen2vl"


def test_qwen25vl_reply_is_read_in_the_servers_resized_frame(server: FakeServer, image: MedicalImage) -> None:
    # the server resizes the 1024x512 image it gets to 1036x504 (smart_resize); x * 2000/1036, y * 1000/504
    server.reply('[{"bbox_2d": [259, 126, 518, 252], "label": "heart"}]')
    (result,) = grounder(server).ground_many(image, ["heart"])
    assert box(result) == [500.0, 250.0, 1000.0, 500.0]
    assert result.regions[0].provenance["frame_size"] == [504, 1036]


def test_malformed_reply_gives_no_region_and_says_why(server: FakeServer, image: MedicalImage) -> None:
    server.reply("I think the heart is somewhere around the middle")
    (result,) = grounder(server).ground_many(image, ["heart"])
    assert result.regions == []
    assert result.note.startswith("reply not parseable:") and "somewhere around" in result.note
    assert result.meta["format"] == "unparsed"


def test_out_of_range_box_is_clipped(server: FakeServer, image: MedicalImage) -> None:
    server.reply('{"regions": [{"label": "heart", "box": [900, 400, 1500, 700]}]}')
    (result,) = grounder(server).ground_many(image, ["heart"])
    assert box(result) == [round(900 * S, 4), round(400 * S, 4), 2000.0, 1000.0]
    assert any("clipped" in w for w in result.regions[0].provenance["warnings"])


def test_empty_reply(server: FakeServer, image: MedicalImage) -> None:
    server.reply("")
    server.reply(None)  # content: null
    results = grounder(server).ground_many(image, ["heart", "liver"])
    assert all(r.regions == [] and r.note == "the model's reply was empty" for r in results)


def test_no_finding_reply(server: FakeServer, image: MedicalImage) -> None:
    server.reply("The appendix is not visible in this radiograph.")
    (result,) = grounder(server).ground_many(image, ["appendix"])
    assert result.regions == [] and result.note.startswith("the model reported no such region")


def test_multi_box_reply_sorted_by_score(server: FakeServer, image: MedicalImage) -> None:
    server.reply(json.dumps({"regions": [{"label": "rib 1", "box": [0, 0, 100, 100], "score": 0.2},
                                         {"label": "rib 2", "box": [200, 200, 300, 300], "score": 0.7},
                                         {"label": "rib 3", "box": [400, 0, 500, 100], "score": 0.5}]}))
    (result,) = grounder(server).ground_many(image, ["ribs"])
    assert [r.label for r in result.regions] == ["rib 2", "rib 3", "rib 1"]
    assert box(result, 0) == [round(200 * S, 4), round(200 * S, 4), round(300 * S, 4), round(300 * S, 4)]


def test_points_only_reply_gets_the_box_of_its_points(server: FakeServer, image: MedicalImage) -> None:
    server.reply('{"label": "carina", "points": [[512, 256]]}')
    (result,) = grounder(server).ground_many(image, ["carina"])
    assert box(result) == [1000.0, 500.0, 1000.0, 500.0]
    assert result.regions[0].provenance["box_from_points"] is True and result.regions[0].label == "carina"


# ------------------------------------------------------------------------------------------------ server errors


def test_http_500_raises_with_status_and_server_text(server: FakeServer, image: MedicalImage) -> None:
    server.replies.append((500, {"object": "error", "message": "CUDA out of memory", "code": 500}))
    with pytest.raises(LLMError, match=r"HTTP 500: CUDA out of memory"):
        grounder(server).ground_many(image, ["heart"])


def test_http_404_says_how_to_fix(server: FakeServer, image: MedicalImage) -> None:
    server.replies.append((404, {"detail": "Not Found"}))
    with pytest.raises(LLMError, match=r"HTTP 404: Not Found.*--llm-url ends in /v1"):
        grounder(server).ground_many(image, ["heart"])


def test_rejected_response_format_is_retried_once_without_it(server: FakeServer, image: MedicalImage) -> None:
    server.replies.append((400, {"error": {"message": "response_format json_schema is not supported",
                                           "type": "invalid_request_error"}}))
    server.reply("(100,200),(300,400)")
    server.reply("(0,0),(500,500)")
    g = grounder(server)
    results = g.ground_many(image, ["heart", "liver"])
    assert len(server.requests) == 3  # 1 refused + 1 retry, then the second phrase goes straight without it
    assert "response_format" in server.requests[0]["body"]
    assert all("response_format" not in r["body"] for r in server.requests[1:])
    assert server.requests[1]["body"]["messages"] == server.requests[0]["body"]["messages"]
    assert g.client.response_format_rejected is True
    assert [r.regions[0].provenance["structured_output"] for r in results] == [False, False]
    assert box(results[0]) == [200.0, 200.0, 600.0, 400.0] and box(results[1]) == [0.0, 0.0, 1000.0, 500.0]


def test_other_http_400_is_not_retried(server: FakeServer, image: MedicalImage) -> None:
    server.replies.append((400, {"error": {"message": "prompt is too long"}}))
    with pytest.raises(LLMError, match="HTTP 400: prompt is too long"):
        grounder(server).ground_many(image, ["heart"])
    assert len(server.requests) == 1


def test_reply_without_choices_raises(server: FakeServer, image: MedicalImage) -> None:
    server.replies.append((200, {"id": "x", "choices": []}))
    with pytest.raises(LLMError, match="choices"):
        grounder(server).ground_many(image, ["heart"])
    server.replies.append((200, "<html>proxy page</html>"))
    with pytest.raises(LLMError, match="proxy page"):
        grounder(server).ground_many(image, ["heart"])


def test_timeout_raises(server: FakeServer) -> None:
    server.replies.append((200, ("sleep", 1.5)))
    client = OpenAIChatClient(server.base_url, "fake-vlm", timeout_s=0.3)
    with pytest.raises(LLMError, match="timeout"):
        client.chat([{"role": "user", "content": "hi"}])


def test_connection_refused_raises() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = OpenAIChatClient(f"http://127.0.0.1:{port}/v1", "m", timeout_s=5)
    with pytest.raises(LLMError, match=r"reachable server.*vllm serve"):
        client.chat([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------------------------------ client details


def test_client_api_key_from_env_and_url_without_path(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server.replies.append((200, {"choices": [{"message": {"content": [{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]}}]}))
    with OpenAIChatClient(server.base_url.removesuffix("/v1"), "m") as client:
        assert client.base_url == server.base_url
        assert client.chat([{"role": "user", "content": "hi"}], max_tokens=7) == "ab"
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-test"
    assert server.requests[0]["body"]["max_tokens"] == 7 and client.last_structured is False


def test_image_data_url_never_enlarges_and_checks_input() -> None:
    url, size = image_data_url(np.zeros((30, 40, 3), dtype=np.uint8), max_side=1024)
    assert size == (30, 40) and Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (40, 30)
    assert image_data_url(np.zeros((1000, 3, 3), dtype=np.uint8), max_side=100)[1] == (100, 1)
    with pytest.raises(InputError, match=r"\(H, W, 3\) uint8"):
        image_data_url(np.zeros((30, 40), dtype=np.uint8))
    with pytest.raises(InputError, match="max_side"):
        image_data_url(np.zeros((30, 40, 3), dtype=np.uint8), max_side=0)


def test_with_image_puts_the_image_first_and_copies() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "t"}]
    out = with_image(messages, "data:x")
    assert out[1]["content"] == [{"type": "image_url", "image_url": {"url": "data:x"}}, {"type": "text", "text": "t"}]
    assert messages[1]["content"] == "t"


# ------------------------------------------------------------------------------------------------ caller errors


def test_missing_url_or_model_names_the_cli_options() -> None:
    with pytest.raises(InputError, match="--llm-url"):
        OpenAIGrounder(None, "m")
    with pytest.raises(InputError, match="--llm-model"):
        OpenAIGrounder("http://localhost:8000/v1", None)
    with pytest.raises(InputError, match="http"):
        OpenAIGrounder("localhost:8000", "m")


def test_bad_phrases_raise(server: FakeServer, image: MedicalImage) -> None:
    g = grounder(server)
    with pytest.raises(InputError, match="non-empty"):
        g.ground_many(image, ["heart", "  "])
    with pytest.raises(InputError, match="list of phrases"):
        g.ground_many(image, "heart")
    assert server.requests == []


def test_build_grounder_preset(server: FakeServer) -> None:
    g = build_grounder("openai", base_url=server.base_url, model="fake-vlm")
    assert isinstance(g, OpenAIGrounder) and g.name == "openai"
