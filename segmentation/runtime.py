"""Inference precision and the OpenVINO runtime for the image (and Med-VLM text) encoders on CPU.

Precision (``--precision``, ``precision=``, or ``$MEDVLM_PRECISION``; default ``auto``):

- ``auto``: bf16 when the CPU has bf16 units (``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``), else fp32.
  The image encoder runs through OpenVINO at that precision when OpenVINO is installed (fp32 OpenVINO gives the
  same masks as torch and was measured faster than torch fp32 on CPUs without bf16 units; see
  :func:`encoder_plan`), and through torch fp32 when it is not (logged at debug level).
- ``fp32``: the torch fp32 reference path; OpenVINO is not used at all.
- ``bf16``: OpenVINO with ``INFERENCE_PRECISION_HINT=bf16``. A CPU without bf16 units runs f32 anyway (OpenVINO
  ignores the hint there; logged as a warning). Without OpenVINO: torch bf16 autocast, with a warning naming
  the install command.

Only the CPU is handled: on a CUDA device the segmenters keep torch fp32 whatever the precision (torch's own
``torch.autocast("cuda")`` is out of scope here).

:func:`compile_encoder` converts a torch module once with ``openvino.convert_model``, saves the IR
(``openvino.save_model``, weights kept f32) under :func:`openvino_cache_dir` keyed by a sha256 of the module's
weights, the input shape and the OpenVINO version, so a later process reads the IR instead of converting it;
compiled models are kept in a bounded in-process LRU (:data:`LRU_SIZE`). :func:`compile_text_encoder` does the
same for a BERT-family text encoder (batch and length dynamic). OpenVINO is imported only inside the functions
that use it. The disk cache is never pruned: one folder per model version (LiteMedSAM's TinyViT ~25 MB, MiniLM
~90 MB); delete the folder to reclaim the space (the next use converts again, ~15-50 s per model on 2 cores).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error

if TYPE_CHECKING:
    import torch

__all__ = [
    "CPUINFO_PATH",
    "LRU_SIZE",
    "OPENVINO_INSTALL",
    "PRECISIONS",
    "PRECISION_ENV",
    "CompiledEncoder",
    "CompiledIR",
    "CompiledTextEncoder",
    "EncoderPlan",
    "Precision",
    "clear_compiled_cache",
    "compile_encoder",
    "compile_text_encoder",
    "cpu_has_bf16",
    "encoder_plan",
    "export_ir",
    "inference_threads",
    "load_ir_encoder",
    "load_ir_model",
    "load_ir_text_encoder",
    "openvino_available",
    "openvino_cache_dir",
    "requested_precision",
    "resolve_precision",
    "runtime_stats",
]

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
ResolvedPrecision = Literal["fp32", "bf16"]
Engine = Literal["torch", "openvino", "torch-autocast"]

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
PRECISION_ENV = "MEDVLM_PRECISION"
OPENVINO_INSTALL = 'pip install "openvino>=2026.4"'
#: where the CPU flags are read (tests point it at a fake file)
CPUINFO_PATH = "/proc/cpuinfo"
#: compiled models kept in this process (least recently used evicted first)
LRU_SIZE = 4
#: bump when the conversion recipe changes, so stale IRs on disk are not reused
IR_FORMAT = 1
BF16_FLAGS = ("avx512_bf16", "amx_bf16")

_STATS: dict[str, int] = {"conversions": 0, "ir_loads": 0, "compiles": 0, "lru_hits": 0, "torch_fallbacks": 0}
_LRU: OrderedDict[tuple[Any, ...], Any] = OrderedDict()  # compiled image and text encoders
_LRU_LOCK = threading.Lock()
_COMPILE_LOCK = threading.RLock()  # one conversion/compilation at a time (two callers never convert the same module)


# --------------------------------------------------------------------------------------------------- precision


def requested_precision(requested: str | None = None) -> Precision:
    """The precision asked for: ``requested``, else ``$MEDVLM_PRECISION``, else ``"auto"`` (validated, lower case).

    Raises :class:`medvlm.errors.InputError` for anything but ``auto``, ``fp32`` or ``bf16``."""
    source = "precision"
    value = requested
    if value is None:
        value = os.environ.get(PRECISION_ENV) or None
        source = f"${PRECISION_ENV}"
    if value is None:
        return "auto"
    norm = str(value).strip().lower()
    if norm == "auto":
        return "auto"
    if norm == "fp32":
        return "fp32"
    if norm == "bf16":
        return "bf16"
    raise input_error(source, expected="one of auto, fp32, bf16", received=repr(value),
                      fix=f"pass --precision auto|fp32|bf16 (or precision=...), or set {PRECISION_ENV} to one of "
                      "them, or unset it for auto")


@lru_cache(maxsize=8)
def _cpu_flags(path: str) -> frozenset[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16(cpuinfo: str | Path | None = None) -> bool:
    """Whether the CPU has bf16 units (``avx512_bf16`` or ``amx_bf16`` among the flags of ``/proc/cpuinfo``).

    False where the file is unreadable (macOS, Windows): auto then means fp32."""
    flags = _cpu_flags(str(cpuinfo if cpuinfo is not None else CPUINFO_PATH))
    return any(f in flags for f in BF16_FLAGS)


def resolve_precision(requested: str | None = None) -> ResolvedPrecision:
    """``"fp32"`` or ``"bf16"``: ``requested`` (else ``$MEDVLM_PRECISION``, else ``auto``) with ``auto`` decided by
    :func:`cpu_has_bf16`. Invalid values raise :class:`medvlm.errors.InputError` (expected / received / fix)."""
    value = requested_precision(requested)
    if value == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    return value


def openvino_available() -> bool:
    """Whether ``import openvino`` works (the result is not cached, so tests can hide the module)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class EncoderPlan:
    """How a segmenter runs its image encoder: ``requested`` (auto/fp32/bf16), the resolved ``precision``
    (fp32/bf16), the ``engine`` (``torch``, ``openvino`` or ``torch-autocast``) and the ``reason`` in words."""

    __slots__ = ("engine", "precision", "reason", "requested")

    def __init__(self, requested: Precision, precision: ResolvedPrecision, engine: Engine, reason: str) -> None:
        self.requested = requested
        self.precision = precision
        self.engine = engine
        self.reason = reason

    @property
    def compiled(self) -> bool:
        """True when the encoder goes through :func:`compile_encoder` (anything but the torch fp32 reference)."""
        return self.engine != "torch"

    def to_json(self) -> dict[str, str]:
        return {"requested": self.requested, "precision": self.precision, "engine": self.engine,
                "reason": self.reason}

    def __repr__(self) -> str:
        return (f"EncoderPlan(requested={self.requested!r}, precision={self.precision!r}, engine={self.engine!r}, "
                f"reason={self.reason!r})")


def encoder_plan(requested: str | None = None, device: str = "cpu") -> EncoderPlan:
    """Decide how an image encoder runs (validates ``requested`` eagerly; imports nothing heavy).

    - a non-CPU ``device``: torch fp32 (CUDA autocast is out of scope);
    - ``fp32`` asked explicitly: torch fp32, the reference path, no OpenVINO;
    - ``auto`` or ``bf16`` with OpenVINO installed: OpenVINO at the resolved precision (for ``auto`` on a CPU
      without bf16 units that is fp32 OpenVINO: the same masks as torch, measured ~3x faster encodes on 2 cores
      of an AMD EPYC without AVX-512);
    - ``auto`` without OpenVINO: torch fp32 (debug log); ``bf16`` without OpenVINO: torch bf16 autocast
      (warning naming the install command, logged when the encoder is compiled).
    """
    asked = requested_precision(requested)
    precision = resolve_precision(asked)
    if not str(device).startswith("cpu"):
        return EncoderPlan(asked, "fp32", "torch", f"device {device}: torch fp32 (precision applies to CPU only)")
    if asked == "fp32":
        return EncoderPlan(asked, "fp32", "torch", "fp32 requested: torch reference path")
    if openvino_available():
        why = "bf16 requested" if asked == "bf16" else (
            "auto: CPU has bf16 units" if precision == "bf16" else "auto: no bf16 units, fp32 OpenVINO")
        return EncoderPlan(asked, precision, "openvino", why)
    if asked == "bf16":
        return EncoderPlan(asked, "bf16", "torch-autocast", f"bf16 requested, OpenVINO missing ({OPENVINO_INSTALL})")
    return EncoderPlan(asked, "fp32", "torch", "auto: OpenVINO not installed, torch fp32")


# ------------------------------------------------------------------------------------------------ compile


def openvino_cache_dir() -> Path:
    """``$MEDVLM_OPENVINO_CACHE`` when set (one IR cache shared by several homes), else ``$MEDVLM_HOME/openvino``
    when MEDVLM_HOME is set, else ``~/.cache/medvlm/openvino``."""
    shared = os.environ.get("MEDVLM_OPENVINO_CACHE")
    if shared:
        return Path(shared).expanduser()
    home = os.environ.get("MEDVLM_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "medvlm"
    return base / "openvino"


def runtime_stats() -> dict[str, int]:
    """Counters of this process: ``conversions`` (convert_model calls), ``ir_loads`` (IRs read from disk),
    ``compiles``, ``lru_hits`` and ``torch_fallbacks``."""
    return dict(_STATS)


def clear_compiled_cache() -> None:
    """Drop the in-process LRU of compiled encoders (the IRs on disk stay)."""
    with _LRU_LOCK:
        _LRU.clear()


class CompiledEncoder:
    """A compiled image encoder: ``encoder(x)`` maps a float32 tensor ``(B, *shape)`` (the example's rank; any
    batch size B >= 1, run in chunks of at most ``max_batch``) to the module's float32 output ``(B, ...)`` on
    the CPU. Thread-safe (one call runs at a time).

    ``engine``: ``openvino`` or ``torch``; ``precision``: the resolved precision asked for (fp32/bf16);
    ``inference_precision``: what actually runs (OpenVINO's ``f32``/``bf16``, or ``fp32``/``bf16-autocast`` for
    torch); ``ir_path``: the IR on disk (OpenVINO); ``converted``: whether this process converted the module
    (False: the IR was read from disk); ``prepare_s``: seconds spent converting or reading + compiling.
    """

    engine: str = "torch"

    def __init__(self, *, precision: str, inference_precision: str, sample_shape: tuple[int, ...],
                 max_batch: int, prepare_s: float, ir_path: Path | None = None, converted: bool = False) -> None:
        self.precision = precision
        self.inference_precision = inference_precision
        self.sample_shape = sample_shape
        self.max_batch = max(1, int(max_batch))
        self.prepare_s = prepare_s
        self.ir_path = ir_path
        self.converted = converted
        self._lock = threading.Lock()

    def _run(self, chunk: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_array(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """As calling the encoder, on numpy arrays and without importing torch (OpenVINO only): ``(B, *shape)``
        float32 -> float32 output ``(B, ...)``."""
        raise NotImplementedError(f"{type(self).__name__} runs torch tensors: call it instead")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        if x.dim() != len(self.sample_shape) + 1 or tuple(x.shape[1:]) != self.sample_shape:
            raise input_error("compiled encoder input", expected=f"a (B, {', '.join(map(str, self.sample_shape))}) "
                              "tensor", received=f"shape {tuple(x.shape)}",
                              fix="preprocess the image(s) the way the model expects (same size as the example)")
        x = x.detach().to(device="cpu", dtype=torch.float32)
        with self._lock:
            outs = [self._run(x[i:i + self.max_batch]) for i in range(0, x.shape[0], self.max_batch)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (engine, precisions, IR path, converted or loaded, seconds)."""
        return {"engine": self.engine, "precision": self.precision, "inference_precision": self.inference_precision,
                "ir_path": str(self.ir_path) if self.ir_path else None, "converted": self.converted,
                "prepare_s": round(self.prepare_s, 3)}


class _TorchEncoder(CompiledEncoder):
    engine = "torch"

    def __init__(self, module: torch.nn.Module, *, autocast_bf16: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.module = module
        self.autocast_bf16 = autocast_bf16

    def _run(self, chunk: torch.Tensor) -> torch.Tensor:
        import torch

        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast_bf16 else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            return self.module(chunk).float()


class _OpenVINOEncoder(CompiledEncoder):
    engine = "openvino"

    def __init__(self, compiled: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def _run_np(self, arr: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self.request.infer({0: np.ascontiguousarray(arr, dtype=np.float32)}, share_inputs=True)
        # the output buffer belongs to the request and is overwritten by the next call: copy it out
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def _run(self, chunk: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(self._run_np(chunk.numpy()))

    def run_array(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if x.ndim != len(self.sample_shape) + 1 or tuple(x.shape[1:]) != self.sample_shape:
            raise input_error("compiled encoder input", expected=f"a (B, {', '.join(map(str, self.sample_shape))}) "
                              "array", received=f"shape {tuple(x.shape)}",
                              fix="preprocess the image(s) the way the model expects (same size as the example)")
        with self._lock:
            outs = [self._run_np(x[i:i + self.max_batch]) for i in range(0, x.shape[0], self.max_batch)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)


def _module_digest(module: torch.nn.Module, examples: Sequence[torch.Tensor], key: str | None, ov_version: str,
                   shapes: str) -> str:
    import torch

    h = hashlib.sha256()
    h.update(f"medvlm-openvino-ir/{IR_FORMAT}|{type(module).__module__}.{type(module).__qualname__}|key={key}|"
             f"openvino={ov_version}|ranks={[e.dim() for e in examples]}|dtypes={[str(e.dtype) for e in examples]}|"
             f"shapes={shapes}".encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"|{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_CORE: Any = None


def _core() -> Any:
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
        # compiled-model blobs next to the IRs: a later process imports the blob instead of compiling the IR
        # again (measured on 2 cores for Med-VLM's three IRs: 1.04-1.35 s -> 0.39 s)
        with contextlib.suppress(RuntimeError, OSError):
            blobs = openvino_cache_dir() / "compiled"
            blobs.mkdir(parents=True, exist_ok=True)
            _CORE.set_property({"CACHE_DIR": str(blobs)})
    return _CORE


def inference_threads() -> int:
    """Threads for OpenVINO: torch's intra-op count when torch is loaded (so both engines use the same), else
    ``$OMP_NUM_THREADS`` or the CPUs this process may run on; without importing torch (1.4 s on 2 cores)."""
    import sys

    torch_mod = sys.modules.get("torch")
    if torch_mod is not None and hasattr(torch_mod, "get_num_threads"):
        return max(1, int(torch_mod.get_num_threads()))
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _type_name(value: Any) -> str:
    getter = getattr(value, "get_type_name", None)
    return str(getter()) if callable(getter) else str(value)


def _convert(module: torch.nn.Module, examples: Sequence[torch.Tensor], static_tail: bool) -> Any:
    """``openvino.convert_model`` of ``module`` traced with ``examples``; with ``static_tail`` the (single) input
    gets a dynamic batch and the example's other dimensions, else every dimension stays dynamic."""
    import openvino as ov
    import torch

    was_training = module.training
    module.eval()
    example: Any = examples[0] if len(examples) == 1 else tuple(examples)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # tracing warns about every Python-level shape check of the module ("might not generalize"): the
            # shapes it freezes are the fixed input size; the batch dimension stays dynamic (checked in tests)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            model = ov.convert_model(module, example_input=example)
    finally:
        module.train(was_training)
    _STATS["conversions"] += 1
    if len(model.inputs) != len(examples) or len(model.outputs) < 1:
        raise input_error("compile module", expected=f"{len(examples)} tensor input(s) and a tensor output",
                          received=f"{len(model.inputs)} inputs, {len(model.outputs)} outputs",
                          fix="wrap the module so that forward(*inputs) -> tensor")
    if static_tail:
        # batch dynamic, the other dimensions static (faster kernels; the encoders take a fixed input size)
        model.reshape(ov.PartialShape([-1, *(int(d) for d in examples[0].shape[1:])]))
    else:
        model.reshape({k: ov.PartialShape([-1] * e.dim()) for k, e in enumerate(examples)})
    return model


def export_ir(module: torch.nn.Module, examples: Sequence[torch.Tensor], xml: str | Path,
              shapes: Sequence[Sequence[int]]) -> Path:
    """Convert ``module`` (traced with ``examples``) to an IR whose inputs have ``shapes`` (``-1`` = dynamic) and
    save it as ``xml`` + ``.bin`` with float32 weights; :func:`load_ir_model` runs it without torch."""
    import openvino as ov

    model = _convert(module, examples, static_tail=False)
    model.reshape({k: ov.PartialShape([int(d) for d in shape]) for k, shape in enumerate(shapes)})
    path = Path(xml)
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


def _save_ir(model: Any, folder: Path, info: dict[str, Any]) -> None:
    """Write ``folder/model.xml`` + ``model.bin`` atomically (a temporary folder renamed into place)."""
    import openvino as ov

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)  # keep the f32 weights exact
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process saved the same IR first: keep theirs
            if not (folder / "model.xml").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Built:
    """What :func:`_build_openvino` returns: the compiled model and how it was obtained."""

    def __init__(self, compiled: Any, actual: str, xml: Path, converted: bool, seconds: float) -> None:
        self.compiled = compiled
        self.actual = actual
        self.xml = xml
        self.converted = converted
        self.seconds = seconds


def _build_openvino(module: torch.nn.Module, examples: Sequence[torch.Tensor], *, key: str | None, digest: str,
                    resolved: ResolvedPrecision, threads: int, static_tail: bool) -> _Built:
    """Read the IR ``digest`` from the disk cache or convert (and save) it, then compile it for the CPU."""
    import openvino as ov

    t0 = time.perf_counter()
    folder = openvino_cache_dir() / digest
    xml = folder / "model.xml"
    converted = False
    model: Any = None
    if xml.is_file() and (folder / "model.bin").is_file():
        try:
            model = _core().read_model(str(xml))
            _STATS["ir_loads"] += 1
        except RuntimeError as exc:  # a truncated or foreign file: convert again
            log.warning("could not read the cached OpenVINO IR %s (%s); converting again", xml, exc)
            model = None
    if model is None:
        model = _convert(module, examples, static_tail)
        converted = True
        info = {"key": key, "module": f"{type(module).__module__}.{type(module).__qualname__}",
                "openvino": ov.__version__, "inputs": [list(e.shape) for e in examples], "format": IR_FORMAT}
        try:
            _save_ir(model, folder, info)
        except OSError as exc:  # a read-only home still gets a working (uncached) encoder
            log.warning("could not save the OpenVINO IR to %s (%s); it will be converted again next time", folder, exc)
    compiled, actual = _compile(model, resolved, threads, key or type(module).__name__)
    seconds = time.perf_counter() - t0
    log.info("OpenVINO %s: %s in %.1f s (%s, %d threads)", key or type(module).__name__,
             "converted" if converted else "IR loaded", seconds, actual, threads)
    return _Built(compiled, actual, xml, converted, seconds)


def _compile(model: Any, resolved: ResolvedPrecision, threads: int, label: str) -> tuple[Any, str]:
    """Compile an OpenVINO model (an ``ov.Model`` or the path of an IR) for the CPU at ``resolved`` precision;
    ``(compiled, actual precision)``."""
    config = {"INFERENCE_PRECISION_HINT": "bf16" if resolved == "bf16" else "f32",
              "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    compiled = _core().compile_model(model, "CPU", config)
    _STATS["compiles"] += 1
    actual = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
    actual = {"float32": "f32", "bfloat16": "bf16"}.get(actual, actual)
    if resolved == "bf16" and actual != "bf16":
        log.warning("bf16 was requested but this CPU has no bf16 units (%s): OpenVINO runs %s in %s",
                    " / ".join(BF16_FLAGS), label, actual)
    return compiled, actual


def _read_ir(xml: Path, resolved: ResolvedPrecision, label: str) -> tuple[Any, str, int, float]:
    """Read and compile the IR ``xml``; ``(compiled, actual precision, threads, seconds)``."""
    t0 = time.perf_counter()
    threads = inference_threads()
    # the path, not a read model: with the blob cache (_core) OpenVINO then skips reading and hashing the IR
    # (0.27 -> ~0.13 s for the Med-VLM image encoder on 2 cores)
    _STATS["ir_loads"] += 1
    compiled, actual = _compile(str(xml), resolved, threads, label)
    return compiled, actual, threads, time.perf_counter() - t0


def load_ir_encoder(xml: str | Path, sample_shape: Sequence[int], precision: str | None, *,
                    max_batch: int = 8) -> CompiledEncoder:
    """An image encoder from an IR that :func:`compile_encoder` saved (``xml``: its ``model.xml``), without the
    torch module: a float32 ``(B, *sample_shape)`` tensor -> the encoder's float32 output. For processes that
    start from a saved inference bundle (``segmentation.textseg.bundle``); shared through the same LRU.
    Raises ``FileNotFoundError`` when the IR is gone."""
    path = Path(xml)
    if not path.is_file():
        raise FileNotFoundError(path)
    resolved = resolve_precision(requested_precision(precision))
    shape = tuple(int(d) for d in sample_shape)

    def make() -> CompiledEncoder:
        compiled, actual, _, seconds = _read_ir(path, resolved, path.parent.name[:12])
        return _OpenVINOEncoder(compiled, precision=resolved, inference_precision=actual, sample_shape=shape,
                                max_batch=max_batch, prepare_s=seconds, ir_path=path, converted=False)

    threads = inference_threads()
    encoder: CompiledEncoder = _cached(("image", path.parent.name, resolved, threads, int(max_batch)), make)
    return encoder


def load_ir_text_encoder(xml: str | Path, precision: str | None) -> CompiledTextEncoder:
    """A text encoder from an IR that :func:`compile_text_encoder` saved, without the torch module (see
    :func:`load_ir_encoder`)."""
    path = Path(xml)
    if not path.is_file():
        raise FileNotFoundError(path)
    resolved = resolve_precision(requested_precision(precision))

    def make() -> CompiledTextEncoder:
        compiled, actual, _, seconds = _read_ir(path, resolved, path.parent.name[:12])
        return CompiledTextEncoder(compiled, precision=resolved, inference_precision=actual, prepare_s=seconds,
                                   ir_path=path, converted=False)

    threads = inference_threads()
    encoder: CompiledTextEncoder = _cached(("text", path.parent.name, resolved, threads), make)
    return encoder


def _cached(lru_key: tuple[Any, ...], make: Any) -> Any:
    """The LRU entry ``lru_key``, made by ``make()`` (one build at a time) when absent."""
    with _COMPILE_LOCK:
        with _LRU_LOCK:
            hit = _LRU.get(lru_key)
            if hit is not None:
                _LRU.move_to_end(lru_key)
                _STATS["lru_hits"] += 1
                return hit
        made = make()
        with _LRU_LOCK:
            _LRU[lru_key] = made
            _LRU.move_to_end(lru_key)
            while len(_LRU) > LRU_SIZE:
                _LRU.popitem(last=False)
        return made


def compile_encoder(module: torch.nn.Module, example: torch.Tensor, precision: str | None, *,
                    key: str | None = None, max_batch: int = 8) -> CompiledEncoder:
    """Compile ``module`` (an image encoder, ``forward(x) -> tensor``) for the CPU; returns a callable
    :class:`CompiledEncoder` mapping a float32 ``(B, *example.shape[1:])`` tensor to the module's float32 output.

    ``example``: a float32 input ``(B0, ...)`` used to trace the module (its batch size does not matter: the
    batch dimension of the compiled model is dynamic, the others are fixed to the example's).
    ``precision``: ``auto``/``fp32``/``bf16`` or None (:func:`requested_precision`): OpenVINO with
    ``INFERENCE_PRECISION_HINT`` bf16 or f32, ``INFERENCE_NUM_THREADS = inference_threads()`` and
    ``PERFORMANCE_HINT=LATENCY``. ``key``: extra text in the cache key (name the forward code: the sha256 covers
    only the weights). ``max_batch``: largest chunk sent at once.

    The module is converted with ``openvino.convert_model`` (eval mode, no grad) only when its IR is not in
    :func:`openvino_cache_dir` yet; compiled encoders are shared through an LRU of :data:`LRU_SIZE`. Without
    OpenVINO: torch fp32 (``auto``/``fp32``, debug log) or torch bf16 autocast (``bf16`` asked, warning).
    """

    asked = requested_precision(precision)
    resolved = resolve_precision(asked)
    sample_shape = tuple(int(d) for d in example.shape[1:])
    if not openvino_available():
        _STATS["torch_fallbacks"] += 1
        if asked == "bf16":
            log.warning("bf16 was requested but OpenVINO is not installed: the image encoder runs with torch bf16 "
                        "autocast (slower than OpenVINO). Install it with: %s", OPENVINO_INSTALL)
            return _TorchEncoder(module.eval(), autocast_bf16=True, precision="bf16",
                                 inference_precision="bf16-autocast", sample_shape=sample_shape, max_batch=max_batch,
                                 prepare_s=0.0)
        log.debug("OpenVINO is not installed: the image encoder runs with torch fp32 (%s)", OPENVINO_INSTALL)
        return _TorchEncoder(module.eval(), autocast_bf16=False, precision="fp32", inference_precision="fp32",
                             sample_shape=sample_shape, max_batch=max_batch, prepare_s=0.0)

    import openvino as ov

    threads = inference_threads()
    digest = _module_digest(module, [example], key, ov.__version__, f"batch+{list(sample_shape)}")

    def make() -> CompiledEncoder:
        built = _build_openvino(module, [example], key=key, digest=digest, resolved=resolved, threads=threads,
                                static_tail=True)
        return _OpenVINOEncoder(built.compiled, precision=resolved, inference_precision=built.actual,
                                sample_shape=sample_shape, max_batch=max_batch, prepare_s=built.seconds,
                                ir_path=built.xml, converted=built.converted)

    encoder: CompiledEncoder = _cached(("image", digest, resolved, threads, int(max_batch)), make)
    return encoder


class _OpenVINOModel:
    """A compiled OpenVINO model with one infer request, its lock and what :meth:`describe` reports."""

    engine = "openvino"

    def __init__(self, compiled: Any, *, precision: str, inference_precision: str, prepare_s: float,
                 ir_path: Path, converted: bool = False) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.precision = precision
        self.inference_precision = inference_precision
        self.prepare_s = prepare_s
        self.ir_path = ir_path
        self.converted = converted
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"engine": self.engine, "precision": self.precision, "inference_precision": self.inference_precision,
                "ir_path": str(self.ir_path), "converted": self.converted, "prepare_s": round(self.prepare_s, 3)}


class CompiledTextEncoder(_OpenVINOModel):
    """A compiled text encoder: ``encoder(input_ids (B, L) int64, attention_mask (B, L) int64)`` -> float32
    ``(B, L, d)`` (B and L dynamic). Thread-safe. Attributes as :class:`CompiledEncoder` (``engine`` is always
    ``openvino``)."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.run_array(input_ids.detach().cpu().numpy(),
                                               attention_mask.detach().cpu().numpy()))

    def run_array(self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64],
                  ) -> npt.NDArray[np.float32]:
        """As calling it, on numpy arrays (no torch): ``(B, L)`` int64 ids and mask -> ``(B, L, d)`` float32."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        with self._lock:
            self.request.infer({0: ids, 1: mask}, share_inputs=True)
            return np.array(self.request.get_output_tensor(0).data, dtype=np.float32, copy=True)


class CompiledIR(_OpenVINOModel):
    """Any IR compiled for the CPU, run on numpy arrays without torch: ``model(*inputs)`` -> the outputs as a
    list of float32/bool arrays (copied out of the request). Thread-safe. Attributes as
    :class:`CompiledTextEncoder`."""

    def __call__(self, *inputs: npt.NDArray[Any]) -> list[npt.NDArray[Any]]:
        arrays = {i: np.ascontiguousarray(a) for i, a in enumerate(inputs)}
        with self._lock:
            self.request.infer(arrays, share_inputs=True)
            return [np.array(self.request.get_output_tensor(k).data, copy=True)
                    for k in range(len(self.compiled.outputs))]


def load_ir_model(xml: str | Path, precision: str | None) -> CompiledIR:
    """Read and compile any saved IR (``xml``: its ``model.xml`` or another ``.xml``) at ``precision``, shared
    through the same LRU as the encoders; numpy in and out. Raises ``FileNotFoundError`` when it is gone."""
    path = Path(xml)
    if not path.is_file():
        raise FileNotFoundError(path)
    resolved = resolve_precision(requested_precision(precision))

    def make() -> CompiledIR:
        compiled, actual, _, seconds = _read_ir(path, resolved, path.stem[:12])
        return CompiledIR(compiled, precision=resolved, inference_precision=actual, prepare_s=seconds,
                          ir_path=path)

    model: CompiledIR = _cached(("ir", str(path.resolve()), resolved, inference_threads()), make)
    return model


def compile_text_encoder(module: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         precision: str | None, *, key: str | None = None) -> CompiledTextEncoder:
    """Compile a BERT-family text encoder ``forward(input_ids (B, L), attention_mask (B, L)) -> (B, L, d)`` with
    OpenVINO (batch and length dynamic), cached on disk and in the LRU like :func:`compile_encoder`.

    Trace it with an example batch whose ``attention_mask`` holds padding (zeros): a mask of ones lets the model
    skip masking, and tracing would freeze that branch. Requires OpenVINO (callers check
    :func:`openvino_available`; there is no torch fallback object here)."""
    import openvino as ov

    if not bool((attention_mask == 0).any()):
        raise input_error("compile_text_encoder example", expected="an attention_mask with padding (some zeros)",
                          received="a mask of ones", fix="tokenize two texts of different lengths together")
    resolved = resolve_precision(precision)
    threads = inference_threads()
    examples = [input_ids, attention_mask]
    digest = _module_digest(module, examples, key, ov.__version__, "dynamic")

    def make() -> CompiledTextEncoder:
        built = _build_openvino(module, examples, key=key, digest=digest, resolved=resolved, threads=threads,
                                static_tail=False)
        return CompiledTextEncoder(built.compiled, precision=resolved, inference_precision=built.actual,
                                   prepare_s=built.seconds, ir_path=built.xml, converted=built.converted)

    encoder: CompiledTextEncoder = _cached(("text", digest, resolved, threads), make)
    return encoder
