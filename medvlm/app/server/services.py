"""The models behind the server: each loaded once, on first use, and shared by every request and job.

- ``litemedsam``: the promptable segmenter (box / point prompts; reference-guided segmentation's features);
- ``medvlm``: the text-guided Med-VLM segmenter;
- ``grounding_agent``: :class:`agents.pipeline.GroundingAgent` with the embedded Med-VLM grounder, built on
  the two models above (no second copy is loaded).

Each model has its own lock: a request holds it while it runs that model, so two requests never drive one
model at once (the grounder keeps per-image state), while different models run in parallel in the server's
worker threads. Image encodings are cached by the content of the uploaded file (SHA-256 of its bytes + the
slice): a small LRU per model, so repeated requests on one image skip the encoder (~1.2 s per image on
2 CPU cores), and concurrent requests on one new image encode it once (the others wait for that encoding).
Decoded images are cached the same way, so the grounder's own last-image cache hits too.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from medvlm.errors import input_error

__all__ = ["MODEL_NAMES", "CachedSegmenter", "LRUCache", "Services", "content_key", "limit_torch_threads"]

#: the models :class:`Services` provides, in /healthz order
MODEL_NAMES = ("litemedsam", "medvlm", "grounding_agent")

#: models a model's default builder uses (built before it)
_DEPENDS = {"grounding_agent": ("medvlm", "litemedsam")}

#: where an image's cache key is kept (a hex digest; not identifying, it is only compared)
KEY_META = "content_sha256"


def content_key(data: bytes, slice_index: int | None) -> str:
    """Cache key of an uploaded image: SHA-256 of its bytes and the slice/frame read from it."""
    digest = hashlib.sha256(data).hexdigest()
    return digest if slice_index is None else f"{digest}:{slice_index}"


def limit_torch_threads(count: int) -> None:
    """Give the calling worker thread ``count`` torch intra-op threads (when torch is loaded).

    Two worker threads each running 2-thread OpenMP regions on 2 cores oversubscribe them; measured with
    ``medvlm bench serve`` while other processes also kept the cores busy, a LiteMedSAM box request at
    concurrency 1 took 1.05 s p50 with torch's default 2 threads and 0.10 s with 1 thread set here (the decoder
    is many small ops, each waiting for the OpenMP team).
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != count:
        torch.set_num_threads(count)


class LRUCache:
    """A thread-safe LRU of at most ``size`` values; :meth:`get_or_create` builds a missing value once even when
    several threads ask for it together (they wait for the first one's result)."""

    def __init__(self, size: int) -> None:
        self.size = max(1, int(size))
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        return None

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get_or_create(self, key: str, build: Callable[[], Any]) -> Any:
        found = self.get(key)
        if found is not None:
            return found
        with self._lock:
            gate = self._building.setdefault(key, threading.Lock())
        try:
            with gate:
                found = self.get(key)  # built by the thread we waited for
                if found is not None:
                    return found
                with self._lock:
                    self.misses += 1
                value = build()
                self.put(key, value)
                return value
        finally:
            with self._lock:
                self._building.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class CachedSegmenter:
    """A segmenter whose :meth:`encode` is served from an :class:`LRUCache` keyed by the image's content key
    (``image.meta["content_sha256"]``, set by :meth:`Services.load_image`); images without one are encoded
    every time. Everything else is the wrapped segmenter's; :meth:`segment` is re-implemented so that it, too,
    goes through the cache (the wrapped class would call its own encode)."""

    def __init__(self, inner: Any, cache: LRUCache) -> None:
        self.inner = inner
        self.cache = cache
        self.name = inner.name

    def encode(self, image: Any) -> Any:
        key = (getattr(image, "meta", None) or {}).get(KEY_META)
        if not key:
            return self.inner.encode(image)
        return self.cache.get_or_create(key, lambda: self.inner.encode(image))

    def predict(self, embedding: Any, prompt: Any, *, multimask: bool = False) -> Any:
        return self.inner.predict(embedding, prompt, multimask=multimask)

    def predict_many(self, embedding: Any, prompts: Sequence[Any], *, multimask: bool = False) -> list[Any]:
        return list(self.inner.predict_many(embedding, prompts, multimask=multimask))

    def segment(self, image: Any, prompts: Any, *, multimask: bool = False) -> list[Any]:
        """Encode ``image`` (cached) and decode ``prompts`` (pixel frame of the original image) on it."""
        from segmentation.base import Prompt, image_size_of

        prompt_list = [prompts] if isinstance(prompts, Prompt) else list(prompts)
        height, width = image_size_of(image)
        for p in prompt_list:  # refuse a bad prompt before paying for the encoder, as SegmenterBase does
            self.inner._check_kind(p).validated(height, width)
        return self.predict_many(self.encode(image), prompt_list, multimask=multimask)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _in_fresh_thread(build: Callable[[], Any]) -> Any:
    """``build()`` run in a new thread that ends with it, its exception re-raised here.

    Measured on the 2-core machine while other processes kept both cores busy: the thread that built a torch
    model ran that model's many small decoder ops ~13x slower afterwards (1.0 s instead of 75 ms per LiteMedSAM
    prompt; normal again with OMP_NUM_THREADS=1, so OpenMP's per-thread team is the suspect). Building in a
    throwaway thread keeps every request worker thread out of that state.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(build())
        except BaseException as exc:  # re-raised in the caller's thread below
            error.append(exc)

    thread = threading.Thread(target=run, name="medvlm-model-load")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class Services:
    """Lazily built, shared models with one lock each, plus the decoded-image and encoding caches.

    ``loaders``: name -> zero-argument builder, overriding the default of that model (tests pass light fakes;
    a builder of ``litemedsam`` / ``medvlm`` returns the raw segmenter, which is wrapped in a
    :class:`CachedSegmenter` here; a builder runs in a thread of its own and must not ask :meth:`get` for a model
    not built yet, except through ``_DEPENDS``). ``cache_size``: images kept per cache. ``max_pixels``: largest
    image decoded.
    """

    def __init__(self, *, loaders: Mapping[str, Callable[[], Any]] | None = None, cache_size: int = 8,
                 max_pixels: int | None = None, medvlm_checkpoint: str | None = None) -> None:
        unknown = set(loaders or {}) - set(MODEL_NAMES)
        if unknown:
            raise input_error("Services loaders", expected=f"names among {MODEL_NAMES}", received=str(sorted(unknown)),
                              fix="name the model being replaced")
        self._loaders: dict[str, Callable[[], Any]] = {
            "litemedsam": self._build_litemedsam, "medvlm": self._build_medvlm,
            "grounding_agent": self._build_agent, **dict(loaders or {})}
        self._models: dict[str, Any] = {}
        self._build_lock = threading.Lock()
        self.locks: dict[str, threading.Lock] = {name: threading.Lock() for name in MODEL_NAMES}
        self.cache_size = int(cache_size)
        self.images = LRUCache(cache_size)
        self.encodings = {name: LRUCache(cache_size) for name in ("litemedsam", "medvlm")}
        self.max_pixels = max_pixels
        self.medvlm_checkpoint = medvlm_checkpoint

    # ------------------------------------------------------------------------------------------------ models

    def get(self, name: str) -> Any:
        """The model ``name`` (one of :data:`MODEL_NAMES`), built on first use; thread-safe."""
        if name not in self._loaders:
            raise input_error("model", expected=f"one of {MODEL_NAMES}", received=repr(name),
                              fix="ask for a known model")
        model = self._models.get(name)
        if model is not None:
            return model
        # built first, in this thread: the builder below runs in another thread, which could not take the lock
        for dependency in _DEPENDS.get(name, ()):
            self.get(dependency)
        with self._build_lock:
            model = self._models.get(name)
            if model is None:
                model = _in_fresh_thread(self._loaders[name])
                if name in self.encodings and not isinstance(model, CachedSegmenter):
                    model = CachedSegmenter(model, self.encodings[name])
                self._models[name] = model
        return model

    def lock(self, name: str) -> threading.Lock:
        """The lock to hold while running model ``name``."""
        return self.locks[name]

    def loaded(self) -> dict[str, bool]:
        """Model name -> built yet."""
        return {name: name in self._models for name in MODEL_NAMES}

    def preload(self, names: Sequence[str] = MODEL_NAMES) -> None:
        """Build ``names`` now rather than on the first request that needs them."""
        for name in names:
            self.get(name)

    def litemedsam(self) -> Any:
        return self.get("litemedsam")

    def medvlm(self) -> Any:
        return self.get("medvlm")

    def agent(self) -> Any:
        return self.get("grounding_agent")

    def _build_litemedsam(self) -> Any:
        from segmentation.registry import build_segmenter

        return build_segmenter("litemedsam")

    def _build_medvlm(self) -> Any:
        from segmentation.registry import build_segmenter

        kwargs = {"checkpoint": self.medvlm_checkpoint} if self.medvlm_checkpoint else {}
        return build_segmenter("medvlm", **kwargs)

    def _build_agent(self) -> Any:
        from agents.grounders.medvlm import MedVLMGrounder
        from agents.pipeline import GroundingAgent

        grounder = MedVLMGrounder(segmenter=self.medvlm())
        return GroundingAgent(grounder, refine="auto", check="repair", refiner=self.litemedsam())

    # ------------------------------------------------------------------------------------------------ images

    def load_image(self, data: bytes, slice_index: int | None = None) -> Any:
        """Decode an uploaded file (bytes) with :func:`medvlm.io.load_image`; the same bytes give the same
        :class:`~medvlm.io.MedicalImage` object (treat it as read-only), tagged with its content key."""
        from medvlm.io import MAX_PIXELS_DEFAULT, load_image

        key = content_key(data, slice_index)

        def build() -> Any:
            image = load_image(data, slice_index=slice_index, max_pixels=self.max_pixels or MAX_PIXELS_DEFAULT)
            image.meta[KEY_META] = key
            return image

        return self.images.get_or_create(key, build)
