"""Text-guided segmentation with a trained Med-VLM checkpoint, behind the same protocol as the promptable ones.

``MedVLMSegmenter.encode(image)`` runs the whole image encoder (frozen base + LoRA) once; every text prompt
then costs one text-encoder + mixer + decoder pass on the cached features. Masks come back at the original
resolution (pixel grid of the input image), like the promptable backends' masks.

Precision (``precision=`` / ``--precision`` / ``$MEDVLM_PRECISION``, see :mod:`segmentation.runtime`): the image
encoder (TinyViT with its LoRA merged into the base weights) and the text encoder (MiniLM with its LoRA merged,
plus the text projection; batch and length dynamic) run through OpenVINO for ``auto`` (bf16 on CPUs with bf16
units, else f32) and ``bf16``; ``fp32`` keeps the torch reference. A segmenter started from an inference bundle
(``light``, :mod:`segmentation.textseg.bundle`) runs the heads from their IR too and never imports torch: its
embeddings' ``features`` are numpy arrays; otherwise the mixer and decoder run in torch fp32. The
text features of the last ``text_cache_size`` distinct texts are cached (keyed by the exact text the model
reads), so a repeated vocabulary phrase skips the text encoder.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from medvlm.coords import letterbox_frame
from medvlm.errors import input_error
from medvlm.io import MedicalImage, model_input_rgb
from medvlm.types import Mask
from segmentation.base import ImageEmbedding, ImageInput, Prompt, SegmentationResult, SegmenterBase, as_rgb_uint8
from segmentation.runtime import (
    CompiledEncoder,
    CompiledTextEncoder,
    EncoderPlan,
    compile_encoder,
    compile_text_encoder,
    encoder_plan,
)
from segmentation.textseg.kind_gate import KindClassifier, KindVerdict
from segmentation.textseg.postprocess import ENCODING_OPS, PostprocessPolicy, postprocess_mask, refine_by_boxes
from segmentation.textseg.specialists import read_specialists, shares_image_encoder

__all__ = ["DEFAULT_CHECKPOINT_ENV", "MedVLMSegmenter", "default_checkpoint_dir", "expand_text", "packaged_checkpoints",
           "resolve_checkpoint"]

DEFAULT_CHECKPOINT_ENV = "MEDVLM_TEXTSEG_CHECKPOINT"
#: names the forward code of the exported Med-VLM image encoder in the OpenVINO IR cache key
IMAGE_EXPORT_KEY = "medvlm-image-encoder/1"
TEXT_EXPORT_KEY = "medvlm-text-encoder+proj/1"
POSTPROCESS_MODES = ("full", "masks", "off")


def _weights_root() -> Path:
    return Path(str(resources.files("segmentation.textseg").joinpath("weights")))


def packaged_checkpoints() -> dict[str, Path]:
    """The checkpoints shipped in the package, by name: ``default`` (chest X-ray), ``multi`` (every modality,
    with the existence head); each a folder under ``segmentation/textseg/weights``."""
    root = _weights_root()
    return {d.name: d for d in sorted(root.iterdir()) if (d / "config.json").is_file()} if root.is_dir() else {}


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A checkpoint folder from a path, or from the name of a packaged checkpoint (``multi``, ``default``) when no
    such path exists here."""
    path = Path(checkpoint)
    if path.exists():
        return path
    packaged = packaged_checkpoints()
    if str(checkpoint) in packaged:
        return packaged[str(checkpoint)]
    if len(path.parts) == 1:  # a bare name that is neither a folder here nor packaged
        raise input_error("Med-VLM checkpoint", expected=f"a checkpoint folder or a packaged name "
                          f"({', '.join(packaged) or 'none installed'})", received=repr(str(checkpoint)),
                          fix="pass e.g. --checkpoint multi, or the folder written by `medvlm train medvlm`")
    return path  # a missing folder: load_medvlm names what it expected there


def default_checkpoint_dir() -> Path:
    """The checkpoint shipped in the package (``segmentation/textseg/weights/default``), or
    ``$MEDVLM_TEXTSEG_CHECKPOINT`` (a folder or a packaged name such as ``multi``) when set."""
    env = os.environ.get(DEFAULT_CHECKPOINT_ENV)
    if env:
        return resolve_checkpoint(env)
    return _weights_root() / "default"


def expand_text(text: str, level: str = "complex", modality: str | None = None) -> tuple[str, str | None]:
    """A user phrase -> the text the model reads, and the canonical structure it names (or None).

    A phrase that names a known structure or one of its synonyms ("cardiac silhouette") is replaced by that
    structure's description at ``level`` (the model was trained on those); any other text, such as a
    description the user wrote, is passed through unchanged.
    """
    from prompts.anatomy import describe, resolve_structure

    name = resolve_structure(text)
    if name is None or level == "verbatim":
        return text, name
    return describe(name, "simple" if level == "simple" else "complex", modality=modality), name


def _sigmoid(x: Any) -> Any:
    # exp overflows to inf for logits below about -88 in float32, and 1 / (1 + inf) is the right answer, 0
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float32)))


@functools.lru_cache(maxsize=2)
def _load(directory: str, device: str) -> tuple[Any, dict[str, Any]]:
    from segmentation.textseg.checkpoint import load_medvlm

    return load_medvlm(directory, device)


ROUTES_FILE = "routes.json"


def _features_as(embedding: ImageEmbedding, light: bool) -> ImageEmbedding:
    """``embedding`` with its features as a segmenter started from a bundle (numpy) or from torch wants them; the
    same ``extra`` dict, so what a specialist caches there (the refiner's embedding) stays with the image."""
    import dataclasses

    features = embedding.features
    if light and not isinstance(features, np.ndarray):
        features = features.float().cpu().numpy()
    elif not light and isinstance(features, np.ndarray):
        import torch

        features = torch.from_numpy(features)
    return embedding if features is embedding.features else dataclasses.replace(embedding, features=features)


def read_routes(directory: str | Path) -> dict[str, Any] | None:
    """The ``routes.json`` of checkpoint folder ``directory`` (see :class:`MedVLMSegmenter`, ``route``), validated,
    with ``otherwise`` resolved to a folder (a packaged name, or a path relative to ``directory``); None when the
    folder has none."""
    from medvlm.datasets.kinds import KIND_STRUCTURES

    path = Path(directory) / ROUTES_FILE
    if not path.is_file():
        return None
    import json

    try:
        routes = json.loads(path.read_text())
    except ValueError as exc:
        raise input_error("Med-VLM routes", expected="JSON", received=f"{path}: {exc}", fix="fix or delete it") from exc
    kinds = routes.get("kinds") if isinstance(routes, dict) else None
    other = routes.get("otherwise") if isinstance(routes, dict) else None
    confidence = routes.get("min_confidence", 0.9) if isinstance(routes, dict) else None
    modalities = routes.get("modalities", []) if isinstance(routes, dict) else None
    if (not isinstance(kinds, list) or not kinds or any(k not in KIND_STRUCTURES for k in kinds)
            or not isinstance(other, str) or not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1
            or not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities)):
        raise input_error("Med-VLM routes", expected='{"kinds": [kinds of image among '
                          f'{sorted(KIND_STRUCTURES)}], "modalities": ["CR", "DX"], "otherwise": "multi" or a '
                          'folder, "min_confidence": 0.9}', received=f"{path}: {routes!r}"[:300],
                          fix="fix or delete it")
    relative = Path(directory) / other
    target = relative if relative.is_dir() else resolve_checkpoint(other)
    if target.resolve() == Path(directory).resolve():
        raise input_error("Med-VLM routes", expected="another checkpoint in otherwise", received=other,
                          fix="name a different checkpoint, e.g. multi")
    return {"kinds": list(kinds), "modalities": [m.strip().upper() for m in modalities], "otherwise": target,
            "min_confidence": float(confidence)}


class MedVLMSegmenter(SegmenterBase):
    """Med-VLM text-guided segmenter. Prompts carry ``text``; boxes and points are rejected.

    ``checkpoint``: a folder written by ``save_medvlm`` (default: :func:`default_checkpoint_dir`).
    ``text_level``: how a known structure name is expanded before the model reads it (``complex`` = the
    description the default checkpoint was mostly trained with, ``simple``, or ``verbatim`` = no expansion).
    ``threshold``: on the mask probability; ``existence_threshold``: on the existence head's probability (when the
    checkpoint has one). Each result's ``meta["found"]`` says whether the structure was found (then the mask is
    non-empty) and ``meta["existence"]`` carries the head's probability (``None`` without a head).
    ``precision``: ``auto``/``fp32``/``bf16`` for the image encoder (module docstring); ``text_cache_size``: text
    features kept (0 = no cache); ``encode_batch_size``: images per encoder call in :meth:`encode_batch`.
    ``light``: with OpenVINO, start from the checkpoint's inference bundle when one was saved (no torch encoders
    built: ~7 s less to start on 2 cores; :mod:`segmentation.textseg.bundle`); ``self.light`` says whether it did,
    and :meth:`torch_model` builds the full model when something needs it (Grad-CAM).
    ``kind_gate``: when the checkpoint carries a kind classifier (:mod:`segmentation.textseg.kind_gate`), a
    structure that no likely kind of image can show is "not found" (``meta["ruled_out_by_kind"]``): the kinds that
    could show it have less than ``1 - kind_confidence`` probability together; ``meta["image_kind"]`` carries the
    verdict.
    ``empty_fallback``: when the existence head says the structure is there but no pixel passes ``threshold``
    (a faint mask: small or low-contrast structures such as the pancreas), the mask is the pixels above half of
    the map's peak probability instead of nothing, so "found" and a non-empty mask always go together
    (``meta["mask_threshold"]`` says which threshold made the mask).
    ``route``: a checkpoint folder with a ``routes.json`` (``{"kinds": [...], "modalities": [...], "otherwise":
    CHECKPOINT, "min_confidence": p}``) keeps the images whose DICOM modality is one of ``modalities`` and, when
    the modality is unknown (PNG, JPEG), those its kind classifier is ``p`` sure are of ``kinds``; every other
    image (another known modality, or another kind) goes to the ``otherwise`` checkpoint (built on first need,
    encoded by it alone when the modality already says so). The packaged default is the chest X-ray model for
    radiographs and ``multi`` for CT, MR, ultrasound, dermoscopy and endoscopy. A routed embedding says where it
    went (``extra["routed_to"]``); :meth:`meta_for` gives the training meta of the model that answers a dataset.
    ``compose_wholes``: a checkpoint trained without wholes (``train_config.wholes`` false, e.g. the chest X-ray
    default) answers a phrase naming a whole of parts ("lung", "clavicles", "kidneys") with the union of its
    parts' masks (``meta["parts"]``), found when any part is; ``None`` (default) = when the checkpoint needs it.
    ``postprocess``: the per-structure mask operations the checkpoint's ``postprocess.json`` chose on its training
    images (:mod:`segmentation.textseg.postprocess`): ``full`` (default) runs them all, ``masks`` all but
    those that encode pixels again (``refine_box``: LiteMedSAM on the image; ``zoom``: this encoder on windows
    around the mask, :meth:`zoom_mask`), ``off`` none. A found mask that was
    postprocessed says so in ``meta["postprocess"]`` (the operations applied) and
    ``meta["pixels_before_postprocess"]``; ``logits`` stay the decoder's. An embedding whose ``extra`` carries
    ``"postprocess"`` overrides the option for its image (a volume's slices: ``off``). ``refiner``: the promptable
    segmenter of ``refine_box`` (default: LiteMedSAM with this precision, built on first need).
    ``specialists`` (default: as ``route``): a checkpoint folder with a ``specialists.json``
    (:mod:`segmentation.textseg.specialists`) hands the prompts of an image its kind classifier assigns to a
    specialist's kind to that checkpoint, which decodes them on this checkpoint's embedding (same image encoder,
    checked when it is built); results say so in ``meta["specialist"]``.
    """

    name = "medvlm"
    accepts_geometry = False
    accepts_text = True
    max_batch = 8

    def __init__(self, checkpoint: str | Path | None = None, *, device: str = "cpu", text_level: str = "complex",
                 threshold: float = 0.5, existence_threshold: float = 0.5, precision: str | None = None,
                 text_cache_size: int = 256, encode_batch_size: int = 8, light: bool = True,
                 kind_gate: bool = True, kind_confidence: float = 0.9, empty_fallback: bool = True,
                 route: bool = True, compose_wholes: bool | None = None, postprocess: str = "full",
                 refiner: Any = None, specialists: bool | None = None) -> None:
        directory = resolve_checkpoint(checkpoint) if checkpoint is not None else default_checkpoint_dir()
        if text_level not in ("complex", "simple", "verbatim"):
            raise input_error("text_level", expected="'complex', 'simple' or 'verbatim'", received=repr(text_level),
                              fix="use 'complex' (default)")
        if postprocess not in POSTPROCESS_MODES:
            raise input_error("postprocess", expected=f"one of {POSTPROCESS_MODES}", received=repr(postprocess),
                              fix="use 'full' (default), 'masks' (no second encoder) or 'off'")
        self.checkpoint = str(directory)
        self.device = device
        self.postprocess = postprocess
        self.postprocess_policy = PostprocessPolicy.load(directory) if postprocess != "off" else None
        self._refiner: Any = refiner
        self.text_level = text_level
        self.threshold = threshold
        self.existence_threshold = existence_threshold
        # validated now (a bad --precision fails before the model loads); the OpenVINO encoder is built on first use
        self.plan: EncoderPlan = encoder_plan(precision, device)
        self.text_cache_size = max(0, int(text_cache_size))
        self.encode_batch_size = max(1, int(encode_batch_size))
        self._lock = threading.Lock()
        self._compiled: CompiledEncoder | None = None
        self._compiled_text: CompiledTextEncoder | None = None
        self._bundle: Path | None = None  # where this checkpoint's bundle is (or will be written)
        self.light = False  # True: encoders from a saved bundle, no torch encoders built (bundle module)
        if self.plan.engine == "openvino" and device == "cpu" and light:
            self._start_from_bundle(directory.resolve())
        if not self.light:
            self.model, self.meta = _load(str(directory.resolve()), device)
        self._text_cache: OrderedDict[str, Any] = OrderedDict()  # text read -> (L, d) projected text features
        self.kind_confidence = float(kind_confidence)
        self.empty_fallback = bool(empty_fallback)
        self.kind_gate = bool(kind_gate)
        self.routes = read_routes(directory) if route else None
        self.kind_classifier: KindClassifier | None = (KindClassifier.load(directory) if kind_gate or self.routes
                                                       else None)
        if self.routes is not None and self.kind_classifier is None:
            raise input_error("Med-VLM routes", expected=f"a kind classifier beside {ROUTES_FILE} in {directory}",
                              received="none", fix="fit one: python -m finetune.kind_classifier --checkpoint "
                              f"{directory}; or delete {ROUTES_FILE}")
        self._routed: MedVLMSegmenter | None = None
        self._use_specialists = route if specialists is None else bool(specialists)
        self.specialists = read_specialists(directory, resolve_checkpoint) if self._use_specialists else None
        if self.specialists is not None and self.kind_classifier is None:
            raise input_error("Med-VLM specialists", expected=f"a kind classifier in {directory}", received="none",
                              fix=f"fit one: python -m finetune.kind_classifier --checkpoint {directory}")
        self._specialist_models: dict[str, MedVLMSegmenter] = {}
        self._host: str | None = None  # a specialist: the broad checkpoint whose embeddings it decodes
        # a specialist that adapted its image encoder (specialists.py): it encodes the images it answers itself
        self._own_encoder = False
        # the segmenter that built this one (routes, specialists): its refiner serves this one too, so a process
        # holds one LiteMedSAM and a refiner given to the front segmenter is the one every hand-over uses
        self._parent: MedVLMSegmenter | None = None
        trained_wholes = bool(self.meta.get("train_config", {}).get("wholes"))
        self.compose_wholes = (not trained_wholes) if compose_wholes is None else bool(compose_wholes)
        self._route_lock = threading.Lock()
        self._options: dict[str, Any] = {"device": device, "text_level": text_level, "threshold": threshold,
                         "existence_threshold": existence_threshold, "precision": precision,
                         "text_cache_size": text_cache_size, "encode_batch_size": encode_batch_size, "light": light,
                         "kind_gate": kind_gate, "kind_confidence": kind_confidence,
                         "empty_fallback": empty_fallback, "compose_wholes": compose_wholes,
                         "postprocess": postprocess}

    def _start_from_bundle(self, directory: Path) -> None:
        from segmentation.runtime import load_ir_encoder, load_ir_text_encoder
        from segmentation.textseg.bundle import bundle_dir, load_bundle

        try:
            self._bundle = bundle_dir(directory, (IMAGE_EXPORT_KEY, TEXT_EXPORT_KEY))
        except OSError:  # no readable checkpoint files: the full load below says what is missing
            return
        found = load_bundle(self._bundle, self.plan.requested)
        if found is None:
            return
        model, meta, image_xml, text_xml = found
        size = model.image_encoder.config.image_size
        try:
            self._compiled = load_ir_encoder(image_xml, (3, size, size), self.plan.requested,
                                             max_batch=self.encode_batch_size)
            self._compiled_text = load_ir_text_encoder(text_xml, self.plan.requested)
        except (FileNotFoundError, RuntimeError):  # deleted or unreadable between the check and now
            self._compiled = self._compiled_text = None
            return
        self.model, self.meta, self.light = model, meta, True

    def _save_bundle(self) -> None:
        """Write the bundle once an encoder is compiled in this process (the full model is at hand), compiling the
        other one first if this process has not: a broad checkpoint whose prompts all go to its specialists never
        runs its text encoder, and a specialist never runs its image encoder (it decodes its host's features), so
        waiting for both would leave them without a bundle, loading the full torch model in every process. The
        other encoder's IR is usually in the cache already (a specialist's image encoder is its host's, bit for
        bit, and the IR cache is keyed by weights)."""
        if self.light or self._bundle is None or (self._bundle / "manifest.json").is_file():
            return
        if self._compiled is None and self.plan.compiled:
            self._compile_image_encoder()
        if self._compiled_text is None and self.plan.engine == "openvino":
            self._compile_text_encoder()
        if self._compiled is None or self._compiled_text is None or self._compiled.ir_path is None:
            return
        from segmentation.textseg.bundle import write_bundle

        try:
            write_bundle(self._bundle, self.model, self._compiled.ir_path, self._compiled_text.ir_path, self.meta)
        except (OSError, ValueError) as exc:  # a read-only cache: the next process builds the full model again
            import logging

            logging.getLogger(__name__).warning("could not write the Med-VLM bundle %s (%s)", self._bundle, exc)

    def torch_model(self) -> Any:
        """The full torch model (encoders included): ``self.model``, or, for a segmenter started from a bundle,
        the checkpoint built in full (cached per process)."""
        if not self.light:
            return self.model
        return _load(str(Path(self.checkpoint).resolve()), self.device)[0]

    @property
    def weights(self) -> str:
        return self.checkpoint

    @property
    def slice_context(self) -> int:
        """The checkpoint's neighbouring-slice context (``MedVLMConfig.slice_context``; 0 = images read alone)."""
        return int(getattr(getattr(self.model, "config", None), "slice_context", 0) or 0)

    def volume_context(self) -> int:
        """How many slices above and below each slice of a volume should carry (``Volume.slice_image(k,
        context=...)``): the largest ``slice_context`` of every checkpoint that may answer a slice (this one, its
        routes' ``otherwise`` checkpoint and their specialists; their configs are read, no model is built); 0 when
        none was trained with neighbours. A checkpoint that was not trained with them reads the grey centre."""
        from segmentation.textseg.checkpoint import read_checkpoint_config

        answering = {Path(self.checkpoint)}
        if self.specialists is not None:
            answering |= set(self.specialists["kinds"].values())
        if self.routes is not None:
            other = Path(self.routes["otherwise"])
            answering.add(other)
            spec = read_specialists(other, resolve_checkpoint) if self._use_specialists else None
            answering |= set(spec["kinds"].values()) if spec is not None else set()
        return max(read_checkpoint_config(d)[0].slice_context for d in answering)

    @property
    def color_input(self) -> bool:
        """Whether this checkpoint reads colour images in colour (``MedVLMConfig.color_input``), else their
        luminance."""
        return bool(getattr(getattr(self.model, "config", None), "color_input", False))

    def _input_rgb(self, image: ImageInput) -> Any:
        """What this checkpoint's encoder reads of ``image``: a :class:`~medvlm.volume.SliceWithNeighbours` shows
        its neighbours only to a checkpoint trained with them (every other checkpoint gets the grey centre), and a
        colour image is read in colour only by a checkpoint trained so (:func:`medvlm.io.model_input_rgb`)."""
        if isinstance(image, MedicalImage):
            return model_input_rgb(image, color=self.color_input, slice_context=self.slice_context)
        return as_rgb_uint8(image)

    @property
    def precision(self) -> str:
        """The resolved precision of the image encoder (``fp32`` or ``bf16``)."""
        return self.plan.precision

    def ir_paths(self) -> dict[str, Path]:
        """The OpenVINO IRs this segmenter runs, by part (``image``, ``text``, ``heads``: the last only when
        started from a bundle); empty on the torch path."""
        paths: dict[str, Path] = {}
        for part, compiled in (("image", self._compiled), ("text", self._compiled_text)):
            if compiled is not None and compiled.ir_path is not None:
                paths[part] = Path(compiled.ir_path)
        heads = getattr(getattr(self.model, "heads", None), "ir_path", None)
        if self.light and heads is not None:
            paths["heads"] = Path(heads)
        return paths

    def read_text(self, text: str, modality: str | None = None) -> str:
        """The text the model reads for a user phrase (:func:`expand_text` at this segmenter's level)."""
        return expand_text(text, self.text_level, modality)[0]

    def encoder_info(self) -> dict[str, Any]:
        """How the image encoder runs: the plan and, once built, the compiled encoder's description."""
        info: dict[str, Any] = self.plan.to_json()
        if self._compiled is not None:
            info.update(self._compiled.describe())
        if self._compiled_text is not None:
            info["text"] = self._compiled_text.describe()
        return info

    def _encode_text(self, ids: Any, mask: Any) -> Any:
        """``model.encode_text`` (text encoder + projection): ``(m, L)`` token ids and mask -> ``(m, L, d)``
        float32; through OpenVINO when the plan says so (built on first use). The caller holds the lock."""
        model = self.model
        if self.plan.engine != "openvino":
            return model.encode_text(ids, mask)
        if self._compiled_text is None:
            self._compile_text_encoder()
            self._save_bundle()
        assert self._compiled_text is not None  # just compiled
        return self._compiled_text(ids, mask).to(self.device)

    def _compile_text_encoder(self) -> None:
        model = self.model
        # an example WITH padding: tracing must keep the attention-mask branch (module docstring of runtime)
        ex_ids, ex_mask = model.text_encoder.tokenize(["chest", "the heart lies in the middle mediastinum"])
        self._compiled_text = compile_text_encoder(model.text_encoder.export_module(model.text_proj), ex_ids,
                                                   ex_mask, self.plan.requested, key=TEXT_EXPORT_KEY)

    def _compile_image_encoder(self) -> None:
        import torch

        encoder = self.model.image_encoder
        size = encoder.config.image_size
        self._compiled = compile_encoder(encoder.export_module(), torch.zeros(1, 3, size, size),
                                         self.plan.requested, key=IMAGE_EXPORT_KEY, max_batch=self.encode_batch_size)

    def _run_encoder(self, pixels: Any) -> Any:
        """``pixels (B, 3, S, S)`` float32 -> features ``(B, C, g, g)``; the caller holds the lock."""
        import torch

        encoder = self.model.image_encoder
        if not self.plan.compiled:
            with torch.inference_mode():
                return encoder(pixels)
        if self._compiled is None:
            self._compile_image_encoder()
            self._save_bundle()
        assert self._compiled is not None  # just compiled
        return self._compiled(pixels).to(self.device)

    def _embedding(self, image: ImageInput, rgb: Any, features: Any, content: tuple[int, int],
                   seconds: float) -> ImageEmbedding:
        height, width = rgb.shape[:2]
        size = self.model.image_encoder.config.image_size
        modality = getattr(image, "modality", None)
        extra = {"input_size": size, "content_shape": content, "modality": modality, "encode_s": seconds,
                 "precision": self.plan.precision, "engine": self.plan.engine}
        if self._needs_pixels():
            extra["rgb"] = rgb  # refine_box prompts the refiner on the same pixels; zoom crops them
        return ImageEmbedding(backend=self.name, original_size=(height, width), features=features,
                              frame=letterbox_frame(height, width, size), extra=extra)

    def _encode_own(self, image: ImageInput) -> ImageEmbedding:
        rgb = self._input_rgb(image)
        t0 = time.perf_counter()
        chw, content = self.model.image_encoder.preprocess(rgb)
        with self._lock:
            if self.light:
                assert self._compiled is not None  # set with self.light
                features = self._compiled.run_array(chw[None])
            else:
                import torch

                features = self._run_encoder(torch.from_numpy(chw)[None].to(self.device))
        return self._embedding(image, rgb, features, content, time.perf_counter() - t0)

    def _encode_batch_own(self, images: Sequence[ImageInput], rgbs: Sequence[Any] | None = None
                          ) -> list[ImageEmbedding]:
        """Embeddings of ``images``; ``rgbs``: the encoder's input pixels instead of :meth:`_input_rgb`'s."""
        if not images:
            return []
        t0 = time.perf_counter()
        rgbs = [self._input_rgb(im) for im in images] if rgbs is None else list(rgbs)
        prepared = [self.model.image_encoder.preprocess(rgb) for rgb in rgbs]
        if self.light:
            assert self._compiled is not None  # set with self.light
            with self._lock:
                arrays = self._compiled.run_array(np.stack([chw for chw, _ in prepared]))
            per_image = (time.perf_counter() - t0) / len(rgbs)
            return [self._embedding(im, rgb, arrays[i:i + 1].copy(), content, per_image)
                    for i, (im, rgb, (_, content)) in enumerate(zip(images, rgbs, prepared))]
        import torch

        feats = []
        # torch on the CPU: one image per forward. Measured on 2 AMD EPYC cores (Med-VLM's TinyViT, fp32):
        # 1.44 s per image at batch 1, 2.14 at batch 8 (larger activations fall out of the caches); the
        # OpenVINO encoder is flat in the batch size (0.71 s at 1 and 8) and keeps its mini-batches
        step = self.encode_batch_size if self.plan.compiled or not str(self.device).startswith("cpu") else 1
        for start in range(0, len(prepared), step):
            chunk = torch.from_numpy(np.stack([chw for chw, _ in prepared[start:start + step]])).to(self.device)
            with self._lock:
                feats.append(self._run_encoder(chunk))
        features = torch.cat(feats, dim=0)
        per_image = (time.perf_counter() - t0) / len(rgbs)
        # clone: an embedding must not keep the whole batch's features alive
        return [self._embedding(im, rgb, features[i:i + 1].clone(), content, per_image)
                for i, (im, rgb, (_, content)) in enumerate(zip(images, rgbs, prepared))]

    def routed_segmenter(self) -> MedVLMSegmenter | None:
        """The ``otherwise`` segmenter of this checkpoint's routes (built once, with this one's options), or None
        without routes."""
        if self.routes is None:
            return None
        with self._route_lock:  # a server's threads must not build it twice
            if self._routed is None:
                self._routed = MedVLMSegmenter(self.routes["otherwise"], **self._options, route=False,
                                               specialists=self._use_specialists)
                self._routed._parent = self
        return self._routed

    def specialist(self, kind: str) -> MedVLMSegmenter:
        """The specialist segmenter of ``kind`` (built once, with this one's options). One trained with the image
        encoder frozen decodes this checkpoint's embeddings; one that adapted its image encoder (its tensors
        differ from this checkpoint's) encodes the images it answers itself (:meth:`_with_specialist_input`)."""
        if self.specialists is None or kind not in self.specialists["kinds"]:
            known = sorted(self.specialists["kinds"]) if self.specialists is not None else []
            raise input_error("Med-VLM specialist", expected=f"a kind among {known}", received=repr(kind),
                              fix="ask for a kind listed in specialists.json")
        target = self.specialists["kinds"][kind]
        key = str(Path(target).resolve())  # kinds that share one specialist (skin, endoscopy) share its model
        with self._route_lock:
            if key not in self._specialist_models:
                specialist = MedVLMSegmenter(target, **self._options, route=False, specialists=False)
                specialist._host, specialist._parent = self.checkpoint, self
                specialist._own_encoder = not shares_image_encoder(self.checkpoint, target)
                if specialist._own_encoder and specialist.model.image_encoder.config.image_size != \
                        self.model.image_encoder.config.image_size:
                    raise input_error("Med-VLM specialist", expected=f"a checkpoint with the input size of "
                                      f"{self.checkpoint}", received=f"{kind}: {target}",
                                      fix="train it from this checkpoint (init_from), or remove it from "
                                      "specialists.json")
                self._specialist_models[key] = specialist
        return self._specialist_models[key]

    def _specialist_for(self, embedding: ImageEmbedding) -> MedVLMSegmenter | None:
        """The specialist that answers the image of ``embedding`` (this checkpoint's own embedding), or None."""
        if self.specialists is None:
            return None
        verdict = self._image_kind(embedding)
        if (verdict is None or verdict.kind not in self.specialists["kinds"]
                or verdict.probability < self.specialists["min_confidence"]):
            return None
        return self.specialist(verdict.kind)

    def _with_specialist_input(self, images: Sequence[ImageInput], embeddings: Sequence[ImageEmbedding]) -> None:
        """For each image that this checkpoint's classifier hands to a specialist which reads it differently (a
        volume slice with its neighbours, a colour image in colour; :meth:`_input_rgb`) or with an image encoder
        of its own (adapted in training), also encode what the specialist reads (with this checkpoint's encoder
        when the specialist shares it, else with the specialist's) into ``extra["specialist_input"]``: the
        classifier keeps reading what it was fitted on, the specialist reads what it was trained on, at the cost
        of one more encoder pass for those images only."""
        if self.specialists is None:
            return
        todo = []
        for image, embedding in zip(images, embeddings):
            if embedding.extra.get("routed_to"):
                continue
            specialist = self._specialist_for(embedding)
            if specialist is None:
                continue
            rgb = specialist._input_rgb(image)
            read = embedding.extra.get("rgb")  # what this checkpoint's encoder read, when it kept the pixels
            if specialist._own_encoder or not np.array_equal(rgb, self._input_rgb(image) if read is None else read):
                todo.append((image, embedding, specialist, rgb))
        if not todo:
            return
        t0 = time.perf_counter()
        by_encoder: dict[str, tuple[MedVLMSegmenter, list[int]]] = {}  # one batch per encoder
        for i, (_, _, specialist, _) in enumerate(todo):
            encoder = specialist if specialist._own_encoder else self
            by_encoder.setdefault(encoder.checkpoint, (encoder, []))[1].append(i)
        own: dict[int, ImageEmbedding] = {}
        for encoder, rows in by_encoder.values():
            own.update(zip(rows, encoder._encode_batch_own([todo[i][0] for i in rows],
                                                           rgbs=[todo[i][3] for i in rows])))
        for row, (image, embedding, specialist, rgb) in enumerate(todo):
            enc = own[row]
            # a slice's neighbours are for the encoder only: a refiner still reads the grey centre
            pixels = embedding.extra.get("rgb")  # None when postprocessing needs no pixels
            if pixels is not None and getattr(image, "color", None) is not None:
                pixels = rgb
            extra = {k: v for k, v in embedding.extra.items() if k not in ("rgb", "refiner_embedding")}
            if pixels is not None:
                extra["rgb"] = pixels
            embedding.extra["specialist_input"] = {"checkpoint": specialist.checkpoint, "features": enc.features,
                                                   "extra": extra}
        for _, embedding, _, _ in todo:
            embedding.extra["encode_s"] = float(embedding.extra.get("encode_s", 0.0)) + (
                time.perf_counter() - t0) / len(todo)

    def _encode_for(self, specialist: MedVLMSegmenter, embedding: ImageEmbedding) -> dict[str, Any]:
        """``extra["specialist_input"]`` for a specialist with its own image encoder when ``embedding`` (this
        checkpoint's) was made without it (not by :meth:`encode` / :meth:`encode_batch`): the pixels it kept,
        encoded by the specialist once and stored in the embedding; a clear error when it kept none."""
        rgb = embedding.extra.get("rgb")
        if rgb is None:
            raise input_error("Med-VLM embedding", expected=f"an embedding encoded by {self.checkpoint}'s encode() "
                              f"(which also encodes for the specialist {specialist.checkpoint})",
                              received="one without the specialist's features or the image's pixels",
                              fix="encode the image with this segmenter's encode() or encode_batch()")
        enc = specialist._encode_batch_own([rgb], rgbs=[rgb])[0]
        extra = {k: v for k, v in embedding.extra.items() if k not in ("specialist_input", "refiner_embedding")}
        embedding.extra["specialist_input"] = {"checkpoint": specialist.checkpoint, "features": enc.features,
                                               "extra": extra}
        return dict(embedding.extra["specialist_input"])

    def _other(self) -> MedVLMSegmenter:
        other = self.routed_segmenter()
        if other is None:  # only called with routes
            raise RuntimeError("no routes: nothing to hand the image to")
        return other

    def _keeps(self, embedding: ImageEmbedding) -> bool:
        """Whether this checkpoint answers the image of ``embedding`` (always, without routes)."""
        if self.routes is None:
            return True
        verdict = self._image_kind(embedding)
        return (verdict is not None and verdict.kind in self.routes["kinds"]
                and verdict.probability >= self.routes["min_confidence"])

    def _mark_routed(self, embedding: ImageEmbedding, verdict: KindVerdict | None) -> ImageEmbedding:
        embedding.extra["routed_to"] = self._other().checkpoint
        embedding.extra["routed_from"] = {"checkpoint": self.checkpoint,
                                          "image_kind": None if verdict is None else verdict.to_json()}
        return embedding

    def _modality_keeps(self, image: ImageInput) -> bool | None:
        """With routes: True/False when the image's DICOM modality decides (one of ``modalities`` / another known
        one), None when it is unknown (then the kind classifier decides); None without routes."""
        if self.routes is None:
            return None
        modality = str(getattr(image, "modality", None) or "unknown").strip().upper()
        if modality in ("UNKNOWN", "OT", ""):
            return None
        return modality in self.routes["modalities"]

    def encode(self, image: ImageInput) -> ImageEmbedding:
        """The image encoder's features of ``image`` (one pass; every text prompt reuses them). With routes, an
        image this checkpoint does not keep is encoded by the ``otherwise`` one (class docstring)."""
        by_modality = self._modality_keeps(image)
        if by_modality is False:
            return self._mark_routed(self._other().encode(image), None)
        embedding = self._encode_own(image)
        if self.routes is None or by_modality or self._keeps(embedding):
            self._with_specialist_input([image], [embedding])
            return embedding
        return self._mark_routed(self._other().encode(image), self._image_kind(embedding))

    def encode_batch(self, images: Sequence[ImageInput]) -> list[ImageEmbedding]:
        """Encode several images, ``encode_batch_size`` per encoder call; one embedding per image, as
        :meth:`encode` gives (``extra["encode_s"]``: the batch's seconds divided by the number of images). With
        routes, the images this checkpoint does not keep go to the ``otherwise`` checkpoint in one batch."""
        decided = [self._modality_keeps(im) for im in images]  # all None without routes
        own = [i for i, d in enumerate(decided) if d is not False]
        out: list[ImageEmbedding | None] = [None] * len(images)
        for i, e in zip(own, self._encode_batch_own([images[i] for i in own])):
            out[i] = e
        kept: list[tuple[ImageInput, ImageEmbedding]] = []
        for i in own:
            mine = out[i]
            if mine is not None and (self.routes is None or decided[i] or self._keeps(mine)):
                kept.append((images[i], mine))
        self._with_specialist_input([im for im, _ in kept], [e for _, e in kept])
        away = [i for i, d in enumerate(decided) if d is False]
        for i in own:
            embedding = out[i]
            if (self.routes is not None and decided[i] is None and embedding is not None
                    and not self._keeps(embedding)):
                away.append(i)
        if away:
            for i, e in zip(away, self._other().encode_batch([images[i] for i in away])):
                before = out[i]
                out[i] = self._mark_routed(e, None if before is None else self._image_kind(before))
        return [e for e in out if e is not None]

    def for_image(self, image: ImageInput) -> MedVLMSegmenter:
        """The segmenter that answers images like ``image``: this one, or with routes the ``otherwise`` one when the
        modality says so or (unknown modality) this checkpoint's classifier does after one encoder pass. A volume
        asks once for its middle slice, so its slices are neither encoded twice nor split between two models."""
        by_modality = self._modality_keeps(image)
        if self.routes is None or by_modality:
            return self
        if by_modality is False or not self._keeps(self._encode_own(image)):
            return self._other()
        return self

    def meta_for(self, dataset: str) -> dict[str, Any]:
        """The training meta (val ids, sources) of the model that answers images of ``dataset`` (a folder name or
        path): this checkpoint's, the ``otherwise`` one's for a kind the routes hand over, or a specialist's for
        its kind."""
        from medvlm.datasets.kinds import kind_of
        from segmentation.textseg.checkpoint import read_checkpoint_config

        kind = kind_of(str(dataset))
        if self.routes is not None and kind not in self.routes["kinds"]:
            if self._routed is not None:
                return self._routed.meta_for(dataset)
            directory = self.routes["otherwise"]
            spec = read_specialists(directory, resolve_checkpoint) if self._use_specialists else None
            if spec is not None and kind in spec["kinds"]:
                directory = spec["kinds"][kind]
            return read_checkpoint_config(directory)[1]  # the config alone: no weights loaded
        if self.specialists is not None and kind in self.specialists["kinds"]:
            return read_checkpoint_config(self.specialists["kinds"][kind])[1]
        return self.meta

    def clear_text_cache(self) -> None:
        """Forget the cached text features (the next prompt of each text runs the text encoder again)."""
        with self._lock:
            self._text_cache.clear()

    def text_features(self, texts: Sequence[str]) -> tuple[Any, Any]:
        """Projected text features of ``texts`` (read as given, no expansion): ``(f_text (n, L, d) float32,
        mask (n, L) bool)``, zero-padded to the longest text. Each distinct text is encoded once and then served
        from an LRU of ``text_cache_size`` entries; the caller holds the lock (inference mode)."""
        model = self.model
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        fresh: dict[str, Any] = {}
        if missing and self.light:
            assert self._compiled_text is not None  # set with self.light
            ids_np, mask_np = model.text_encoder.tokenize(missing)
            encoded_np = self._compiled_text.run_array(ids_np, mask_np)  # (m, L, d)
            fresh = {t: encoded_np[k, : int(mask_np[k].sum())].copy() for k, t in enumerate(missing)}
        elif missing:
            ids, mask = model.text_encoder.tokenize(missing, self.device)
            encoded = self._encode_text(ids, mask)  # (m, L, d)
            lengths = mask.sum(dim=1).tolist()
            fresh = {t: encoded[k, : int(lengths[k])].clone() for k, t in enumerate(missing)}
        rows = []
        for t in texts:
            row = fresh.get(t)
            if row is None:
                row = self._text_cache[t]
                self._text_cache.move_to_end(t)
            rows.append(row)
        if self.text_cache_size:
            for t, row in fresh.items():
                self._text_cache[t] = row
                self._text_cache.move_to_end(t)
            while len(self._text_cache) > self.text_cache_size:
                self._text_cache.popitem(last=False)
        longest = max(int(r.shape[0]) for r in rows)
        if self.light:
            f_np = np.zeros((len(rows), longest, rows[0].shape[1]), dtype=np.float32)
            m_np = np.zeros((len(rows), longest), dtype=bool)
            for k, r in enumerate(rows):
                f_np[k, : r.shape[0]] = r
                m_np[k, : r.shape[0]] = True
            return f_np, m_np
        import torch

        f_text = rows[0].new_zeros((len(rows), longest, rows[0].shape[1]))
        text_mask = torch.zeros((len(rows), longest), dtype=torch.bool, device=f_text.device)
        for k, r in enumerate(rows):
            f_text[k, : r.shape[0]] = r
            text_mask[k, : r.shape[0]] = True
        return f_text, text_mask

    def _image_kind(self, embedding: ImageEmbedding) -> KindVerdict | None:
        """The kind classifier's verdict on ``embedding`` (computed once, kept in ``embedding.extra``)."""
        if self.kind_classifier is None:
            return None
        verdict = embedding.extra.get("image_kind")
        if not isinstance(verdict, KindVerdict):
            verdict = self.kind_classifier.predict(embedding.features)
            embedding.extra["image_kind"] = verdict
        return verdict

    def _result(self, prompt: Prompt, binary: Any, existence: float | None, inside: Any, logits: Any,
                text: tuple[str, str | None], frame: str, verdict: KindVerdict | None = None) -> SegmentationResult:
        """One prompt's result from its mask at the original size (``binary``, bool), the existence probability,
        the probabilities inside the content (``inside``, numpy ``(h, w)`` on the input frame), its logits on
        the input frame and the kind classifier's ``verdict`` on the image."""
        from segmentation.textseg.preprocess import resize_bilinear

        verdict = verdict if self.kind_gate else None
        ruled_out = verdict is not None and verdict.rules_out(text[1], self.kind_confidence)
        present = existence is None or existence >= self.existence_threshold
        mask_threshold = self.threshold
        if (self.empty_fallback and existence is not None and present and not ruled_out and not binary.any()
                and inside.size and float(inside.max()) > 0.0):
            # the head is sure it is there and the decoder's map has a peak, only a faint one: keep its top
            mask_threshold = 0.5 * float(inside.max())
            binary = resize_bilinear(inside, binary.shape) > mask_threshold
        # "not in this image": the existence head (or the kind of image) overrules a mask the decoder would draw
        found = bool(binary.any()) and present and not ruled_out
        if not found:
            binary = np.zeros_like(binary)
        sel = (inside > mask_threshold) if found else np.zeros(inside.shape, dtype=bool)
        # mean foreground probability of the predicted mask: a confidence in [0, 1], 0 when empty
        score = float(inside[sel].mean()) if bool(sel.any()) else 0.0
        meta: dict[str, Any] = {
            "backend": self.name, "text_read": text[0], "structure": text[1], "text_level": self.text_level,
            "logits_frame": frame, "found": found, "existence": existence, "mask_threshold": mask_threshold}
        if verdict is not None:
            meta["image_kind"] = verdict.to_json()
            meta["ruled_out_by_kind"] = ruled_out
        return SegmentationResult(mask=Mask(np.asarray(binary, dtype=bool)), score=score, logits=logits,
                                  prompt=prompt, meta=meta)

    def _decode_light(self, embedding: ImageEmbedding, prompts: Sequence[Prompt],
                      expanded: list[tuple[str, str | None]]) -> list[SegmentationResult]:
        """:meth:`_decode` of a bundle-started segmenter: numpy and the heads IR, no torch."""
        from segmentation.textseg.preprocess import resize_bilinear

        texts = [t for t, _ in expanded]
        with self._lock:
            f_text, mask = self.text_features(texts)
            logits, exist_logits = self.model.forward_text_features(embedding.features, f_text, mask)
        logits = logits[:, 0]  # (n, S, S)
        probs = _sigmoid(logits)
        exist = None if exist_logits is None else _sigmoid(exist_logits)
        ch, cw = embedding.extra["content_shape"]
        height, width = embedding.original_size
        verdict = self._image_kind(embedding)
        results = []
        for i, prompt in enumerate(prompts):
            up = resize_bilinear(logits[i, :ch, :cw], (height, width))
            results.append(self._result(prompt, _sigmoid(up) > self.threshold,
                                        None if exist is None else float(exist[i]), probs[i, :ch, :cw],
                                        logits[i].astype(np.float32), expanded[i], embedding.frame.name, verdict))
        return results

    def _decode_wholes(self, embedding: ImageEmbedding, prompts: Sequence[Prompt], parts: Sequence[tuple[str, ...]],
                       multimask: bool) -> list[SegmentationResult]:
        """Each prompt with parts becomes one prompt per part; their results merge into one per prompt: the
        union of the masks, the max of the logits and of the existences, the mean score of the found parts."""
        flat: list[Prompt] = []
        owners: list[int] = []
        for i, (prompt, names) in enumerate(zip(prompts, parts)):
            for sub in ([Prompt(text=n) for n in names] if names else [prompt]):
                flat.append(sub)
                owners.append(i)
        decoded = self._decode(embedding, flat, multimask)  # parts have no parts: no recursion beyond one level
        results: list[SegmentationResult] = []
        for i, (prompt, names) in enumerate(zip(prompts, parts)):
            mine = [r for r, o in zip(decoded, owners) if o == i]
            if not names:
                results.append(mine[0])
                continue
            found = [r for r in mine if r.meta.get("found", bool(r.mask.data.any()))]
            mask = np.logical_or.reduce([r.mask.data for r in found]) if found else np.zeros_like(mine[0].mask.data)
            exist = [r.meta["existence"] for r in mine if r.meta.get("existence") is not None]
            logits = [r.logits for r in mine if r.logits is not None]
            meta = {**mine[0].meta, "structure": expand_text(str(prompt.text), self.text_level,
                                                             embedding.extra.get("modality"))[1],
                    "text_read": "; ".join(str(r.meta.get("text_read")) for r in mine), "parts": list(names),
                    "found": bool(found), "existence": max(exist) if exist else None}
            results.append(SegmentationResult(
                mask=Mask(mask), score=float(np.mean([r.score for r in found])) if found else 0.0,
                logits=np.maximum.reduce(logits) if logits else None, prompt=prompt, meta=meta))
        return results

    def _parts(self, prompt: Prompt, modality: str | None) -> tuple[str, ...]:
        """The parts whose union answers ``prompt`` when this checkpoint composes wholes, else ``()``."""
        if not self.compose_wholes or prompt.text is None:
            return ()
        from prompts.anatomy import parts_of

        structure = expand_text(str(prompt.text), self.text_level, modality)[1]
        return parts_of(structure) if structure is not None else ()

    def _decode(self, embedding: ImageEmbedding, prompts: Sequence[Prompt],
                multimask: bool) -> list[SegmentationResult]:
        routed_to = embedding.extra.get("routed_to")
        # encoded by this checkpoint's image encoder (a specialist's is its host's)
        mine = routed_to is None or routed_to in (self.checkpoint, self._host)
        specialist = self._specialist_for(embedding) if mine else None
        if specialist is not None:
            own = embedding.extra.get("specialist_input")
            if specialist._own_encoder and (own is None or own["checkpoint"] != specialist.checkpoint):
                own = self._encode_for(specialist, embedding)
            if own is not None and own["checkpoint"] == specialist.checkpoint:  # encoded as the specialist reads it
                import dataclasses

                # its own extra dict, kept in the image's: what the specialist caches there (the refiner's
                # embedding of its pixels) stays with the image across calls
                embedding = dataclasses.replace(embedding, features=own["features"], extra=own["extra"])
            results = specialist._decode(_features_as(embedding, specialist.light), prompts, multimask)
            for r in results:
                r.meta["specialist"] = specialist.checkpoint
            return results
        if mine:
            modality = embedding.extra.get("modality")
            parts = [self._parts(p, modality) for p in prompts]
            if any(parts):
                return self._decode_wholes(embedding, prompts, parts, multimask)
        if not mine:
            other = self.routed_segmenter()
            if other is None or other.checkpoint != routed_to:
                raise input_error("Med-VLM embedding", expected=f"an embedding of {self.checkpoint}",
                                  received=f"one routed to {routed_to}", fix="encode with this segmenter")
            results = other._decode(embedding, prompts, multimask)
            for r in results:
                r.meta["routed_to"] = routed_to
            return results
        modality = embedding.extra.get("modality")
        expanded = [expand_text(str(p.text), self.text_level, modality) for p in prompts]
        if self.light:
            return self._postprocessed(embedding, self._decode_light(embedding, prompts, expanded))
        import torch
        import torch.nn.functional as F

        model = self.model
        texts = [t for t, _ in expanded]
        with self._lock, torch.inference_mode():
            f_text, mask = self.text_features(texts)
            logits, exist_logits = model.forward_text_features(embedding.features, f_text, mask)
            logits = logits[:, 0]  # (n, S, S)
            probs = torch.sigmoid(logits)
            exist = None if exist_logits is None else torch.sigmoid(exist_logits.float()).cpu().numpy()
            ch, cw = embedding.extra["content_shape"]
            height, width = embedding.original_size
            verdict = self._image_kind(embedding)
            results = []
            for i, prompt in enumerate(prompts):
                up = F.interpolate(logits[i, :ch, :cw][None, None], size=(height, width), mode="bilinear",
                                   align_corners=False)[0, 0]
                binary = (torch.sigmoid(up) > self.threshold).cpu().numpy()
                results.append(self._result(prompt, binary, None if exist is None else float(exist[i]),
                                            probs[i, :ch, :cw].float().cpu().numpy(),
                                            logits[i].float().cpu().numpy(), expanded[i], embedding.frame.name,
                                            verdict))
        return self._postprocessed(embedding, results)

    def _needs_pixels(self) -> bool:
        """Whether embeddings keep the image's pixels (``extra["rgb"]``): ``refine_box`` and ``zoom`` read them,
        this checkpoint's or a specialist's (whose policy is not known before it is built)."""
        if self.postprocess != "full":
            return False
        policy = self.postprocess_policy
        return self.specialists is not None or (policy is not None and (policy.refines or policy.zooms))

    def refiner(self) -> Any:
        """The promptable segmenter of ``refine_box``: the one given, else LiteMedSAM with this segmenter's
        precision and device (built on first need, once); a routed or specialist segmenter uses the refiner of the
        segmenter that built it."""
        if self._parent is not None and self._refiner is None:
            return self._parent.refiner()
        with self._route_lock:
            if self._refiner is None:
                from segmentation.litemedsam import LiteMedSAMSegmenter

                self._refiner = LiteMedSAMSegmenter(precision=self._options["precision"], device=self.device)
        return self._refiner

    def _refined(self, embedding: ImageEmbedding, mask: Any) -> Any:
        """``refine_box`` of ``mask`` (bool ``(H, W)``, original grid), or None when the embedding has no pixels to
        refine from (encoded with postprocessing off) or the mask no component."""
        rgb = embedding.extra.get("rgb")
        if rgb is None or not mask.any():
            return None
        refiner = self.refiner()
        cached = embedding.extra.get("refiner_embedding")
        if cached is None:  # one refiner encoding per image, whatever the number of structures refined
            cached = embedding.extra["refiner_embedding"] = refiner.encode(rgb)
        return refine_by_boxes(refiner, cached, mask)

    def zoom_mask(self, embedding: ImageEmbedding, prompt: Prompt, mask: Any, rgb: Any = None) -> Any:
        """``zoom`` of ``mask`` (bool ``(H, W)``, original grid; :mod:`segmentation.textseg.zoom`): the union of the
        masks this checkpoint finds for ``prompt`` in a square window around each component of ``mask``, each
        window encoded (in one batch) by the image encoder that made ``embedding``; bool ``(H, W)``, or None when
        there are no pixels (``rgb``, default ``embedding.extra["rgb"]``), no component, or no window finds it.
        A window is read as part of the same image: its modality and kind of image are the image's, and it is
        decoded with postprocessing off."""
        from segmentation.textseg.zoom import zoom_windows

        pixels = embedding.extra.get("rgb") if rgb is None else rgb
        m = np.asarray(mask, dtype=bool)
        windows = zoom_windows(m) if pixels is not None else []
        if not windows:
            return None
        # a specialist decodes its host's features: the host encodes the windows (the same encoder, checked),
        # unless the specialist adapted its own
        shared = self._host is not None and self._parent is not None and not self._own_encoder
        encoder = self._parent if shared and self._parent is not None else self
        crops = [np.ascontiguousarray(w.crop(np.asarray(pixels))) for w in windows]
        union = np.zeros(m.shape, dtype=bool)
        for window, crop_embedding in zip(windows, encoder._encode_batch_own(crops)):
            crop_embedding = _features_as(crop_embedding, self.light)
            crop_embedding.extra.update(postprocess="off", modality=embedding.extra.get("modality"))
            if "image_kind" in embedding.extra:
                crop_embedding.extra["image_kind"] = embedding.extra["image_kind"]
            result = self._decode(crop_embedding, [prompt], False)[0]
            if result.meta.get("found"):
                union |= window.paste(result.mask.data, m.shape)
        return union if union.any() else None

    def _postprocessed(self, embedding: ImageEmbedding,
                       results: list[SegmentationResult]) -> list[SegmentationResult]:
        """``results`` after the checkpoint's per-structure operations (class docstring, ``postprocess``)."""
        policy = self.postprocess_policy
        mode = str(embedding.extra.get("postprocess", self.postprocess))
        if policy is None or mode == "off":
            return results
        out = []
        for r in results:
            ops = policy.ops_for(r.meta.get("structure"))
            if mode != "full":
                ops = tuple(op for op in ops if op not in ENCODING_OPS)
            if not ops or not r.meta.get("found"):
                out.append(r)
                continue
            before = np.asarray(r.mask.data, dtype=bool)
            mask, applied = postprocess_mask(before, ops, lambda m: self._refined(embedding, m),
                                             functools.partial(self.zoom_mask, embedding, r.prompt))
            if not mask.any():
                out.append(r)
                continue
            meta = {**r.meta, "postprocess": applied, "pixels_before_postprocess": int(before.sum())}
            out.append(SegmentationResult(mask=Mask(mask), score=r.score, logits=r.logits, prompt=r.prompt, meta=meta))
        return out
