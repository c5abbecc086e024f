"""Request bodies of the task endpoints: multipart/form-data or JSON, checked before any image is decoded.

Both encodings give the same :class:`Form`: JSON-valued fields (``box``, ``points``, ``phrases``...) are JSON
strings in a multipart form and plain JSON values in a JSON body; images are file parts in a multipart form
(or base64 text fields) and base64 / ``data:`` URL strings in JSON. Validation of the non-image fields is the
endpoint's pydantic model, so both encodings accept exactly the same fields (unknown fields are errors).

Uploads are checked twice before :func:`medvlm.io.load_image` sees them: the part's declared content type
must be an image type the server reads (or a generic binary type), and the leading bytes must be PNG, JPEG,
DICOM ("DICM" at byte 128), NIfTI-1/2 or gzip; anything else is 415. Client file names are never read: images
are bytes in memory, and files the server writes get names it makes itself.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from medvlm.app.server.errors import ApiError

__all__ = ["Form", "Upload", "detect_format", "read_form"]

#: declared part types accepted for an image, beside a missing one; the magic bytes decide what it is
_GENERIC_TYPES = {"", "application/octet-stream", "binary/octet-stream", "application/binary"}
_DECLARED = {
    "image/png": "png", "image/x-png": "png",
    "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/pjpeg": "jpeg",
    "application/dicom": "dicom", "application/dicom+octet-stream": "dicom",
    "application/gzip": "gzip", "application/x-gzip": "gzip", "application/x-nifti": "nifti",
    "application/nifti": "nifti", "image/nifti": "nifti",
}
_FORMATS = "PNG, JPEG, DICOM (with its 128-byte preamble and 'DICM'), NIfTI (.nii, .nii.gz)"


@dataclass
class Upload:
    """One uploaded image: its bytes, the format its leading bytes show, and the field it came in."""

    data: bytes
    format: str
    field: str


@dataclass
class Form:
    """A parsed request: validated non-image fields (``fields``, the endpoint's pydantic model) and images."""

    fields: Any
    images: dict[str, list[Upload]] = field(default_factory=dict)

    def image(self, name: str) -> Upload:
        """The one image of field ``name``; 422 when it is missing or given more than once."""
        found = self.optional_image(name)
        if found is None:
            raise ApiError(422, "missing_image", f"field '{name}': no image was sent",
                           expected=f"an image in '{name}' ({_FORMATS})",
                           fix=f"multipart: a file part named '{name}'; JSON: \"{name}\": \"<base64 or data URL>\"")
        return found

    def optional_image(self, name: str) -> Upload | None:
        """The one image of field ``name`` or None; 422 when it is given more than once."""
        items = self.images.get(name, [])
        if len(items) > 1:
            raise ApiError(422, "invalid_input", f"field '{name}': expected one image, received {len(items)}",
                           expected=f"exactly one '{name}' image", fix=f"send one '{name}' part")
        return items[0] if items else None


def detect_format(data: bytes) -> str | None:
    """"png", "jpeg", "dicom", "nifti" or "gzip" (a .nii.gz; the loader looks inside and says so when it is
    another gzip file) from the leading bytes; None for anything else."""
    from medvlm.io import sniff_format

    return sniff_format(data)


def check_upload(data: bytes, declared: str, name: str) -> Upload:
    """Check one image upload (bytes + declared content type) -> :class:`Upload`; 415/422 with the reason."""
    if not data:
        raise ApiError(422, "invalid_input", f"field '{name}': the image is empty (0 bytes)",
                       expected=f"an image file ({_FORMATS})", fix="check the upload: the part was empty")
    fmt = detect_format(data)
    declared = declared.split(";")[0].strip().lower()
    if fmt is None:
        raise ApiError(415, "unsupported_media_type",
                       f"field '{name}': the file is not a supported image (leading bytes {data[:8]!r})",
                       expected=_FORMATS, fix="convert the image to PNG, or send the DICOM/NIfTI file as it is")
    if declared not in _GENERIC_TYPES:
        want = _DECLARED.get(declared)
        agrees = want == fmt or (want in ("gzip", "nifti") and fmt in ("gzip", "nifti"))
        if want is None or not agrees:
            raise ApiError(415, "unsupported_media_type",
                           f"field '{name}': declared content type {declared!r} does not match the file, which is "
                           f"{fmt.upper()}" if want is not None else
                           f"field '{name}': content type {declared!r} is not an image type the server reads",
                           expected="image/png, image/jpeg, application/dicom, application/gzip (NIfTI) or "
                           "application/octet-stream, matching the file's bytes",
                           fix="send the file with its own type, or as application/octet-stream")
    return Upload(data=data, format=fmt, field=name)


def decode_base64(value: Any, name: str) -> tuple[bytes, str]:
    """A base64 string or ``data:<type>;base64,<data>`` URL -> (bytes, declared type); 422 when it is neither."""
    if not isinstance(value, str) or not value.strip():
        raise ApiError(422, "invalid_input", f"field '{name}': expected a base64 string or a data URL",
                       expected="\"data:image/png;base64,...\" or plain base64 of the file",
                       fix="encode the file's bytes with base64")
    text = value.strip()
    declared = ""
    if text.startswith("data:"):
        head, sep, body = text.partition(",")
        if not sep or ";base64" not in head:
            raise ApiError(422, "invalid_input", f"field '{name}': a data URL must be base64-encoded",
                           expected="data:<type>;base64,<data>", fix="use ;base64 data URLs")
        declared, text = head[5:].split(";")[0], body
    elif text.lower().startswith(("http:", "https:", "file:", "ftp:")):
        raise _not_fetched(name)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        # '/' is a base64 digit (a JPEG's base64 starts with '/9j/'), so a path is only named as one here
        if text.startswith(("/", ".", "~", "\\")) or text[1:3] in (":\\", ":/"):
            raise _not_fetched(name) from None
        raise ApiError(422, "invalid_input", f"field '{name}': not valid base64 ({exc})",
                       expected="standard base64 (A-Z, a-z, 0-9, +, /, = padding)",
                       fix="encode the file's bytes with base64, e.g. base64.b64encode(open(f, 'rb').read())") from exc
    return data, declared


def _not_fetched(name: str) -> ApiError:
    return ApiError(422, "invalid_input", f"field '{name}': URLs and paths are not fetched or opened",
                    expected="the image itself, base64-encoded or as a data URL",
                    fix="send the file's bytes (multipart file part or base64)")


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    details = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg')}"
                        for e in exc.errors()[:5])
    return ApiError(422, "invalid_input", f"field '{where}': {first.get('msg')} ({details})",
                    expected="the fields documented in GET /openapi.json for this endpoint",
                    fix="correct the field named above")


async def read_form(request: Any, model: type[BaseModel], *, images: Sequence[str],
                    json_fields: Sequence[str] = (), max_images: int = 16, max_part_bytes: int = 1 << 20) -> Form:
    """Parse and validate the body of a task endpoint.

    ``model``: the pydantic model of the JSON body (image fields are base64 strings there). ``images``: the
    image field names; ``json_fields``: the fields a multipart form carries as JSON strings. At most
    ``max_images`` images in all; ``max_part_bytes``: largest text field of a multipart form (an image may come
    as base64 text). 415 for another content type, 400 for malformed JSON, 422 for invalid fields.
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    uploads: dict[str, list[Upload]] = {}
    if ctype == "application/json":
        body = await request.body()
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as exc:
            # ValueError: JSONDecodeError, UnicodeDecodeError, and an integer of more than 4300 digits;
            # RecursionError: arrays/objects nested thousands deep
            raise ApiError(400, "malformed_json", f"the body is not valid JSON ({_json_problem(exc)})",
                           expected="a JSON object", fix="check the request body (quotes, commas, brackets)") from None
        if not isinstance(obj, dict):
            raise ApiError(422, "invalid_input", f"the JSON body is a {type(obj).__name__}, not an object",
                           expected="a JSON object with the documented fields", fix="send {\"image\": ..., ...}")
        try:
            fields = model.model_validate(obj)
        except ValidationError as exc:
            raise _validation_error(exc) from exc
        for name in images:
            value = obj.get(name)
            if value is None:
                continue
            for item in value if isinstance(value, list) else [value]:
                data, declared = decode_base64(item, name)
                uploads.setdefault(name, []).append(check_upload(data, declared, name))
    elif ctype == "multipart/form-data":
        try:
            # starlette's own file cap stays above ours, so that too many images get our 413, not its 400
            form = await request.form(max_files=max_images + 4, max_fields=200, max_part_size=max_part_bytes)
        except ApiError:
            raise
        except Exception as exc:  # starlette raises HTTPException / MultiPartException with its own text
            detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or type(exc).__name__
            raise ApiError(400, "malformed_multipart", f"the multipart body could not be parsed ({detail})",
                           expected="multipart/form-data with an image file part and form fields",
                           fix="let your HTTP client build the multipart body (e.g. requests/httpx files=...)") from exc
        values: dict[str, Any] = {}
        try:
            for name, value in form.multi_items():
                if isinstance(value, str) and name not in images:
                    if name in values:
                        raise ApiError(422, "invalid_input", f"field '{name}' was sent more than once",
                                       expected=f"one '{name}' field (a JSON list for several values)",
                                       fix=f"send '{name}' once, e.g. {name}=[...]")
                    values[name] = _json_field(name, value) if name in json_fields else value
                    continue
                if name not in images:
                    raise ApiError(422, "invalid_input", f"unexpected file part '{name}'",
                                   expected=f"file parts named {', '.join(images) or '(none)'}",
                                   fix="rename the part or drop it")
                if isinstance(value, str):  # an image sent as base64 text in a form field
                    data, declared = decode_base64(value, name)
                else:
                    data, declared = await value.read(), value.content_type or ""
                uploads.setdefault(name, []).append(check_upload(data, declared, name))
        finally:
            await form.close()
        for name in uploads:
            # the model types image fields as base64 strings (the JSON encoding); a file part stands in for one
            values.setdefault(name, "<file part>")
        try:
            fields = model.model_validate(values)
        except ValidationError as exc:
            raise _validation_error(exc) from exc
    else:
        raise ApiError(415, "unsupported_media_type", f"content type {ctype or '(none)'!r} is not accepted",
                       expected="multipart/form-data or application/json",
                       fix="send a multipart form (image file part + fields) or a JSON body (image as base64)")
    if sum(len(v) for v in uploads.values()) > max_images:
        raise ApiError(413, "too_many_images", f"{sum(len(v) for v in uploads.values())} images in one request",
                       expected=f"at most {max_images} images per request", fix="split the request")
    return Form(fields=fields, images=uploads)


def _json_field(name: str, value: str) -> Any:
    """A JSON-valued form field (a list or an object); anything else stays text (``text=heart``, ``label=1``) for
    the model to validate."""
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError) as exc:
        if not value.lstrip().startswith(("[", "{")):
            return value
        raise ApiError(400, "malformed_json", f"field '{name}' is not valid JSON ({_json_problem(exc)})",
                       expected=f"'{name}' as a JSON value, e.g. [120, 80, 480, 620]",
                       fix="send JSON-valued form fields as JSON text") from None
    return parsed if isinstance(parsed, (list, dict)) else value


def _json_problem(exc: BaseException) -> str:
    """What is wrong with a JSON text, without quoting the text."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg}: line {exc.lineno} column {exc.colno} (char {exc.pos})"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8/16/32 text at byte {exc.start}"
    return str(exc).split(";")[0][:200]  # e.g. an integer of more than 4300 digits
