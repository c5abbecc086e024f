"""`medvlm serve` with the real models (LiteMedSAM, the shipped Med-VLM, the grounding agent) on real JSRT
radiographs: every endpoint in multipart and JSON, boxes in original pixels, RLE masks against the ground truth,
the OpenAI chat shape, exports, a batch job, 32 concurrent requests on a real uvicorn server, the load benchmark
and the CLI. The models load once per module and each image is encoded once (the server's encoding cache).

The RLE round trip at the top needs no model."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medvlm.app.server.rle import rle_area, rle_decode, rle_encode
from medvlm.errors import InputError
from tests.conftest import data_dir

IMAGE_A = "JPCLN002"
IMAGE_B = "JPCLN003"


# ---------------------------------------------------------------------------------------------------- RLE


@pytest.mark.parametrize("seed", range(4))
def test_rle_round_trip(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
    mask = rng.random(shape) < [0.0, 0.3, 0.9, 1.0][seed]
    rle = rle_encode(mask)
    assert rle["size"] == list(shape) and rle["order"] == "row-major"
    assert sum(rle["counts"]) == mask.size and rle_area(rle) == int(mask.sum())
    np.testing.assert_array_equal(rle_decode(rle), mask)


def test_rle_layout_is_row_major_starting_with_zeros() -> None:
    mask = np.array([[1, 1, 0], [0, 0, 1]], bool)
    assert rle_encode(mask)["counts"] == [0, 2, 3, 1]  # row 0 then row 1; first run (zeros) is empty
    assert rle_encode(np.zeros((2, 2), bool))["counts"] == [4]
    with pytest.raises(InputError, match="H\\*W"):
        rle_decode({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(InputError, match="row-major"):
        rle_decode({"size": [2, 2], "counts": [4], "order": "column-major"})


# --------------------------------------------------------------------------------------------- fixtures


def _mask(name: str, structure: str) -> np.ndarray:
    return np.array(Image.open(data_dir("cxr_jsrt_scr") / "masks" / structure / f"{name}.png")) > 0


def _tight_box(mask: np.ndarray) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def _box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def jsrt() -> dict[str, bytes]:
    folder = data_dir("cxr_jsrt_scr") / "images"
    return {name: (folder / f"{name}.png").read_bytes() for name in (IMAGE_A, IMAGE_B)}


@pytest.fixture(scope="module")
def services() -> Any:
    from medvlm.app.server.services import Services

    return Services(cache_size=8)


@pytest.fixture(scope="module")
def client(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from medvlm.app.server.app import create_app
    from medvlm.app.server.config import ServerConfig

    app = create_app(ServerConfig(data_dir=tmp_path_factory.mktemp("serve")), services)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def server_url(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 (ephemeral port) sharing the module's models."""
    import uvicorn

    from medvlm.app.server.app import create_app
    from medvlm.app.server.config import ServerConfig

    app = create_app(ServerConfig(data_dir=tmp_path_factory.mktemp("serve_uvicorn"), worker_threads=2), services)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _check_regions(regions: list[dict[str, Any]], shape: tuple[int, int] = (1024, 1024)) -> list[np.ndarray]:
    """Every region: box inside the image in original pixels, equal to its mask's tight box; RLE of the right
    shape and area. Returns the decoded masks."""
    masks = []
    for k, r in enumerate(regions, start=1):
        assert r["id"] == k and set(r) >= {"label", "box", "points", "mask", "score", "provenance", "checks"}
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]
        mask = rle_decode(r["mask"])
        assert mask.shape == shape and mask.sum() == r["area_px"] == rle_area(r["mask"]) > 0
        assert _tight_box(mask) == pytest.approx(r["box"], abs=1.0)
        masks.append(mask)
    return masks


# ------------------------------------------------------------------------------------------ basic endpoints


@pytest.mark.slow
@pytest.mark.data
def test_healthz_and_openapi(client: Any) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["version"] and set(health["models"]) == {
        "litemedsam", "medvlm", "grounding_agent"}
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/segment", "/v1/ground", "/v1/link-report", "/v1/reference-segment", "/v1/chat/completions",
                 "/v1/jobs", "/v1/jobs/{job_id}", "/v1/results/{result_id}.json", "/healthz"):
        assert path in paths, path
    body = paths["/v1/segment"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert body["multipart/form-data"]["schema"]["properties"]["image"]["items"]["format"] == "binary"
    components = schema["components"]["schemas"]
    assert {"SegmentRequest", "SegmentResponse", "RegionOut", "RLEMask", "ErrorResponse"} <= set(components)
    assert "413" in paths["/v1/segment"]["post"]["responses"]


@pytest.mark.slow
@pytest.mark.data
def test_segment_box_multipart_and_json_in_original_pixels(client: Any, services: Any,
                                                           jsrt: dict[str, bytes]) -> None:
    lung = _mask(IMAGE_A, "right_lung")
    box = _tight_box(lung)
    r = client.post("/v1/segment", files={"image": ("a.png", jsrt[IMAGE_A], "image/png")},
                    data={"box": json.dumps(box), "label": "right lung"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": 1024, "height": 1024, "spacing_mm": None, "modality": "unknown",
                             "format": "png"}
    [mask] = _check_regions(body["regions"])
    region = body["regions"][0]
    assert region["label"] == "right lung" and region["provenance"]["model"] == "litemedsam"
    assert region["provenance"]["prompt"]["box"] == box  # the prompt as sent, original pixels
    assert _dice(mask, lung) > 0.85
    assert _box_iou(region["box"], box) > 0.8
    # the same image as JSON (data URL), two boxes: the encoding is cached (no second LiteMedSAM encode)
    encodes = services.encodings["litemedsam"].misses
    heart_box = _tight_box(_mask(IMAGE_A, "heart"))
    r = client.post("/v1/segment", json={"image": "data:image/png;base64," + _b64(jsrt[IMAGE_A]),
                                         "box": [box, heart_box], "label": ["right lung", "heart"]})
    assert r.status_code == 200, r.text
    masks = _check_regions(r.json()["regions"])
    np.testing.assert_array_equal(masks[0], mask)  # same prompt, same image: same mask
    assert services.encodings["litemedsam"].misses == encodes
    # a box with points (they join the one box); LiteMedSAM was trained on boxes, so only the plumbing is checked
    r = client.post("/v1/segment", json={"image": _b64(jsrt[IMAGE_A]), "box": box,
                                         "points": {"positive": [[300, 400]], "negative": [[700, 400]]}})
    assert r.status_code == 200, r.text
    _check_regions(r.json()["regions"])
    assert r.json()["regions"][0]["points"] == [{"x": 300.0, "y": 400.0, "label": 1},
                                                {"x": 700.0, "y": 400.0, "label": 0}]


def test_segment_spacing_mm_field(client: Any, jsrt: dict[str, bytes]) -> None:
    """A PNG carries no pixel size: the request's spacing_mm gives one (areas in mm2); a bad one is a 422."""
    box = _tight_box(_mask(IMAGE_A, "heart"))
    for r in (client.post("/v1/segment", json={"image": _b64(jsrt[IMAGE_A]), "box": box, "spacing_mm": [0.35, 0.35]}),
              client.post("/v1/segment", files={"image": ("a.png", jsrt[IMAGE_A], "image/png")},
                          data={"box": json.dumps(box), "spacing_mm": "[0.35, 0.35]"})):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["image"]["spacing_mm"] == [0.35, 0.35]
        region = body["regions"][0]
        assert region["area_mm2"] == pytest.approx(region["area_px"] * 0.35 * 0.35, rel=1e-9)
    for bad in ([0.0, 0.35], [0.35], [-1.0, 1.0]):
        r = client.post("/v1/segment", json={"image": _b64(jsrt[IMAGE_A]), "box": box, "spacing_mm": bad})
        assert r.status_code == 422, (bad, r.text)
        assert "spacing_mm" in r.text


@pytest.mark.slow
@pytest.mark.data
def test_segment_text_uses_medvlm(client: Any, jsrt: dict[str, bytes]) -> None:
    r = client.post("/v1/segment", files={"image": ("a.png", jsrt[IMAGE_A], "image/png")},
                    data={"text": '["left lung", "heart"]'})
    assert r.status_code == 200, r.text
    regions = r.json()["regions"]
    masks = _check_regions(regions)
    assert [x["label"] for x in regions] == ["left lung", "heart"]
    assert all(x["provenance"]["model"] == "medvlm" for x in regions)
    assert _dice(masks[0], _mask(IMAGE_A, "left_lung")) > 0.85
    assert _dice(masks[1], _mask(IMAGE_A, "heart")) > 0.75
    # plain text in a form field works too
    r = client.post("/v1/segment", files={"image": ("a.png", jsrt[IMAGE_A], "image/png")}, data={"text": "heart"})
    assert r.status_code == 200 and r.json()["regions"][0]["label"] == "heart"


@pytest.mark.slow
@pytest.mark.data
def test_ground_multipart_and_json(client: Any, jsrt: dict[str, bytes]) -> None:
    heart = _mask(IMAGE_A, "heart")
    r = client.post("/v1/ground", files={"image": ("a.png", jsrt[IMAGE_A], "image/png")},
                    data={"text": "where is the heart?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["phrase"] == "heart" and "heart" in body["answer"] and body["result_id"]
    masks = _check_regions(body["regions"])
    assert _box_iou(body["regions"][0]["box"], _tight_box(heart)) > 0.6
    assert _dice(masks[0], heart) > 0.75
    r = client.post("/v1/ground", json={"image": _b64(jsrt[IMAGE_A]), "text": "left lung"})
    assert r.status_code == 200, r.text
    [lung] = _check_regions(r.json()["regions"])
    assert _dice(lung, _mask(IMAGE_A, "left_lung")) > 0.85
    assert r.json()["regions"][0]["box"][0] > 512  # the patient's left lung is on the image right


@pytest.mark.slow
@pytest.mark.data
def test_link_report_multipart_and_json(client: Any, jsrt: dict[str, bytes]) -> None:
    report = "The heart size is normal. No pneumothorax. The patient is cooperative."
    for r in (client.post("/v1/link-report", files={"image": ("a.png", jsrt[IMAGE_A], "image/png")},
                          data={"report": report}),
              client.post("/v1/link-report", json={"image": _b64(jsrt[IMAGE_A]), "report": report})):
        assert r.status_code == 200, r.text
        body = r.json()
        sentences = body["sentences"]
        assert [s["index"] for s in sentences] == [1, 2, 3]
        assert [s["status"] for s in sentences] == ["grounded", "negated", "not_groundable"]
        assert sentences[0]["region_ids"] and not sentences[1]["region_ids"]
        _check_regions(body["regions"])
        assert {i for s in sentences for i in s["region_ids"]} == {x["id"] for x in body["regions"]}


@pytest.mark.slow
@pytest.mark.data
def test_reference_segment_multipart_and_json(client: Any, jsrt: dict[str, bytes]) -> None:
    ref_mask = _mask(IMAGE_A, "left_lung")
    buf = io.BytesIO()
    Image.fromarray(np.where(ref_mask, 255, 0).astype(np.uint8)).save(buf, format="PNG")
    files = [("reference", ("ref.png", jsrt[IMAGE_A], "image/png")),
             ("reference_mask", ("mask.png", buf.getvalue(), "image/png")),
             ("target", ("t.png", jsrt[IMAGE_B], "image/png"))]
    r = client.post("/v1/reference-segment", files=files, data={"label": "left lung"})
    assert r.status_code == 200, r.text
    [target] = r.json()["targets"]
    assert target["index"] == 0 and target["result_id"]
    [mask] = _check_regions(target["regions"])
    assert _dice(mask, _mask(IMAGE_B, "left_lung")) > 0.75
    # JSON with a reference box (LiteMedSAM turns it into the reference mask), two targets
    r = client.post("/v1/reference-segment", json={
        "reference": _b64(jsrt[IMAGE_A]), "reference_box": _tight_box(ref_mask),
        "target": [_b64(jsrt[IMAGE_B]), _b64(jsrt[IMAGE_A])], "label": "left lung"})
    assert r.status_code == 200, r.text
    targets = r.json()["targets"]
    assert [t["index"] for t in targets] == [0, 1]
    assert _dice(_check_regions(targets[1]["regions"])[0], ref_mask) > 0.8  # the reference itself


@pytest.mark.slow
@pytest.mark.data
def test_chat_completions_in_openai_shape(client: Any, jsrt: dict[str, bytes]) -> None:
    url = "data:image/png;base64," + _b64(jsrt[IMAGE_A])
    r = client.post("/v1/chat/completions", json={
        "model": "medvlm-grounding", "temperature": 0,
        "messages": [{"role": "system", "content": "You are a radiologist."},
                     {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": "where is the heart?"}]}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "medvlm-grounding" and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant" and "heart" in choice["message"]["content"]
    assert choice["message"]["regions"] == body["regions"]
    [mask] = _check_regions(body["regions"])
    assert _dice(mask, _mask(IMAGE_A, "heart")) > 0.75
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


# ------------------------------------------------------------------------------------------ results and exports


@pytest.mark.slow
@pytest.mark.data
def test_results_and_exports(client: Any, jsrt: dict[str, bytes]) -> None:
    import nibabel as nib

    boxes = [_tight_box(_mask(IMAGE_A, "right_lung")), _tight_box(_mask(IMAGE_A, "left_lung"))]
    r = client.post("/v1/segment", json={"image": _b64(jsrt[IMAGE_A]), "box": boxes})
    body = r.json()
    rid = body["result_id"]
    masks = _check_regions(body["regions"])
    assert client.get(f"/v1/results/{rid}.json").json() == body
    labels = np.array(Image.open(io.BytesIO(client.get(body["downloads"]["png"]).content)))
    assert labels.shape == (1024, 1024) and set(np.unique(labels)) == {0, 1, 2}
    np.testing.assert_array_equal(labels == 2, masks[1])
    zf = zipfile.ZipFile(io.BytesIO(client.get(body["downloads"]["zip"]).content))
    assert len([n for n in zf.namelist() if n.endswith(".png")]) == 2
    nii = client.get(body["downloads"]["nii"])
    assert nii.status_code == 200
    img = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(nii.content))
    assert img.shape == (1024, 1024, 1)
    np.testing.assert_array_equal(np.asarray(img.dataobj)[:, :, 0], labels)
    preview = np.array(Image.open(io.BytesIO(client.get(body["downloads"]["image"]).content)))
    assert preview.shape == (1024, 1024)
    assert client.get(f"/v1/results/{rid}/masks.dcm").status_code == 409  # a PNG source


@pytest.mark.slow
@pytest.mark.data
def test_dicom_upload_exports_dicom_seg(client: Any, jsrt: dict[str, bytes]) -> None:
    import pydicom

    from tests.server_fakes import dicom_bytes

    pixels = np.array(Image.open(io.BytesIO(jsrt[IMAGE_A]))).astype(np.uint16) * 16
    dcm = dicom_bytes(pixels, PixelSpacing=[0.35, 0.35], ImagerPixelSpacing=[0.35, 0.35])
    src = pydicom.dcmread(io.BytesIO(dcm))
    box = _tight_box(_mask(IMAGE_A, "right_lung"))
    r = client.post("/v1/segment", files={"image": ("scan.dcm", dcm, "application/dicom")},
                    data={"box": json.dumps(box), "label": "right lung"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"]["format"] == "dicom" and body["image"]["spacing_mm"] == [0.35, 0.35]
    [mask] = _check_regions(body["regions"])
    assert body["regions"][0]["area_mm2"] == pytest.approx(mask.sum() * 0.35 * 0.35, rel=1e-6)
    seg = pydicom.dcmread(io.BytesIO(client.get(body["downloads"]["dcm"]).content))
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        src.SOPInstanceUID
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    np.testing.assert_array_equal(seg.pixel_array.reshape(1024, 1024) > 0, mask)


# ---------------------------------------------------------------------------------------------------- jobs


@pytest.mark.slow
@pytest.mark.data
def test_batch_job_runs_in_the_background(client: Any, jsrt: dict[str, bytes]) -> None:
    r = client.post("/v1/jobs", files=[("images", ("a.png", jsrt[IMAGE_A], "image/png"))],
                    data={"phrases": json.dumps(["heart", "right lung"])})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 180
    while (status := client.get(f"/v1/jobs/{job_id}").json())["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert status["status"] == "done" and status["progress"] == {"done": 2, "total": 2} and status["error"] is None
    lines = [json.loads(x) for x in client.get(f"/v1/jobs/{job_id}/results").text.splitlines()]
    assert [(x["image_index"], x["phrase"], x["status"]) for x in lines] == [(0, "heart", "ok"),
                                                                             (0, "right lung", "ok")]
    zf = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{job_id}/results.zip").content))
    heart_png = next(n for n in zf.namelist() if n.startswith("masks/") and ".heart." in n)
    heart = np.array(Image.open(io.BytesIO(zf.read(heart_png)))) > 0
    assert _dice(heart, _mask(IMAGE_A, "heart")) > 0.75


# ------------------------------------------------------------------------------------- a real server under load


@pytest.mark.slow
@pytest.mark.data
def test_32_concurrent_segment_requests_without_error(server_url: str, services: Any,
                                                      jsrt: dict[str, bytes]) -> None:
    from medvlm.app.server.bench import run_load

    encodes_before = services.encodings["litemedsam"].misses
    row = run_load(server_url, "segment", concurrency=32, requests=32, image=jsrt[IMAGE_A])
    assert row.errors == 0, row.error_examples
    assert row.requests == 32 and row.rps > 0 and row.p95_ms >= row.p50_ms > 0
    # the image was encoded at most once (cached from the earlier tests, or once by the first of the 32)
    assert services.encodings["litemedsam"].misses - encodes_before <= 1


@pytest.mark.slow
@pytest.mark.data
def test_bench_table_against_a_running_server(server_url: str, jsrt: dict[str, bytes]) -> None:
    from medvlm.app.server.bench import bench_serve, format_table

    rows = bench_serve(server_url, concurrencies=(1, 2), requests=2, endpoints=("ground", "segment"),
                       image=jsrt[IMAGE_A], server_pid=os.getpid())
    assert [(r.endpoint, r.concurrency) for r in rows] == [("ground", 1), ("ground", 2), ("segment", 1),
                                                           ("segment", 2)]
    assert all(r.errors == 0 and r.rps > 0 and r.peak_rss_mib and r.peak_rss_mib > 100 for r in rows)
    table = format_table(rows)
    assert table.splitlines()[0].startswith("| endpoint | concurrency |") and len(table.splitlines()) == 6


@pytest.mark.slow
def test_medvlm_serve_cli_starts_on_an_ephemeral_port(tmp_path: Path) -> None:
    import httpx

    from medvlm.app.server.bench import start_server, stop_server

    proc, url = start_server(tmp_path / "serve", timeout_s=120)
    try:
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        health = httpx.get(url + "/healthz", timeout=10).json()
        assert health["status"] == "ok" and not any(health["models"].values())  # nothing loaded before use
        r = httpx.post(url + "/v1/segment", content=b"{", headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["type"] == "malformed_json"
    finally:
        stop_server(proc)
    assert proc.returncode is not None


@pytest.mark.slow
@pytest.mark.parametrize("duration_s", [8.0])
def test_mixed_load_32_concurrent_for_a_bounded_time(tmp_path: Path, duration_s: float, record_property: Any,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """32 requests in flight for ``duration_s`` seconds on a real `medvlm serve` process with the real models and
    an API key, cycling segment / ground / chat / streamed chat / result JSON / model list / healthz: 0 errors.
    Prints requests/s, p50/p95 latency and the server's peak RSS."""
    from medvlm.app.server.bench import MIXED, format_table, peak_rss_mib, run_mixed_load, start_server, stop_server
    from medvlm.assets import DEMO_IMAGE, asset_path

    key = "load-test-key-0123456789"
    image = asset_path(DEMO_IMAGE).read_bytes()
    # ~30 requests/s make ~250 results in 8 s: keep them all, so that a "result" request never meets an eviction
    proc, url = start_server(tmp_path / "serve", timeout_s=300, extra_args=("--preload", "--max-results", "100000"),
                             env={"MEDVLM_API_KEY": key})
    try:
        row = run_mixed_load(url, 32, duration_s, image, headers={"Authorization": f"Bearer {key}"})
        row.peak_rss_mib = peak_rss_mib(proc.pid)
    finally:
        stop_server(proc)
    record_property("mixed_load", {"rps": row.rps, "p50_ms": row.p50_ms, "p95_ms": row.p95_ms,
                                   "peak_rss_mib": row.peak_rss_mib, "requests": row.requests})
    with capsys.disabled():
        print(f"\nmedvlm serve mixed load, 32 in flight for {duration_s:g} s ({row.seconds:.1f} s with the last "
              f"ones), requests per kind {row.kinds}:\n{format_table([row])}")
    assert row.errors == 0, row.error_examples
    assert row.requests >= 32 and set(row.kinds) == set(MIXED) and row.p95_ms >= row.p50_ms > 0
