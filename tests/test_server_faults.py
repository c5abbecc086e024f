"""`medvlm serve` killed mid-job: a real server process (`python -m medvlm.app.cli serve`, the real default models:
LiteMedSAM, the shipped Med-VLM and the grounding agent) is sent SIGKILL while a batch job runs, then started again
on the same data folder; the job resumes and its JSONL holds every (image, phrase) item exactly once. The server
runs with an API key from MEDVLM_API_KEY, which must never appear in its output."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server_fakes import png_bytes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KEY = "fault-test-key-5c1d0b2e9a7f"
PHRASES = ["heart", "left lung"]
START_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = float(os.environ.get("MEDVLM_FAULT_TIMEOUT", "600"))


def _images(count: int) -> list[bytes]:
    """Distinct small radiograph-like images (a bright mediastinum between two dark fields), so that each one is
    encoded by the models (no cache hit)."""
    out = []
    for k in range(count):
        y, x = np.mgrid[0:96, 0:96].astype(np.float32)
        img = 60 + 40 * np.exp(-((x - 48 - k) ** 2) / 300.0) + 20 * np.sin(y / (5.0 + k))
        out.append(png_bytes(np.clip(img, 0, 255).astype(np.uint8)))
    return out


def _lines(path: Path) -> list[dict[str, object]]:
    """The complete JSON lines of a results.jsonl (a torn last line left by the kill is not one)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].decode().splitlines() if line.strip()]


def test_sigkill_during_a_batch_job_then_restart_finishes_every_item_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medvlm.app.server.bench import start_server, stop_server

    data = tmp_path / "serve"
    auth = {"Authorization": f"Bearer {KEY}"}
    output: list[str] = []
    images = _images(5)
    total = len(images) * len(PHRASES)
    proc, url = start_server(data, timeout_s=START_TIMEOUT_S, env={"MEDVLM_API_KEY": KEY}, output=output)
    try:
        assert httpx.get(url + "/v1/jobs/0123456789abcdef0123456789abcdef", timeout=10).status_code == 401
        r = httpx.post(url + "/v1/jobs", files=[("images", (f"img{k}.png", b, "image/png"))
                                                 for k, b in enumerate(images)],
                       data={"phrases": json.dumps(PHRASES)}, headers=auth, timeout=60)
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        results = data / "jobs" / job / "out" / "results.jsonl"
        # kill as soon as the first item is on disk: the models are loaded and the job is under way
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not _lines(results):
            assert proc.poll() is None, "".join(output[-20:])
            assert time.monotonic() < deadline, "the job wrote nothing"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        stop_server(proc)
    assert proc.returncode == -signal.SIGKILL
    before = _lines(results)
    state = json.loads((data / "jobs" / job / "job.json").read_text())
    assert 1 <= len(before) < total and state["status"] == "running", (len(before), state)

    proc, url = start_server(data, timeout_s=START_TIMEOUT_S, env={"MEDVLM_API_KEY": KEY}, output=output)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while (status := httpx.get(f"{url}/v1/jobs/{job}", headers=auth, timeout=30).json())["status"] not in (
                "done", "failed"):
            assert proc.poll() is None and time.monotonic() < deadline, status
            time.sleep(0.25)
        assert status["status"] == "done" and status["progress"] == {"done": total, "total": total}, status
        jsonl = httpx.get(f"{url}/v1/jobs/{job}/results", headers=auth, timeout=30).text
    finally:
        stop_server(proc)
    lines = [json.loads(line) for line in jsonl.splitlines()]
    items = sorted((line["image_index"], line["phrase"]) for line in lines)
    assert items == sorted((k, p) for k in range(len(images)) for p in PHRASES)  # every item, exactly once
    assert all(line["status"] == "ok" for line in lines), [line for line in lines if line["status"] != "ok"]
    on_disk = _lines(results)
    assert len(on_disk) == total and len({line["key"] for line in on_disk}) == total
    assert on_disk[: len(before)] == before  # the lines written before the kill were kept, not redone
    assert KEY not in "".join(output)
    with capsys.disabled():
        print(f"\nmedvlm serve SIGKILLed after {len(before)} of {total} job items; restarted on the same data dir, "
              f"the job finished with {len(on_disk)} lines, every item once")
