"""Feature cache for Med-VLM training: the frozen image-encoder prefix of every (augmented) training image.

Nothing before the first LoRA-adapted encoder stage trains, so its output is computed once per image variant
and stored (float16) with the image's letterboxed masks. Training then runs only the adapted stages, the
mixer and the decoder: on CPU this is what makes training feasible (the TinyViT prefix is ~1.1 s per image,
the rest ~0.1 s).

Layout of ``cache_dir``: ``index.json`` ({"encoder": ..., "entries": [...]}) and one ``<key>.pt`` per image
variant holding ``{"prefix": (N, C) or (C, h, w) float16, "masks": {name: (S, S) bool}, "content": (h, w)}``.
A cache built for another encoder config is refused (the key includes it). Building resumes: variants whose
file exists are skipped, and :class:`FeatureCache` takes each entry's structures from its file (a run with
another seed draws other augmentations than the stored ones).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from medvlm.datasets import Sample
from medvlm.errors import input_error
from medvlm.io import atomic_open, model_input_rgb
from segmentation.textseg.wholes import add_wholes, annotated_with_wholes
from segmentation.textseg.zoom import Window, random_zoom_window

__all__ = ["CacheEntry", "FeatureCache", "augment", "build_cache", "letterbox_mask"]

@dataclass(frozen=True)
class CacheEntry:
    """One cached image variant: ``key`` names its file; ``structures`` are the masks it holds."""

    key: str
    dataset: str
    sample_id: str
    variant: int
    modality: str
    structures: tuple[str, ...]
    absent: tuple[str, ...]  # structures the dataset annotates that this image does not contain
    site: str = ""  # the reader's site hint (picks e.g. the cardiac vs brain MR view sentence)
    #: a zoom variant's window (top, left, side) in pixels of the original image; None for the whole image
    window: tuple[int, int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "dataset": self.dataset, "sample_id": self.sample_id, "variant": self.variant,
                "modality": self.modality, "structures": list(self.structures), "absent": list(self.absent),
                "site": self.site, "window": None if self.window is None else list(self.window)}


def letterbox_mask(mask: npt.NDArray[np.bool_], size: int) -> npt.NDArray[np.bool_]:
    """A bool ``(H, W)`` mask -> ``(size, size)`` in the letterbox frame (content top-left, longer side = size).

    Area-averaged and thresholded at 0.5, so thin structures keep their width on average."""
    import torch.nn.functional as F

    from medvlm.coords import letterbox_content_shape

    h, w = mask.shape
    ch, cw = letterbox_content_shape(h, w, size)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    small = F.interpolate(t, size=(ch, cw), mode="area" if ch <= h else "bilinear",
                          align_corners=None if ch <= h else False)[0, 0]
    out = np.zeros((size, size), dtype=bool)
    out[:ch, :cw] = small.numpy() >= 0.5
    return out


def augment(rgb: npt.NDArray[np.uint8], masks: dict[str, npt.NDArray[np.bool_]], rng: np.random.Generator,
            ) -> tuple[npt.NDArray[np.uint8], dict[str, npt.NDArray[np.bool_]]]:
    """A random similarity transform (scale 0.9-1.1, rotation +-8 degrees, shift +-5 %) and a gamma/contrast
    change, applied to the image and its masks together. Never a left-right flip: laterality is the label. A
    colour image (channels not equal) also gets a per-channel gain of up to +-8 %: cameras and dermatoscopes
    differ in white balance; a grey image stays grey (and draws what it drew before)."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = float(rng.uniform(0.9, 1.1))
    angle = math.radians(float(rng.uniform(-8, 8)))
    tx, ty = float(rng.uniform(-0.05, 0.05)) * w, float(rng.uniform(-0.05, 0.05)) * h
    cx, cy = w / 2, h / 2
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # PIL's affine maps OUTPUT pixel (x, y) to INPUT (a x + b y + c, d x + e y + f): the inverse transform.
    a, b, d, e = cos, sin, -sin, cos
    c = cx - a * (cx + tx) - b * (cy + ty)
    f = cy - d * (cx + tx) - e * (cy + ty)
    coeffs = (a, b, c, d, e, f)
    img = Image.fromarray(rgb).transform((w, h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    out_rgb = np.asarray(img).astype(np.float32) / 255.0
    gamma = float(np.exp(rng.uniform(-0.3, 0.3)))
    contrast = float(rng.uniform(0.85, 1.15))
    out_rgb = np.clip((out_rgb ** gamma - 0.5) * contrast + 0.5, 0, 1)
    if rgb.ndim == 3 and not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
        out_rgb = np.clip(out_rgb * np.exp(rng.uniform(-0.08, 0.08, size=3)).astype(np.float32), 0, 1)
    out_masks = {}
    for name, m in masks.items():
        mi = Image.fromarray(m.astype(np.uint8) * 255).transform((w, h), Image.Transform.AFFINE, coeffs,
                                                                 resample=Image.Resampling.BILINEAR)
        out_masks[name] = np.asarray(mi) >= 128
    return (out_rgb * 255).round().astype(np.uint8), {k: v for k, v in out_masks.items() if v.any()}


def _digest(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


def encoder_key(encoder_config: dict[str, Any], first_adapted: int) -> str:
    blob = json.dumps({"encoder": encoder_config, "first_adapted": first_adapted}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _modality(sample: Sample) -> str:
    mod = str(getattr(sample.image, "modality", "") or "").upper()
    return mod or "unknown"


def build_cache(encoder: Any, items: Iterable[tuple[str, Sample, int, Sequence[str]]], cache_dir: str | Path,
                *, seed: int = 0, progress: bool = True,
                prefix_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 8,
                wholes: bool = False, zooms: Mapping[str, int] | None = None,
                slice_context: int = 0, color_input: bool = False) -> list[CacheEntry]:
    """Encode every ``(dataset, sample, n_variants, annotated structures)`` into ``cache_dir``; returns entries.

    Variant 0 is the image as is, variants 1.. are :func:`augment` draws seeded by (seed, sample id, variant).
    Existing files are reused (a killed build resumes). ``encoder`` is a ``segmentation.textseg.encoders.
    ImageEncoder``; the index records its config so that a mismatching cache is refused by :class:`FeatureCache`.
    ``prefix_fn`` maps a batch of encoder inputs ``(B, 3, S, S)`` to the frozen prefix (default
    ``encoder.prefix``; e.g. an OpenVINO-compiled copy); images go through it ``batch_size`` at a time.
    ``wholes``: also store the wholes of present parts (:func:`add_wholes`).
    ``zooms``: dataset name -> zoom variants per image (keys ``...__z<k>``): the crop of a
    :func:`~segmentation.textseg.zoom.random_zoom_window` seeded by (seed, sample id, k), augmented from k = 1 on,
    with the masks' parts inside it; what the ``zoom`` postprocess operation shows the model at inference.
    ``slice_context``: recorded in the index (the items' volume slices carry that many neighbours, see
    ``finetune.textseg_train.slice_with_context``); a folder built with another value is refused, since its
    files would be reused for images they do not show.
    ``color_input``: colour images are encoded in colour, else from their luminance
    (:func:`medvlm.io.model_input_rgb`); recorded in the index (``color_images``), and a folder built the other
    way is refused when the items include a colour image.
    """
    from tqdm.auto import tqdm

    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    work = list(items)
    if (root / "index.json").is_file():
        index_before = json.loads((root / "index.json").read_text())
        _check_slice_context(index_before, slice_context, root)
        if any(getattr(s.image, "color", None) is not None for _, s, _, _ in work):
            _check_color(index_before, color_input, root)
    enc_key = encoder_key(_encoder_json(encoder), encoder.first_adapted)
    size = encoder.config.image_size
    entries: list[CacheEntry] = []
    zooms = dict(zooms or {})
    total = sum(n + zooms.get(d, 0) for d, _, n, _ in work)
    bar = tqdm(total=total, desc="caching encoder features", disable=not progress)
    run = prefix_fn if prefix_fn is not None else encoder.prefix
    pending: list[tuple[Path, npt.NDArray[np.float32], tuple[int, int], dict[str, npt.NDArray[np.bool_]],
                        tuple[int, int, int] | None]] = []

    def flush() -> None:
        if not pending:
            return
        with torch.no_grad():
            prefixes = run(torch.from_numpy(np.stack([chw for _, chw, _, _, _ in pending]))).to(torch.float16)
        for (path, _, content, masks, window), prefix in zip(pending, prefixes):
            # clone: a row of the batch is a view, and torch.save would write the whole batch's storage
            payload: dict[str, Any] = {
                "prefix": prefix.clone(), "content": torch.tensor(content),
                "masks": {name: torch.from_numpy(letterbox_mask(m, size)) for name, m in masks.items()}}
            if window is not None:
                payload["window"] = list(window)
            with atomic_open(path, "wb") as fh:
                torch.save(payload, fh)
        bar.update(len(pending))
        pending.clear()

    for dataset, sample, n_variants, dataset_structures in work:
        base_rgb = model_input_rgb(sample.image, color=color_input, slice_context=slice_context)
        annotated = annotated_with_wholes(dataset_structures) if wholes else tuple(dataset_structures)
        draws: list[tuple[str, int, Window | None]] = [(f"v{v}", v, None) for v in range(n_variants)]
        for k in range(zooms.get(dataset, 0)):
            window = random_zoom_window(sample.masks, base_rgb.shape[:2], np.random.default_rng(
                _digest(f"{seed}:{dataset}:{sample.id}:z{k}")))
            if window is not None:
                draws.append((f"z{k}", k, window))
        for tag, v, window in draws:
            key = f"{dataset}__{sample.id}__{tag}".replace("/", "_")
            path = root / f"{key}.pt"
            rgb, masks = base_rgb, dict(sample.masks)
            if window is not None:
                rgb = np.ascontiguousarray(window.crop(base_rgb))
                masks = {n: np.ascontiguousarray(window.crop(np.asarray(m, dtype=bool))) for n, m in masks.items()}
                masks = {n: m for n, m in masks.items() if m.any()}
            if v > 0:  # whole-image variants keep their historical seeds (existing caches stay valid)
                draw = f"{seed}:{dataset}:{sample.id}:" + (tag if window is not None else str(v))
                rgb, masks = augment(rgb, masks, np.random.default_rng(_digest(draw)))
            if wholes:
                masks = add_wholes(masks)
            structures = tuple(sorted(masks))
            absent = tuple(s for s in annotated if s not in masks)
            box = None if window is None else (window.top, window.left, window.side)
            entries.append(CacheEntry(key, dataset, sample.id, v, _modality(sample), structures, absent,
                                      str(sample.meta.get("site", "") or ""), box))
            if path.is_file():
                bar.update(1)
                continue
            chw, content = encoder.preprocess(rgb)
            pending.append((path, chw, content, masks, box))
            if len(pending) >= batch_size:
                flush()
    flush()
    bar.close()
    index = {"encoder_key": enc_key, "encoder": _encoder_json(encoder), "slice_context": int(slice_context),
             "color_images": _color_images(color_input), "entries": [e.to_json() for e in entries]}
    with atomic_open(root / "index.json", "w") as fh:
        json.dump(index, fh, indent=1)
    return entries


def _check_slice_context(index: Mapping[str, Any], slice_context: int, root: Path) -> None:
    had = int(index.get("slice_context", 0))  # caches from before the key showed every slice alone
    if had != int(slice_context):
        raise input_error("feature cache", expected=f"a cache built with slice_context {slice_context}",
                          received=f"slice_context {had} in {root}",
                          fix="give this run its own cache_dir (neighbouring slices change every volume image)")


def _color_images(color_input: bool) -> str:
    """How a cache shows colour images to the encoder (its index's ``color_images``)."""
    return "rgb" if color_input else "luminance"


def _check_color(index: Mapping[str, Any], color_input: bool, root: Path) -> None:
    # indexes from before colour images kept their colour lack the key: they were encoded from the luminance
    had = str(index.get("color_images", "luminance"))
    if had != _color_images(color_input):
        raise input_error("feature cache", expected=f"a cache whose colour images were encoded as "
                          f"{_color_images(color_input)!r} (color_input: {str(color_input).lower()})",
                          received=f"color_images {had!r} in {root}",
                          fix="give this run its own cache_dir (or set color_input to match this cache)")


def _encoder_json(encoder: Any) -> dict[str, Any]:
    from dataclasses import asdict

    cfg = asdict(encoder.config)
    # LoRA hyper-parameters do not change the frozen prefix, only which stage it ends at.
    for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_last_stages"):
        cfg.pop(k, None)
    return cfg


def _as_stored(entry: CacheEntry, payload: dict[str, Any]) -> CacheEntry:
    """``entry`` with the structures (and window) of the file it names. A build reuses the files that exist, but
    an augmented variant is drawn from the build's seed: a run with another seed over the same cache computes the
    index's structures from a draw that is not the stored one (a structure shifted out of the image, or into it),
    so the file, whose image and masks belong together, is what counts."""
    stored = tuple(sorted(payload["masks"]))
    window = payload.get("window")
    window_t = None if window is None else (int(window[0]), int(window[1]), int(window[2]))
    if stored == entry.structures and (window is None or window_t == entry.window):
        return entry
    annotated = set(entry.structures) | set(entry.absent)
    return replace(entry, structures=stored, absent=tuple(sorted(annotated - set(stored))),
                   window=window_t if window is not None else entry.window)


class FeatureCache:
    """Cached prefixes and masks, loaded into memory (float16). ``entries`` lists what is there."""

    def __init__(self, cache_dir: str | Path, encoder: Any, keys: Sequence[str] | None = None, *,
                 slice_context: int = 0):
        root = Path(cache_dir)
        index_path = root / "index.json"
        if not index_path.is_file():
            raise input_error("feature cache", expected=f"{index_path}", received="missing",
                              fix="build it first (medvlm train medvlm CONFIG.yaml does)")
        index = json.loads(index_path.read_text())
        want = encoder_key(_encoder_json(encoder), encoder.first_adapted)
        if index.get("encoder_key") != want:
            raise input_error("feature cache", expected=f"a cache built for encoder key {want}",
                              received=f"key {index.get('encoder_key')} in {root}",
                              fix="use another cache_dir or delete this one; the encoder or its LoRA stages changed")
        _check_slice_context(index, slice_context, root)
        entries = [CacheEntry(e["key"], e["dataset"], e["sample_id"], int(e["variant"]), e["modality"],
                              tuple(e["structures"]), tuple(e["absent"]), e.get("site", ""),
                              None if e.get("window") is None else tuple(e["window"]))
                   for e in index["entries"]]
        if keys is not None:
            wanted = set(keys)
            entries = [e for e in entries if e.key in wanted]
        self.entries = entries
        self.prefix: dict[str, torch.Tensor] = {}
        self.masks: dict[str, dict[str, torch.Tensor]] = {}
        for i, e in enumerate(entries):
            payload = torch.load(root / f"{e.key}.pt", map_location="cpu", weights_only=True)
            self.prefix[e.key] = payload["prefix"].clone()  # own storage (files of older builds held views)
            self.masks[e.key] = payload["masks"]
            entries[i] = _as_stored(e, payload)
