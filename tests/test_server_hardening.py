"""The HTTP layer of `medvlm serve` under bad input: body and pixel limits, content types and magic bytes, corrupt
DICOM, malformed JSON, path-like names, no PHI in logs, timeouts, the JSON error shape, and batch jobs that
resume after a restart. The models are light fakes (tests/server_fakes.py): these tests check the server, not
the models (tests/test_server.py runs the real ones)."""

from __future__ import annotations

import base64
import io
import json
import logging
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from medvlm.app.server.app import create_app
from medvlm.app.server.config import ServerConfig
from tests.server_fakes import dicom_bytes, fake_services, png_bytes

IMAGE = png_bytes((np.arange(120 * 160).reshape(120, 160) % 251).astype(np.uint8))


def client_for(tmp_path: Path, services: Any = None, **config: Any) -> TestClient:
    cfg = ServerConfig(data_dir=tmp_path / "serve", **config)
    return TestClient(create_app(cfg, services or fake_services()), raise_server_exceptions=False)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with client_for(tmp_path) as c:
        yield c


def assert_error(response: Any, status: int, kind: str | None = None) -> dict[str, Any]:
    """The response is ``status`` with the API's error shape; returns ``error``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "expected", "fix"}, body
    assert body["error"]["message"] and body["error"]["fix"]
    if kind is not None:
        assert body["error"]["type"] == kind, body
    return dict(body["error"])


def segment(client: TestClient, image: bytes = IMAGE, ctype: str = "image/png", name: str = "image.png",
            **fields: str) -> Any:
    return client.post("/v1/segment", files={"image": (name, image, ctype)},
                       data=fields or {"box": "[10, 20, 110, 90]"})


# ------------------------------------------------------------------------------------------------- size limits


def test_body_over_limit_by_content_length_is_413(tmp_path: Path) -> None:
    with client_for(tmp_path, max_upload_mb=0.01) as c:  # 10 KiB
        big = png_bytes(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))
        assert len(big) > 20_000
        err = assert_error(segment(c, big), 413, "payload_too_large")
        assert "Content-Length" in err["message"] and "--max-upload-mb" in err["expected"]
        # nothing was decoded or stored
        assert not any((tmp_path / "serve" / "results").iterdir())


def test_body_over_limit_while_streaming_is_413(tmp_path: Path) -> None:
    with client_for(tmp_path, max_upload_mb=0.01) as c:
        def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer, counted as it arrives
            for _ in range(40):
                yield b"x" * 1024

        r = c.post("/v1/segment", content=chunks(), headers={"content-type": "application/json"})
        err = assert_error(r, 413, "payload_too_large")
        assert "streamed" in err["message"]
        # a small chunked body still goes through to the endpoint
        small = json.dumps({"image": base64.b64encode(IMAGE).decode(), "box": [10, 20, 110, 90]}).encode()
        r = c.post("/v1/segment", content=iter([small[:100], small[100:]]),
                   headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


def test_image_over_pixel_limit_is_413_with_the_knob(tmp_path: Path) -> None:
    with client_for(tmp_path, max_pixels=10_000) as c:  # the image is 160 x 120 = 19,200 pixels
        err = assert_error(segment(c), 413, "image_too_large")
        assert "19200 pixels" in err["message"] and "--max-pixels" in err["fix"]


def test_too_many_images_is_413(tmp_path: Path) -> None:
    with client_for(tmp_path, max_images=2) as c:
        files = [("reference", ("r.png", IMAGE, "image/png"))] + [("target", (f"{k}.png", IMAGE, "image/png"))
                                                                   for k in range(3)]
        assert_error(c.post("/v1/reference-segment", files=files, data={"reference_box": "[1, 1, 50, 50]"}), 413)


# ------------------------------------------------------------------------------------------ types and contents


def test_content_type_and_magic_bytes_are_checked(client: TestClient) -> None:
    # a body that is neither multipart nor JSON
    r = client.post("/v1/segment", content=b"box=1", headers={"content-type": "text/plain"})
    assert "multipart/form-data or application/json" in assert_error(r, 415, "unsupported_media_type")["expected"]
    # a GIF sent as an image: magic bytes decide
    assert_error(segment(client, b"GIF89a" + b"\0" * 200, "application/octet-stream"), 415)
    # a PNG part declared as text, and a JPEG declared as PNG
    assert_error(segment(client, IMAGE, "text/plain"), 415)
    jpeg = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((20, 20), np.uint8)).save(jpeg, format="JPEG")
    err = assert_error(segment(client, jpeg.getvalue(), "image/png"), 415)
    assert "JPEG" in err["message"]
    # the same JPEG declared generically is fine (its bytes say what it is)
    assert segment(client, jpeg.getvalue(), "application/octet-stream", box="[1, 1, 10, 10]").status_code == 200
    # base64 in JSON: the decoded bytes are checked the same way
    r = client.post("/v1/segment", json={"image": base64.b64encode(b"%PDF-1.4 hello").decode(), "box": [1, 1, 5, 5]})
    assert_error(r, 415)


def test_corrupt_dicom_is_422_with_the_loaders_message(client: TestClient) -> None:
    good = dicom_bytes(np.full((64, 64), 500, np.uint16))
    truncated = good[: len(good) - 3000]
    err = assert_error(segment(client, truncated, "application/dicom", box="[1, 1, 20, 20]"), 422, "invalid_input")
    assert "DICOM" in err["message"] and "re-export" in err["fix"]
    assert "<bytes>" in err["message"] or "image" in err["message"]
    # DICM magic with garbage after it
    garbage = b"\0" * 128 + b"DICM" + b"\xff" * 64
    assert "DICOM" in assert_error(segment(client, garbage, "application/dicom"), 422)["message"]


def test_malformed_and_invalid_bodies(client: TestClient) -> None:
    hdr = {"content-type": "application/json"}
    r = client.post("/v1/segment", content=b'{"image": "abc", "box": [1, 2', headers=hdr)
    assert_error(r, 400, "malformed_json")
    assert_error(client.post("/v1/segment", content=b"[1, 2, 3]", headers=hdr), 422)
    b64 = base64.b64encode(IMAGE).decode()
    err = assert_error(client.post("/v1/segment", json={"image": b64, "box": [1, 2, 3]}), 422)
    assert "box" in err["message"] or "4 values" in err["message"]
    assert "bogus" in assert_error(client.post("/v1/segment", json={"image": b64, "bogus": 1}), 422)["message"]
    assert_error(client.post("/v1/segment", json={"image": "not base64 !!", "box": [1, 1, 5, 5]}), 422)
    assert_error(client.post("/v1/segment", json={"image": "https://example.org/x.png", "box": [1, 1, 5, 5]}), 422)
    assert_error(client.post("/v1/segment", json={"box": [1, 1, 5, 5]}), 422)  # no image
    assert_error(client.post("/v1/segment", json={"image": b64}), 422)  # no prompt
    # a JSON field of a multipart form that is not JSON
    assert_error(segment(client, box="[1, 2"), 400, "malformed_json")
    # a box outside the image: the segmenter's own message, 422
    err = assert_error(segment(client, box="[0, 0, 5000, 90]"), 422)
    assert "inside the image" in err["expected"]
    # chat: no image / no text are 400 with what to send
    msg = [{"role": "user", "content": "where is the heart?"}]
    assert "image_url" in assert_error(client.post("/v1/chat/completions", json={"messages": msg}), 400)["expected"]
    url = "data:image/png;base64," + b64
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    assert_error(client.post("/v1/chat/completions", json={"messages": msg}), 400, "missing_text")


def test_unknown_routes_methods_and_ids_answer_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/segment"), 405)
    assert_error(client.get("/v1/results/0123456789abcdef0123456789abcdef.json"), 404, "not_found")
    assert_error(client.get("/v1/jobs/0123456789abcdef0123456789abcdef"), 404, "not_found")
    rid = segment(client).json()["result_id"]
    assert_error(client.get(f"/v1/results/{rid}/masks.tiff"), 404)
    err = assert_error(client.get(f"/v1/results/{rid}/masks.dcm"), 409, "not_dicom")
    assert "DICOM" in err["message"] and "nii.gz" in err["fix"]


# ---------------------------------------------------------------------------------------------- names and PHI


def test_path_like_names_are_never_paths(tmp_path: Path) -> None:
    evil = "../../etc/passwd"
    with client_for(tmp_path) as c:
        r = segment(c, name=evil, box="[10, 20, 110, 90]", label=evil)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["regions"][0]["label"] == evil  # kept as text
        names = zipfile.ZipFile(io.BytesIO(c.get(f"/v1/results/{body['result_id']}/masks.zip").content)).namelist()
        assert names == ["1-etc-passwd.png", "regions.json"]
        for bad in ("..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "%2E%2E", "x" * 40):
            assert c.get(f"/v1/results/{bad}.json").status_code == 404
            assert c.get(f"/v1/jobs/{bad}").status_code == 404
        r = c.post("/v1/jobs", files=[("images", (evil, IMAGE, "image/png"))], data={"phrases": json.dumps([evil])})
        assert r.status_code == 202, r.text
    # every file the server wrote is inside its data folder, named by the server
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all((tmp_path / "serve") in p.parents for p in written)
    assert all(".." not in p.relative_to(tmp_path).parts for p in written)
    assert not (tmp_path / "etc").exists()


def test_no_phi_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pixels = (np.arange(64 * 80).reshape(64, 80) % 4000).astype(np.uint16)
    dcm = dicom_bytes(pixels, patient_name="Doe^Jane", patient_id="SECRET-123")
    with caplog.at_level(logging.DEBUG), client_for(tmp_path) as c:
        r = segment(c, dcm, "application/dicom", name="Jane_Doe_chest.dcm", box="[1, 2, 30, 40]")
        assert r.status_code == 200, r.text
        assert c.get(r.json()["downloads"]["dcm"]).status_code == 200
        # errors are logged too: a truncated file of the same patient
        assert segment(c, dcm[:-2000], "application/dicom", name="Jane_Doe_2.dcm").status_code == 422
        g = c.post("/v1/ground", files={"image": ("Jane_Doe.dcm", dcm, "application/dicom")}, data={"text": "heart"})
        assert g.status_code == 200
    assert "/v1/segment" in caplog.text  # the request log is there...
    for secret in ("Doe", "Jane", "SECRET-123", "19700101", "ACC1"):
        assert secret not in caplog.text  # ...without a tag value or a client file name
    assert "Doe" not in json.dumps(r.json())


def test_unexpected_exception_is_a_json_500_without_its_message_in_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from medvlm.app.server.services import Services
    from tests.server_fakes import BoxFillSegmenter

    secret = "".join(["Do", "e^Ja", "ne"])  # not spelled out: the logged stack frames quote source lines

    class Broken(BoxFillSegmenter):
        def encode(self, image: Any) -> Any:
            raise RuntimeError(f"value {secret} could not be parsed")

    services = Services(loaders={"litemedsam": Broken})
    with caplog.at_level(logging.DEBUG), client_for(tmp_path, services) as c:
        r = segment(c)
        err = assert_error(r, 500, "internal_error")
        assert "RuntimeError" in err["message"] and "Doe" not in err["message"]
        assert len(r.headers["x-request-id"]) == 12
        assert c.get("/healthz").status_code == 200  # the server goes on
    assert "internal error RuntimeError" in caplog.text and "Doe" not in caplog.text


# -------------------------------------------------------------------------------------------------- timeouts


def test_slow_model_work_is_504(tmp_path: Path) -> None:
    with client_for(tmp_path, fake_services(encode_s=1.5), request_timeout_s=0.3) as c:
        t0 = time.perf_counter()
        err = assert_error(segment(c), 504, "timeout")
        assert time.perf_counter() - t0 < 1.4  # answered at the timeout, not when the work ended
        assert "--timeout" in err["expected"]


# --------------------------------------------------------------------------------------- exports (fake masks)


def test_dicom_result_exports_seg_with_source_uids(client: TestClient) -> None:
    import pydicom

    pixels = (np.arange(64 * 80).reshape(64, 80) % 4000).astype(np.uint16)
    dcm = dicom_bytes(pixels, ImagerPixelSpacing=[0.2, 0.25])
    src = pydicom.dcmread(io.BytesIO(dcm))
    r = segment(client, dcm, "application/dicom", box="[[2, 3, 30, 40], [20, 10, 60, 50]]")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": 80, "height": 64, "spacing_mm": [0.2, 0.25], "modality": "CR",
                             "format": "dicom"}
    seg = pydicom.dcmread(io.BytesIO(client.get(body["downloads"]["dcm"]).content))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == src.StudyInstanceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert len(seg.SegmentSequence) == 2
    frames = seg.pixel_array.reshape(-1, 64, 80)
    assert frames.shape[0] == 2
    assert frames[0][3:40, 2:30].all() and frames[0].sum() == 28 * 37
    assert frames[1][10:50, 20:60].all() and frames[1].sum() == 40 * 40  # overlaps kept
    # the label map: region 2 wins where they overlap
    from PIL import Image

    labels = np.array(Image.open(io.BytesIO(client.get(body["downloads"]["png"]).content)))
    assert labels.shape == (64, 80) and labels[20, 25] == 2 and labels[5, 5] == 1 and labels[60, 70] == 0


# ------------------------------------------------------------------------------------------------------- jobs


def test_jobs_resume_after_a_restart_with_every_item_once(tmp_path: Path) -> None:
    images = [png_bytes(np.full((40 + 10 * k, 60), 20 * k, np.uint8)) for k in range(3)]
    files = [("images", (f"img{k}.png", data, "image/png")) for k, data in enumerate(images)]
    phrases = ["heart", "left lung"]
    # a server that stores the job but stops before its worker runs (no lifespan = no worker)
    first = client_for(tmp_path)
    r = first.post("/v1/jobs", files=files, data={"phrases": json.dumps(phrases)})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.json()["status"] == "queued" and r.json()["progress"] == {"done": 0, "total": 6}
    # ... and one that finished the first image before being killed: its lines are on disk
    out = tmp_path / "serve" / "jobs" / job_id / "out"
    from agents.batch import run_batch
    from tests.server_fakes import FakeAgent

    first_input = sorted((tmp_path / "serve" / "jobs" / job_id / "inputs").iterdir())[0]
    run_batch(FakeAgent(), [first_input], phrases, out, progress=False)
    state = json.loads((tmp_path / "serve" / "jobs" / job_id / "job.json").read_text())
    state["status"] = "running"
    (tmp_path / "serve" / "jobs" / job_id / "job.json").write_text(json.dumps(state))
    # restart: the new server resumes the job
    with client_for(tmp_path) as c:
        deadline = time.monotonic() + 30
        while (status := c.get(f"/v1/jobs/{job_id}").json())["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert status["status"] == "done" and status["progress"] == {"done": 6, "total": 6}, status
        lines = [json.loads(x) for x in c.get(f"/v1/jobs/{job_id}/results").text.splitlines()]
        assert sorted((x["image_index"], x["phrase"]) for x in lines) == [(k, p) for k in range(3) for p in sorted(
            phrases)]
        assert all(x["status"] == "ok" and "key" not in x and "image" not in x for x in lines)
        sizes = {x["image_index"]: x["size"] for x in lines}
        assert sizes == {k: [40 + 10 * k, 60] for k in range(3)}
        zf = zipfile.ZipFile(io.BytesIO(c.get(f"/v1/jobs/{job_id}/results.zip").content))
        assert "results.jsonl" in zf.namelist() and len([n for n in zf.namelist() if n.startswith("masks/")]) == 6
    # bad job requests
    with client_for(tmp_path) as c:
        assert_error(c.post("/v1/jobs", files=files, data={"phrases": "[]"}), 422)
        assert_error(c.post("/v1/jobs", json={"images": [], "phrases": ["heart"]}), 422)


# ------------------------------------------------------------------------------------------ results kept, NIfTI


def test_results_are_bounded_oldest_evicted(tmp_path: Path) -> None:
    with client_for(tmp_path, max_results=2) as c:
        ids = []
        for _ in range(3):
            ids.append(segment(c).json()["result_id"])
            time.sleep(0.02)  # distinct modification times
        assert_error(c.get(f"/v1/results/{ids[0]}.json"), 404, "not_found")
        assert [c.get(f"/v1/results/{i}.json").status_code for i in ids[1:]] == [200, 200]
        assert len(list((tmp_path / "serve" / "results").iterdir())) == 2


def test_nifti_volume_upload_needs_a_slice_and_exports_in_its_geometry(tmp_path: Path) -> None:
    import gzip

    import nibabel as nib

    volume = np.random.default_rng(1).normal(size=(40, 30, 6)).astype(np.float32)
    affine = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0, -20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    data = gzip.compress(nib.Nifti1Image(volume, affine).to_bytes())
    with client_for(tmp_path) as c:
        err = assert_error(c.post("/v1/segment", files={"image": ("v.nii.gz", data, "application/gzip")},
                                  data={"box": "[1, 1, 10, 10]"}), 422)
        assert "3D" in err["message"]
        assert "'slice'" in err["fix"]
        r = c.post("/v1/segment", files={"image": ("v.nii.gz", data, "application/gzip")},
                   data={"box": "[2, 3, 12, 20]", "slice": "4"})
        assert r.status_code == 200, r.text
        assert r.json()["image"]["width"] == 30 and r.json()["image"]["height"] == 40  # rows = first array axis
        out = nib.Nifti1Image.from_bytes(gzip.decompress(c.get(r.json()["downloads"]["nii"]).content))
    assert out.shape == (40, 30, 1)
    np.testing.assert_allclose(out.affine[:3, 3], (affine @ [0, 0, 4, 1])[:3])  # slice 4's position
    mask = np.asarray(out.dataobj)[:, :, 0] > 0
    assert mask[3:20, 2:12].all() and mask.sum() == 17 * 10


# ------------------------------------------------------------------------------------- API key, CORS, expiry

KEY = "s3cret-key-for-tests-0123456789"


def test_api_key_is_required_except_on_open_routes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = {"Authorization": f"Bearer {KEY}"}
    with caplog.at_level(logging.DEBUG), client_for(tmp_path, api_key=KEY) as c:
        for r in (segment(c), c.get("/v1/models"), c.get("/v1/jobs/0123456789abcdef0123456789abcdef")):
            err = assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == 'Bearer realm="medvlm"' and "Bearer" in err["expected"]
        for header in (f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", f"Basic {KEY}", KEY, "Bearer", f"Token {KEY}"):
            r = c.post("/v1/segment", files={"image": ("a.png", IMAGE, "image/png")}, data={"box": "[1, 1, 9, 9]"},
                       headers={"Authorization": header})
            assert_error(r, 401, "unauthorized")
        assert 'error="invalid_token"' in c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).headers[
            "www-authenticate"]
        # the right key, scheme in any case
        r = c.post("/v1/segment", files={"image": ("a.png", IMAGE, "image/png")}, data={"box": "[1, 1, 9, 9]"},
                   headers={"Authorization": f"bearer {KEY}"})
        assert r.status_code == 200, r.text
        assert c.get(r.json()["downloads"]["json"], headers=good).status_code == 200
        assert_error(c.get(r.json()["downloads"]["json"]), 401)
        # open: liveness, the web page and its files, the API documentation
        for path in ("/healthz", "/", "/static/app.js", "/openapi.json", "/docs"):
            assert c.get(path).status_code == 200, path
        assert_error(c.get("/static/../v1/models"), 401)
        schema = c.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        # an unauthenticated upload is refused before its body is buffered or parsed
        assert c.post("/v1/segment", content=b"{", headers={"content-type": "application/json"}).status_code == 401
    assert KEY not in caplog.text and "s3cret" not in caplog.text


def test_the_key_comes_from_the_flag_or_the_environment_and_is_never_echoed(tmp_path: Path) -> None:
    from medvlm.app.cli import build_parser
    from medvlm.app.server.run import config_from_args
    from medvlm.errors import InputError

    assert KEY not in repr(ServerConfig(data_dir=tmp_path, api_key=KEY))
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--cors-origin", "https://a.example",
                                      "--cors-origin", "http://localhost:3000", "--ttl", "60"])
    assert config_from_args(args, {}).api_key is None
    config = config_from_args(args, {"MEDVLM_API_KEY": KEY})
    assert config.api_key == KEY and config.cors_origins == ("https://a.example", "http://localhost:3000")
    assert config.result_ttl_s == 60
    args = build_parser().parse_args(["serve", "--api-key", "from-the-flag-123"])
    assert config_from_args(args, {"MEDVLM_API_KEY": KEY}).api_key == "from-the-flag-123"
    with pytest.raises(InputError) as info:
        ServerConfig(data_dir=tmp_path, api_key="short key")
    assert "short key" not in str(info.value)
    with pytest.raises(InputError):
        ServerConfig(data_dir=tmp_path, cors_origins=("https://a.example/path",))
    with pytest.raises(InputError):
        ServerConfig(data_dir=tmp_path, result_ttl_s=-1)


def test_cors_is_off_by_default_and_opt_in_per_origin(tmp_path: Path) -> None:
    origin = "https://viewer.example.org"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with client_for(tmp_path) as c:
        r = c.options("/v1/segment", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in c.get("/healthz", headers={"Origin": origin}).headers
    with client_for(tmp_path, cors_origins=(origin,), api_key=KEY) as c:
        r = c.options("/v1/segment", headers=preflight)  # answered before the key check
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.get("/v1/models", headers={"Origin": origin})  # a 401 a page can read
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == origin
        r = c.options("/v1/segment", headers={**preflight, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


def test_delete_result_removes_its_files(tmp_path: Path) -> None:
    pixels = (np.arange(64 * 80).reshape(64, 80) % 4000).astype(np.uint16)
    with client_for(tmp_path) as c:
        body = segment(c, dicom_bytes(pixels), "application/dicom", box="[2, 3, 30, 40]").json()
        rid = body["result_id"]
        folder = tmp_path / "serve" / "results" / rid
        assert c.get(body["downloads"]["dcm"]).status_code == 200
        assert (folder / "source.dcm").is_file() and (folder / "masks.dcm").is_file()
        r = c.delete(f"/v1/results/{rid}")
        assert r.status_code == 200 and r.json() == {"result_id": rid, "deleted": True}
        assert not folder.exists()
        for url in (f"/v1/results/{rid}.json", body["downloads"]["png"], body["downloads"]["image"]):
            assert_error(c.get(url), 404, "not_found")
        assert_error(c.delete(f"/v1/results/{rid}"), 404, "not_found")
        assert_error(c.delete("/v1/results/..%2F..%2Fjobs"), 404, "not_found")
        assert_error(c.delete("/v1/results/0123456789abcdef0123456789abcdef"), 404, "not_found")
    assert (tmp_path / "serve" / "results").is_dir()


def test_results_and_finished_jobs_expire(tmp_path: Path) -> None:
    import os

    with client_for(tmp_path, result_ttl_s=3600) as c:
        old, fresh = segment(c).json()["result_id"], segment(c).json()["result_id"]
        folder = tmp_path / "serve" / "results"
        hours_ago = time.time() - 2 * 3600
        os.utime(folder / old / "result.json", (hours_ago, hours_ago))
        assert_error(c.get(f"/v1/results/{old}.json"), 404, "not_found")  # expired on access: deleted now
        assert not (folder / old).exists() and c.get(f"/v1/results/{fresh}.json").status_code == 200
        job = c.post("/v1/jobs", files=[("images", ("a.png", IMAGE, "image/png"))],
                     data={"phrases": '["heart"]'}).json()["id"]
        deadline = time.monotonic() + 30
        while c.get(f"/v1/jobs/{job}").json()["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # expired at the next start (the sweep), unexpired ones kept
    os.utime(folder / fresh / "result.json", (hours_ago, hours_ago))
    os.utime(tmp_path / "serve" / "jobs" / job / "job.json", (hours_ago, hours_ago))
    keep = segment(client_for(tmp_path, result_ttl_s=3600)).json()["result_id"]  # no lifespan: no sweep yet
    with client_for(tmp_path, result_ttl_s=3600) as c:
        assert not (folder / fresh).exists() and not (tmp_path / "serve" / "jobs" / job).exists()
        assert c.get(f"/v1/results/{keep}.json").status_code == 200
        assert_error(c.get(f"/v1/jobs/{job}"), 404)


def test_prompt_and_finding_counts_are_bounded(client: TestClient) -> None:
    """10,000 boxes (or a report with hundreds of findings) would hold a model for minutes: a clear 422 instead."""
    b64 = base64.b64encode(IMAGE).decode()
    err = assert_error(client.post("/v1/segment", json={"image": b64, "box": [[1, 1, 20, 20]] * 10_000}), 422)
    assert "box" in err["message"] and "64" in err["message"]
    err = assert_error(client.post("/v1/segment", json={"image": b64, "points": {"positive": [[5, 5]] * 10_000}}), 422)
    assert "points.positive" in err["message"]
    assert client.post("/v1/segment", json={"image": b64, "box": [[1, 1, 20, 20]] * 64}).status_code == 200
    report = "The heart is enlarged. " * 70
    err = assert_error(client.post("/v1/link-report", json={"image": b64, "report": report}), 422)
    assert "70 findings" in err["message"] and "split the report" in err["fix"]
    assert client.post("/v1/link-report", json={"image": b64, "report": "The heart is enlarged. " * 3}).status_code \
        == 200
    # NaN / inf coordinates are refused when the body is read
    body = b'{"image": "' + b64.encode() + b'", "box": [NaN, 1, 20, Infinity]}'
    assert "finite" in assert_error(client.post("/v1/segment", content=body,
                                                headers={"content-type": "application/json"}), 422)["message"]
