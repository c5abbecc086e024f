"""``medvlm batch --engine ray`` on a local Ray (2 CPUs, started and stopped here): the local engine's output on 4
real JSRT images x 2 phrases, a worker killed mid-job, a driver killed mid-job and rerun, and the missing-Ray
error. The grounding agent is the embedded default (Med-VLM from the shipped checkpoint)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.batch import run_batch
from medvlm.app.agent_commands import AgentFactory
from medvlm.errors import MissingDependencyError
from tests.conftest import REPO, data_dir

PHRASES = ["heart", "left lung"]
N_IMAGES = 4  # 8 items: enough for two workers to both hold work, and for a kill mid-job
N_ITEMS = N_IMAGES * len(PHRASES)


def _factory() -> AgentFactory:
    return AgentFactory(argparse.Namespace(grounder="medvlm", refine="auto", check="repair", checkpoint=None))


def _lines(out: Path) -> dict[str, dict[str, Any]]:
    """key -> record of results.jsonl; fails on a key written twice."""
    records: dict[str, dict[str, Any]] = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["key"] not in records, f"{rec['key']} written twice"
        records[rec["key"]] = rec
    return records


def _masks(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "masks").iterdir())}


def _without_scores(rec: dict[str, Any]) -> dict[str, Any]:
    return {**rec, "regions": [{k: v for k, v in r.items() if k != "score"} for r in rec["regions"]]}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = data_dir("cxr_jsrt_scr") / "images"
    paths = sorted(folder.glob("*.png"))[:N_IMAGES]
    if len(paths) < N_IMAGES:
        pytest.skip(f"fewer than {N_IMAGES} JSRT images in {folder}")
    listing = tmp_path_factory.mktemp("inputs") / "images.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    return listing


@pytest.fixture(scope="module", autouse=True)
def fp32_everywhere() -> Iterator[None]:
    """Torch fp32 in this process, the Ray workers and the CLI subprocess: on a CPU with bf16 units ``auto`` runs
    OpenVINO bf16, whose sums depend on the thread count (1 per worker here, all cores locally), so a mask could
    differ by a boundary pixel; these tests are about the batch bookkeeping, not the precision."""
    before = os.environ.get("MEDVLM_PRECISION")
    os.environ["MEDVLM_PRECISION"] = "fp32"
    yield
    if before is None:
        os.environ.pop("MEDVLM_PRECISION", None)
    else:
        os.environ["MEDVLM_PRECISION"] = before


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'; make install does it)")
    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
                       log_to_driver=False, logging_level="warning")
    try:
        yield context
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local engine's output (this process, torch's default threads: this machine's cores)."""
    from agents.batch import list_inputs

    out = tmp_path_factory.mktemp("local")
    summary = run_batch(_factory()(), list_inputs(images), PHRASES, out, progress=False)
    assert summary.done_now == N_ITEMS and summary.errors == 0
    return out


@pytest.mark.slow
@pytest.mark.data
def test_ray_engine_writes_the_local_engines_output(ray_cluster: Any, images: Path, local: Path,
                                                    tmp_path: Path) -> None:
    from agents.batch import list_inputs
    from agents.batch_ray import RayBatch

    # one worker with all the cores: the same torch/OpenVINO thread count as the local run, so the same floats
    summary = RayBatch(_factory(), num_workers=1, cpus_per_worker=os.cpu_count() or 1).run(
        list_inputs(images), PHRASES, tmp_path, progress=False)
    assert summary.done_now == N_ITEMS and summary.errors == 0 and summary.regions > 0
    assert _lines(tmp_path) == _lines(local)  # order aside, every line identical
    assert _masks(tmp_path) == _masks(local)
    again = RayBatch(_factory(), num_workers=1).run(list_inputs(images), PHRASES, tmp_path, progress=False)
    assert again.done_now == 0 and again.skipped_done == N_ITEMS  # a rerun has nothing left to do


@pytest.mark.slow
@pytest.mark.data
def test_a_killed_worker_is_replaced_and_every_item_is_written_once(ray_cluster: Any, images: Path, local: Path,
                                                                    tmp_path: Path) -> None:
    import ray

    from agents.batch import list_inputs
    from agents.batch_ray import RayBatch

    killed: list[int] = []

    def kill_one(batch: RayBatch) -> None:
        if not killed:  # after the first image: the other worker is busy, the killed one had work queued
            ray.kill(batch.actors[0], no_restart=False)
            killed.append(1)

    summary = RayBatch(_factory(), num_workers=2, cpus_per_worker=1, on_result=kill_one).run(
        list_inputs(images), PHRASES, tmp_path, progress=False)
    assert killed and summary.done_now == N_ITEMS and summary.errors == 0
    got, want = _lines(tmp_path), _lines(local)
    assert set(got) == set(want)
    for key in want:
        # 1 torch thread per worker here against all cores locally: float sums differ in the 7th digit
        assert _without_scores(got[key]) == _without_scores(want[key])
        for a, b in zip(got[key]["regions"], want[key]["regions"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    assert _masks(tmp_path) == _masks(local)


@pytest.mark.slow
@pytest.mark.data
def test_a_killed_driver_resumes_and_finishes_every_item_once(ray_cluster: Any, images: Path, local: Path,
                                                              tmp_path: Path) -> None:
    address = ray_cluster.address_info["gcs_address"]
    # the same items as an image,phrase CSV (the other input form), so the lines must equal the local run's
    rows = tmp_path / "items.csv"
    paths = [ln for ln in images.read_text().splitlines() if ln]
    rows.write_text("image,phrase\n" + "".join(f"{p},{ph}\n" for p in paths for ph in PHRASES))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medvlm.app.cli", "batch", "--engine", "ray", "--address", address,
           "--num-workers", "1", "--cpus-per-worker", str(os.cpu_count() or 1), "--input", str(rows),
           "--out", str(out), "--no-progress"]
    results = out / "results.jsonl"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if results.is_file() and results.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0].decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = results.read_text().count("\n")
    assert 2 <= partial < N_ITEMS
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"already done (skipped): {partial}" in done.stdout
    assert _lines(out) == _lines(local)
    assert _masks(out) == _masks(local)


@pytest.mark.filterwarnings("ignore")
def test_without_ray_the_error_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.batch_ray import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r"pip install -e \".\[ray\]\""):
        import_ray()


def test_serve_llm_passes_tensor_parallel_size_to_vllm() -> None:
    from agents.vllm_server import VLLMServer
    from medvlm.app.cli import build_parser

    args = build_parser().parse_args(["serve-llm", "--model", "org/big-vlm", "--", "--tensor-parallel-size", "2",
                                      "--distributed-executor-backend", "ray"])
    extra = list(args.vllm_args)
    extra = extra[1:] if extra[:1] == ["--"] else extra  # as run_serve_llm does
    cmd = VLLMServer("org/big-vlm", extra_args=extra).command()
    assert cmd[-4:] == ["--tensor-parallel-size", "2", "--distributed-executor-backend", "ray"]
    assert cmd[cmd.index("--model") + 1] == "org/big-vlm"


def test_csv_input_groups_rows_per_image_and_says_what_is_missing(tmp_path: Path) -> None:
    from agents.batch import batch_inputs, read_batch_csv
    from medvlm.errors import InputError

    (tmp_path / "a.png").write_bytes(b"")
    csv_path = tmp_path / "items.csv"
    csv_path.write_text("Image,Phrase\na.png,heart\n/abs/b.png,left lung\na.png,right lung\na.png,heart\n,x\n")
    items = read_batch_csv(csv_path, ["trachea"])
    assert items == [(tmp_path / "a.png", ["heart", "right lung", "trachea"]),
                     (Path("/abs/b.png"), ["left lung", "trachea"])]
    assert batch_inputs(csv_path, []) == [(tmp_path / "a.png", ["heart", "right lung"]),
                                          (Path("/abs/b.png"), ["left lung"])]
    (tmp_path / "no_image.csv").write_text("path,phrase\na.png,heart\n")
    with pytest.raises(InputError, match="'image' column"):
        read_batch_csv(tmp_path / "no_image.csv")
    (tmp_path / "no_phrase.csv").write_text("image\na.png\n")
    with pytest.raises(InputError, match="without a phrase"):
        read_batch_csv(tmp_path / "no_phrase.csv")
    assert read_batch_csv(tmp_path / "no_phrase.csv", ["heart"]) == [(tmp_path / "a.png", ["heart"])]
    with pytest.raises(InputError, match="--phrase"):
        batch_inputs(tmp_path / "a.png", [])
