"""A small OpenAI-compatible chat client (on httpx) and the image encoding shared by the LLM grounders.

Works with any server that implements ``POST {base_url}/chat/completions`` with image content parts: vLLM
(``vllm serve MODEL``), SGLang, llama.cpp's server, OpenAI. Errors say what happened and how to fix it; they are
:class:`LLMError`, a :class:`~medvlm.errors.MedvlmError`.
"""

from __future__ import annotations

import base64
import copy
import io
import os
import re
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import numpy.typing as npt
from PIL import Image

from medvlm.errors import MedvlmError, input_error

__all__ = ["LLMError", "OpenAIChatClient", "fit_image", "image_data_url", "with_image"]

# a 400/422 whose text mentions one of these is a server without structured outputs, not a bad request
_REJECTED_FORMAT_RE = re.compile(r"response_format|json_schema|guided|structured", re.I)


class LLMError(MedvlmError):
    """The LLM server could not be reached, failed, or answered something that is not a chat completion."""


def _llm_error(what: str, *, expected: str, received: str, fix: str) -> LLMError:
    return LLMError(f"{what}: expected {expected}; received {received}. How to fix: {fix}")


class OpenAIChatClient:
    """Chat completions against an OpenAI-compatible server.

    ``base_url``: e.g. ``http://localhost:8000/v1`` (a URL without a path gets ``/v1``). ``api_key``: default the
    ``OPENAI_API_KEY`` environment variable, else ``"EMPTY"`` (what vLLM accepts without ``--api-key``).

    Attributes:
        response_format_rejected: True once the server refused ``response_format``; later calls no longer send it.
        last_structured: whether the last successful :meth:`chat` was answered under ``response_format``.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        parts = urlsplit(base_url) if isinstance(base_url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise input_error("LLM server URL", expected="an http(s) URL such as http://localhost:8000/v1",
                              received=repr(base_url), fix="pass --llm-url with the server's OpenAI base URL")
        if not isinstance(model, str) or not model.strip():
            raise input_error("LLM model", expected="the served model's name", received=repr(model),
                              fix="pass --llm-model with a name listed by GET {base_url}/models")
        if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise input_error("LLM timeout", expected="a positive number of seconds", received=repr(timeout_s),
                              fix="pass e.g. timeout_s=60")
        url = base_url.rstrip("/")
        self.base_url = url if parts.path.strip("/") else f"{url}/v1"
        self.model = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.timeout_s = float(timeout_s)
        self.response_format_rejected = False
        self.last_structured = False
        self._http: httpx.Client | None = None  # made on first use, then reused (keep-alive across phrases)

    def close(self) -> None:
        """Close the HTTP connection pool (the client reopens one if used again)."""
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> OpenAIChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chat(self, messages: list[dict[str, Any]], *, response_format: dict[str, Any] | None = None,
             structured_outputs: dict[str, Any] | None = None, max_tokens: int = 512,
             temperature: float = 0.0) -> str:
        """Send ``messages`` (OpenAI chat format) and return the first choice's message content (``""`` when the
        server gives none).

        ``response_format``: OpenAI's (e.g. a JSON schema); ``structured_outputs``: vLLM's constrained decoding
        field (e.g. ``{"regex": ...}``), sent as an extra body field. A server that rejects either (HTTP 400/422
        naming it) is asked once more without it, and :attr:`response_format_rejected` is set. Raises
        :class:`LLMError` on connection failures, timeouts, HTTP errors (with the status and the server's message)
        and replies without choices."""
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": int(max_tokens),
                                   "temperature": float(temperature)}
        constraint = {k: v for k, v in (("response_format", response_format),
                                        ("structured_outputs", structured_outputs)) if v is not None}
        structured = bool(constraint) and not self.response_format_rejected
        if structured:
            payload.update(constraint)
        response = self._post(payload)
        if structured and response.status_code in (400, 422) and _REJECTED_FORMAT_RE.search(_error_text(response)):
            self.response_format_rejected = True
            structured = False
            for key in constraint:
                del payload[key]
            response = self._post(payload)
        message = self._first_choice(response)
        self.last_structured = structured
        return _content(message)

    def chat_message(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                     tool_choice: str | dict[str, Any] | None = None, max_tokens: int = 512,
                     temperature: float = 0.0) -> dict[str, Any]:
        """Send ``messages`` with OpenAI function-calling ``tools`` (``[{"type": "function", "function": {...}}]``)
        and return the first choice's assistant message as a dict: ``{"role": "assistant", "content": str | None,
        "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": JSON string}}]}``
        (``tool_calls`` is ``[]`` when the model called none; ``content`` is joined to one string when the server
        sends a list of text parts). ``tool_choice``: ``"auto"``, ``"none"``, ``"required"`` or a named function;
        sent only with ``tools``. Raises :class:`LLMError` as :meth:`chat` does (a server started without tool
        calling, e.g. vLLM without ``--enable-auto-tool-choice``, answers HTTP 400: the error carries its text)."""
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": int(max_tokens),
                                   "temperature": float(temperature)}
        if tools:
            payload["tools"] = tools
            if tool_choice is not None:
                payload["tool_choice"] = tool_choice
        choice = self._first_choice(self._post(payload))
        raw = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(raw, dict):
            raise _llm_error(f"LLM server {self.base_url}", expected="a chat completion whose choice has a message",
                             received=repr(choice)[:300],
                             fix="check that --llm-url points at an OpenAI-compatible /v1/chat/completions endpoint")
        content = raw.get("content")
        calls = raw.get("tool_calls")
        return {**raw, "role": "assistant", "content": None if content is None else _content(choice),
                "tool_calls": list(calls) if isinstance(calls, list) else []}

    def _first_choice(self, response: httpx.Response) -> Any:
        """``choices[0]`` of a successful reply; :class:`LLMError` for HTTP errors and non-completions."""
        if response.status_code >= 400:
            raise _http_error(self.base_url, self.model, response)
        try:
            return response.json()["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _llm_error(f"LLM server {self.base_url}", expected='a chat completion with "choices"',
                             received=repr(response.text[:300]),
                             fix="check that --llm-url points at an OpenAI-compatible /v1 endpoint") from exc

    def _post(self, payload: dict[str, Any]) -> httpx.Response:
        url = f"{self.base_url}/chat/completions"
        headers = {"Authorization": f"Bearer {self.api_key}"}
        if self._http is None:
            self._http = httpx.Client(timeout=self.timeout_s)
        try:
            return self._http.post(url, json=payload, headers=headers)
        except httpx.TimeoutException as exc:
            raise _llm_error(f"LLM server {self.base_url}", expected=f"an answer within {self.timeout_s:g} s",
                             received=f"a timeout ({type(exc).__name__})",
                             fix="raise timeout_s, or check that the server is not overloaded") from exc
        except httpx.HTTPError as exc:
            raise _llm_error(f"LLM server {self.base_url}", expected="a reachable server",
                             received=f"{type(exc).__name__}: {exc}",
                             fix="start the server (e.g. `vllm serve MODEL`) or correct --llm-url") from exc


def _error_text(response: httpx.Response) -> str:
    """The server's error message: OpenAI ``{"error": {"message"}}``, vLLM ``{"message"}``, FastAPI ``{"detail"}``,
    else the raw body (truncated to 500 characters)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error")
        for candidate in (error.get("message") if isinstance(error, dict) else error, body.get("message"),
                          body.get("detail")):
            if candidate:
                return str(candidate)[:500]
    return response.text[:500]


def _http_error(base_url: str, model: str, response: httpx.Response) -> LLMError:
    status = response.status_code
    fixes = {401: "set OPENAI_API_KEY (or api_key) to the server's key",
             403: "set OPENAI_API_KEY (or api_key) to a key allowed to use this model",
             404: f"check that --llm-url ends in /v1 and that --llm-model {model!r} is served (GET /v1/models)"}
    return _llm_error(f"LLM server {base_url}", expected="HTTP 200",
                      received=f"HTTP {status}: {_error_text(response)}",
                      fix=fixes.get(status, "read the server's message above and its logs"))


def _content(choice: Any) -> str:
    """Text of a choice: ``message.content`` as a string or a list of text parts; ``text`` of a completion."""
    message = choice.get("message") if isinstance(choice, dict) else None
    content = message.get("content") if isinstance(message, dict) else choice.get("text")
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def fit_image(rgb: npt.NDArray[np.uint8], max_side: int = 1024) -> Image.Image:
    """``(H, W, 3)`` uint8 -> PIL RGB image downscaled (aspect kept, Lanczos) so that its longer side is
    ``<= max_side``; smaller images are not enlarged. Its ``(H, W)`` is ``(img.height, img.width)``."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8 or arr.size == 0:
        raise input_error("image for the LLM", expected="an (H, W, 3) uint8 RGB array",
                          received=f"shape {arr.shape}, dtype {arr.dtype}", fix="pass MedicalImage.to_rgb_uint8()")
    if not isinstance(max_side, int) or max_side <= 0:
        raise input_error("max_side", expected="a positive number of pixels", received=repr(max_side),
                          fix="pass e.g. max_side=1024")
    height, width = arr.shape[:2]
    image = Image.fromarray(np.ascontiguousarray(arr))
    scale = max_side / max(height, width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def image_data_url(rgb: npt.NDArray[np.uint8], *, max_side: int = 1024) -> tuple[str, tuple[int, int]]:
    """PNG ``data:`` URL of ``rgb`` ((H, W, 3) uint8) after :func:`fit_image`, and the ``(H, W)`` actually sent."""
    image = fit_image(rgb, max_side)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return url, (image.height, image.width)


def with_image(messages: list[dict[str, Any]], image_url: str) -> list[dict[str, Any]]:
    """A copy of ``messages`` whose last user message becomes ``[image_url part, text part]`` (image first, as
    Qwen-VL and most VLMs are trained)."""
    out = copy.deepcopy(messages)
    for message in reversed(out):
        if message.get("role") == "user":
            text = message.get("content", "")
            message["content"] = [{"type": "image_url", "image_url": {"url": image_url}},
                                  {"type": "text", "text": text}]
            return out
    raise input_error("chat messages", expected="a user message to attach the image to",
                      received=f"roles {[m.get('role') for m in messages]}", fix="render a template first")
