"""Property-based fuzzing of `medvlm serve`'s HTTP API (hypothesis, derandomized: the same cases on every run).

Every field of every endpoint, in JSON and multipart encodings, gets wrong types, NaN / inf, negative, inverted and
out-of-image boxes, 10,000 boxes, unicode (lone surrogates, right-to-left marks, emoji), path-like names and file
names, empty and huge strings, valid and broken images (PNG, JPEG, DICOM, NIfTI 2D/3D, truncated files, gzip that is
not NIfTI, a PNG header announcing 10^10 pixels), raw bodies under odd content types, and odd ids in the URL. The app
runs in process (starlette's TestClient) with the light fake models of tests/server_fakes.py.

Each case is a valid request with 0 to 3 fields replaced by hostile values (so that most cases get past
validation into the models, the result store and the exports), or a raw body, URL or header. The property: every
case ends in a 2xx, or a 4xx with the API's JSON error shape (``{"error": {"type", "message", "expected",
"fix"}}``) -- never a 500 (the fake models do not fail, so a 500 is the server's own bug) and never a hang (a
per-request wall-time bound, and pytest-timeout); a request left valid must answer 2xx. After a 2xx some cases
also fetch the result's downloads, delete it, or poll the job. test_fuzz_case_count asserts that the endpoint tests
generated at least 2,000 cases in all and prints the count (shown without -s; also a junit property).
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
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medvlm.app.server.app import CHAT_MODELS, create_app
from medvlm.app.server.config import ServerConfig
from tests.server_fakes import dicom_bytes, fake_services, png_bytes

# pydicom warns when a fuzzed label cannot be written in the DICOM SEG's character set (the server silences it)
pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::UserWarning")]

#: requests sent per endpoint test (module-wide, read by test_fuzz_case_count): one per generated case, plus
#: follow-up requests on what a 2xx made (downloads, delete, job status), counted under "<endpoint> follow"
CASES: Counter[str] = Counter()
#: (endpoint, HTTP status) -> cases: how deep the cases reached (2xx = through the model and the result store)
STATUSES: Counter[tuple[str, int]] = Counter()
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
    "png_16bit": png_bytes(PIXELS.astype(np.uint16) * 200),
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
ODD_STRINGS = ["", " ", "\t\n", "\x00", "\x00heart", "\ud800", "heart\udfff", "\u202eheart", "🫀 heart 🫁",
               "ｈｅａｒｔ", "心臓", "'; DROP TABLE results; --", "<script>alert(1)</script>", "{}", "[]", "null",
               "NaN", "-Infinity", "x" * 100_000, "heart " * 400, "left lung", "where is the heart?"]
HUGE_STRING = "y" * 1_500_000  # over the 1 MiB body limit of the fuzzed server
PHRASES = ["heart", "left lung", "right lung", "where is the heart?", "the right apical pneumothorax",
           "aorta", "🫀", "Left Lung", "../../etc/passwd", "lung\u202e", "心臓"]

NUMS = st.one_of(st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
                 st.sampled_from([0, -0.0, -1, 1, 0.5, 1e308, -1e308, 5e-324, 2 ** 63, 2 ** 64 + 1, math.nan,
                                  math.inf, -math.inf]))
STRINGS = st.one_of(st.text(max_size=30), st.sampled_from(ODD_STRINGS + PATH_LIKE))
SCALARS = st.one_of(st.none(), st.booleans(), NUMS, STRINGS)
ANY = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=10)

# valid values (the test images are 64 x 48)
GOOD_BOX = st.tuples(st.integers(0, 30), st.integers(0, 20), st.integers(1, 33), st.integers(1, 27)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])
GOOD_POINT = st.tuples(st.floats(0, 64), st.floats(0, 48)).map(list)
GOOD_PHRASE = st.one_of(st.sampled_from(PHRASES), st.text(min_size=1, max_size=20).filter(str.strip))
GOOD_REPORT = st.lists(st.sampled_from(["The heart is enlarged.", "No pleural effusion.", "Left lung is clear.",
                                        "The patient is cooperative.", "Right apical pneumothorax!"]),
                       min_size=1, max_size=4).map(" ".join)

# hostile values
COORD = st.one_of(st.integers(-60, 130), st.floats(-60, 130), NUMS)
BOX = st.lists(COORD, min_size=4, max_size=4)
TEN_K_BOXES = [[1, 1, 20, 20]] * 10_000
BOXES = st.one_of(GOOD_BOX.map(lambda b: [b[2], b[3], b[0], b[1]]),  # inverted
                  GOOD_BOX.map(lambda b: [-v for v in b]), GOOD_BOX.map(lambda b: [b[0], b[1], b[0], b[3]]),  # empty
                  GOOD_BOX.map(lambda b: [v * 100 for v in b]), BOX, st.lists(BOX, max_size=5),
                  st.just(TEN_K_BOXES), st.just([1.0] * 10_000), st.lists(COORD, max_size=7), ANY)
POINT_LISTS = st.one_of(st.lists(st.lists(COORD, min_size=0, max_size=3), max_size=4), st.just([[5, 5]] * 10_000), ANY)
POINTS = st.one_of(st.fixed_dictionaries({}, optional={"positive": POINT_LISTS, "negative": POINT_LISTS, "other": ANY}),
                   ANY)
TEXTS = st.one_of(STRINGS, st.lists(STRINGS, max_size=4), st.just(["heart"] * 10_000), ANY)
SLICES = st.one_of(st.integers(-3, 8), NUMS, ANY)

#: images valid for every valid case (64 x 48: every GOOD_BOX fits); the others are among the hostile values
_ODD_SIZE = ("nifti_3d", "png_1px", "nifti_nan")
_GOOD_B64 = [b64(v) for k, v in GOOD_IMAGES.items() if k not in _ODD_SIZE] + [
    "data:image/png;base64," + b64(PNG), "data:application/octet-stream;base64," + b64(PNG),
    "data:application/dicom;base64," + b64(GOOD_IMAGES["dicom"]), " \n" + b64(PNG) + "\n "]
_BAD_B64 = [b64(v) for v in BAD_IMAGES.values()] + [b64(GOOD_IMAGES[k]) for k in _ODD_SIZE] + [
    "not base64 !!", "data:image/png;base64,", "data:image/png," + "rawtext", "data:text/html;base64," + b64(PNG),
    "data:image/jpeg;base64," + b64(PNG), "data:;base64," + b64(PNG),
    "data:image/png;base64," + b64(PNG)[:-3], "https://example.org/x.png", "http://169.254.169.254/latest/meta-data",
    *PATH_LIKE, b64(PNG) + "====", "=" * 8, HUGE_STRING]
GOOD_IMAGE = st.sampled_from(_GOOD_B64)
IMAGE_VALUES = st.one_of(st.sampled_from(_BAD_B64), ANY, st.lists(GOOD_IMAGE, min_size=2, max_size=3))
FILENAMES = st.one_of(st.sampled_from([*PATH_LIKE, "image.png", "", "a" * 300, "x.dcm", "x.nii.gz", "🫀.png",
                                      "name\r\nX-Injected: 1"]),
                      st.text(max_size=20))
CTYPES = st.sampled_from(["image/png", "image/jpeg", "application/dicom", "application/gzip",
                          "application/octet-stream", "", "text/plain", "image/gif", "application/json",
                          "image/png; charset=utf-8", "IMAGE/PNG", "multipart/form-data", "x/y"])
#: the image bytes of a valid base64 value (plain or data URL), to send the same image as a file part
_FILE_OF = {v: base64.b64decode(v.split(",")[-1].strip()) for v in _GOOD_B64} | {
    b64(GOOD_IMAGES[k]): GOOD_IMAGES[k] for k in _ODD_SIZE}
_MASK = png_bytes(np.pad(np.full((20, 20), 255, np.uint8), ((10, 18), (10, 34))))  # a reference mask, 64 x 48
_FILE_OF[b64(_MASK)] = _MASK
_DECLARED = {"png": "image/png", "jpeg": "image/jpeg", "dicom": "application/dicom", "gzip": "application/gzip"}
# httpx sends a part with an empty file name as a text field, so valid file parts have a name
GOOD_FILENAMES = FILENAMES.filter(bool)
ANY_FILE = st.tuples(FILENAMES, st.sampled_from(sorted(ALL_IMAGES)).map(ALL_IMAGES.__getitem__), CTYPES)


def good_file(draw: Any, data: bytes) -> tuple[str, bytes, str]:
    """``data`` as a valid file part: any non-empty file name, its own type or a generic one."""
    from medvlm.io import sniff_format

    declared = _DECLARED.get(sniff_format(data) or "", "application/octet-stream")
    return draw(GOOD_FILENAMES), data, draw(st.sampled_from([declared, "application/octet-stream", ""]))


@st.composite
def mutated(draw: Any, valid: st.SearchStrategy[dict[str, Any]],
            hostile: dict[str, st.SearchStrategy[Any]]) -> tuple[dict[str, Any], bool]:
    """(request, whether it is valid): a valid request with 0 to 3 of its fields replaced by a hostile value or
    dropped (and, in hostile, fields the model does not have). Most cases get past validation into the model code,
    the store and the exports; the unchanged ones (a sixth) must succeed."""
    obj = dict(draw(valid))
    count = draw(st.sampled_from([0, 1, 1, 1, 2, 3]))
    for name in draw(st.lists(st.sampled_from(sorted(hostile)), min_size=count, max_size=count, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            obj.pop(name, None)
        else:
            obj[name] = draw(hostile[name])
    return obj, count == 0


def form_value(value: Any) -> str:
    """A multipart text field: a string as it is (a form field cannot carry a lone surrogate), else JSON text."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    return json.dumps(value, allow_nan=True)


@st.composite
def multipart(draw: Any, case: st.SearchStrategy[tuple[dict[str, Any], bool]], image_fields: tuple[str, ...]
              ) -> tuple[dict[str, str], list[tuple[str, tuple[str, bytes, str]]], bool]:
    """A JSON case as a multipart form: images as file parts (odd file names; sometimes odd bytes, types or part
    names, or a file part where text belongs), other fields as text (JSON text for lists and objects)."""
    obj, valid = draw(case)
    fields: dict[str, str] = {}
    files: list[tuple[str, tuple[str, bytes, str]]] = []
    for name, value in obj.items():
        if name in image_fields and isinstance(value, str) and value in _FILE_OF:
            files.append((name, good_file(draw, _FILE_OF[value])))
        elif name in image_fields and isinstance(value, list) and value and all(
                isinstance(v, str) and v in _FILE_OF for v in value):
            files += [(name, good_file(draw, _FILE_OF[v])) for v in value]
        elif name in image_fields and draw(st.booleans()):
            files.append((name, draw(ANY_FILE)))
            valid = False
        else:
            fields[name] = form_value(value)
    if draw(st.integers(0, 5)) == 0:
        files.append((draw(st.sampled_from([*image_fields, "bogus", "box", "text"])), draw(ANY_FILE)))
        valid = False
    return fields, files, valid


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


def check(r: Any, endpoint: str, case: Any, seconds: float, valid: bool = False) -> None:
    """The fuzz property for one response: 2xx, or 4xx with the API's JSON error; never 5xx; answered in time;
    2xx for a ``valid`` request."""
    CASES[endpoint] += 1
    STATUSES[endpoint, r.status_code] += 1
    where = f"{endpoint}: HTTP {r.status_code} after {seconds:.1f} s for {repr(case)[:600]}\n{r.text[:800]}"
    assert seconds < MAX_REQUEST_S, where
    assert 200 <= r.status_code < (300 if valid else 500), where
    if r.status_code >= 400:
        assert r.headers.get("content-type", "").startswith("application/json"), where
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "expected", "fix"}, where
        assert body["error"]["type"] and body["error"]["message"], where
    elif r.headers.get("content-type", "").startswith("application/json"):
        r.json()


def run_json(client: TestClient, endpoint: str, path: str, case: tuple[Any, bool]) -> Any:
    obj, valid = case
    # NaN / Infinity go out as the JSON extensions Python writes; lone surrogates as \ud800 escapes
    body = json.dumps(obj, allow_nan=True, ensure_ascii=True).encode()
    t0 = time.perf_counter()
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    check(r, endpoint, obj, time.perf_counter() - t0, valid)
    return r


def run_multipart(client: TestClient, endpoint: str, path: str, case: Any) -> Any:
    fields, files, valid = case
    t0 = time.perf_counter()
    r = client.post(path, data=fields, files=files or None)
    shown = {"fields": {k: v[:100] for k, v in fields.items()},
             "files": [(n, (f, len(b), c)) for n, (f, b, c) in files]}
    check(r, endpoint, shown, time.perf_counter() - t0, valid)
    return r


def follow_result(client: TestClient, endpoint: str, body: dict[str, Any], delete: bool) -> None:
    """Fetch every download of a result (and delete it)."""
    for url in (body.get("downloads") or {}).values():
        t0 = time.perf_counter()
        check(client.get(url), endpoint + " follow", url, time.perf_counter() - t0)
    if delete and body.get("result_id"):
        t0 = time.perf_counter()
        check(client.delete(f"/v1/results/{body['result_id']}"), endpoint + " follow", body["result_id"],
              time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------- endpoints

SEGMENT_VALID = st.one_of(
    st.fixed_dictionaries({"image": GOOD_IMAGE, "box": st.one_of(GOOD_BOX, st.lists(GOOD_BOX, min_size=1, max_size=4))},
                          optional={"multimask": st.booleans()}),
    st.fixed_dictionaries({"image": GOOD_IMAGE, "box": GOOD_BOX}, optional={
        "points": st.fixed_dictionaries({"positive": st.lists(GOOD_POINT, max_size=3)},
                                        optional={"negative": st.lists(GOOD_POINT, max_size=2)}),
        "label": GOOD_PHRASE}),
    st.fixed_dictionaries({"image": GOOD_IMAGE, "text": st.one_of(GOOD_PHRASE, st.lists(GOOD_PHRASE, min_size=1,
                                                                                        max_size=3))}),
    st.fixed_dictionaries({"image": GOOD_IMAGE, "points": st.fixed_dictionaries({"positive": st.lists(
        GOOD_POINT, min_size=1, max_size=3)})}),
    st.fixed_dictionaries({"image": st.just(b64(GOOD_IMAGES["nifti_3d"])), "slice": st.integers(0, 3),
                           "box": st.tuples(st.integers(0, 15), st.integers(0, 20), st.integers(1, 14),
                                            st.integers(1, 19)).map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])}))
SEGMENT = mutated(SEGMENT_VALID, {"image": IMAGE_VALUES, "box": BOXES, "points": POINTS, "text": TEXTS, "label": TEXTS,
                                  "slice": SLICES, "multimask": ANY, "bogus": ANY})


@fuzz(270)
@given(case=SEGMENT, follow=st.integers(0, 14))
def test_fuzz_segment_json(client: TestClient, case: tuple[dict[str, Any], bool], follow: int) -> None:
    r = run_json(client, "segment json", "/v1/segment", case)
    if r.status_code == 200 and follow == 0:
        follow_result(client, "segment json", r.json(), delete=True)
    FINISHED.add("segment json")


@fuzz(200)
@given(case=multipart(SEGMENT, ("image",)), follow=st.integers(0, 5))
def test_fuzz_segment_multipart(client: TestClient, case: Any, follow: int) -> None:
    r = run_multipart(client, "segment multipart", "/v1/segment", case)
    if r.status_code == 200 and follow == 0:
        follow_result(client, "segment multipart", r.json(), delete=False)
    FINISHED.add("segment multipart")


GROUND = mutated(st.one_of(st.fixed_dictionaries({"image": GOOD_IMAGE, "text": GOOD_PHRASE}),
                           st.fixed_dictionaries({"image": st.just(b64(GOOD_IMAGES["nifti_3d"])), "text": GOOD_PHRASE,
                                                  "slice": st.integers(0, 3)})),
                 {"image": IMAGE_VALUES, "text": st.one_of(STRINGS, ANY), "slice": SLICES, "bogus": ANY})


@fuzz(150)
@given(case=GROUND)
def test_fuzz_ground_json(client: TestClient, case: tuple[dict[str, Any], bool]) -> None:
    run_json(client, "ground json", "/v1/ground", case)
    FINISHED.add("ground json")


@fuzz(110)
@given(case=multipart(GROUND, ("image",)))
def test_fuzz_ground_multipart(client: TestClient, case: Any) -> None:
    run_multipart(client, "ground multipart", "/v1/ground", case)
    FINISHED.add("ground multipart")


LINK = mutated(st.fixed_dictionaries({"image": GOOD_IMAGE, "report": GOOD_REPORT},
                                     optional={"threshold": st.floats(0, 1)}),
               {"image": IMAGE_VALUES, "report": st.one_of(STRINGS, st.just("The heart is enlarged. " * 1000), ANY),
                "threshold": st.one_of(NUMS, ANY), "slice": SLICES, "bogus": ANY})


@fuzz(130)
@given(case=LINK)
def test_fuzz_link_report_json(client: TestClient, case: tuple[dict[str, Any], bool]) -> None:
    run_json(client, "link-report json", "/v1/link-report", case)
    FINISHED.add("link-report json")


@fuzz(110)
@given(case=multipart(LINK, ("image",)))
def test_fuzz_link_report_multipart(client: TestClient, case: Any) -> None:
    run_multipart(client, "link-report multipart", "/v1/link-report", case)
    FINISHED.add("link-report multipart")


_TARGETS = st.one_of(GOOD_IMAGE, st.lists(GOOD_IMAGE, min_size=1, max_size=3))
REFERENCE = mutated(st.one_of(
    st.fixed_dictionaries({"reference": GOOD_IMAGE, "reference_box": GOOD_BOX, "target": _TARGETS},
                          optional={"label": GOOD_PHRASE, "mask_source": st.sampled_from(["vote", "segmenter"])}),
    st.fixed_dictionaries({"reference": st.just(b64(PNG)), "reference_mask": st.just(b64(_MASK)), "target": _TARGETS},
                          optional={"mask_source": st.sampled_from(["vote", "segmenter"])})),
    {"reference": IMAGE_VALUES, "reference_mask": st.one_of(GOOD_IMAGE, IMAGE_VALUES), "reference_box": BOXES,
     "target": st.one_of(IMAGE_VALUES, st.lists(IMAGE_VALUES, max_size=6)), "label": st.one_of(STRINGS, ANY),
     "mask_source": ANY, "bogus": ANY})


@fuzz(150)
@given(case=REFERENCE)
def test_fuzz_reference_segment_json(client: TestClient, case: tuple[dict[str, Any], bool]) -> None:
    run_json(client, "reference-segment json", "/v1/reference-segment", case)
    FINISHED.add("reference-segment json")


@fuzz(110)
@given(case=multipart(REFERENCE, ("reference", "reference_mask", "target")))
def test_fuzz_reference_segment_multipart(client: TestClient, case: Any) -> None:
    run_multipart(client, "reference-segment multipart", "/v1/reference-segment", case)
    FINISHED.add("reference-segment multipart")


_DATA_URLS = [u for u in _GOOD_B64 if u.startswith("data:")]
CHAT_URLS = st.one_of(st.sampled_from(_GOOD_B64 + _BAD_B64).map(
    lambda v: v if v.startswith("data:") else "data:image/png;base64," + v), IMAGE_VALUES)
GOOD_IMAGE_PART = st.fixed_dictionaries({"type": st.just("image_url"),
                                         "image_url": st.fixed_dictionaries({"url": st.sampled_from(_DATA_URLS)})})
GOOD_TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": GOOD_PHRASE})
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
        st.fixed_dictionaries({"url": CHAT_URLS}), CHAT_URLS, ANY)}),
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(STRINGS, ANY)}),
    st.dictionaries(st.sampled_from(["type", "text", "image_url", "x"]), ANY, max_size=3), ANY)
GOOD_USER = st.fixed_dictionaries({"role": st.just("user"),
                                   "content": st.permutations([GOOD_IMAGE_PART, GOOD_TEXT_PART]).flatmap(
                                       lambda parts: st.tuples(*parts).map(list))})
OTHER_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "assistant", "tool"]), "content": st.one_of(STRINGS, st.none())})
MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), ANY),
                                 "content": st.one_of(STRINGS, st.lists(PART, max_size=4), st.none(), ANY)},
                                optional={"name": ANY, "tool_calls": ANY})
CHAT_VALID = st.fixed_dictionaries(
    {"model": st.just(CHAT_MODELS[0]),
     "messages": st.tuples(st.lists(OTHER_MESSAGE, max_size=2), GOOD_USER).map(lambda t: [*t[0], t[1]])},
    optional={"stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
              "temperature": st.floats(0, 2), "max_tokens": st.integers(1, 100)})
# a valid request but for a lone surrogate in the question (JSON "\ud800"): the answer quotes the question
SURROGATE_USER = st.fixed_dictionaries({"role": st.just("user"), "content": st.tuples(
    GOOD_IMAGE_PART, st.fixed_dictionaries({"type": st.just("text"), "text": st.sampled_from(
        ["heart\ud800", "\udfff", "left \udbff lung"])})).map(list)})
CHAT = mutated(CHAT_VALID, {
    "model": st.one_of(STRINGS, ANY),
    "messages": st.one_of(st.lists(st.one_of(GOOD_USER, MESSAGE), max_size=4), st.tuples(SURROGATE_USER).map(list),
                          ANY),
    "stream": ANY, "stream_options": ANY, "temperature": NUMS, "n": ANY, "tools": ANY, "max_tokens": NUMS})


@fuzz(280)
@given(case=CHAT)
def test_fuzz_chat_completions(client: TestClient, case: tuple[dict[str, Any], bool]) -> None:
    r = run_json(client, "chat", "/v1/chat/completions", case)
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events), r.text[:500]
        for e in events[:-1]:
            assert json.loads(e[len("data: "):])["object"] == "chat.completion.chunk"
    FINISHED.add("chat")


JOBS = mutated(st.fixed_dictionaries({"images": st.one_of(GOOD_IMAGE, st.lists(GOOD_IMAGE, min_size=1, max_size=3)),
                                      "phrases": st.lists(GOOD_PHRASE, min_size=1, max_size=3)}),
               {"images": st.one_of(IMAGE_VALUES, st.lists(IMAGE_VALUES, max_size=6)),
                "phrases": st.one_of(st.lists(STRINGS, max_size=4), st.just(["heart"] * 65), ANY), "bogus": ANY})


@fuzz(110)
@given(case=JOBS, follow=st.integers(0, 2))
def test_fuzz_jobs_json(client: TestClient, case: tuple[dict[str, Any], bool], follow: int) -> None:
    r = run_json(client, "jobs json", "/v1/jobs", case)
    if r.status_code == 202 and follow == 0:
        job = r.json()["id"]
        for suffix in ("", "/results", "/results.zip"):
            t0 = time.perf_counter()
            check(client.get(f"/v1/jobs/{job}{suffix}"), "jobs json follow", job, time.perf_counter() - t0)
    FINISHED.add("jobs json")


@fuzz(90)
@given(case=multipart(JOBS, ("images",)))
def test_fuzz_jobs_multipart(client: TestClient, case: Any) -> None:
    run_multipart(client, "jobs multipart", "/v1/jobs", case)
    FINISHED.add("jobs multipart")


ROUTES = [("GET", "/v1/results/{}.json"), ("GET", "/v1/results/{}/masks.{}"), ("GET", "/v1/results/{}/image.png"),
          ("DELETE", "/v1/results/{}"), ("GET", "/v1/jobs/{}"), ("GET", "/v1/jobs/{}/results"),
          ("GET", "/v1/jobs/{}/results.zip"), ("GET", "/v1/models/{}"), ("POST", "/v1/results/{}"),
          ("PUT", "/v1/jobs/{}")]
SEGMENTS = st.one_of(st.text(max_size=40), st.sampled_from(
    [*PATH_LIKE, "0" * 32, "f" * 32, "F" * 32, "0" * 33, "0" * 31, "g" * 32, "%00", "a b", ";x", "?x=1", "#f", "",
     "png", "zip", "nii.gz", "dcm", "tiff", "../masks.png", CHAT_MODELS[0], "x" * 5000]))


@fuzz(180)
@given(route=st.sampled_from(ROUTES), first=st.one_of(SEGMENTS, st.sampled_from(["RESULT0", "RESULT1"])),
       second=st.one_of(SEGMENTS, st.sampled_from(["png", "zip", "nii.gz", "dcm"])), encode=st.booleans())
def test_fuzz_urls(client: TestClient, result_ids: list[str], route: tuple[str, str], first: str, second: str,
                   encode: bool) -> None:
    method, template = route
    first = {"RESULT0": result_ids[0], "RESULT1": result_ids[1]}.get(first, first)
    if method == "DELETE" and first in result_ids:
        first = first[::-1]  # keep the two results for the other cases
    # raw when printable ASCII (., .., ;, ?, # reach the router as they are), else percent-encoded
    parts = [p if not encode and p.isascii() and p.isprintable() else quote(p, safe="") for p in (first, second)]
    url = template.format(*parts)
    t0 = time.perf_counter()
    r = client.request(method, url)
    check(r, "urls", (method, url), time.perf_counter() - t0)
    FINISHED.add("urls")


POSTS = ["/v1/segment", "/v1/ground", "/v1/link-report", "/v1/reference-segment", "/v1/chat/completions", "/v1/jobs"]
RAW_CTYPES = st.sampled_from([
    "application/json", "application/json; charset=utf-16", "application/json; charset=latin-1", "multipart/form-data",
    "multipart/form-data; boundary=xyz", "multipart/form-data; boundary=", "application/x-www-form-urlencoded",
    "text/plain", "", "image/png", "APPLICATION/JSON", "application/json;;;", "application/jsonx"])
RAW_BODIES = st.one_of(st.binary(max_size=200), st.sampled_from([
    b"", b"{", b"null", b"[]", b"{}", b'"string"', b"1e999", b"NaN", b'{"image": null}', b"\xef\xbb\xbf{}",
    b'{"box": [' + b"9" * 5000 + b"]}", b'{"a": ' * 5000 + b"1" + b"}" * 5000, b"[" * 100_000,
    "{}".encode("utf-16"), b"\xff\xfe\x00", b'{"image": "' + b64(PNG).encode() + b'", "box": [1, 2, 3, 4]}',
    b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n" + PNG,
    b"--xyz\r\nContent-Disposition: form-data; name=\"box\"\r\n\r\n[1,2,3,4]\r\n--xyz--\r\n",
    b"--xyz--\r\n", b"--xyz\r\n\r\n\r\n--xyz--", b"image=abc&box=1"]))


@fuzz(180)
@given(path=st.sampled_from(POSTS), ctype=RAW_CTYPES, body=RAW_BODIES)
def test_fuzz_raw_bodies(client: TestClient, path: str, ctype: str, body: bytes) -> None:
    t0 = time.perf_counter()
    r = client.post(path, content=body, headers={"content-type": ctype} if ctype else {})
    check(r, "raw bodies", (path, ctype, body[:200]), time.perf_counter() - t0)
    FINISHED.add("raw bodies")


KEY = "fuzz-key-0123456789abcdef"
_HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


@pytest.fixture(scope="module")
def keyed_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("serve_fuzz_key"), api_key=KEY, max_results=4)
    with TestClient(create_app(config, fake_services()), raise_server_exceptions=False) as c:
        yield c


@fuzz(100)
@given(path=st.sampled_from(["/v1/models", "/v1/segment", "/healthz", "/v1/results/" + "0" * 32 + ".json"]),
       value=st.one_of(_HEADER_TEXT, st.sampled_from([f"Bearer {KEY}", f"bearer {KEY}", f"BEARER  {KEY} ", KEY,
                                                      f"Bearer {KEY[:-1]}", f"Bearer {KEY}0", "Bearer ", "Bearer",
                                                      f"Basic {KEY}", f"Bearer {KEY}, Bearer x"]),
                       _HEADER_TEXT.map(lambda t: "Bearer " + t)))
def test_fuzz_api_key_header(keyed_client: TestClient, path: str, value: str) -> None:
    """Any Authorization header: the exact key passes, anything else is 401 (the open /healthz aside)."""
    t0 = time.perf_counter()
    r = keyed_client.request("POST" if path == "/v1/segment" else "GET", path, headers={"Authorization": value},
                             json={"image": b64(PNG), "box": [1, 1, 9, 9]} if path == "/v1/segment" else None)
    check(r, "api key header", (path, value), time.perf_counter() - t0)
    scheme, _, token = value.strip().partition(" ")
    if path == "/healthz":
        assert r.status_code == 200
    elif scheme.lower() == "bearer" and token.strip() == KEY:
        assert r.status_code in (200, 404), r.text
    else:
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (value, r.text)
    FINISHED.add("api key header")


def test_fuzz_case_count(capsys: pytest.CaptureFixture[str], record_property: Any) -> None:
    """At least MIN_TOTAL cases in all; prints the count per endpoint (shown without -s too)."""
    expected = {"segment json", "segment multipart", "ground json", "ground multipart", "link-report json",
                "link-report multipart", "reference-segment json", "reference-segment multipart", "chat",
                "jobs json", "jobs multipart", "urls", "raw bodies", "api key header"}
    if not expected <= FINISHED:
        pytest.skip(f"only {sorted(FINISHED)} of the fuzz tests ran; the total is checked when all run")
    generated = sum(n for k, n in CASES.items() if not k.endswith(" follow"))
    follow = sum(CASES.values()) - generated
    ok = sum(n for (_, status), n in STATUSES.items() if status < 300)
    record_property("fuzz_cases", generated)
    with capsys.disabled():
        print(f"\nmedvlm serve fuzz: {generated} generated cases + {follow} follow-up requests, {ok} answered 2xx, "
              "the rest 4xx; no 5xx, no hang. Per endpoint: "
              + ", ".join(f"{k} {v}" for k, v in sorted(CASES.items())))
    assert generated >= MIN_TOTAL, f"only {generated} fuzz cases ran (want >= {MIN_TOTAL}): {dict(CASES)}"
