"""``medvlm bench serve``: a bounded load on the HTTP API, per endpoint and concurrency.

:func:`start_server` runs ``medvlm serve --port 0`` on 127.0.0.1 in a subprocess (its own data folder) and
reads the bound port from its first line; :func:`run_load` sends ``requests`` requests with at most
``concurrency`` in flight (httpx, one thread per in-flight request) and measures each request's latency from
send to full response; :func:`bench_serve` does both endpoints at every concurrency and reads the server's
peak resident memory (``VmHWM`` of ``/proc/PID/status``, the high-water mark since the server started, so it
only grows down the table). Every request sends the same image, as a client re-asking about one image would:
after the warm-up request the server's encodings are cached, so the numbers are decode + answer cost, not
image encoding.

- ``segment``: ``POST /v1/segment`` with one box (LiteMedSAM);
- ``ground``: ``POST /v1/ground`` with a question (grounding agent: Med-VLM anatomy + answer).

:func:`run_mixed_load` instead keeps ``concurrency`` requests in flight for ``duration_s`` seconds, cycling through
:data:`MIXED`: the two above, a chat completion (plain and streamed), a kept result's JSON, the model list and
``/healthz`` (each answered in full; a streamed chat is read to its ``[DONE]``).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medvlm.errors import input_error

__all__ = ["ENDPOINTS", "MIXED", "BenchRow", "bench_serve", "format_table", "peak_rss_mib", "run_bench_serve",
           "run_load", "run_mixed_load", "start_server", "stop_server"]

#: endpoint name -> (path, form fields); the image is the bundled NIH chest X-ray unless another is given
ENDPOINTS: dict[str, tuple[str, dict[str, str]]] = {
    "segment": ("/v1/segment", {"box": "[395, 440, 765, 770]", "label": "heart"}),
    "ground": ("/v1/ground", {"text": "where is the heart?"}),
}


@dataclass
class BenchRow:
    """One table row: ``requests`` sent with at most ``concurrency`` in flight; latencies in milliseconds;
    ``rps`` = requests / wall seconds; ``peak_rss_mib`` = the server's VmHWM after the row (MiB)."""

    endpoint: str
    concurrency: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    errors: int
    peak_rss_mib: float | None = None
    error_examples: tuple[str, ...] = ()
    kinds: dict[str, int] = field(default_factory=dict)


def peak_rss_mib(pid: int) -> float | None:
    """Peak resident set size of process ``pid`` in MiB (``VmHWM``), or None where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` in [0, 100] of ``values`` (no interpolation between two latencies)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))
    return ordered[k]


def run_load(base_url: str, endpoint: str, concurrency: int, requests: int, image: bytes, *,
             timeout_s: float = 300.0) -> BenchRow:
    """Send ``requests`` multipart requests to ``endpoint`` (a key of :data:`ENDPOINTS`) with at most
    ``concurrency`` in flight; a request fails when it raises or answers a status other than 200."""
    import httpx

    if endpoint not in ENDPOINTS:
        raise input_error("bench endpoint", expected=f"one of {sorted(ENDPOINTS)}", received=repr(endpoint),
                          fix="use segment or ground")
    if concurrency < 1 or requests < 1:
        raise input_error("bench load", expected="concurrency >= 1 and requests >= 1",
                          received=f"concurrency {concurrency}, requests {requests}", fix="pass positive numbers")
    path, fields = ENDPOINTS[endpoint]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=base_url, timeout=timeout_s, limits=limits) as client:

        def one(_: int) -> None:
            t0 = time.perf_counter()
            try:
                r = client.post(path, data=fields, files={"image": ("image.png", image, "image/png")})
                ok, why = r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}"
            dt = (time.perf_counter() - t0) * 1000.0
            with lock:
                latencies.append(dt)
                if not ok:
                    errors.append(why)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(one, range(requests)))
        wall = time.perf_counter() - t0
    return BenchRow(endpoint=endpoint, concurrency=concurrency, requests=requests, seconds=wall,
                    rps=requests / wall if wall > 0 else 0.0, p50_ms=_percentile(latencies, 50),
                    p95_ms=_percentile(latencies, 95), errors=len(errors), error_examples=tuple(errors[:3]))


#: the request kinds of :func:`run_mixed_load`, in the order they are cycled through
MIXED = ("segment", "ground", "chat", "result", "chat-stream", "models", "healthz")


def run_mixed_load(base_url: str, concurrency: int, duration_s: float, image: bytes, *,
                   headers: dict[str, str] | None = None, timeout_s: float = 300.0) -> BenchRow:
    """Keep ``concurrency`` requests in flight for ``duration_s`` seconds (the last ones finish after it), the
    kinds of :data:`MIXED` in turn; ``headers`` go with every request (e.g. the API key). A request fails when it
    raises or answers a status other than 200 (or a stream that does not end in ``[DONE]``)."""
    import httpx

    if concurrency < 1 or duration_s <= 0:
        raise input_error("bench mixed load", expected="concurrency >= 1 and a positive duration",
                          received=f"concurrency {concurrency}, duration {duration_s}", fix="pass positive numbers")
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    chat = {"model": "medvlm-grounding", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "where is the heart?"}]}]}
    segment_path, segment_fields = ENDPOINTS["segment"]
    ground_path, ground_fields = ENDPOINTS["ground"]
    latencies: list[float] = []
    errors: list[str] = []
    kinds: dict[str, int] = {}
    lock = threading.Lock()
    order = itertools.cycle(MIXED)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=base_url, timeout=timeout_s, limits=limits, headers=headers or {}) as client:
        first = client.post(segment_path, data=segment_fields, files={"image": ("image.png", image, "image/png")})
        if first.status_code != 200:
            raise input_error("bench mixed load", expected="HTTP 200 from the warm-up request",
                              received=f"HTTP {first.status_code}: {first.text[:200]}", fix="check the server's log")
        result_path = f"/v1/results/{first.json()['result_id']}.json"

        def send(kind: str) -> tuple[bool, str]:
            files = {"image": ("image.png", image, "image/png")}
            if kind == "segment":
                r = client.post(segment_path, data=segment_fields, files=files)
            elif kind == "ground":
                r = client.post(ground_path, data=ground_fields, files=files)
            elif kind == "chat":
                r = client.post("/v1/chat/completions", json=chat)
            elif kind == "chat-stream":
                with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
                    body = r.read()
                if r.status_code == 200 and not body.rstrip().endswith(b"data: [DONE]"):
                    return False, "a stream without [DONE]"
            elif kind == "result":
                r = client.get(result_path)
            elif kind == "models":
                r = client.get("/v1/models")
            else:
                r = client.get("/healthz")
            return r.status_code == 200, f"{kind}: HTTP {r.status_code}: {r.text[:200]}"

        deadline = time.perf_counter() + duration_s

        def worker(_: int) -> None:
            while time.perf_counter() < deadline:
                with lock:
                    kind = next(order)
                t0 = time.perf_counter()
                try:
                    ok, why = send(kind)
                except httpx.HTTPError as exc:
                    ok, why = False, f"{kind}: {type(exc).__name__}: {exc}"
                dt = (time.perf_counter() - t0) * 1000.0
                with lock:
                    latencies.append(dt)
                    kinds[kind] = kinds.get(kind, 0) + 1
                    if not ok:
                        errors.append(why)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(worker, range(concurrency)))
        wall = time.perf_counter() - t0
    n = len(latencies)
    return BenchRow(endpoint="mixed", concurrency=concurrency, requests=n, seconds=wall,
                    rps=n / wall if wall > 0 else 0.0, p50_ms=_percentile(latencies, 50) if n else 0.0,
                    p95_ms=_percentile(latencies, 95) if n else 0.0, errors=len(errors),
                    error_examples=tuple(errors[:3]), kinds=kinds)


def start_server(data_dir: Path, *, timeout_s: float = 120.0, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None,
                 output: list[str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start ``medvlm serve --port 0`` on 127.0.0.1 with ``data_dir``; return (process, base URL) once
    ``/healthz`` answers. ``env``: variables added to this process's environment (e.g. ``MEDVLM_API_KEY``);
    ``output``: a list that receives every line the server prints (else they are read and dropped).
    The caller stops it (:func:`stop_server`)."""
    import httpx

    cmd = [sys.executable, "-m", "medvlm.app.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir",
           str(data_dir), *extra_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    url = None
    seen: list[str] = []
    while url is None:
        line = proc.stdout.readline()
        if not line:
            stop_server(proc)
            raise input_error("medvlm serve", expected="a server that starts", received="it exited: " +
                              " | ".join(seen[-5:]), fix="run `medvlm serve --port 0` by hand to see why")
        seen.append(line.strip())
        if output is not None:
            output.append(line)
        if "listening on " in line:
            url = line.split("listening on ")[1].split()[0]
        if time.monotonic() > deadline:
            stop_server(proc)
            raise input_error("medvlm serve", expected=f"a server up within {timeout_s:.0f} s", received="no answer",
                              fix="check the machine's load")
    # keep reading its output so that a full pipe never blocks the server
    threading.Thread(target=_drain, args=(proc, output), daemon=True).start()
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise input_error("medvlm serve", expected=f"/healthz within {timeout_s:.0f} s", received="no answer",
                      fix="check the machine's load")


def _drain(proc: subprocess.Popen[str], output: list[str] | None = None) -> None:
    for line in proc.stdout or ():
        if output is not None:
            output.append(line)


def stop_server(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL after 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def bench_serve(base_url: str, *, concurrencies: tuple[int, ...] = (1, 4, 16), requests: int = 32,
                endpoints: tuple[str, ...] = ("ground", "segment"), image: bytes | None = None,
                server_pid: int | None = None, warmup: bool = True) -> list[BenchRow]:
    """Every endpoint at every concurrency against the server at ``base_url`` (process ``server_pid`` for the
    memory column). ``warmup``: one untimed request per endpoint first (model load, image encoding)."""
    from medvlm.assets import DEMO_IMAGE, asset_path

    image = image if image is not None else asset_path(DEMO_IMAGE).read_bytes()
    rows = []
    for endpoint in endpoints:
        if warmup:
            warm = run_load(base_url, endpoint, 1, 1, image)
            if warm.errors:
                raise input_error(f"bench warm-up of {endpoint}", expected="HTTP 200",
                                  received="; ".join(warm.error_examples), fix="check the server's log")
        for c in concurrencies:
            row = run_load(base_url, endpoint, c, requests, image)
            row.peak_rss_mib = peak_rss_mib(server_pid) if server_pid else None
            rows.append(row)
    return rows


def format_table(rows: list[BenchRow]) -> str:
    """A markdown table of ``rows``."""
    lines = ["| endpoint | concurrency | requests | requests/s | p50 ms | p95 ms | errors | peak server RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = f"{r.peak_rss_mib:.0f}" if r.peak_rss_mib is not None else "-"
        lines.append(f"| {r.endpoint} | {r.concurrency} | {r.requests} | {r.rps:.2f} | {r.p50_ms:.0f} | "
                     f"{r.p95_ms:.0f} | {r.errors} | {rss} |")
    return "\n".join(lines)


def run_bench_serve(args: argparse.Namespace) -> int:
    """``medvlm bench serve``: start the server, load it, print the table (and write JSON with ``--json``)."""
    import tempfile

    from medvlm.outputs import write_json_atomic

    image = Path(args.image).read_bytes() if args.image else None
    with tempfile.TemporaryDirectory(prefix="medvlm_bench_serve_") as tmp:
        proc, url = start_server(Path(tmp), timeout_s=args.start_timeout,
                                 extra_args=("--worker-threads", str(args.worker_threads)))
        try:
            print(f"medvlm bench serve: server at {url} (pid {proc.pid}); {args.requests} requests per row, "
                  f"concurrency {' '.join(map(str, args.concurrency))}", file=sys.stderr)
            rows = bench_serve(url, concurrencies=tuple(args.concurrency), requests=args.requests,
                               endpoints=tuple(args.endpoint or ("ground", "segment")), image=image,
                               server_pid=proc.pid)
        finally:
            stop_server(proc)
    print(format_table(rows))
    for r in rows:
        for e in r.error_examples:
            print(f"error ({r.endpoint}, concurrency {r.concurrency}): {e}", file=sys.stderr)
    if args.json_out:
        write_json_atomic({"suite": "bench-serve", "rows": [asdict(r) for r in rows]}, Path(args.json_out))
    return 0 if all(r.errors == 0 for r in rows) else 1
