"""Tolerant parsing of grounding replies from multimodal LLMs into pixel xyxy of the ORIGINAL image.

Every model family answers in its own syntax and frame; :func:`parse_grounding` detects which and maps it to the
project convention (:mod:`medvlm.types`: pixel xyxy boxes, pixel xy points, floats, original image grid):

========== =========================================================== ============================================
format     syntax                                                      frame of the numbers
========== =========================================================== ============================================
json       ``{"regions": [{"label", "box": [x0,y0,x1,y1],              pixels of the SENT image (``sent_size``);
           "points": [[x,y],...], "score"}]}`` (:data:`GROUNDING_SCHEMA`) the project's structured-output schema
qwen2vl    ``<|object_ref_start|>label<|object_ref_end|>``             0-1000 per axis of the image
           ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``, or bare
           ``(x1,y1),(x2,y2)``
qwen25vl   JSON with ``"bbox_2d": [x1,y1,x2,y2]`` / ``"point_2d": [x,y]`` absolute pixels of the model's resized input
                                                                       (``sent_size``, else
                                                                       :func:`qwen25vl_input_size` of the image)
paligemma  ``<locY0><locX0><locY1><locX1> label ; ...``                1024 bins per axis, order y x y x
medvlm     ``label: <box><locX0><locY0><locX1><locY1></box>; ...``    1024 bins per axis, order x y x y
           (:mod:`medvlm.tokens`, what ``medvlm train mllm`` teaches)
gemini     JSON with ``"box_2d": [ymin,xmin,ymax,xmax]``,               0-1000 per axis, order y x
           ``"point": [y, x]``
generic    any other JSON: keys box/bbox/bounding_box/coordinates,     pixels of the SENT image
           points/point, label/name, score/confidence; a dict, a list,
           or ``{"regions"|"boxes"|"objects": [...]}``; in fences or
           prose
========== =========================================================== ============================================

JSON-based formats whose numbers are all ``<= 1.0`` with at least one written as a decimal (``0.25``, ``1.0``) are
read as fractions of the image instead. Nothing here raises on model output: problems become
:attr:`ParseResult.warnings` (clipped, swapped or dropped geometry; unparseable text). Only bad caller arguments
(non-positive sizes, unknown ``fmt``) raise :class:`~medvlm.errors.InputError`.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medvlm.coords import Frame, from_loc_tokens, normalized_frame, per_mille_frame, resized_frame
from medvlm.errors import InputError, input_error
from medvlm.tokens import decode_box
from medvlm.types import Box

__all__ = [
    "FORMATS",
    "GROUNDING_SCHEMA",
    "ParseResult",
    "ParsedRegion",
    "parse_grounding",
    "qwen25vl_input_size",
    "response_format",
]

FORMATS: tuple[str, ...] = ("auto", "json", "qwen2vl", "qwen25vl", "paligemma", "medvlm", "gemini", "generic")
"""Values of ``fmt`` accepted by :func:`parse_grounding`."""

GROUNDING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "regions": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
                    "points": {
                        "type": "array",
                        "items": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
                    },
                    "score": {"type": "number", "minimum": 0, "maximum": 1},
                },
                "required": ["label", "box"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["regions"],
    "additionalProperties": False,
}
"""JSON schema of the project's grounding answer: boxes ``[x0, y0, x1, y1]`` and points ``[x, y]`` in pixels of
the image the model sees; ``score`` in [0, 1]; ``{"regions": []}`` when the target is not visible."""

_MAX_CHARS = 20_000  # replies are a few hundred tokens; the cap bounds the JSON scan on pathological output
_MAX_REGIONS = 100
_EPS = 1e-6  # pixels; float error of the frame round trip is not worth a "clipped" warning
_NUM = r"[-+]?\d+(?:\.\d+)?"
_BOX_KEYS = ("bbox_2d", "box_2d", "box", "bbox", "bounding_box", "boundingbox", "coordinates")
_POINT_KEYS = ("point_2d", "points", "point")
_LABEL_KEYS = ("label", "name")
_SCORE_KEYS = ("score", "confidence")
_LIST_KEYS = ("regions", "boxes", "objects", "detections")

_MEDVLM_RE = re.compile(r"(?:([^;:<>\n]*):\s*)?<box>\s*((?:<loc\d{4}>\s*){4})</box>")
_LOC_RE = re.compile(r"((?:<loc\d{4}>\s*){4})(?:<seg\d{3}>\s*)*([^;<]*)")
_QWEN_TOKENS = ("<|box_start|>", "<|object_ref_start|>")
_QWEN_RE = re.compile(
    r"<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>"
    rf"|(?:<\|box_start\|>)?\s*\(\s*(?P<a>{_NUM})\s*,\s*(?P<b>{_NUM})\s*\)\s*,?\s*"
    rf"\(\s*(?P<c>{_NUM})\s*,\s*(?P<d>{_NUM})\s*\)\s*(?:<\|box_end\|>)?",
    re.S,
)
_KEYED_BOX_RE = re.compile(
    rf"[\"']?(?P<key>{'|'.join(_BOX_KEYS)})[\"']?\s*[:=]\s*\[\s*(?P<v>{_NUM}(?:\s*,\s*{_NUM}){{3}})\s*\]", re.I)
_LABEL_RE = re.compile(r"[\"'](?:label|name)[\"']\s*:\s*[\"']([^\"']*)[\"']")
_NEGATIVE_RE = re.compile(
    r"^\W*(?:no|none|nothing|null|n/?a)\b"
    r"|\bno (?:finding|abnormalit|evidence|such|visible|region|target|object|lesion|match)"
    r"|\bnot (?:visible|found|present|seen|identified|detected|shown|depicted|locat|appar|in the image)"
    r"|\b(?:cannot|can ?not|can't|could not|couldn't|unable to|impossible to) "
    r"(?:find|locate|identify|see|detect|determine|ground)"
    r"|\babsent\b",
    re.I,
)


@dataclass
class ParsedRegion:
    """One region of a reply, already in the ORIGINAL image's pixel frame.

    ``box``: pixel xyxy (clipped to the image, positive area), or None when the reply gave only points.
    ``points``: ``(x, y)`` pixel positions inside the image. ``label``: the model's label, if any.
    ``score``: in [0, 1] when the model gave a valid one.
    """

    box: Box | None
    points: list[tuple[float, float]] = field(default_factory=list)
    label: str | None = None
    score: float | None = None


@dataclass
class ParseResult:
    """What :func:`parse_grounding` found.

    ``format``: one of ``json qwen2vl qwen25vl paligemma medvlm gemini generic`` when geometry (or an explicit empty
    answer such as ``{"regions": []}``) was parsed; ``"empty"`` for a blank reply, ``"none"`` for a "no finding"
    reply, ``"unparsed"`` when nothing could be read (then ``warnings`` starts with ``"reply not parseable:"``).
    """

    regions: list[ParsedRegion] = field(default_factory=list)
    format: str = "unparsed"
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Raw:
    """A region as written in the reply: numbers in the reply's own axis order and frame."""

    box: list[float] | None
    points: list[list[float]]
    label: str | None
    score: Any
    index: int = 0  # 1-based position among the reply's regions, for warnings; 0 = position in the list


# --------------------------------------------------------------------------------------------------- public API


def response_format() -> dict[str, Any]:
    """The OpenAI-compatible ``response_format`` asking for :data:`GROUNDING_SCHEMA` (accepted by vLLM's
    structured outputs and by OpenAI). ``strict`` is False because the schema has optional keys."""
    return {"type": "json_schema",
            "json_schema": {"name": "grounding", "schema": copy.deepcopy(GROUNDING_SCHEMA), "strict": False}}


def qwen25vl_input_size(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                        max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """``(H, W)`` in pixels of the image Qwen2-VL / Qwen2.5-VL actually encode for an input of ``(height, width)``.

    Same algorithm as ``transformers``' ``smart_resize`` (a copy, so that parsing does not import transformers):
    both sides rounded to a multiple of ``factor`` (patch 14 x merge 2), then scaled (aspect kept) into
    ``[min_pixels, max_pixels]``. The defaults are the transformers defaults; Qwen2.5-VL checkpoints ship
    ``max_pixels=12845056``, which is what a server without ``mm_processor_kwargs`` uses.
    """
    for name, value in (("height", height), ("width", width), ("factor", factor), ("max_pixels", max_pixels)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise input_error(f"qwen25vl_input_size {name}", expected="a positive integer", received=repr(value),
                              fix="pass sizes in pixels, e.g. qwen25vl_input_size(1024, 768)")
    if max(height, width) / min(height, width) > 200:
        raise input_error("qwen25vl_input_size", expected="an aspect ratio below 200 (the Qwen-VL limit)",
                          received=f"{height}x{width}", fix="crop the image before sending it to Qwen-VL")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return int(h_bar), int(w_bar)


def parse_grounding(text: str, *, image_size: tuple[int, int], sent_size: tuple[int, int] | None = None,
                    fmt: str = "auto") -> ParseResult:
    """Parse a model's grounding reply into regions in pixel xyxy / xy of the original image.

    Args:
        text: the reply (any string; None is read as empty).
        image_size: ``(H, W)`` of the ORIGINAL image, pixels.
        sent_size: ``(H, W)`` of the image as given to the model (after the caller's downscale), pixels; frame of
            the ``json``/``generic`` formats and, when given, of ``qwen25vl`` (pass the model's resized input
            there). Default: ``image_size`` (``qwen25vl``: :func:`qwen25vl_input_size` of ``image_size``).
        fmt: one of :data:`FORMATS`; ``"auto"`` detects it.

    Rules: out-of-range boxes are clipped, inverted corners swapped, zero-area boxes and out-of-image points
    dropped, each with a warning. Blank and "no finding" replies give no region and no warning; unreadable text
    gives no region and a warning ``"reply not parseable: '<at most 200 characters>'"``.
    """
    height, width = _check_size(image_size, "image_size")
    sent = _check_size(sent_size, "sent_size") if sent_size is not None else None
    if fmt not in FORMATS:
        raise input_error("parse_grounding fmt", expected=f"one of {FORMATS}", received=repr(fmt),
                          fix="pass fmt='auto' to detect the format")
    reply = "" if text is None else str(text)
    warnings: list[str] = []
    if len(reply) > _MAX_CHARS:
        warnings.append(f"reply of {len(reply)} characters truncated to {_MAX_CHARS} for parsing")
        reply = reply[:_MAX_CHARS]
    stripped = reply.strip()
    if not stripped:
        return ParseResult([], "empty", warnings)
    found = _extract(stripped, fmt, warnings)
    if found is None:
        if _NEGATIVE_RE.search(stripped):
            return ParseResult([], "none", warnings)
        more = "..." if len(stripped) > 200 else ""
        return ParseResult([], "unparsed", [f"reply not parseable: {stripped[:200]!r}{more}", *warnings])
    detected, raws = found
    if len(raws) > _MAX_REGIONS:
        warnings.append(f"{len(raws)} regions in the reply; only the first {_MAX_REGIONS} kept")
        raws = raws[:_MAX_REGIONS]
    regions = _convert(raws, detected, height, width, sent, warnings)
    return ParseResult(regions, detected, warnings)


# --------------------------------------------------------------------------------------------------- extraction


def _check_size(size: object, name: str) -> tuple[int, int]:
    ok = (isinstance(size, (tuple, list)) and len(size) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size))
    if not ok:
        raise input_error(f"parse_grounding {name}", expected="(height, width): two positive integers (pixels)",
                          received=repr(size), fix="pass e.g. image.shape of the MedicalImage")
    assert isinstance(size, (tuple, list))
    return int(size[0]), int(size[1])


def _extract(text: str, fmt: str, warnings: list[str]) -> tuple[str, list[_Raw]] | None:
    """``(format, raw regions)``, or None when nothing in ``text`` reads as geometry or an explicit empty answer."""
    auto = fmt == "auto"
    deferred: list[str] = []
    if fmt == "medvlm" or (auto and "<box>" in text and "<loc" in text):
        own: list[str] = []  # dropped when another format reads the reply after all
        raws = _medvlm(text, own)
        if raws or not auto:
            warnings += own
            return ("medvlm", raws) if raws else None
        deferred = own
    if fmt == "paligemma" or (auto and "<loc" in text):
        raws = _paligemma(text, warnings)
        if raws or not auto:
            return ("paligemma", raws) if raws else None
    if fmt == "qwen2vl" or (auto and any(tok in text for tok in _QWEN_TOKENS)):
        raws = _qwen2vl(text)
        if raws or not auto:
            return ("qwen2vl", raws) if raws else None
    if fmt in ("auto", "json", "qwen25vl", "gemini", "generic"):
        found = _from_json(text, fmt, warnings)
        if found is not None:
            return found
        found = _from_keyed_pattern(text, fmt, warnings)
        if found is not None:
            return found
    if auto:
        raws = _qwen2vl(text)
        if raws:
            return "qwen2vl", raws
    warnings += deferred
    return None


def _paligemma(text: str, warnings: list[str]) -> list[_Raw]:
    raws = []
    for match in _LOC_RE.finditer(text):
        bins = [float(b) for b in re.findall(r"<loc(\d{4})>", match.group(1))]
        raws.append(_Raw(bins, [], match.group(2).strip() or None, None))
    leftover = len(re.findall(r"<loc\d{4}>", text)) - 4 * len(raws)
    if leftover:
        warnings.append(f"{leftover} <loc> token(s) not in groups of four ignored")
    return raws


def _medvlm(text: str, warnings: list[str]) -> list[_Raw]:
    raws = []
    for match in _MEDVLM_RE.finditer(text):
        bins = [float(b) for b in re.findall(r"<loc(\d{4})>", match.group(2))]
        raws.append(_Raw(bins, [], (match.group(1) or "").strip() or None, None))
    leftover = text.count("<box>") - len(raws)
    if leftover:
        warnings.append(f"{leftover} <box> group(s) without 4 <loc> tokens ignored")
    return raws


def _qwen2vl(text: str) -> list[_Raw]:
    raws: list[_Raw] = []
    label: str | None = None
    for match in _QWEN_RE.finditer(text):
        if match.group("label") is not None:
            label = match.group("label").strip() or None  # Qwen2-VL names the object once, then lists its boxes
            continue
        box = [_number(match.group(k)) for k in "abcd"]
        raws.append(_Raw(box, [], label, None))
    return raws


def _number(token: str) -> float:
    """A number token as int or float, keeping the distinction that the fraction rule relies on."""
    return float(token) if "." in token else int(token)


def _json_values(text: str) -> list[Any]:
    """Every top-level JSON object/array in ``text`` (inside fences or prose), in order."""
    decoder = json.JSONDecoder()
    values = []
    i = 0
    while i < len(text):
        if text[i] in "[{":
            try:
                value, end = decoder.raw_decode(text, i)
            except (ValueError, RecursionError):
                i += 1
                continue
            values.append(value)
            i = end
        else:
            i += 1
    return values


def _repair(text: str) -> str:
    """Common non-JSON dialects: trailing commas, Python literals, single quotes (when no double quote is used)."""
    fixed = re.sub(r",\s*([}\]])", r"\1", text)
    fixed = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", fixed)))
    if '"' not in fixed:
        fixed = fixed.replace("'", '"')
    return fixed


def _from_json(text: str, fmt: str, warnings: list[str]) -> tuple[str, list[_Raw]] | None:
    values = _json_values(text)
    items, explicit_empty = _collect(values)
    if not items and not explicit_empty:
        repaired = _repair(text)
        if repaired != text:
            values = _json_values(repaired)
            items, explicit_empty = _collect(values)
    if not items and not explicit_empty:
        return None
    if items and all(isinstance(item, list) for item in items) and _KEYED_BOX_RE.search(text):
        return None  # bare lists cut out of broken keyed JSON: the keyed pattern keeps their key and label
    detected = fmt if fmt != "auto" else _guess_format(items, values)
    raws = [raw for i, item in enumerate(items, 1) if (raw := _raw_from_item(item, i, warnings))]
    return detected, raws


def _collect(values: list[Any]) -> tuple[list[Any], bool]:
    """Region candidates (dicts with a geometry key, bare number lists) and whether an explicit empty answer
    (``[]``, ``{}``, ``{"regions": []}``) was given."""
    items: list[Any] = []
    explicit_empty = False

    def visit(value: Any, depth: int) -> None:
        nonlocal explicit_empty
        if depth > 3:
            return
        if isinstance(value, dict):
            lists = [value[k] for k in _LIST_KEYS if isinstance(value.get(k), list)]
            if lists:
                for inner in lists:
                    explicit_empty |= not inner
                    for element in inner:
                        visit(element, depth + 1)
            elif any(k.lower() in _BOX_KEYS + _POINT_KEYS for k in value):
                items.append(value)
            elif not value:
                explicit_empty = True
            else:  # e.g. {"answer": {"box": ...}}; bare number lists under unknown keys are not geometry
                for inner in value.values():
                    if isinstance(inner, dict) or (isinstance(inner, list) and not _is_numbers(inner)):
                        visit(inner, depth + 1)
        elif isinstance(value, list):
            if _is_numbers(value) and len(value) in (2, 4):
                items.append(value)
            elif not value:
                explicit_empty = True
            else:
                for element in value:
                    visit(element, depth + 1)

    for value in values:
        visit(value, 0)
    return items, explicit_empty


def _guess_format(items: list[Any], values: list[Any]) -> str:
    keys = {k.lower() for item in items if isinstance(item, dict) for k in item}
    if keys & {"bbox_2d", "point_2d"}:
        return "qwen25vl"
    if "box_2d" in keys:
        return "gemini"
    if any(isinstance(v, dict) and isinstance(v.get("regions"), list) for v in values):
        return "json"
    return "generic"


def _is_numbers(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _raw_from_item(item: Any, index: int, warnings: list[str]) -> _Raw | None:
    if isinstance(item, list):  # a bare [x0, y0, x1, y1] or [x, y]
        if not _finite(item):
            warnings.append(f"region {index}: {_short(item)} holds non-finite numbers; ignored")
            return None
        if len(item) == 4:
            return _Raw(list(item), [], None, None, index)
        return _Raw(None, [list(item)], None, None, index)
    lowered = {str(k).lower(): v for k, v in item.items()}
    box_value = next((lowered[k] for k in _BOX_KEYS if k in lowered), None)
    point_value = next((lowered[k] for k in _POINT_KEYS if k in lowered), None)
    box = _box_numbers(box_value) if box_value is not None else None
    if box_value is not None and box is None:
        warnings.append(f"region {index}: box {_short(box_value)} is not 4 finite numbers; ignored")
    points = _point_numbers(point_value) if point_value is not None else []
    if point_value is not None and points is None:
        warnings.append(f"region {index}: points {_short(point_value)} are not [x, y] pairs; ignored")
        points = []
    assert points is not None
    if box is None and not points:
        if box_value is None and point_value is None:
            return None
        warnings.append(f"region {index}: no usable box or point; dropped")
        return None
    label = next((lowered[k] for k in _LABEL_KEYS if lowered.get(k) not in (None, "")), None)
    score = next((lowered[k] for k in _SCORE_KEYS if k in lowered), None)
    return _Raw(box, points, None if label is None else str(label).strip() or None, score, index)


def _box_numbers(value: Any) -> list[float] | None:
    """4 finite numbers from ``[a, b, c, d]``, ``[[a, b], [c, d]]``, ``"a, b, c, d"`` or an xyxy/xywh dict."""
    if isinstance(value, str):
        tokens = re.findall(_NUM, value)
        value = [_number(t) for t in tokens]
    if isinstance(value, dict):
        low = {str(k).lower(): v for k, v in value.items()}
        for keys in (("x0", "y0", "x1", "y1"), ("xmin", "ymin", "xmax", "ymax"), ("x1", "y1", "x2", "y2"),
                     ("left", "top", "right", "bottom")):
            if all(k in low for k in keys):
                value = [low[k] for k in keys]
                break
        else:
            size = next((k for k in (("width", "height"), ("w", "h")) if all(s in low for s in k)), None)
            if size is None or "x" not in low or "y" not in low:
                return None
            nums = [low["x"], low["y"], low[size[0]], low[size[1]]]
            if not _finite(nums):
                return None
            value = [nums[0], nums[1], nums[0] + nums[2], nums[1] + nums[3]]
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, list) and len(v) == 2 for v in value):
        value = [*value[0], *value[1]]
    if isinstance(value, list) and len(value) == 4 and _finite(value):
        return list(value)
    return None


def _point_numbers(value: Any) -> list[list[float]] | None:
    """``[[a, b], ...]`` from ``[a, b]``, a list of pairs, ``{"x", "y"}`` or a list of such dicts."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and len(value) == 2 and _finite(value):
        return [list(value)]
    if not isinstance(value, list):
        return None
    out = []
    for element in value:
        if isinstance(element, dict) and "x" in element and "y" in element:
            element = [element["x"], element["y"]]
        if not (isinstance(element, list) and len(element) == 2 and _finite(element)):
            return None
        out.append(list(element))
    return out


def _finite(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _from_keyed_pattern(text: str, fmt: str, warnings: list[str]) -> tuple[str, list[_Raw]] | None:
    """Last resort for broken JSON (e.g. cut off by max_tokens): ``"bbox_2d": [a, b, c, d]`` patterns."""
    raws, keys = [], set()
    for match in _KEYED_BOX_RE.finditer(text):
        keys.add(match.group("key").lower())
        start = text.rfind("{", 0, match.start())
        end = text.find("}", match.end())
        label = _LABEL_RE.search(text[max(start, 0): end if end >= 0 else len(text)])
        box = [_number(t) for t in re.findall(_NUM, match.group("v"))]
        raws.append(_Raw(box, [], (label.group(1).strip() or None) if label else None, None))
    if not raws:
        return None
    warnings.append(f"reply is not valid JSON; {len(raws)} box(es) recovered by pattern")
    if fmt != "auto":
        return fmt, raws
    return ("qwen25vl" if "bbox_2d" in keys else "gemini" if "box_2d" in keys else "generic"), raws


# --------------------------------------------------------------------------------------------------- conversion


def _convert(raws: list[_Raw], fmt: str, height: int, width: int, sent: tuple[int, int] | None,
             warnings: list[str]) -> list[ParsedRegion]:
    """Map raw numbers to original pixels with the frame of ``fmt``, then validate the geometry."""
    yx_order = fmt in ("gemini", "paligemma")
    frame: Frame
    if fmt in ("json", "generic", "qwen25vl", "gemini") and _all_fractions(raws):
        frame, frame_name = normalized_frame(height, width), "fractions of the image"
    elif fmt in ("qwen2vl", "gemini"):
        frame, frame_name = per_mille_frame(height, width), "0-1000 per axis"
    elif fmt == "qwen25vl":
        model_h, model_w = sent if sent is not None else _qwen_default(height, width, warnings)
        frame, frame_name = resized_frame(height, width, model_h, model_w), f"pixels of the {model_w}x{model_h} input"
    else:
        sent_h, sent_w = sent if sent is not None else (height, width)
        frame, frame_name = resized_frame(height, width, sent_h, sent_w), f"pixels of the {sent_w}x{sent_h} image"
    regions = []
    for position, raw in enumerate(raws, 1):
        index = raw.index or position
        if fmt == "paligemma":
            box = _loc_box(raw.box, index, height, width, warnings) if raw.box is not None else None
        elif fmt == "medvlm" and raw.box is not None:
            box = _medvlm_box(raw.box, index, height, width, warnings)
        elif raw.box is not None:
            values = [raw.box[1], raw.box[0], raw.box[3], raw.box[2]] if yx_order else list(raw.box)
            box = _frame_box(values, frame, frame_name, index, height, width, warnings)
        else:
            box = None
        points = []
        for p in raw.points:
            u, v = (p[1], p[0]) if yx_order else (p[0], p[1])
            x, y = (float(c) for c in _inverse(frame, [u, v]))
            if -_EPS <= x <= width + _EPS and -_EPS <= y <= height + _EPS:
                points.append((min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height))))
            else:
                warnings.append(f"region {index}: point {_short(p)} ({frame_name}) is outside the image; dropped")
        if box is None and not points:
            continue
        regions.append(ParsedRegion(box, points, raw.label, _score(raw.score, index, warnings)))
    return regions


def _qwen_default(height: int, width: int, warnings: list[str]) -> tuple[int, int]:
    try:
        return qwen25vl_input_size(height, width)
    except InputError:  # aspect ratio beyond Qwen's limit: the model cannot have seen this image resized
        warnings.append(f"no Qwen2.5-VL input size for a {width}x{height} image; coordinates read as image pixels")
        return height, width


def _inverse(frame: Frame, uv: list[Any]) -> np.ndarray[Any, Any]:
    # huge numbers a model may write overflow to +-inf, which the clipping and range checks then handle
    with np.errstate(over="ignore", invalid="ignore"):
        return frame.inverse_xy(uv)


def _all_fractions(raws: list[_Raw]) -> bool:
    values = [v for raw in raws for v in [*(raw.box or []), *(c for p in raw.points for c in p)]]
    return bool(values) and all(v <= 1.0 for v in values) and any(isinstance(v, float) for v in values)


def _frame_box(values: list[float], frame: Frame, frame_name: str, index: int, height: int, width: int,
               warnings: list[str]) -> Box | None:
    u0, v0, u1, v1 = (float(v) for v in values)
    if u0 > u1 or v0 > v1:
        warnings.append(f"region {index}: inverted corners {_short(values)}; swapped")
        u0, u1 = min(u0, u1), max(u0, u1)
        v0, v1 = min(v0, v1), max(v0, v1)
    (x0, y0), (x1, y1) = _inverse(frame, [[u0, v0], [u1, v1]]).tolist()
    if any(math.isnan(c) for c in (x0, y0, x1, y1)):
        warnings.append(f"region {index}: box {_short(values)} does not map to pixels; dropped")
        return None
    clipped = [min(max(x0, 0.0), width), min(max(y0, 0.0), height),
               min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        warnings.append(f"region {index}: box {_short(values)} ({frame_name}) has no area inside the "
                        f"{width}x{height} image; dropped")
        return None
    if any(abs(a - b) > _EPS for a, b in zip((x0, y0, x1, y1), clipped)):
        warnings.append(f"region {index}: box {_short(values)} ({frame_name}) extends outside the {width}x{height} "
                        f"image; clipped to {[round(c, 2) for c in clipped]}")
    return Box(*clipped)


def _sorted_bins(bins: list[float], index: int, warnings: list[str]) -> list[float]:
    """Four location bins, two per corner (either axis order): clipped to 1023 and each axis ordered, with a
    warning for either repair."""
    if any(b > 1023 for b in bins):
        warnings.append(f"region {index}: <loc> bins {[int(b) for b in bins]} above 1023; clipped")
        bins = [min(b, 1023.0) for b in bins]
    a0, b0, a1, b1 = bins
    if a0 > a1 or b0 > b1:
        warnings.append(f"region {index}: inverted <loc> corners {[int(b) for b in bins]}; swapped")
    return [min(a0, a1), min(b0, b1), max(a0, a1), max(b0, b1)]


def _loc_box(bins: list[float], index: int, height: int, width: int, warnings: list[str]) -> Box:
    """PaliGemma bins ``(y0, x0, y1, x1)`` -> Box; bins above 1023 are clipped, inverted corners swapped."""
    return from_loc_tokens(_sorted_bins(bins, index, warnings), height, width)


def _medvlm_box(bins: list[float], index: int, height: int, width: int, warnings: list[str]) -> Box:
    """medvlm bins ``(x0, y0, x1, y1)`` -> Box through :func:`medvlm.tokens.decode_box` (its exact inverse);
    bins above 1023 are clipped and inverted corners swapped, each with a warning."""
    ordered = _sorted_bins(bins, index, warnings)
    box = decode_box("<box>" + "".join(f"<loc{int(b):04d}>" for b in ordered) + "</box>", height, width)
    assert box is not None  # four bins in [0, 1023] always decode
    return box


def _score(value: Any, index: int, warnings: list[str]) -> float | None:
    if value is None:
        return None
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = math.nan
    if not 0.0 <= score <= 1.0:  # also rejects NaN
        warnings.append(f"region {index}: score {_short(value)} is not a number in [0, 1]; ignored")
        return None
    return score


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
