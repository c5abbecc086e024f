"""Grounding with any OpenAI-compatible multimodal chat endpoint (vLLM, SGLang, OpenAI, ...).

Per phrase, one chat request: the v1 ``grounding`` template (:mod:`prompts.templates`) plus the image as a PNG data
URL, downscaled so that its longer side is at most ``max_side``. The reply is parsed by
:func:`agents.parsing.parse_grounding` (whatever format the model answers in) and mapped back to pixels of the
ORIGINAL image. With ``structured=True`` the request asks for :data:`agents.parsing.GROUNDING_SCHEMA` through
``response_format``; a server that refuses it is asked again without it, and the results say
``"structured_output": False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agents.grounders.base import GroundingResult
from agents.llm import OpenAIChatClient, image_data_url, with_image
from agents.parsing import ParseResult, parse_grounding, qwen25vl_input_size, response_format
from medvlm.errors import input_error
from medvlm.types import Box, Points, Region
from prompts.templates import load_templates

if TYPE_CHECKING:
    from medvlm.io import MedicalImage

__all__ = ["ANSWER_FORMATS", "QWEN25VL_MAX_PIXELS", "TOKEN_ANSWER_REGEX", "OpenAIGrounder", "check_phrases",
           "grounding_result"]

ANSWER_FORMATS = ("json", "tokens")

_TOKEN_BOX = r"<box>(<loc(0[0-9]{3}|10[01][0-9]|102[0-3])>){4}</box>"  # bins 0000-1023 only
TOKEN_ANSWER_REGEX = rf"[^;:<>\n]{{1,60}}: {_TOKEN_BOX}(; [^;:<>\n]{{1,60}}: {_TOKEN_BOX}){{0,7}}"
"""The syntax a ``medvlm train mllm`` model answers grounding questions in (1 to 8 labelled boxes)."""

QWEN25VL_MAX_PIXELS = 12845056
"""``max_pixels`` in the preprocessor config that Qwen2.5-VL checkpoints ship, hence what vLLM uses by default."""


class OpenAIGrounder:
    """:class:`~agents.grounders.base.Grounder` backed by an OpenAI-compatible server.

    Args:
        base_url: the server's OpenAI base URL (``--llm-url``), e.g. ``http://localhost:8000/v1``.
        model: the served model name (``--llm-model``).
        structured: ask for :data:`~agents.parsing.GROUNDING_SCHEMA` JSON via ``response_format``.
        max_side: longer side, pixels, of the image sent (the original is never enlarged).
        api_key, timeout_s: see :class:`~agents.llm.OpenAIChatClient`.
        max_tokens: reply length limit.
        qwen25vl_max_pixels: ``max_pixels`` of the server's Qwen2.5-VL processor; used only to map replies in
            Qwen2.5-VL's absolute-pixel format (the server resizes the sent image with ``smart_resize``).
        answer: ``"json"`` (any instruction-following VLM: the v1 ``grounding`` template, answers in
            :data:`~agents.parsing.GROUNDING_SCHEMA`) or ``"tokens"`` (a model fine-tuned by ``medvlm train mllm``:
            the ``grounding_tokens`` template it was trained on, answers ``label: <box>4 x <locNNNN></box>``; with
            ``structured`` the server is held to that syntax by vLLM's ``structured_outputs`` regex).
    """

    name = "openai"

    def __init__(self, base_url: str | None = None, model: str | None = None, *, structured: bool = True,
                 max_side: int = 1024, api_key: str | None = None, timeout_s: float = 60.0, max_tokens: int = 512,
                 qwen25vl_max_pixels: int = QWEN25VL_MAX_PIXELS, answer: str = "json") -> None:
        if not base_url:
            raise input_error("openai grounder", expected="the server URL (--llm-url), e.g. http://localhost:8000/v1",
                              received=repr(base_url), fix="pass --llm-url URL (start one with `vllm serve MODEL`)")
        if not model:
            raise input_error("openai grounder", expected="the served model name (--llm-model)", received=repr(model),
                              fix="pass --llm-model NAME as listed by GET <llm-url>/models")
        if not isinstance(max_side, int) or max_side <= 0:
            raise input_error("openai grounder max_side", expected="a positive number of pixels",
                              received=repr(max_side), fix="pass e.g. max_side=1024")
        if answer not in ANSWER_FORMATS:
            raise input_error("openai grounder answer", expected=f"one of {ANSWER_FORMATS}", received=repr(answer),
                              fix="use 'tokens' for models fine-tuned by `medvlm train mllm`, else 'json'")
        self.answer = answer
        self.client = OpenAIChatClient(base_url, model, api_key=api_key, timeout_s=timeout_s)
        self.model = model
        self.structured = bool(structured)
        self.max_side = max_side
        self.max_tokens = max_tokens
        self.qwen25vl_max_pixels = qwen25vl_max_pixels
        self.template = load_templates("1")["grounding" if answer == "json" else "grounding_tokens"]

    def ground_many(self, image: MedicalImage, phrases: Sequence[str]) -> list[GroundingResult]:
        """One request per phrase, all with the same data URL; geometry in pixels of ``image``. Server and
        connection failures raise :class:`~agents.llm.LLMError`."""
        checked = check_phrases(phrases)
        url, sent = image_data_url(image.to_rgb_uint8(), max_side=self.max_side)
        results = []
        for phrase in checked:
            if self.answer == "json":
                fields = {"phrase": phrase, "width": sent[1], "height": sent[0]}
                constraint: dict[str, Any] = {"response_format": response_format()} if self.structured else {}
            else:
                fields = {"phrase": phrase}
                constraint = {"structured_outputs": {"regex": TOKEN_ANSWER_REGEX}} if self.structured else {}
            messages = with_image(self.template.render(**fields), url)
            reply = self.client.chat(messages, max_tokens=self.max_tokens, **constraint)
            parsed = parse_grounding(reply, image_size=image.shape, sent_size=sent,
                                     fmt="auto" if self.answer == "json" else "medvlm")
            frame_size = sent
            if parsed.format == "qwen25vl":  # absolute pixels of the server's own resize of what we sent
                frame_size = qwen25vl_input_size(*sent, max_pixels=self.qwen25vl_max_pixels)
                parsed = parse_grounding(reply, image_size=image.shape, sent_size=frame_size, fmt="qwen25vl")
            provenance = {"grounder": self.name, "model": self.model,
                          "structured_output": self.client.last_structured, "sent_size": list(sent),
                          "frame_size": list(frame_size), "template": f"{self.template.name}/v1"}
            results.append(grounding_result(phrase, reply, parsed, provenance))
        return results


def check_phrases(phrases: Sequence[str]) -> list[str]:
    """``phrases`` stripped; a bare string, an empty phrase or a non-string raises InputError."""
    if isinstance(phrases, str) or not isinstance(phrases, Sequence):
        raise input_error("phrases", expected="a list of phrases", received=repr(phrases)[:120],
                          fix="wrap a single phrase in a list: ['left lung']")
    out = []
    for phrase in phrases:
        if not isinstance(phrase, str) or not phrase.strip():
            raise input_error("phrase", expected="a non-empty text phrase", received=repr(phrase),
                              fix="say what to find, e.g. 'left lung'")
        out.append(phrase.strip())
    return out


def grounding_result(phrase: str, reply: str, parsed: ParseResult, provenance: dict[str, Any]) -> GroundingResult:
    """Turn a parsed reply into a :class:`GroundingResult`.

    Regions keep the model's label (else the phrase); points become positive :class:`~medvlm.types.Points`; a
    points-only region gets the tight box of its points (degenerate for one point) and ``"box_from_points"`` in
    its provenance. Regions are sorted by score when every region has one. Each provenance gets ``format``,
    ``raw`` (reply[:2000]) and the parser's ``warnings``; ``note`` says why there is no region.
    """
    base = {**provenance, "format": parsed.format, "raw": reply[:2000]}
    regions = []
    for found in parsed.regions:
        box = found.box
        extra: dict[str, Any] = {}
        if box is None:
            xs, ys = [p[0] for p in found.points], [p[1] for p in found.points]
            box, extra = Box(min(xs), min(ys), max(xs), max(ys)), {"box_from_points": True}
        points = Points.from_lists(positive=found.points) if found.points else None
        regions.append(Region(box=box, label=found.label or phrase, points=points, score=found.score,
                              provenance={**base, "warnings": list(parsed.warnings), **extra}))
    if regions and all(r.score is not None for r in regions):
        regions.sort(key=lambda r: -(r.score or 0.0))
    note = ""
    if not regions:
        if parsed.format == "empty":
            note = "the model's reply was empty"
        elif parsed.format == "none":
            note = f"the model reported no such region: {reply.strip()[:200]!r}"
        else:
            note = "; ".join(parsed.warnings) or "the model's reply held no region"
    meta = {**base, "warnings": list(parsed.warnings)}
    return GroundingResult(phrase=phrase, regions=regions, note=note, meta=meta)
