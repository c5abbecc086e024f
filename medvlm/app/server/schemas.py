"""Pydantic models of the HTTP API: request bodies (JSON encoding) and responses, as the OpenAPI schema shows them.

Coordinates everywhere are pixels of the ORIGINAL uploaded image (after DICOM/NIfTI slice selection): boxes
``[x0, y0, x1, y1]`` (left, top, right, bottom; x = column, y = row; the tight box of a mask is exclusive at
the right/bottom edge), points ``{"x", "y", "label"}`` (label 1 = inside, 0 = outside). Masks are
:mod:`medvlm.app.server.rle` objects on the same grid. Images in JSON bodies are base64 strings or
``data:<type>;base64,...`` URLs; in multipart forms they are file parts and the JSON-valued fields (``box``,
``points``, ``phrases``...) are JSON text.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MAX_PROMPTS",
    "MAX_QUESTION_CHARS",
    "ChatCompletion",
    "ChatCompletionRequest",
    "Deleted",
    "ErrorResponse",
    "GroundRequest",
    "GroundResponse",
    "Health",
    "JobRequest",
    "JobStatus",
    "LinkReportRequest",
    "LinkReportResponse",
    "ModelCard",
    "ModelList",
    "PacsJobStatus",
    "PacsLinkReportRequest",
    "PacsSegmentRequest",
    "ReferenceSegmentRequest",
    "ReferenceSegmentResponse",
    "RegionOut",
    "SegmentRequest",
    "SegmentResponse",
]

_IMAGE = ("the image: base64 of a PNG, JPEG, DICOM or NIfTI file, or a data URL (JSON body); a file part "
          "(multipart form)")


#: most prompts (boxes, points per list, texts, labels) in one segment request: each one is a decoder pass, and
#: 10,000 boxes would hold the model for minutes
MAX_PROMPTS = 64

#: a coordinate in pixels: a finite number (NaN / inf are refused when the body is read)
Coord = Annotated[float, Field(allow_inf_nan=False)]
BoxIn = Annotated[list[Coord], Field(min_length=4, max_length=4, description="[x0, y0, x1, y1], pixels")]
PointIn = Annotated[list[Coord], Field(min_length=2, max_length=2, description="[x, y], pixels")]
#: longest question or phrase of POST /v1/ground (and of a chat question)
MAX_QUESTION_CHARS = 2000

#: a phrase, a structure name or a label
Name = Annotated[str, Field(max_length=500)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------------------- common


class PointsIn(_Request):
    """Point prompts in pixels of the original image: ``[[x, y], ...]``."""

    positive: list[PointIn] = Field(default_factory=list, max_length=MAX_PROMPTS,
                                    description="points inside the target, [[x, y], ...]")
    negative: list[PointIn] = Field(default_factory=list, max_length=MAX_PROMPTS,
                                    description="points outside the target, [[x, y], ...]")


class RLEMask(_Response):
    """Uncompressed run-length mask (see medvlm.app.server.rle): runs of 0 and 1 alternating, starting with zeros, over
    the mask read row by row; the counts sum to H * W."""

    size: list[int] = Field(description="[H, W] of the original image, pixels")
    counts: list[int] = Field(description="run lengths, first run = zeros (may be 0)")
    order: Literal["row-major"] = "row-major"


class PointOut(_Response):
    x: float = Field(description="column, pixels of the original image")
    y: float = Field(description="row, pixels of the original image")
    label: int = Field(description="1 positive (inside), 0 negative (outside)")


class RegionOut(_Response):
    """One located region; geometry in pixels of the original image. A structure with a clinical measurement also
    carries ``measurements`` (fetal head: ``head_circumference_mm``, ``biparietal_diameter_mm``,
    ``occipitofrontal_diameter_mm`` of its ellipse; ``_px`` without a pixel spacing): an extra field, absent
    otherwise, so stored results read back exactly as answered."""

    id: int = Field(description="1-based, unique within the result; masks.png uses it as the label value")
    label: str
    box: list[float] = Field(description="[x0, y0, x1, y1] pixels of the original image (tight box of the mask)")
    points: list[PointOut] = Field(default_factory=list)
    mask: RLEMask | None = None
    score: float | None = Field(default=None, description="model confidence in [0, 1] when it gives one")
    area_px: int | None = None
    area_mm2: float | None = Field(default=None, description="when the image has a pixel spacing")
    provenance: dict[str, Any] = Field(default_factory=dict, description="model, prompt and how it was made")
    checks: dict[str, Any] = Field(default_factory=dict, description="anatomy checks (laterality, zone) and action")


class ImageInfo(_Response):
    width: int = Field(description="columns, pixels")
    height: int = Field(description="rows, pixels")
    spacing_mm: list[float] | None = Field(default=None, description="[row_mm, col_mm] or null")
    modality: str = "unknown"
    format: str = Field(default="", description="png, jpeg, dicom or nifti")


class _Result(_Response):
    result_id: str = Field(description="id for GET /v1/results/{result_id}.json and its mask exports")
    image: ImageInfo
    regions: list[RegionOut]
    timings_s: dict[str, float] = Field(default_factory=dict)


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable kind, e.g. invalid_input, payload_too_large, timeout")
    message: str
    expected: str = ""
    fix: str = ""


class ErrorResponse(BaseModel):
    """Every error answers this shape, with the HTTP status saying which class of error it is."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    models: dict[str, bool] = Field(description="model name -> loaded yet (models load on first use)")


# ----------------------------------------------------------------------------------------------- endpoints


class SegmentRequest(_Request):
    """POST /v1/segment: box and/or point prompts (LiteMedSAM) and/or text prompts (Med-VLM) on one image."""

    image: str = Field(description=_IMAGE)
    box: BoxIn | Annotated[list[BoxIn], Field(max_length=MAX_PROMPTS)] | None = Field(
        default=None, description=f"[x0, y0, x1, y1] or a list of at most {MAX_PROMPTS} of them, pixels of the "
        "original image; one region each")
    points: PointsIn | None = Field(default=None, description="points; they join the box when there is one box")
    text: Name | Annotated[list[Name], Field(max_length=MAX_PROMPTS)] | None = Field(
        default=None, description="structure(s) to segment from text (Med-VLM)")
    label: Name | Annotated[list[Name], Field(max_length=MAX_PROMPTS)] | None = Field(
        default=None, description="name of each box's structure, in order")
    slice: int | None = Field(default=None, ge=0, description="slice of a 3D NIfTI (along its third array axis) / "
                              "frame of a multi-frame DICOM")
    multimask: bool = Field(default=False, description="LiteMedSAM: keep the best of 3 masks by predicted IoU")
    spacing_mm: Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]],
                          Field(min_length=2, max_length=2)] | None = Field(
        default=None, description="[row_mm, col_mm] pixel size of a PNG/JPEG (which does not store it; replaces a "
        "DICOM's own): areas and measurements (fetal head circumference) come in mm")


class SegmentResponse(_Result):
    pass


class GroundRequest(_Request):
    """POST /v1/ground: a phrase or a question -> the grounding agent's answer and regions."""

    image: str = Field(description=_IMAGE)
    text: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS, description="a phrase ('left lung') or a question")
    slice: int | None = Field(default=None, ge=0)


class GroundResponse(_Result):
    answer: str = Field(description="one paragraph: where the phrase is, how sure, what the checks did")
    question: str
    phrase: str = Field(description="the phrase extracted from the question and grounded")
    note: str = ""
    grounder: str = ""


class LinkReportRequest(_Request):
    """POST /v1/link-report: every sentence of a report -> grounded / negated / not_groundable, with regions."""

    image: str = Field(description=_IMAGE)
    report: str = Field(min_length=1, max_length=20000, description="the report text")
    threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="regions scoring below are dropped")
    slice: int | None = Field(default=None, ge=0)


class SentenceOut(_Response):
    index: int = Field(description="1-based sentence number")
    text: str
    status: Literal["grounded", "negated", "not_groundable"]
    region_ids: list[int] = Field(default_factory=list, description="ids of this sentence's regions")
    note: str = ""


class LinkReportResponse(_Result):
    sentences: list[SentenceOut]


class ReferenceSegmentRequest(_Request):
    """POST /v1/reference-segment: what a reference image shows (mask or box), found in target images."""

    reference: str = Field(description="the reference image (see image)")
    reference_mask: str | None = Field(default=None, description="PNG mask of the structure on the reference "
                                       "(white = structure), same size as the reference")
    reference_box: BoxIn | None = Field(default=None, description="[x0, y0, x1, y1] on the reference, pixels")
    target: str | list[str] = Field(description="one or more target images")
    label: str = Field(default="structure", max_length=200, description="name of the structure")
    mask_source: Literal["vote", "segmenter"] = Field(default="vote", description="vote: label-transfer map; "
                                                      "segmenter: LiteMedSAM from the map's box")


class TargetOut(_Response):
    index: int = Field(description="0-based position of the target in the request")
    result_id: str
    image: ImageInfo
    regions: list[RegionOut]


class ReferenceSegmentResponse(_Response):
    label: str
    targets: list[TargetOut]
    timings_s: dict[str, float] = Field(default_factory=dict)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI chat.completions request; the image is a data URL in an image_url content part of a user message."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(default="medvlm-grounding", description="a model id of GET /v1/models")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = Field(default=False, description="true: server-sent events of chat.completion.chunk objects, the "
                         "last with finish_reason 'stop' and the regions, then data: [DONE]")
    stream_options: dict[str, Any] | None = Field(default=None, description="{\"include_usage\": true}: a usage "
                                                  "chunk before [DONE]")


class ChatChoiceMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str
    regions: list[RegionOut] = Field(default_factory=list)


class ChatChoice(_Response):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str = "stop"


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: dict[str, int] = Field(default_factory=dict)
    regions: list[RegionOut] = Field(default_factory=list)
    result_id: str = ""


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the server started")
    owned_by: str = "medvlm"


class ModelList(_Response):
    """GET /v1/models in OpenAI's shape: the chat model ids POST /v1/chat/completions accepts."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class Deleted(_Response):
    result_id: str
    deleted: bool = True


class JobRequest(_Request):
    """POST /v1/jobs: ground every phrase on every image in the background (resumable)."""

    images: str | list[str] = Field(description="the images (base64 in JSON; file parts named 'images')")
    phrases: list[Name] = Field(min_length=1, max_length=64, description="phrases to ground on every image")


class JobProgress(BaseModel):
    done: int = Field(description="(image, phrase) items finished, errors included")
    total: int


class JobStatus(_Response):
    id: str
    status: Literal["queued", "running", "done", "failed"]
    progress: JobProgress
    error: str | None = None
    images: int = 0
    phrases: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- PACS jobs

_PACS_URL = ("DICOMweb base URL of the PACS; must be one the server was started with (`medvlm serve --pacs-url`); "
             "default: the first of them")
_UID = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")]
_SECRET = Annotated[str | None, Field(default=None, max_length=4096)]


class _PacsRequest(_Request):
    url: str | None = Field(default=None, max_length=2000, description=_PACS_URL)
    study: _UID = Field(description="Study Instance UID")
    series: _UID | None = Field(default=None, description="Series Instance UID (default: the study's only "
                                "series of a fitting modality)")
    store: bool = Field(default=False, description="store the results in the PACS (one STOW-RS request, after "
                        "every object was built and checked)")
    user: _SECRET = Field(default=None, description="HTTP basic user for the PACS (default: the server's "
                          "$MEDVLM_PACS_USER); kept in memory for this job only, never written or logged")
    password: _SECRET = Field(default=None, description="HTTP basic password (default: $MEDVLM_PACS_PASSWORD); "
                              "kept in memory only")
    token: _SECRET = Field(default=None, description="bearer token instead of user/password (default: "
                           "$MEDVLM_PACS_TOKEN); kept in memory only")


class PacsSegmentRequest(_PacsRequest):
    """POST /v1/pacs/segment: segment a series of a study by text; DICOM SEG written (and stored with store)."""

    texts: list[Name] = Field(min_length=1, max_length=MAX_PROMPTS, description="phrases, one segment each")
    labels: list[Name] | None = Field(default=None, max_length=MAX_PROMPTS, description="segment label of each "
                                      "text (default: the texts)")
    window: Annotated[list[Coord], Field(min_length=2, max_length=2)] | None = Field(
        default=None, description="[center, width] display window (default: 40 400 for CT, else the image's own)")


class PacsLinkReportRequest(_PacsRequest):
    """POST /v1/pacs/link-report: ground a report's sentences on the study's radiograph; DICOM SR + SEG."""

    report: str = Field(min_length=1, max_length=100_000, description="the report text")
    instance: _UID | None = Field(default=None, description="SOP Instance UID of the radiograph when the series "
                                  "has several")
    threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="abstain when every region of a sentence "
                             "scores below this")


class PacsJobProgress(BaseModel):
    stage: str = Field(description="queued, retrieve, segment (slices or images), ground, store, done")
    done: int
    total: int


class PacsJobStatus(_Response):
    id: str
    kind: Literal["segment", "link-report"]
    status: Literal["queued", "running", "done", "failed"]
    progress: PacsJobProgress
    request: dict[str, Any] = Field(description="the request without credentials")
    messages: list[str] = Field(default_factory=list, description="the job's last messages (what the CLI prints)")
    result: dict[str, Any] | None = Field(default=None, description="the summary: outputs, and under 'stored' "
                                          "what reached the PACS")
    files: list[str] = Field(default_factory=list, description="output files, for GET "
                             "/v1/pacs/jobs/{id}/files/{name}")
    error: dict[str, Any] | None = None
