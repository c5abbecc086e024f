"""Property-based fuzzing of `medvlm serve`'s HTTP API (hypothesis, derandomized: the same cases on every run).

Every field of every endpoint, in JSON and multipart encodings, gets wrong types, NaN / inf, negative, inverted and
out-of-image boxes, 10,000 boxes, unicode (lone surrogates, right-to-left marks, emoji), path-like names and file
names, empty and huge strings, valid and broken images (PNG, JPEG, DICOM, NIfTI 2D/3D, truncated files, gzip that is
not NIfTI, a PNG header announcing 10^10 pixels), raw bodies under odd content types, and odd ids in the URL. The app
runs in process (starlette's TestClient) with the light fake models of tests/server_fakes.py.

The property: every case ends in a 2xx, or a 4xx with the API's JSON error shape (``{"error": {"type", "message",
"expected", "fix"}}``) -- never a 500 (the fake models do not fail, so a 500 is the server's own bug) and never a
hang (a per-request wall-time bound, and pytest-timeout). test_fuzz_case_count asserts that the endpoint tests
ran at least 2,000 cases in all and prints the count.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import math
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medvlm.app.server.app import CHAT_MODELS, create_app
from medvlm.app.server.config import ServerConfig
from tests.server_fakes import dicom_bytes, fake_services, png_bytes

pytestmark = pytest.mark.timeout(300)

#: cases run per endpoint test (module-wide, read by test_fuzz_case_count)
CASES: Counter[str] = Counter()
#: endpoint tests that finished (the total is only asserted when all of them ran)
FINISHED: set[str] = set()
MIN_TOTAL = 2000
#: the longest one fuzz request may take (the fake models answer in milliseconds)
MAX_REQUEST_S = 20.0

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])


def fuzz(cases: int) -> settings:
    return settings(FUZZ, max_examples=cases)


# ------------------------------------------------------------------------------------------------ test images


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR announces ``width`` x ``height`` (then a tiny, wrong IDAT): the pixel limit must refuse it
    from the header, before decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _nifti(volume: np.ndarray) -> bytes:
    import nibabel as nib

    return bytes(nib.Nifti1Image(volume, np.diag([0.7, 0.7, 2.0, 1.0])).to_bytes())


def _jpeg(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


PIXELS = (np.arange(48 * 64).reshape(48, 64) % 251).astype(np.uint8)
PNG = png_bytes(PIXELS)
GOOD_IMAGES: dict[str, bytes] = {
    "png": PNG,
    "png_rgb": png_bytes(np.stack([PIXELS] * 3, axis=-1)),
    "png_1px": png_bytes(np.zeros((1, 1), np.uint8)),
    "png_16bit": png_bytes((PIXELS.astype(np.uint16) * 200)),
    "jpeg": _jpeg(PIXELS),
    "dicom": dicom_bytes((PIXELS.astype(np.uint16) * 10), PixelSpacing=[0.5, 0.5]),
    "nifti_2d": gzip.compress(_nifti(PIXELS.astype(np.float32)[:, :, None])),
    "nifti_3d": _nifti(np.random.default_rng(0).normal(size=(40, 30, 4)).astype(np.float32)),
    "nifti_nan": _nifti(np.full((20, 24, 1), np.nan, np.float32)),
}
BAD_IMAGES: dict[str, bytes] = {
    "empty": b"",
    "gif": b"GIF89a" + b"\0" * 64,
    "text": b"hello, this is not an image",
    "png_truncated": PNG[: len(PNG) // 2],
    "png_magic_only": b"\x89PNG\r\n\x1a\n",
    "png_10G_pixels": _png_header(100_000, 100_000),
    "png_0x0": _png_header(0, 0),
    "jpeg_truncated": GOOD_IMAGES["jpeg"][:40],
    "dicom_truncated": GOOD_IMAGES["dicom"][:-500],
    "dicom_garbage": b"\0" * 128 + b"DICM" + b"\xff" * 64,
    "gzip_not_nifti": gzip.compress(b"just some text " * 10),
    "gzip_truncated": GOOD_IMAGES["nifti_2d"][:30],
    "nifti_truncated": GOOD_IMAGES["nifti_3d"][:400],
}
ALL_IMAGES = {**GOOD_IMAGES, **BAD_IMAGES}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------------------- strategies

PATH_LIKE = ["../../etc/passwd", "/etc/passwd", "..\\..\\windows\\win.ini", "C:\\Windows\\win.ini", "file:///etc/passwd",
             "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "~/.ssh/id_rsa", "/dev/zero", "/proc/self/environ", "\\\\server\\share",
             "con", "NUL", "a/b/../../c.png", ".", "..", "results/../../x"]
ODD_STRINGS = ["", " ", "\t\n", "\x00", "\x00heart", "\ud800", "heart\udfff", "\u202eheart", "🫀 heart 🫁", "ｈｅａｒｔ",
               "心臓", "'; DROP TABLE results; --", "<script>alert(1)</script>", "{}", "[]", "null", "NaN", "-Infinity",
               "x" * 100_000, "heart " * 400, "left lung", "where is the heart?"]
HUGE_STRING = "y" * 1_500_000  # over the 1 MiB body limit of the fuzzed server

NUMS = st.one_of(st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
                 st.sampled_from([0, -0.0, -1, 1, 0.5, 1e308, -1e308, 5e-324, 2 ** 63, 2 ** 64 + 1, math.nan,
                                  math.inf, -math.inf]))
STRINGS = st.one_of(st.text(max_size=30), st.sampled_from(ODD_STRINGS + PATH_LIKE))
SCALARS = st.one_of(st.none(), st.booleans(), NUMS, STRINGS)
ANY = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=10)

COORD = st.one_of(st.integers(-60, 130), st.floats(-60, 130), NUMS)
BOX = st.lists(COORD, min_size=4, max_size=4)
SANE_BOX = st.tuples(st.integers(0, 40), st.integers(0, 30), st.integers(1, 64), st.integers(1, 48)).map(list)
TEN_K_BOXES = [[1, 1, 20, 20]] * 10_000
BOXES = st.one_of(SANE_BOX, SANE_BOX.map(lambda b: [b[2], b[3], b[0], b[1]]),  # inverted
                  SANE_BOX.map(lambda b: [-v for v in b]), BOX, st.lists(BOX, max_size=5), st.lists(SANE_BOX, max_size=5),
                  st.just(TEN_K_BOXES), st.just([1.0] * 10_000), st.lists(COORD, max_size=7), ANY)
POINT_LISTS = st.one_of(st.lists(st.lists(COORD, min_size=0, max_size=3), max_size=4), st.just([[5, 5]] * 10_000), ANY)
POINTS = st.one_of(st.fixed_dictionaries({}, optional={"positive": POINT_LISTS, "negative": POINT_LISTS, "other": ANY}),
                   ANY)
TEXTS = st.one_of(STRINGS, st.lists(STRINGS, max_size=4), st.just(["heart"] * 10_000), ANY)
SLICES = st.one_of(st.integers(-3, 8), NUMS, ANY)

_GOOD_B64 = [b64(v) for v in GOOD_IMAGES.values()] + ["data:image/png;base64," + b64(PNG),
                                                     "data:application/octet-stream;base64," + b64(PNG),
                                                     "data:application/dicom;base64," + b64(GOOD_IMAGES["dicom"]),
                                                     " \n" + b64(PNG) + "\n "]
_BAD_B64 = [b64(v) for v in BAD_IMAGES.values()] + [
    "not base64 !!", "data:image/png;base64,", "data:image/png," + "rawtext", "data:text/html;base64," + b64(PNG),
    "data:image/jpeg;base64," + b64(PNG), "data:;base64," + b64(PNG), "data:image/png;base64," + b64(PNG)[:-3],
    "https://example.org/x.png", "http://169.254.169.254/latest/meta-data", *PATH_LIKE, b64(PNG) + "====", "=" * 8]
IMAGE_VALUES = st.one_of(st.sampled_from(_GOOD_B64), st.sampled_from(_GOOD_B64), st.sampled_from(_BAD_B64), ANY,
                         st.just(HUGE_STRING))
FILENAMES = st.one_of(st.sampled_from(PATH_LIKE + ["image.png", "", "a" * 300, "x.dcm", "x.nii.gz", "🫀.png",
                                                   "name\r\nX-Injected: 1"]),
                      st.text(max_size=20))
CTYPES = st.sampled_from(["image/png", "image/jpeg", "application/dicom", "application/gzip", "application/octet-stream",
                          "", "text/plain", "image/gif", "application/json", "image/png; charset=utf-8", "IMAGE/PNG",
                          "multipart/form-data", "x/y"])
FILE_BYTES = st.one_of(st.sampled_from(sorted(GOOD_IMAGES)), st.sampled_from(sorted(ALL_IMAGES))).map(ALL_IMAGES.get)


# --------------------------------------------------------------------------------------------------- harness


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("serve_fuzz"), max_upload_mb=1.0, max_pixels=4_000_000,
                          max_results=16, max_images=4, max_job_images=4, request_timeout_s=MAX_REQUEST_S,
                          worker_threads=2, torch_threads=1)
    with TestClient(create_app(config, fake_services()), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def result_ids(client: TestClient) -> list[str]:
    """Ids of real results (PNG and DICOM sources), for the URL fuzz."""
    ids = []
    for name in ("png", "dicom"):
        r = client.post("/v1/segment", json={"image": b64(GOOD_IMAGES[name]), "box": [2, 3, 30, 40]})
        assert r.status_code == 200, r.text
        ids.append(r.json()["result_id"])
    return ids


def check(r: httpx.Response, endpoint: str, case: Any, seconds: float) -> None:
    """The fuzz property for one response: 2xx, or 4xx with the API's JSON error; never 5xx; answered in time."""
    CASES[endpoint] += 1
    where = f"{endpoint}: HTTP {r.status_code} after {seconds:.1f} s for {repr(case)[:600]}\n{r.text[:800]}"
    assert seconds < MAX_REQUEST_S, where
    assert 200 <= r.status_code < 500, where
    if r.status_code >= 400:
        assert r.headers.get("content-type", "").startswith("application/json"), where
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "expected", "fix"}, where
        assert body["error"]["type"] and body["error"]["message"], where
    elif r.headers.get("content-type", "").startswith("application/json"):
        r.json()


def post_json(client: TestClient, path: str, obj: Any) -> httpx.Response:
    # NaN / Infinity go out as the JSON extensions Python writes; lone surrogates as \\ud800 escapes
    body = json.dumps(obj, allow_nan=True, ensure_ascii=True).encode()
    return client.post(path, content=body, headers={"content-type": "application/json"})


def run_json(client: TestClient, endpoint: str, path: str, obj: Any) -> httpx.Response:
    t0 = time.perf_counter()
    r = post_json(client, path, obj)
    check(r, endpoint, obj, time.perf_counter() - t0)
    return r


def run_multipart(client: TestClient, endpoint: str, path: str, fields: dict[str, Any],
                  files: list[tuple[str, tuple[str, bytes, str]]]) -> httpx.Response:
    t0 = time.perf_counter()
    r = client.post(path, data=fields, files=files or None)
    case = {"fields": {k: str(v)[:100] for k, v in fields.items()},
            "files": [(n, (f, len(b), c)) for n, (f, b, c) in files]}
    check(r, endpoint, case, time.perf_counter() - t0)
    return r


def follow_result(client: TestClient, endpoint: str, body: dict[str, Any], delete: bool) -> None:
    """Fetch every download of a result (and delete it)."""
    for url in (body.get("downloads") or {}).values():
        t0 = time.perf_counter()
        check(client.get(url), endpoint + " downloads", url, time.perf_counter() - t0)
    if delete and body.get("result_id"):
        t0 = time.perf_counter()
        check(client.delete(f"/v1/results/{body['result_id']}"), endpoint + " delete", body["result_id"],
              time.perf_counter() - t0)


def form_value(value: Any, as_json: bool) -> str:
    """A multipart text field: JSON text of ``value``, or ``value`` itself when it is a string."""
    if as_json or not isinstance(value, str):
        return json.dumps(value, allow_nan=True)
    return value.encode("utf-8", "replace").decode("utf-8")  # a form field cannot carry a lone surrogate


def multipart_case(image_fields: tuple[str, ...], values: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """(text fields, file parts) of a multipart form: some of ``values`` as JSON or raw text, image file parts
    (odd names, types and bytes), sometimes an unknown field or a file part where text belongs."""
    names = st.sampled_from([*image_fields, *values, "bogus", "image", "box"])
    file_part = st.tuples(st.one_of(st.sampled_from(image_fields), names), st.tuples(FILENAMES, FILE_BYTES, CTYPES))
    good_file = st.tuples(st.sampled_from(image_fields), st.tuples(st.just("image.png"), st.just(PNG),
                                                                   st.just("image/png")))
    text_fields = st.fixed_dictionaries({}, optional={k: st.tuples(v, st.booleans()) for k, v in values.items()}).map(
        lambda d: {k: form_value(v, as_json) for k, (v, as_json) in d.items()})
    extra = st.dictionaries(st.one_of(names, st.text(min_size=1, max_size=8)), STRINGS.map(
        lambda s: s.encode("utf-8", "replace").decode("utf-8")), max_size=2)
    return st.tuples(st.builds(lambda a, b: {**b, **a}, text_fields, extra),
                     st.one_of(st.lists(good_file, min_size=1, max_size=1), st.lists(file_part, max_size=3),
                               st.tuples(good_file, file_part).map(list)))


# ------------------------------------------------------------------------------------------------- endpoints


SEGMENT_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "box": BOXES, "points": POINTS, "text": TEXTS, "label": TEXTS, "slice": SLICES,
    "multimask": st.one_of(st.booleans(), ANY)}


@fuzz(300)
@given(obj=st.one_of(st.fixed_dictionaries({"image": IMAGE_VALUES}, optional={**SEGMENT_FIELDS, "bogus": ANY}),
                     st.fixed_dictionaries({}, optional={"image": IMAGE_VALUES, **SEGMENT_FIELDS})),
       follow=st.integers(0, 5))
def test_fuzz_segment_json(client: TestClient, obj: dict[str, Any], follow: int) -> None:
    r = run_json(client, "segment json", "/v1/segment", obj)
    if r.status_code == 200 and follow == 0:
        follow_result(client, "segment json", r.json(), delete=True)
    FINISHED.add("segment json")


@fuzz(240)
@given(case=multipart_case(("image",), SEGMENT_FIELDS), follow=st.integers(0, 5))
def test_fuzz_segment_multipart(client: TestClient, case: Any, follow: int) -> None:
    fields, files = case
    r = run_multipart(client, "segment multipart", "/v1/segment", fields, files)
    if r.status_code == 200 and follow == 0:
        follow_result(client, "segment multipart", r.json(), delete=False)
    FINISHED.add("segment multipart")


GROUND_FIELDS: dict[str, st.SearchStrategy[Any]] = {"text": st.one_of(STRINGS, STRINGS, ANY), "slice": SLICES}


@fuzz(150)
@given(obj=st.fixed_dictionaries({"image": IMAGE_VALUES}, optional={**GROUND_FIELDS, "bogus": ANY}))
def test_fuzz_ground_json(client: TestClient, obj: dict[str, Any]) -> None:
    run_json(client, "ground json", "/v1/ground", obj)
    FINISHED.add("ground json")


@fuzz(120)
@given(case=multipart_case(("image",), GROUND_FIELDS))
def test_fuzz_ground_multipart(client: TestClient, case: Any) -> None:
    run_multipart(client, "ground multipart", "/v1/ground", *case)
    FINISHED.add("ground multipart")


LINK_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "report": st.one_of(STRINGS, st.just("The heart is enlarged. No effusion. " * 600), ANY),
    "threshold": st.one_of(st.floats(0, 1), NUMS, ANY), "slice": SLICES}


@fuzz(150)
@given(obj=st.fixed_dictionaries({"image": IMAGE_VALUES}, optional={**LINK_FIELDS, "bogus": ANY}))
def test_fuzz_link_report_json(client: TestClient, obj: dict[str, Any]) -> None:
    run_json(client, "link-report json", "/v1/link-report", obj)
    FINISHED.add("link-report json")


@fuzz(120)
@given(case=multipart_case(("image",), LINK_FIELDS))
def test_fuzz_link_report_multipart(client: TestClient, case: Any) -> None:
    run_multipart(client, "link-report multipart", "/v1/link-report", *case)
    FINISHED.add("link-report multipart")


_MASK = png_bytes(np.pad(np.full((20, 20), 255, np.uint8), ((10, 18), (10, 34))))
REF_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "reference_mask": st.one_of(st.just(b64(_MASK)), IMAGE_VALUES), "reference_box": BOXES,
    "target": st.one_of(IMAGE_VALUES, st.lists(IMAGE_VALUES, max_size=6)), "label": st.one_of(STRINGS, ANY),
    "mask_source": st.one_of(st.sampled_from(["vote", "segmenter"]), ANY)}


@fuzz(160)
@given(obj=st.fixed_dictionaries({"reference": IMAGE_VALUES}, optional={**REF_FIELDS, "bogus": ANY}))
def test_fuzz_reference_segment_json(client: TestClient, obj: dict[str, Any]) -> None:
    run_json(client, "reference-segment json", "/v1/reference-segment", obj)
    FINISHED.add("reference-segment json")


@fuzz(120)
@given(case=multipart_case(("reference", "reference_mask", "target"),
                           {k: v for k, v in REF_FIELDS.items() if k in ("reference_box", "label", "mask_source")}))
def test_fuzz_reference_segment_multipart(client: TestClient, case: Any) -> None:
    run_multipart(client, "reference-segment multipart", "/v1/reference-segment", *case)
    FINISHED.add("reference-segment multipart")


CHAT_URLS = st.one_of(st.sampled_from([u for u in _GOOD_B64 if u.startswith("data:")]),
                      st.sampled_from(_GOOD_B64 + _BAD_B64).map(lambda v: v if v.startswith("data:") else
                                                                 "data:image/png;base64," + v), IMAGE_VALUES)
IMAGE_PART = st.fixed_dictionaries({"type": st.just("image_url"),
                                    "image_url": st.one_of(st.fixed_dictionaries({"url": CHAT_URLS}), CHAT_URLS, ANY)})
TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(STRINGS, ANY)})
PART = st.one_of(IMAGE_PART, TEXT_PART, st.dictionaries(st.sampled_from(["type", "text", "image_url", "x"]), ANY,
                                                        max_size=3), ANY)
GOOD_MESSAGE = st.fixed_dictionaries({"role": st.just("user"), "content": st.tuples(IMAGE_PART, TEXT_PART).map(list)})
MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), ANY),
                                 "content": st.one_of(STRINGS, st.lists(PART, max_size=4), st.none(), ANY)},
                                optional={"name": ANY, "tool_calls": ANY})
CHAT = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(st.one_of(GOOD_MESSAGE, MESSAGE), min_size=1, max_size=4), st.just([]), ANY)},
    optional={"model": st.one_of(st.just(CHAT_MODELS[0]), st.just(CHAT_MODELS[0]), STRINGS, ANY),
              "stream": st.one_of(st.booleans(), ANY), "stream_options": st.one_of(
                  st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), ANY)}), ANY),
              "temperature": NUMS, "n": ANY, "tools": ANY, "max_tokens": NUMS})


@fuzz(330)
@given(obj=CHAT)
def test_fuzz_chat_completions(client: TestClient, obj: dict[str, Any]) -> None:
    r = run_json(client, "chat", "/v1/chat/completions", obj)
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events), r.text[:500]
        for e in events[:-1]:
            assert json.loads(e[len("data: "):])["object"] == "chat.completion.chunk"
    FINISHED.add("chat")


JOB_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "phrases": st.one_of(st.lists(STRINGS, max_size=4), st.lists(st.just("heart"), min_size=1, max_size=3),
                         st.just(["heart"] * 65), ANY)}


@fuzz(120)
@given(obj=st.fixed_dictionaries({"images": st.one_of(IMAGE_VALUES, st.lists(IMAGE_VALUES, max_size=6))},
                                 optional={**JOB_FIELDS, "bogus": ANY}))
def test_fuzz_jobs_json(client: TestClient, obj: dict[str, Any]) -> None:
    r = run_json(client, "jobs json", "/v1/jobs", obj)
    if r.status_code == 202:
        job = r.json()["id"]
        for suffix in ("", "/results", "/results.zip"):
            t0 = time.perf_counter()
            check(client.get(f"/v1/jobs/{job}{suffix}"), "jobs json follow", job, time.perf_counter() - t0)
    FINISHED.add("jobs json")


@fuzz(100)
@given(case=multipart_case(("images",), JOB_FIELDS))
def test_fuzz_jobs_multipart(client: TestClient, case: Any) -> None:
    run_multipart(client, "jobs multipart", "/v1/jobs", *case)
    FINISHED.add("jobs multipart")


ROUTES = [("GET", "/v1/results/{}.json"), ("GET", "/v1/results/{}/masks.{}"), ("GET", "/v1/results/{}/image.png"),
          ("DELETE", "/v1/results/{}"), ("GET", "/v1/jobs/{}"), ("GET", "/v1/jobs/{}/results"),
          ("GET", "/v1/jobs/{}/results.zip"), ("GET", "/v1/models/{}"), ("POST", "/v1/results/{}"),
          ("PUT", "/v1/jobs/{}")]
SEGMENTS = st.one_of(st.text(max_size=40), st.sampled_from(
    PATH_LIKE + ["0" * 32, "f" * 32, "F" * 32, "0" * 33, "0" * 31, "g" * 32, "%00", "a b", ";x", "?x=1", "#f", "",
                 "png", "zip", "nii.gz", "dcm", "tiff", "../masks.png", CHAT_MODELS[0], "x" * 5000]))


@fuzz(220)
@given(route=st.sampled_from(ROUTES), first=st.one_of(SEGMENTS, st.sampled_from(["RESULT0", "RESULT1"])),
       second=SEGMENTS, encode=st.booleans())
def test_fuzz_urls(client: TestClient, result_ids: list[str], route: tuple[str, str], first: str, second: str,
                   encode: bool) -> None:
    method, template = route
    first = {"RESULT0": result_ids[0], "RESULT1": result_ids[1]}.get(first, first)
    if route[0] == "DELETE" and first in result_ids:
        first = first[::-1]  # keep the two results for the other cases
    parts = [quote(p, safe="") if encode or p in result_ids else p for p in (first, second)]
    url = template.format(*parts)
    t0 = time.perf_counter()
    try:
        r = client.request(method, url)
    except (httpx.InvalidURL, UnicodeEncodeError):
        CASES["urls (refused by the client)"] += 1
        return
    check(r, "urls", (method, url), time.perf_counter() - t0)
    FINISHED.add("urls")


POSTS = ["/v1/segment", "/v1/ground", "/v1/link-report", "/v1/reference-segment", "/v1/chat/completions", "/v1/jobs"]
RAW_CTYPES = st.sampled_from(["application/json", "application/json; charset=utf-16", "application/json; charset=latin-1",
                              "multipart/form-data", "multipart/form-data; boundary=xyz",
                              "multipart/form-data; boundary=", "application/x-www-form-urlencoded", "text/plain", "",
                              "image/png", "APPLICATION/JSON", "application/json;;;", "application/jsonx"])
RAW_BODIES = st.one_of(st.binary(max_size=200), st.sampled_from([
    b"", b"{", b"null", b"[]", b"{}", b'"string"', b"1e999", b"NaN", b'{"image": null}', b"\xef\xbb\xbf{}",
    b'{"box": [' + b"9" * 5000 + b"]}", b'{"a": ' * 5000 + b"1" + b"}" * 5000, b"[" * 100_000,
    "{}".encode("utf-16"), b"\xff\xfe\x00", b'{"image": "' + b64(PNG).encode() + b'", "box": [1, 2, 3, 4]}',
    b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n" + PNG,
    b"--xyz\r\nContent-Disposition: form-data; name=\"box\"\r\n\r\n[1,2,3,4]\r\n--xyz--\r\n",
    b"--xyz--\r\n", b"--xyz\r\n\r\n\r\n--xyz--", b"image=abc&box=1"]))


@fuzz(200)
@given(path=st.sampled_from(POSTS), ctype=RAW_CTYPES, body=RAW_BODIES)
def test_fuzz_raw_bodies(client: TestClient, path: str, ctype: str, body: bytes) -> None:
    t0 = time.perf_counter()
    r = client.post(path, content=body, headers={"content-type": ctype} if ctype else {})
    check(r, "raw bodies", (path, ctype, body[:200]), time.perf_counter() - t0)
    FINISHED.add("raw bodies")


def test_fuzz_case_count(capsys: pytest.CaptureFixture[str], record_property: Any) -> None:
    """At least MIN_TOTAL cases in all; prints the count per endpoint (shown without -s too)."""
    expected = {"segment json", "segment multipart", "ground json", "ground multipart", "link-report json",
                "link-report multipart", "reference-segment json", "reference-segment multipart", "chat",
                "jobs json", "jobs multipart", "urls", "raw bodies"}
    if not expected <= FINISHED:
        pytest.skip(f"only {sorted(FINISHED)} of the fuzz tests ran; the total is checked when all run")
    total = sum(CASES.values())
    record_property("fuzz_cases", total)
    with capsys.disabled():
        print(f"\nmedvlm serve fuzz: {total} cases, no 5xx, no hang: "
              + ", ".join(f"{k} {v}" for k, v in sorted(CASES.items())))
    assert total >= MIN_TOTAL, f"only {total} fuzz cases ran (want >= {MIN_TOTAL}): {dict(CASES)}"
