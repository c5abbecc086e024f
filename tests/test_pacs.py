"""``medvlm pacs``: DICOMweb find / segment / link-report against a real Orthanc, the DICOM SR, and the transport's
error paths (auth, retries with backoff, timeouts, a PACS that is down).

Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``, installed by ``make orthanc``) is started once per
module on a free loopback port with a temporary storage folder, HTTP basic authentication and the DICOMweb
plugin; the tests skip with the reason when it is absent. Fast tests use a fake text segmenter and a fake
grounding agent; the two ``slow`` ones run the shipped Med-VLM (the CT liver from ../shared/data, ``data``) and
the grounding agent (the bundled chest X-ray). Every patient is synthetic.

``MEDVLM_PACS_SCREENSHOT=docs/pacs_seg.png pytest tests/test_pacs.py -k liver`` also writes the README screenshot:
the stored SEG drawn over its source slice, both retrieved through DICOMweb.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medvlm.app.cli import main
from medvlm.errors import InputError
from medvlm.pacs import (
    PacsAuth,
    PacsClient,
    SeriesInfo,
    check_url,
    default_cache_dir,
    parse_since,
    redact_url,
    resolve_auth,
    seg_overlay,
    select_series,
)
from medvlm.sr import (
    SRRegion,
    SRSentence,
    box_polygon,
    build_report_sr,
    mask_polygons,
    read_report_sr,
    validate_report_sr,
)
from medvlm.types import Box, Mask, Region
from tests.conftest import REPO, data_dir
from tests.dicom_fixtures import radiograph_dataset, write_series

hd = pytest.importorskip("highdicom")
pytest.importorskip("dicomweb_client")
import pydicom  # noqa: E402

ORTHANC_BINARIES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
DICOMWEB_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*", "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                    "/usr/lib/*/orthanc/libOrthancDicomWeb.so*",
                    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*")
ORTHANC_NOTE = REPO / ".venv" / ".orthanc-unavailable"
REPORT = "The heart is enlarged. No pneumothorax or pleural effusion. Clinical history: cough. The right lung is clear."


# ------------------------------------------------------------------------------------------------ Orthanc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _orthanc_paths() -> tuple[str, str]:
    binary = next((b for b in ORTHANC_BINARIES if os.access(b, os.X_OK)), None) or shutil.which("Orthanc")
    plugins = sorted(p for pattern in DICOMWEB_PLUGINS for p in glob.glob(pattern))
    if binary and plugins:
        return binary, plugins[0]
    note = ORTHANC_NOTE.read_text().strip() if ORTHANC_NOTE.is_file() else "run `make orthanc` (Debian: apt-get " \
        "install orthanc orthanc-dicomweb)"
    missing = "the Orthanc binary" if not binary else "the Orthanc DICOMweb plugin (libOrthancDicomWeb.so)"
    pytest.skip(f"{missing} is not installed: {note}")


@dataclass
class Orthanc:
    root: str
    user: str
    password: str
    log: Path

    @property
    def url(self) -> str:
        return f"{self.root}/dicom-web"

    def client(self, **kwargs: Any) -> PacsClient:
        return PacsClient(self.url, PacsAuth(self.user, self.password), retries=0, **kwargs)

    def series_count(self, study: str) -> int:
        return len(self.client().list_series(study, must_exist=False))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    import requests

    binary, plugin = _orthanc_paths()
    work = tmp_path_factory.mktemp("orthanc")
    password = secrets.token_hex(8)
    for _ in range(3):  # another process may take the port between choosing and binding it
        port = _free_port()
        config = {"Name": "medvlm-test", "StorageDirectory": str(work / "db"), "IndexDirectory": str(work / "db"),
                  "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": True, "RegisteredUsers": {"medvlm": password},
                  "Plugins": [plugin], "StableAge": 1,
                  "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": f"127.0.0.1:{port}",
                               "Ssl": False}}
        (work / "orthanc.json").write_text(json.dumps(config, indent=2))
        log = work / f"orthanc-{port}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen([binary, str(work / "orthanc.json")], stdout=fh, stderr=subprocess.STDOUT,
                                    cwd=work)
        root = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = requests.get(f"{root}/dicom-web/studies", auth=("medvlm", password), timeout=2).ok
            except requests.RequestException:
                ready = False
            if ready:
                break
            time.sleep(0.2)
        if ready:
            break
        proc.terminate()
        proc.wait(timeout=10)
    else:
        pytest.fail(f"Orthanc did not start; its log:\n{log.read_text()[-3000:]}")
    try:
        yield Orthanc(root=root, user="medvlm", password=password, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def pacs_env(orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Orthanc:
    """The credentials in the environment (as a user would keep them) and a private instance cache; the OpenVINO
    IRs stay in the suite's shared cache (converting the encoders again in every test costs ~30 s each)."""
    from segmentation.runtime import openvino_cache_dir

    monkeypatch.setenv("MEDVLM_OPENVINO_CACHE", str(openvino_cache_dir()))
    monkeypatch.setenv("MEDVLM_PACS_USER", orthanc.user)
    monkeypatch.setenv("MEDVLM_PACS_PASSWORD", orthanc.password)
    monkeypatch.delenv("MEDVLM_PACS_TOKEN", raising=False)
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path / "home"))
    return orthanc


def _store_folder(orthanc: Orthanc, folder: Path) -> list[Any]:
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    orthanc.client().store(datasets)
    return datasets


def _uids(**extra: Any) -> dict[str, Any]:
    from pydicom.uid import generate_uid

    return {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid(), **extra}


def _synthetic_ct() -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) int16: a bright 'organ' box of 200 HU in stored slices 1-5; 1.5 x 1.5 x 2.5 mm voxels."""
    data = np.full((24, 20, 8), -1000, dtype=np.int16)
    data[4:16, 5:15, 1:6] = 200
    affine = np.diag([1.5, 1.5, 2.5, 1.0])
    affine[:3, 3] = [-20.0, 10.0, 30.0]
    return data, affine


@pytest.fixture(scope="module")
def studies(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Synthetic studies in Orthanc: a small CT (fake segmenter), the bundled chest X-ray as DX, a CT with a missing
    slice, a CT stack with a slice of another orientation, and a US 'series' (a modality nobody segments)."""
    from medvlm.assets import DEMO_IMAGE, asset_path

    root = tmp_path_factory.mktemp("studies")
    out: dict[str, Any] = {}
    data, affine = _synthetic_ct()
    ids = _uids(patient="SYN0001", date="20240101", description="synthetic CT")
    out["ct_sops"] = write_series(root / "ct", data, affine, uids=ids)
    out["ct"] = ids
    _store_folder(orthanc, root / "ct")

    pixels = np.asarray(Image.open(asset_path(DEMO_IMAGE)).convert("L"))
    dx = radiograph_dataset(pixels, patient="SYN0002", date="20240301")
    orthanc.client().store([dx])
    out["dx"], out["dx_ds"] = {"study": str(dx.StudyInstanceUID), "series": str(dx.SeriesInstanceUID)}, dx

    small = np.zeros((12, 10, 6), dtype=np.int16)
    gap = _uids(patient="SYN0003", description="gap")
    write_series(root / "gap", small, np.diag([1.0, 1.0, 2.0, 1.0]), [0, 1, 2, 4, 5], uids=gap)
    _store_folder(orthanc, root / "gap")
    out["gap"] = gap

    mixed = _uids(patient="SYN0004", description="mixed")
    write_series(root / "mixed", small, np.diag([1.0, 1.0, 2.0, 1.0]), uids=mixed)
    victim = sorted((root / "mixed").iterdir())[2]
    ds = pydicom.dcmread(victim)
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal slice in an axial stack
    ds.save_as(victim)
    _store_folder(orthanc, root / "mixed")
    out["mixed"] = mixed

    us = _uids(patient="SYN0005", modality="US", description="not a CT")
    write_series(root / "us", small, np.diag([1.0, 1.0, 2.0, 1.0]), uids=us)
    _store_folder(orthanc, root / "us")
    out["us"] = us
    return out


# -------------------------------------------------------------------------------------------------- fakes


class FakeTextSegmenter:
    """Text 'segmenter' for fast tests: the mask of text ``t`` is where the image is brighter than ``t``'s level.
    Serves both paths: ``encode`` + ``predict_many`` (volumes) and ``segment`` (2D images)."""

    name = "fake"
    accepts_text = True
    LEVELS: ClassVar[dict[str, float]] = {"bright": 50.0, "very bright": 220.0, "nothing": 1e9}

    def encode(self, image: Any) -> Any:
        return image

    def predict_many(self, embedding: Any, prompts: list[Any]) -> list[Any]:
        out = []
        for p in prompts:
            mask = np.asarray(embedding.pixels) > self.LEVELS[p.text]
            found = bool(mask.any())
            out.append(SimpleNamespace(mask=Mask(mask), score=0.8 if found else 0.0,
                                       meta={"found": found, "structure": p.text, "existence": 0.9 if found else 0.1}))
        return out

    def segment(self, image: Any, prompts: list[Any]) -> list[Any]:
        return self.predict_many(self.encode(image), prompts)


@pytest.fixture
def fake_segmenter(monkeypatch: pytest.MonkeyPatch) -> FakeTextSegmenter:
    import segmentation.registry

    fake = FakeTextSegmenter()
    monkeypatch.setattr(segmentation.registry, "build_segmenter", lambda name, **kw: fake)
    return fake


class FakeAgent:
    """Grounding agent for fast tests: each phrase gets a fixed rectangle mask (``outside``: one more region, a box
    reaching past the image, without a mask)."""

    grounder = SimpleNamespace(name="fake")

    def __init__(self, outside: bool = False) -> None:
        self.outside = outside

    def ground_phrases(self, image: Any, phrases: list[str]) -> list[tuple[Any, list[Region]]]:
        out = []
        h, w = image.shape
        for k, phrase in enumerate(phrases):
            mask = np.zeros((h, w), dtype=bool)
            mask[h // 4 + 40 * k: h // 2 + 40 * k, w // 4: w // 2 + 60 * k] = True
            regions = [Region.from_mask(Mask(mask), label=phrase, score=0.9)]
            if self.outside:
                regions.append(Region(box=Box(w / 2, 0, w + 50, h / 3), label=phrase + " (box)", score=0.9))
            out.append((SimpleNamespace(note="", meta={}), regions))
        return out


@pytest.fixture
def fake_agent(monkeypatch: pytest.MonkeyPatch) -> FakeAgent:
    import medvlm.app.agent_commands

    agent = FakeAgent()
    monkeypatch.setattr(medvlm.app.agent_commands, "build_agent", lambda args: agent)
    return agent


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["pacs", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _series_of(orthanc: Orthanc, study: str, modality: str) -> list[SeriesInfo]:
    return [s for s in orthanc.client().list_series(study) if s.modality == modality]


def _retrieve_all(orthanc: Orthanc, study: str, series: str) -> list[Any]:
    client = orthanc.client(cache_dir=None)
    return [pydicom.dcmread(p) for p in client.retrieve_series(study, series)]


# ------------------------------------------------------------------------------------- auth, URL, options


def test_auth_from_arguments_and_environment_never_shows_secrets() -> None:
    env = {"MEDVLM_PACS_USER": "alice", "MEDVLM_PACS_PASSWORD": "pw-from-env", "MEDVLM_PACS_TOKEN": ""}
    auth = resolve_auth(env=env)
    assert (auth.user, auth.password, auth.token) == ("alice", "pw-from-env", None)
    assert "pw-from-env" not in repr(auth) and "pw-from-env" not in auth.describe()
    assert resolve_auth("bob", "pw", env=env).user == "bob"  # the argument wins over the environment
    token = resolve_auth(env={"MEDVLM_PACS_TOKEN": "tok-123"})
    assert token.token == "tok-123" and "tok-123" not in repr(token) and token.describe() == "a bearer token"
    assert resolve_auth(env={}).describe() == "no credentials"
    with pytest.raises(InputError, match="either --user/--password"):
        resolve_auth(token="t", env=env)
    with pytest.raises(InputError, match="without a password"):
        resolve_auth("alice", env={})
    with pytest.raises(InputError, match="without a user"):
        resolve_auth(password="pw", env={})


def test_url_checks_redaction_dates_and_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert check_url("http://pacs.local:8042/dicom-web/") == "http://pacs.local:8042/dicom-web"
    with pytest.raises(InputError, match="without credentials") as err:
        check_url("https://alice:hunter2@pacs.local/dicom-web")
    assert "hunter2" not in str(err.value)
    for bad in ("pacs.local/dicom-web", "ftp://pacs.local", "http://:80/x", "http://host:99999/x"):
        with pytest.raises(InputError, match="--url"):
            check_url(bad)
    assert redact_url("https://a:b@h:8443/dicom-web?token=x") == "https://h:8443/dicom-web"
    assert parse_since("20240131") == "20240131-" and parse_since(None) is None
    for bad in ("2024", "20241331", "2024-01-31"):
        with pytest.raises(InputError, match="YYYYMMDD"):
            parse_since(bad)
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / "pacs"
    monkeypatch.delenv("MEDVLM_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "medvlm" / "pacs"


def test_select_series_picks_the_only_image_series_or_says_what_to_do() -> None:
    ct = SeriesInfo("1.2", "1.2.1", "CT", 1, "abdomen", 30)
    seg = SeriesInfo("1.2", "1.2.9", "SEG", 9001, "medvlm segmentation", 1)
    dx = SeriesInfo("1.2", "1.2.2", "DX", 2, "chest", 1)
    assert select_series([ct, seg], "1.2", None, modalities=("CT", "MR", "CR", "DX"), purpose="segment") is ct
    assert select_series([ct, dx], "1.2", "1.2.2", modalities=("CR", "DX"), purpose="link-report") is dx
    with pytest.raises(InputError, match="2 such series") as err:
        select_series([ct, dx, seg], "1.2", None, modalities=("CT", "MR", "CR", "DX"), purpose="segment")
    assert "--series" in str(err.value)
    with pytest.raises(InputError, match="radiograph") as err:
        select_series([ct, seg], "1.2", None, modalities=("CR", "DX"), purpose="link-report")
    assert "modality CT, SEG" in str(err.value)
    with pytest.raises(InputError, match="modality SEG"):
        select_series([ct, seg], "1.2", "1.2.9", modalities=("CT", "MR", "CR", "DX"), purpose="segment")
    with pytest.raises(InputError, match="not in the study"):
        select_series([ct], "1.2", "1.2.77", modalities=("CT",), purpose="segment")
    with pytest.raises(InputError, match="DICOM UID"):
        select_series([ct], "1.2", "../etc/passwd", modalities=("CT",), purpose="segment")


# ------------------------------------------------------------------------------------------------- the SR


def _source(h: int = 64, w: int = 80) -> Any:
    return radiograph_dataset(np.zeros((h, w), np.uint8), study="1.2.826.0.1.3680043.8.498.1")


def test_mask_polygons_are_closed_inside_and_cover_the_mask() -> None:
    import cv2

    mask = np.zeros((64, 80), dtype=bool)
    mask[10:40, 20:50] = True
    mask[30:40, 20:30] = False  # a notch: not convex
    mask[50:54, 5:9] = True  # a second part
    mask[63, 79] = True  # a speck, dropped (under 1 % of the largest part)
    polygons = mask_polygons(mask)
    assert len(polygons) == 2
    for poly in polygons:
        assert np.allclose(poly[0], poly[-1]) and len(poly) >= 4
        assert poly[:, 0].min() >= 0 and poly[:, 0].max() <= 80 and poly[:, 1].min() >= 0 and poly[:, 1].max() <= 64
    filled = np.zeros((64, 80), np.uint8)
    for poly in polygons:  # the outline through the boundary pixels' centres, filled, is the mask
        cv2.fillPoly(filled, [np.round(poly[:-1] - 0.5).astype(np.int32)], 1)
    expected = mask.copy()
    expected[63, 79] = False
    assert ((filled > 0) == expected).mean() > 0.99
    assert mask_polygons(np.zeros((4, 4), bool)) == []
    line = np.zeros((10, 10), bool)
    line[5, 2:8] = True  # too thin for an outline: its box
    assert np.allclose(mask_polygons(line)[0], box_polygon(2, 5, 8, 6))


def test_sr_one_item_per_sentence_with_status_coordinates_and_segment(tmp_path: Path) -> None:
    from medvlm.export import write_dicom_seg

    src = _source()
    heart = np.zeros((64, 80), bool)
    heart[20:40, 30:60] = True
    seg = pydicom.dcmread(write_dicom_seg([heart], ["heart (sentence 1)"], src, tmp_path / "seg.dcm"))
    sentences = [SRSentence(1, "The heart is enlarged.", "grounded",
                            regions=[SRRegion("heart", mask_polygons(heart), segment_number=1),
                                     SRRegion("left lung", [box_polygon(40, 5, 78, 60)])]),
                 SRSentence(2, "No pneumothorax.", "negated", note="every finding in this sentence is negated"),
                 SRSentence(3, "Clinical history: cough.", "not_groundable", note="nothing to ground")]
    sr = build_report_sr(src, sentences, seg=seg)
    validate_report_sr(sr, src, sentences)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and ds.CompletionFlag == "COMPLETE"
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    evidence = {str(i.ReferencedSOPInstanceUID) for s in ds.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == {str(src.SOPInstanceUID), str(seg.SOPInstanceUID)}
    read = read_report_sr(ds)
    assert [(r["text"], r["status"]) for r in read] == [(s.text, s.status) for s in sentences]
    assert read[1]["note"].startswith("every finding") and not read[1]["regions"] and not read[2]["regions"]
    heart_read, lung_read = read[0]["regions"]
    assert heart_read["label"] == "heart" and heart_read["finding_site"] == "Heart"
    assert heart_read["segment"] == (str(seg.SOPInstanceUID), 1)
    assert heart_read["images"] == [str(src.SOPInstanceUID)]
    assert np.allclose(heart_read["polygons"][0].min(axis=0), [30.5, 20.5])
    assert np.allclose(heart_read["polygons"][0].max(axis=0), [59.5, 39.5])
    assert lung_read["finding_site"] == "Lung" and lung_read["segment"] is None
    assert np.allclose(lung_read["polygons"][0], box_polygon(40, 5, 78, 60))


def test_sr_validation_refuses_what_it_should_not_store() -> None:
    src = _source()
    outside = [SRSentence(1, "The heart is enlarged.", "grounded",
                          regions=[SRRegion("heart", [box_polygon(-3, 0, 90, 9)])])]
    with pytest.raises(InputError, match="outside the 80 x 64 image") as err:
        validate_report_sr(build_report_sr(src, outside), src, outside)
    assert "nothing was stored" in str(err.value)
    open_line = [SRSentence(1, "x", "grounded", regions=[SRRegion("heart", [np.array([[1.0, 1], [5, 1], [5, 5]])])])]
    with pytest.raises(InputError, match="not a closed polygon"):
        validate_report_sr(build_report_sr(src, open_line), src, open_line)
    bare = [SRSentence(1, "The heart is enlarged.", "grounded")]
    with pytest.raises(InputError, match="grounded without spatial coordinates"):
        validate_report_sr(build_report_sr(src, bare), src, bare)
    sentences = [SRSentence(1, "a", "negated"), SRSentence(2, "b", "negated")]
    with pytest.raises(InputError, match="1 sentence item"):
        validate_report_sr(build_report_sr(src, sentences[:1]), src, sentences)
    with pytest.raises(InputError, match="status"):
        build_report_sr(src, [SRSentence(1, "a", "maybe")])


# ------------------------------------------------------------------------- transport: retries, timeouts, auth


@pytest.fixture
def http_stub() -> Iterator[SimpleNamespace]:
    """A loopback HTTP server answering GETs from ``stub.answers`` (status, body, delay s); the last answer
    repeats. Records each request's path and Authorization header."""
    stub = SimpleNamespace(answers=[(200, b"[]", 0.0)], seen=[])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            stub.seen.append((self.path, self.headers.get("Authorization")))
            status, body, delay = stub.answers[min(len(stub.seen), len(stub.answers)) - 1]
            time.sleep(delay)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json" if body.startswith(b"[") else "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (timeout tests)
                pass

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    stub.url = f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"
    try:
        yield stub
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_retries_with_exponential_backoff_then_success(http_stub: SimpleNamespace) -> None:
    http_stub.answers = [(503, b"busy", 0.0), (502, b"bad gateway", 0.0), (200, b"[]", 0.0)]
    waits: list[float] = []
    client = PacsClient(http_stub.url, retries=3, backoff_s=0.25, sleep=waits.append, cache_dir="/nonexistent")
    assert client.find_studies() == []
    assert waits == [0.25, 0.5] and len(http_stub.seen) == 3
    assert http_stub.seen[0][1] is None  # no credentials, no Authorization header


def test_retries_are_bounded_and_final_errors_are_clear(http_stub: SimpleNamespace) -> None:
    waits: list[float] = []
    http_stub.answers = [(503, b"busy", 0.0)]
    client = PacsClient(http_stub.url, retries=2, backoff_s=0.1, sleep=waits.append)
    with pytest.raises(InputError, match=r"HTTP 503 .* after 3 attempt\(s\)") as err:
        client.find_studies()
    assert len(http_stub.seen) == 3 and waits == [0.1, 0.2] and "try again later" in str(err.value)
    for status, words in ((401, "credentials the PACS accepts"), (403, "permission"), (404, "not found"),
                          (400, "HTTP 400")):
        http_stub.seen.clear()
        http_stub.answers = [(status, b"nope", 0.0)]
        with pytest.raises(InputError, match=words):
            client.find_studies()
        assert len(http_stub.seen) == 1  # never retried
    http_stub.seen.clear()
    http_stub.answers = [(200, b"<html>a web viewer</html>", 0.0)]
    with pytest.raises(InputError, match="not DICOMweb"):
        client.find_studies()


def test_timeouts_are_retried_then_reported(http_stub: SimpleNamespace) -> None:
    http_stub.answers = [(200, b"[]", 1.5)]
    waits: list[float] = []
    client = PacsClient(http_stub.url, timeout_s=0.3, retries=1, backoff_s=0.0, sleep=waits.append)
    with pytest.raises(InputError, match=r"no answer within 0.3 s, 2 attempt\(s\)") as err:
        client.find_studies()
    assert "--timeout" in str(err.value) and len(waits) == 1


def test_bearer_token_is_sent_but_never_printed_or_logged(http_stub: SimpleNamespace,
                                                          capsys: pytest.CaptureFixture[str],
                                                          caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "tok-" + secrets.token_hex(6)
    monkeypatch.setenv("MEDVLM_PACS_TOKEN", secret)
    monkeypatch.delenv("MEDVLM_PACS_USER", raising=False)
    monkeypatch.delenv("MEDVLM_PACS_PASSWORD", raising=False)
    http_stub.answers = [(401, b"", 0.0)]
    with caplog.at_level(logging.DEBUG):
        code, out, err = _cli(capsys, "find", "--url", http_stub.url, "--retries", "0")
    assert code == 2 and "HTTP 401" in err and "a bearer token" in err
    assert http_stub.seen[-1][1] == f"Bearer {secret}"
    assert secret not in out + err + caplog.text
    code, out, err = _cli(capsys, "find", "--url", http_stub.url, "--user", "alice", "--password", "pw-" + secret)
    assert code == 2 and "either --user/--password" in err and secret not in out + err


def test_unreachable_pacs_is_a_clear_error_after_bounded_retries(capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)  # the backoff waits (PacsClient sleeps with time.sleep)
    port = _free_port()  # nothing listens there
    code, _out, err = _cli(capsys, "find", "--url", f"http://127.0.0.1:{port}/dicom-web", "--retries", "2")
    assert code == 2 and "connection refused" in err and "3 attempt(s)" in err and "reachable" in err


# -------------------------------------------------------------------------------------------- against Orthanc


def test_find_lists_studies_and_series_with_filters(pacs_env: Orthanc, studies: dict[str, Any],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, "find", "--url", pacs_env.url)
    assert code == 0, err
    header, *rows = out.strip().splitlines()
    for column in ("study UID", "date", "patient id", "mod", "series UID", "inst", "description"):
        assert column in header
    ct_row = next(r for r in rows if studies["ct"]["series"] in r)
    assert studies["ct"]["study"] in ct_row and "20240101" in ct_row and "SYN0001" in ct_row and " CT " in ct_row
    assert " 8  synthetic CT" in ct_row  # 8 instances
    assert any(studies["dx"]["series"] in r and " DX " in r and "chest PA" in r for r in rows)
    code, out, _ = _cli(capsys, "find", "--url", pacs_env.url, "--modality", "dx")
    assert code == 0 and studies["dx"]["series"] in out and studies["ct"]["series"] not in out
    code, out, _ = _cli(capsys, "find", "--url", pacs_env.url, "--patient", "SYN0001")
    assert code == 0 and studies["ct"]["series"] in out and studies["dx"]["series"] not in out
    code, out, _ = _cli(capsys, "find", "--url", pacs_env.url, "--since", "20240201")
    assert code == 0 and studies["dx"]["study"] in out and studies["ct"]["study"] not in out
    code, out, _ = _cli(capsys, "find", "--url", pacs_env.url, "--since", "20990101")
    assert code == 0 and out.startswith("no study")


def test_wrong_credentials_are_refused_without_printing_them(orthanc: Orthanc, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MEDVLM_PACS_USER", "MEDVLM_PACS_PASSWORD", "MEDVLM_PACS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    code, out, err = _cli(capsys, "find", "--url", orthanc.url, "--user", "medvlm", "--password", "wrong-pw-42")
    assert code == 2 and "HTTP 401" in err and "user 'medvlm'" in err and "wrong-pw-42" not in out + err
    monkeypatch.setenv("MEDVLM_PACS_TOKEN", "wrong-token-42")
    code, out, err = _cli(capsys, "find", "--url", orthanc.url)
    assert code == 2 and "HTTP 401" in err and "bearer token" in err and "wrong-token-42" not in out + err
    monkeypatch.delenv("MEDVLM_PACS_TOKEN")
    code, _, err = _cli(capsys, "find", "--url", orthanc.url)  # no credentials at all
    assert code == 2 and "HTTP 401" in err and "no credentials" in err


def test_segment_volume_stores_a_seg_matching_the_local_output(pacs_env: Orthanc, studies: dict[str, Any],
                                                               fake_segmenter: FakeTextSegmenter, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    ct = studies["ct"]
    before = pacs_env.series_count(ct["study"])
    out = tmp_path / "out"
    code, printed, err = _cli(capsys, "segment", "--url", pacs_env.url, "--study", ct["study"], "--text", "bright",
                              "--text", "nothing", "--label", "organ", "--label", "absent", "--store",
                              "--out", str(out))
    assert code == 0, err
    summary = json.loads((out / "pacs_segment.json").read_text())
    [stored] = summary["stored"]
    assert stored["modality"] == "SEG" and f"stored SEG SOP Instance UID {stored['sop_instance_uid']}" in printed
    assert stored["series_uid"] in printed and pacs_env.series_count(ct["study"]) == before + 1
    # read back through DICOMweb and check with highdicom
    [seg_series] = [s for s in _series_of(pacs_env, ct["study"], "SEG") if s.series_uid == stored["series_uid"]]
    [seg_ds] = _retrieve_all(pacs_env, ct["study"], seg_series.series_uid)
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["organ", "absent"]
    assert [r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence] == [ct["series"]]
    payload = json.loads((out / "ct-series-1.json").read_text())
    sops = payload["sop_instance_uids"]  # stored (slice) order
    assert sorted(sops) == sorted(studies["ct_sops"])
    frames = seg.get_pixels_by_source_instance(sops, segment_numbers=[1, 2], combine_segments=False,
                                               assert_missing_frames_are_empty=True)  # (slices, rows, cols, 2)
    labels = np.asarray(nib.load(str(out / "ct-series-1.seg.nii.gz")).dataobj)  # (rows, cols, slices)
    for k in (1, 2):
        got = frames[..., k - 1].transpose(1, 2, 0) > 0
        want = labels == k
        assert np.array_equal(got, want)  # Dice 1.0 (and both empty for 'absent')
    assert int((labels == 1).sum()) == 12 * 10 * 5


def test_segment_radiograph_stores_a_seg_matching_the_png_mask(pacs_env: Orthanc, studies: dict[str, Any],
                                                               fake_segmenter: FakeTextSegmenter, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    dx = studies["dx"]
    out = tmp_path / "out"
    code, _printed, err = _cli(capsys, "segment", "--url", pacs_env.url, "--study", dx["study"], "--text",
                              "very bright", "--store", "--out", str(out))
    assert code == 0, err
    [stored] = json.loads((out / "pacs_segment.json").read_text())["stored"]
    seg_ds = pacs_env.client().retrieve_instance(dx["study"], stored["series_uid"], stored["sop_instance_uid"])
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    pixels = seg.get_pixels_by_source_instance([str(studies["dx_ds"].SOPInstanceUID)], combine_segments=False)
    png = np.asarray(Image.open(out / "dx-1.mask.png")) > 0
    assert png.any() and np.array_equal(pixels[0, :, :, 0] > 0, png)
    assert seg.SegmentSequence[0].SegmentLabel == "very bright"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == dx["series"]


def test_link_report_stores_an_sr_and_seg(pacs_env: Orthanc, studies: dict[str, Any], fake_agent: FakeAgent,
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dx, src = studies["dx"], studies["dx_ds"]
    out = tmp_path / "out"
    code, _printed, err = _cli(capsys, "link-report", "--url", pacs_env.url, "--study", dx["study"], "--report-text",
                              REPORT, "--store", "--out", str(out))
    assert code == 0, err
    local = json.loads((out / "dx-1.report.json").read_text())
    stored = {s["modality"]: s for s in json.loads((out / "dx-1.report.pacs.json").read_text())["stored"]}
    assert set(stored) == {"SEG", "SR"}
    sr_ds = pacs_env.client().retrieve_instance(dx["study"], stored["SR"]["series_uid"],
                                                stored["SR"]["sop_instance_uid"])
    read = read_report_sr(sr_ds)
    assert [(r["text"], r["status"]) for r in read] == [(s["text"], s["status"]) for s in local["sentences"]]
    statuses = [r["status"] for r in read]
    assert statuses.count("negated") == 1 and statuses.count("grounded") == 2 and "not_groundable" in statuses
    for entry in read:
        for region in entry["regions"]:
            assert region["images"] == [str(src.SOPInstanceUID)] * len(region["polygons"])
            for poly in region["polygons"]:
                assert poly[:, 0].min() >= 0 and poly[:, 0].max() <= src.Columns
                assert poly[:, 1].min() >= 0 and poly[:, 1].max() <= src.Rows
            assert region["segment"][0] == stored["SEG"]["sop_instance_uid"]
    seg = hd.seg.Segmentation.from_dataset(pacs_env.client().retrieve_instance(
        dx["study"], stored["SEG"]["series_uid"], stored["SEG"]["sop_instance_uid"]))
    assert len(seg.SegmentSequence) == sum(len(r["regions"]) for r in read) == 2
    masks = seg.get_pixels_by_source_instance([str(src.SOPInstanceUID)], combine_segments=False)[0]
    for k, region in enumerate(local["regions"]):
        png = np.asarray(Image.open(out / region["mask"])) > 0
        assert np.array_equal(masks[..., k] > 0, png)


def test_an_sr_that_fails_validation_stores_nothing(pacs_env: Orthanc, studies: dict[str, Any],
                                                    fake_agent: FakeAgent, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    fake_agent.outside = True  # a region reaching past the image: the SR cannot hold it
    dx = studies["dx"]
    before = pacs_env.series_count(dx["study"])
    code, _printed, err = _cli(capsys, "link-report", "--url", pacs_env.url, "--study", dx["study"], "--report-text",
                              "The heart is enlarged.", "--store", "--out", str(tmp_path / "out"))
    assert code == 2 and "DICOM SR" in err and "outside the 1024 x 1024 image" in err and "nothing was stored" in err
    assert pacs_env.series_count(dx["study"]) == before  # not even the SEG, which was valid


def test_bad_input_errors(pacs_env: Orthanc, studies: dict[str, Any], fake_segmenter: FakeTextSegmenter,
                          fake_agent: FakeAgent, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*argv: str) -> str:
        code, _, err = _cli(capsys, *argv, "--url", pacs_env.url, "--out", str(tmp_path / "out"))
        assert code == 2 and "expected" in err and "received" in err and "How to fix" in err, err
        return err

    err = run("segment", "--study", "1.2.3.4.5.6.7", "--text", "liver")
    assert "no such study" in err and "medvlm pacs find" in err
    err = run("link-report", "--study", studies["ct"]["study"], "--report-text", REPORT)
    assert "CR, DX series for link-report" in err and "modality CT" in err and "pacs segment" in err
    err = run("segment", "--study", studies["us"]["study"], "--text", "liver")
    assert "modality US" in err
    err = run("segment", "--study", studies["ct"]["study"], "--series", studies["dx"]["series"], "--text", "liver")
    assert "not in the study" in err
    err = run("segment", "--study", studies["gap"]["study"], "--text", "bright")
    assert "missing slice(s)" in err and studies["gap"]["series"] in err and "--series" in err
    err = run("segment", "--study", studies["mixed"]["study"], "--text", "bright")
    assert "inconsistent orientation" in err and studies["mixed"]["series"] in err
    err = run("link-report", "--study", studies["dx"]["study"], "--report", str(tmp_path / "missing.txt"))
    assert "not a file" in err
    err = run("segment", "--study", studies["ct"]["study"], "--text", "nothing", "--store")
    assert "no phrase was found" in err
    assert _series_of(pacs_env, studies["gap"]["study"], "SEG") == []


def test_retrieved_instances_are_cached_by_sop_instance_uid(orthanc: Orthanc, studies: dict[str, Any],
                                                             tmp_path: Path) -> None:
    ct = studies["ct"]
    client = orthanc.client(cache_dir=tmp_path / "cache")
    paths = client.retrieve_series(ct["study"], ct["series"])
    assert sorted(p.stem for p in paths) == sorted(studies["ct_sops"])
    assert all(p.parent == tmp_path / "cache" and (p.stat().st_mode & 0o777) == 0o600 for p in paths)
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700

    def no_wado(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("WADO-RS used although every instance is cached")

    client._client.retrieve_series = no_wado
    client._client.retrieve_instance = no_wado
    assert client.retrieve_series(ct["study"], ct["series"]) == paths
    kept = pydicom.dcmread(paths[3])
    paths[3].unlink()  # one missing: only that one is fetched
    fetched: list[str] = []

    def one(study: str, series: str, sop: str) -> Any:
        fetched.append(sop)
        return kept

    client._client.retrieve_instance = one
    assert client.retrieve_series(ct["study"], ct["series"]) == paths and fetched == [paths[3].stem]


# -------------------------------------------------------------------------- medvlm serve: PACS jobs


class _ServedFake(FakeTextSegmenter):
    """FakeTextSegmenter behind the server's encoding cache, which passes ``multimask``."""

    def predict_many(self, embedding: Any, prompts: list[Any], **kwargs: Any) -> list[Any]:
        return super().predict_many(embedding, prompts)


@contextlib.contextmanager
def _pacs_server(urls: tuple[str, ...], tmp_path: Path, agent: Any = None) -> Iterator[Any]:
    """``medvlm serve``'s app with the fakes, allowed to talk to ``urls``, its lifespan (job workers) running."""
    from fastapi.testclient import TestClient

    from medvlm.app.server.app import create_app
    from medvlm.app.server.config import ServerConfig
    from medvlm.app.server.services import Services

    services = Services(loaders={"medvlm": _ServedFake, "litemedsam": lambda: SimpleNamespace(name="unused"),
                                 "grounding_agent": lambda: agent or FakeAgent()})
    config = ServerConfig(data_dir=tmp_path / "serve", pacs_urls=urls, pacs_cache_dir=tmp_path / "cache")
    with TestClient(create_app(config, services)) as client:
        yield client


def _finish(client: Any, job: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll GET /v1/pacs/jobs/{id} until the job is done or failed; the stages seen are kept under 'seen'."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = client.get(f"/v1/pacs/jobs/{job['id']}").json()
        seen.append(state["progress"]["stage"])
        if state["status"] in ("done", "failed"):
            state["seen"] = seen
            return dict(state)
        time.sleep(0.05)
    raise AssertionError(f"PACS job {job['id']} did not finish in {timeout_s} s: {state}")


def test_serve_pacs_segment_job_stores_the_seg_of_its_own_outputs(pacs_env: Orthanc, studies: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    ct = studies["ct"]
    before = pacs_env.series_count(ct["study"])
    with _pacs_server((pacs_env.url,), tmp_path) as client:
        r = client.post("/v1/pacs/segment", json={"study": ct["study"], "texts": ["bright", "nothing"],
                                                  "labels": ["organ", "absent"], "store": True})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["kind"] == "segment" and job["status"] in ("queued", "running")
        assert job["request"]["url"] == pacs_env.url and job["request"]["auth"] == "server"
        state = _finish(client, job)
        assert state["status"] == "done", state["error"]
        assert state["progress"]["stage"] == "done" and set(state["seen"]) <= {"queued", "retrieve", "segment",
                                                                               "store", "done"}
        [stored] = state["result"]["stored"]
        assert stored["modality"] == "SEG" and any(f"stored SEG SOP Instance UID {stored['sop_instance_uid']}" in m
                                                   for m in state["messages"])
        assert "ct-series-1.seg.nii.gz" in state["files"] and "ct-series-1.seg.dcm" in state["files"]
        label_file = client.get(f"/v1/pacs/jobs/{job['id']}/files/ct-series-1.seg.nii.gz")
        assert label_file.status_code == 200
        assert client.get(f"/v1/pacs/jobs/{job['id']}/files/..%2Fjob.json").status_code == 404
        assert client.get(f"/v1/pacs/jobs/{job['id']}/files/nothing.dcm").status_code == 404
    assert pacs_env.series_count(ct["study"]) == before + 1
    # the stored SEG, read back through DICOMweb, holds exactly the label volume the job wrote
    seg = hd.seg.Segmentation.from_dataset(pacs_env.client().retrieve_instance(
        ct["study"], stored["series_uid"], stored["sop_instance_uid"]))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["organ", "absent"]
    assert [r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence] == [ct["series"]]
    folder = tmp_path / "serve" / "pacs" / job["id"] / "out"
    sops = json.loads((folder / "ct-series-1.json").read_text())["sop_instance_uids"]
    frames = seg.get_pixels_by_source_instance(sops, segment_numbers=[1, 2], combine_segments=False,
                                               assert_missing_frames_are_empty=True)
    assert label_file.content == (folder / "ct-series-1.seg.nii.gz").read_bytes()
    labels = np.asarray(nib.load(str(folder / "ct-series-1.seg.nii.gz")).dataobj)
    for k in (1, 2):
        assert np.array_equal(frames[..., k - 1].transpose(1, 2, 0) > 0, labels == k)
    assert int((labels == 1).sum()) == 12 * 10 * 5


def test_serve_pacs_link_report_job_with_request_credentials_that_are_never_written(
        pacs_env: Orthanc, studies: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDVLM_PACS_USER")
    monkeypatch.delenv("MEDVLM_PACS_PASSWORD")
    dx, src = studies["dx"], studies["dx_ds"]
    with _pacs_server((pacs_env.url + "/",), tmp_path) as client:
        r = client.post("/v1/pacs/link-report", json={"url": pacs_env.url, "study": dx["study"], "report": REPORT,
                                                      "store": True, "user": pacs_env.user,
                                                      "password": pacs_env.password})
        assert r.status_code == 202, r.text
        state = _finish(client, r.json())
        assert state["status"] == "done", state["error"]
        assert state["request"]["auth"] == "request" and "password" not in state["request"]
        # without credentials (none in the request, none on the server) the PACS refuses: a clear failed job
        r = client.post("/v1/pacs/link-report", json={"study": dx["study"], "report": REPORT, "store": True})
        refused = _finish(client, r.json())
    assert refused["status"] == "failed" and "HTTP 401" in refused["error"]["message"]
    assert refused["error"]["fix"] and refused["result"] is None
    for path in (tmp_path / "serve").rglob("*"):
        if path.is_file():
            assert pacs_env.password.encode() not in path.read_bytes(), path
    summary = state["result"]
    assert [s["status"] for s in summary["sentences"]].count("negated") == 1
    stored = {s["modality"]: s for s in summary["stored"]}
    assert set(stored) == {"SEG", "SR"}
    read = read_report_sr(pacs_env.client().retrieve_instance(dx["study"], stored["SR"]["series_uid"],
                                                              stored["SR"]["sop_instance_uid"]))
    assert [(r["text"], r["status"]) for r in read] == [(s["text"], s["status"]) for s in summary["sentences"]]
    for entry in read:
        for region in entry["regions"]:
            assert region["images"] == [str(src.SOPInstanceUID)] * len(region["polygons"])


def test_serve_pacs_refuses_other_urls_bad_fields_and_a_missing_pacs(pacs_env: Orthanc, studies: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    ct = studies["ct"]
    with _pacs_server((pacs_env.url,), tmp_path / "a") as client:
        r = client.post("/v1/pacs/segment", json={"url": "http://169.254.169.254/dicom-web", "study": ct["study"],
                                                  "texts": ["bright"]})
        assert r.status_code == 403 and r.json()["error"]["type"] == "pacs_not_allowed"
        assert client.post("/v1/pacs/segment", json={"study": "../../etc", "texts": ["x"]}).status_code == 422
        assert client.post("/v1/pacs/segment", json={"study": ct["study"], "texts": []}).status_code == 422
        assert client.post("/v1/pacs/link-report", json={"study": ct["study"], "report": ""}).status_code == 422
        assert client.get("/v1/pacs/jobs/nope").status_code == 404
        # a study that does not exist and a series with a missing slice: failed jobs that say why, nothing stored
        missing = _finish(client, client.post("/v1/pacs/segment", json={"study": "1.2.3.4.5.6.7", "texts": ["x"],
                                                                          "store": True}).json())
        gap = _finish(client, client.post("/v1/pacs/segment", json={"study": studies["gap"]["study"],
                                                                      "texts": ["bright"], "store": True}).json())
    assert missing["status"] == "failed" and "no such study" in missing["error"]["message"]
    assert gap["status"] == "failed" and "missing slice(s)" in gap["error"]["message"]
    assert _series_of(pacs_env, studies["gap"]["study"], "SEG") == []
    with _pacs_server((), tmp_path / "b") as client:
        r = client.post("/v1/pacs/segment", json={"study": ct["study"], "texts": ["bright"]})
        assert r.status_code == 409 and "--pacs-url" in r.json()["error"]["expected"]


# ------------------------------------------------------------------------------ the real models, on real data


def source_header(orthanc: Orthanc, ids: dict[str, Any], sop: str) -> Any:
    return orthanc.client().retrieve_instance(ids["study"], ids["series"], sop)


@pytest.mark.slow
@pytest.mark.data
def test_real_liver_segmentation_round_trip_through_the_pacs(pacs_env: Orthanc, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The TotalSegmentator example CT as a DICOM series in Orthanc -> medvlm pacs segment --text liver --store ->
    the SEG read back through DICOMweb matches the CLI's own NIfTI output voxel for voxel."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    src = data_dir("ct_totalsegmentator_example") / "example_ct_sm.nii.gz"
    # as a scanner writes an axial series: columns toward the patient's left, rows toward the back (IOP 1\0\0\0\1\0)
    ornt = ornt_transform(io_orientation(nib.load(str(src)).affine), axcodes2ornt(("L", "P", "S")))
    img = nib.load(str(src)).as_reoriented(ornt)
    ids = _uids(patient="SYN0010", date="20240401", description="abdomen CT (TotalSegmentator example)")
    sops = write_series(tmp_path / "ct", np.asarray(img.dataobj), img.affine, uids=ids)
    _store_folder(pacs_env, tmp_path / "ct")
    out = tmp_path / "out"
    code, printed, err = _cli(capsys, "segment", "--url", pacs_env.url, "--study", ids["study"], "--text", "liver",
                              "--store", "--out", str(out))
    assert code == 0, err
    assert "liver" in printed and "mL" in printed and "stored SEG SOP Instance UID" in printed
    [stored] = json.loads((out / "pacs_segment.json").read_text())["stored"]
    seg_ds = pacs_env.client().retrieve_instance(ids["study"], stored["series_uid"], stored["sop_instance_uid"])
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ids["series"]
    assert {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        == set(sops)
    assert seg.SegmentSequence[0].SegmentLabel == "liver"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    iop = source_header(pacs_env, ids, sops[0]).ImageOrientationPatient
    assert [round(float(v)) for v in iop] == [1, 0, 0, 0, 1, 0]
    payload = json.loads((out / "ct-series-1.json").read_text())
    order = payload["sop_instance_uids"]
    frames = seg.get_pixels_by_source_instance(order, combine_segments=False, assert_missing_frames_are_empty=True)
    pacs_mask = frames[..., 0].transpose(1, 2, 0) > 0
    local = np.asarray(nib.load(str(out / "ct-series-1.seg.nii.gz")).dataobj) == 1
    assert local.sum() > 1000
    assert 2 * (pacs_mask & local).sum() / (pacs_mask.sum() + local.sum()) == 1.0
    # TotalSegmentator's own liver (label 5) in this CT: the model's liver overlaps it
    truth = np.asarray(nib.load(str(src.parent / "example_seg.nii.gz")).as_reoriented(ornt).dataobj) == 5
    truth = truth.transpose(1, 0, 2)  # (rows, columns, slices) as the series
    assert 2 * (local & truth).sum() / (local.sum() + truth.sum()) > 0.5

    # the README screenshot: the stored SEG over its source slice, both retrieved through DICOMweb
    k = int(np.argmax(pacs_mask.reshape(-1, pacs_mask.shape[2]).sum(axis=0)))
    source = pacs_env.client().retrieve_instance(ids["study"], ids["series"], order[k])
    rgb = seg_overlay(seg_ds, source, window=(40.0, 400.0),
                      title=f"DICOM SEG from the PACS: liver, slice {k} of {len(order)}")
    shown = rgb[..., 0].astype(int) - rgb[..., 2].astype(int)
    assert max(rgb.shape[:2]) >= 512 and (shown > 40).mean() > 0.02  # the orange liver fill is there
    target = Path(os.environ.get("MEDVLM_PACS_SCREENSHOT") or tmp_path / "pacs_seg.png")
    Image.fromarray(rgb).save(target, optimize=True)
    assert target.stat().st_size < 300_000


@pytest.mark.slow
def test_real_link_report_round_trip_through_the_pacs(pacs_env: Orthanc, studies: dict[str, Any], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The bundled chest X-ray as DX in Orthanc -> medvlm pacs link-report --store with the grounding agent -> the
    SR read back through DICOMweb holds one item per sentence, with the statuses and the outlines on the image."""
    dx, src = studies["dx"], studies["dx_ds"]
    report = tmp_path / "report.txt"
    report.write_text(REPORT)
    out = tmp_path / "out"
    code, _printed, err = _cli(capsys, "link-report", "--url", pacs_env.url, "--study", dx["study"], "--report",
                              str(report), "--store", "--out", str(out))
    assert code == 0, err
    local = json.loads((out / "dx-1.report.json").read_text())
    stored = {s["modality"]: s for s in json.loads((out / "dx-1.report.pacs.json").read_text())["stored"]}
    sr = pacs_env.client().retrieve_instance(dx["study"], stored["SR"]["series_uid"], stored["SR"]["sop_instance_uid"])
    read = read_report_sr(sr)
    assert [(r["text"], r["status"]) for r in read] == [(s["text"], s["status"]) for s in local["sentences"]]
    statuses = {r["text"]: r["status"] for r in read}
    assert statuses["The heart is enlarged."] == "grounded"
    assert statuses["No pneumothorax or pleural effusion."] == "negated"
    assert "not_groundable" in statuses.values()
    heart = next(r for r in read if r["text"] == "The heart is enlarged.")
    for region in heart["regions"]:
        for poly in region["polygons"]:
            assert poly.min() >= 0 and poly[:, 0].max() <= src.Columns and poly[:, 1].max() <= src.Rows
    centre = np.vstack([p for r in heart["regions"] for p in r["polygons"]]).mean(axis=0)
    assert 300 < centre[0] < 800 and 350 < centre[1] < 850  # the heart of the demo image (demo.json: 395-765, 440-770)
    seg = hd.seg.Segmentation.from_dataset(pacs_env.client().retrieve_instance(
        dx["study"], stored["SEG"]["series_uid"], stored["SEG"]["sop_instance_uid"]))
    assert len(seg.SegmentSequence) == len([r for r in local["regions"] if r.get("mask")])
