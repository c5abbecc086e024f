"""Training of the Med-VLM text-guided segmenter (library code; the recipe is ``medvlm train medvlm CONFIG``).

What trains: the LoRA adapters of both encoders, the two input projections, the feature mixer and the mask
decoder (``requires_grad`` is False everywhere else). Loss: BCE + Dice (unweighted sum). Optimiser: AdamW with
linear warm-up and cosine decay. Runs on accelerate (CPU here; ``accelerate launch`` for GPUs).

Data: every folder listed in ``data`` is read with ``medvlm.datasets``; the JSRT/SCR folder is split with
``split_ids(val_fraction, seed)`` and its val ids are never trained on (they are written to the run folder).
Each step draws ``batch_images`` cached image variants (datasets weighted by ``weight``) and up to
``texts_per_image`` structures of each; each structure's text is sampled from ``prompts.anatomy`` at a
description level drawn with ``level_weights`` (and a synonym for simple/complex); with probability
``negative_prob`` one text names a structure the dataset annotates but this image lacks (target: empty mask).

Learned anatomy gating (``prior_weight`` > 0): each chest radiograph of a batch also gets
``prior_texts_per_image`` finding phrases ("cardiomegaly", "left pleural effusion", "nodule", ... from
``prompts.findings``), whose target is no mask but the soft gate of the regions the finding is expected in, built
from the image's ground-truth anatomy masks (:mod:`finetune.textseg_prior`); the loss adds ``prior_weight`` x the
share of each finding heatmap's mass outside that gate (:func:`~segmentation.textseg.losses.prior_mass_loss`), so
the model learns to keep finding maps where the finding can be and no gate is needed at inference.
``init_from``: a checkpoint folder whose weights start the run (fine-tuning, e.g. the shipped default).

Keeping what a checkpoint knew (``distill_from`` + ``distill_weight`` > 0): for the rows of a batch whose image
comes from one of ``distill_sources`` and whose structure is present, a frozen teacher (that checkpoint, usually
the shipped chest X-ray model) predicts the same text on the same cached features, and the loss adds
``distill_weight`` x BCE of the student's logits against the teacher's probabilities (learning without
forgetting): the new modalities cannot buy their Dice with the teacher's structures. ``distill_structures``
extends this to structures a source does not annotate (the heart and clavicles on lung-only chest X-ray folders
from other hospitals): each image of a ``distill_sources`` folder gets one extra row for one of those structures
it has no mask for, whose target is the teacher's own mask (logit > 0; existence 1 where that mask is not empty)
plus the same soft-target BCE, so what the teacher knew about other hospitals' images is kept too.

"Not in this image": with ``foreign_negative_prob`` each image also gets ``negatives_per_image`` structures of other
kinds of image (empty target, existence 0); ``hard_negatives`` draws them by the model's running existence score
per (kind of image, structure) (:class:`HardNegativeMiner`) instead of uniformly; with ``foreign_negative_mask_loss``
off they train only the existence head.

Run folder ``out_dir``: ``last/`` (weights + optimizer + step, for resume), ``best/`` (best val Dice),
``log.jsonl`` (one line per eval), ``val_ids.txt``, ``train_config.json``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from finetune.textseg_cache import CacheEntry, FeatureCache, build_cache
from medvlm.datasets.kinds import mismatched_structures
from medvlm.errors import input_error
from segmentation.textseg.config import MedVLMConfig
from segmentation.textseg.losses import bce_dice_loss, positive_bce_loss, prior_mass_loss
from segmentation.textseg.model import MedVLM, build_medvlm

__all__ = ["Batch", "DataSource", "HardNegativeMiner", "TrainConfig", "load_train_config", "mask_loss_rows",
           "sample_batch", "train_medvlm"]

log = logging.getLogger(__name__)

JSRT = "cxr_jsrt_scr"


@dataclass
class DataSource:
    """One data folder: ``name`` (a medvlm.datasets name), ``variants`` cached per image (1 = no augmentation),
    ``weight`` (relative sampling weight: per image, or per source with ``balance: source``), ``limit`` (first N
    ids, for quick runs), ``every`` (keep every k-th training id of each case: neighbouring slices of a volume
    are nearly the same image), ``zooms`` (zoom variants cached per image: a window around a random structure,
    what the ``zoom`` postprocess operation shows the model; :mod:`segmentation.textseg.zoom`)."""

    name: str
    variants: int = 1
    weight: float = 1.0
    limit: int | None = None
    every: int = 1
    zooms: int = 0


@dataclass
class TrainConfig:
    model: dict[str, Any] = field(default_factory=dict)
    data: list[DataSource] = field(default_factory=lambda: [DataSource(JSRT, 3, 2.0)])
    data_root: str | None = None
    val_fraction: float = 0.2
    split_seed: int = 0
    out_dir: str = "runs/medvlm"
    cache_dir: str = "runs/cache"
    steps: int = 1000
    batch_images: int = 2
    texts_per_image: int = 5
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    level_weights: dict[str, float] = field(default_factory=lambda: {"complex": 0.6, "simple": 0.4})
    negative_prob: float = 0.1
    eval_every: int = 200
    checkpoint_every: int = 100
    eval_limit: int | None = None
    seed: int = 0
    init_from: str | None = None
    #: neighbouring-slice context (the model config's ``slice_context``; None = the model's own): with k >= 1 each
    #: slice of a volume source (a reader with ``volume()``, e.g. mr_hippocampus_msd) is cached with slices k below
    #: and above as R and B (:func:`medvlm.volume.with_neighbours`); 2D sources stay grey. Use its own cache_dir.
    slice_context: int | None = None
    #: colour images (dermoscopy, endoscopy) shown to the encoder in colour (the model config's ``color_input``;
    #: None = the model's own, False = their luminance). Use its own cache_dir.
    color_input: bool | None = None
    #: image-encoder stages that carry LoRA (the model config's ``image_encoder.lora_last_stages``; None = the
    #: model's own). More than ``init_from``'s: the new adapters start at zero (the run starts from exactly that
    #: checkpoint's outputs) and the cached prefix ends earlier, so use its own cache_dir. Train them with
    #: ``image_encoder.`` in ``train_modules``. At inference such a specialist encodes images itself.
    image_lora_stages: int | None = None
    prior_weight: float = 0.0
    prior_texts_per_image: int = 2
    #: hold out a val split (by case, ``val_fraction``) of every source with >= 5 cases, not only JSRT
    holdout_all: bool = False
    #: "image": ``weight`` is per image; "source": each source's images share its ``weight`` (so a folder of
    #: 2,000 slices and one of 16 photographs are drawn as often as their weights say)
    balance: str = "image"
    #: negatives from other kinds of image (a brain MR asked for the liver): probability per image, and how many
    foreign_negative_prob: float = 0.0
    negatives_per_image: int = 1
    #: weight of the existence head's BCE (models built with ``existence_head: true``)
    existence_weight: float = 1.0
    #: train the wholes of present parts too ("lung" = left + right lung, "kidney", "hippocampus")
    wholes: bool = False
    #: precision of the frozen prefix when caching: fp32 (torch) or bf16/auto (OpenVINO where the CPU has bf16;
    #: segmentation.runtime); inference runs the same encoder path
    cache_precision: str = "fp32"
    #: learning without forgetting: a frozen teacher checkpoint, the weight of its soft-target BCE, and the
    #: sources whose present structures it supervises
    distill_from: str | None = None
    distill_weight: float = 0.0
    distill_sources: list[str] = field(default_factory=list)
    #: structures the teacher labels (pseudo-masks) on ``distill_sources`` images that have no mask for them
    distill_structures: list[str] = field(default_factory=list)
    #: online hard-negative mining: foreign negatives are drawn in proportion to the model's running existence
    #: score for that (kind of image, structure) pair (:class:`HardNegativeMiner`) instead of uniformly
    hard_negatives: bool = False
    #: whether foreign negatives also train the mask towards empty (True) or only the existence head (False).
    #: With hard mining a few structures take most negative rows ("polyp" on every other kind of image), and
    #: empty-mask targets on all of them teach that text to draw nothing even where it is (run 5: polyp val
    #: Dice 0.26 -> 0.01); the existence head alone decides "not in this image" at inference anyway.
    foreign_negative_mask_loss: bool = True
    #: weight of :func:`~segmentation.textseg.losses.positive_bce_loss` (BCE over each target's own pixels) added
    #: to BCE + Dice: brings back a small structure whose logits sank so far that BCE + Dice no longer move it
    positive_weight: float = 0.0
    #: train only the parameters under these name prefixes (e.g. ["existence."]: recalibrate the existence head
    #: for the kind gate while the masks stay exactly as they were); empty = everything trainable
    train_modules: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.steps < 1 or self.batch_images < 1 or self.texts_per_image < 1:
            raise input_error("train config", expected="steps, batch_images, texts_per_image >= 1",
                              received=f"{self.steps}, {self.batch_images}, {self.texts_per_image}",
                              fix="use e.g. steps: 1000, batch_images: 2, texts_per_image: 5")
        bad = set(self.level_weights) - {"none", "simple", "complex"}
        if bad or not self.level_weights or sum(self.level_weights.values()) <= 0:
            raise input_error("level_weights", expected="weights for 'none', 'simple' and/or 'complex'",
                              received=repr(self.level_weights), fix="use {complex: 0.6, simple: 0.4}")
        if self.positive_weight < 0:
            raise input_error("positive_weight", expected=">= 0 (0 = BCE + Dice alone)",
                              received=repr(self.positive_weight), fix="use e.g. positive_weight: 0.5")
        if self.prior_weight < 0 or self.prior_texts_per_image < 0:
            raise input_error("prior_weight / prior_texts_per_image", expected=">= 0 (0 = no learned gating)",
                              received=f"{self.prior_weight}, {self.prior_texts_per_image}",
                              fix="use e.g. prior_weight: 0.5, prior_texts_per_image: 2")
        if self.init_from is not None and not (Path(self.init_from) / "config.json").is_file():
            raise input_error("init_from", expected="a Med-VLM checkpoint folder (config.json + model.safetensors)",
                              received=repr(self.init_from),
                              fix="e.g. init_from: segmentation/textseg/weights/default, or remove the key")
        if self.balance not in ("image", "source"):
            raise input_error("balance", expected="'image' or 'source'", received=repr(self.balance),
                              fix="use balance: source to weight folders, not images")
        if any(d.variants < 1 or d.zooms < 0 for d in self.data):
            raise input_error("data variants / zooms", expected="variants >= 1 and zooms >= 0",
                              received=str([(d.variants, d.zooms) for d in self.data]),
                              fix="use variants: 1 (the image as is) and zooms: 0 (no zoom windows) or e.g. 3")
        if self.slice_context is not None and (not isinstance(self.slice_context, int)
                                               or isinstance(self.slice_context, bool) or self.slice_context < 0):
            raise input_error("slice_context", expected="an int >= 0, or no key (the model's own)",
                              received=repr(self.slice_context), fix="use slice_context: 1 (adjacent slices) or 0")
        if self.image_lora_stages is not None and (not isinstance(self.image_lora_stages, int)
                                                   or isinstance(self.image_lora_stages, bool)
                                                   or self.image_lora_stages < 0):
            raise input_error("image_lora_stages", expected="an int >= 0 (the last k encoder stages carry LoRA)",
                              received=repr(self.image_lora_stages), fix="use e.g. image_lora_stages: 3, or drop it")
        if self.color_input is not None and not isinstance(self.color_input, bool):
            raise input_error("color_input", expected="true, false, or no key (the model's own)",
                              received=repr(self.color_input), fix="use color_input: true for colour images")
        if any(d.every < 1 for d in self.data):
            raise input_error("data every", expected=">= 1", received=str([d.every for d in self.data]),
                              fix="use every: 1 (all ids) or e.g. every: 3")
        if not self.data:
            raise input_error("data", expected="at least one data source", received="[]",
                              fix=f"add e.g. - name: {JSRT}")
        if self.distill_weight < 0 or (self.distill_weight > 0 and not self.distill_sources):
            raise input_error("distill_weight / distill_sources", expected="weight >= 0, and sources when > 0",
                              received=f"{self.distill_weight}, {self.distill_sources}",
                              fix=f"use e.g. distill_weight: 1.0, distill_sources: [{JSRT}]")
        if self.distill_weight > 0 and (self.distill_from is None
                                        or not (Path(self.distill_from) / "config.json").is_file()):
            raise input_error("distill_from", expected="a Med-VLM checkpoint folder (config.json + model.safetensors)",
                              received=repr(self.distill_from),
                              fix="e.g. distill_from: segmentation/textseg/weights/default")
        unknown = set(self.distill_sources) - {d.name for d in self.data}
        if unknown:
            raise input_error("distill_sources", expected="names of sources listed under data",
                              received=str(sorted(unknown)), fix="list only sources that are in data")
        if self.distill_structures and self.distill_weight <= 0:
            raise input_error("distill_structures", expected="distill_weight > 0 and a teacher (distill_from)",
                              received=f"distill_structures={self.distill_structures}, "
                                       f"distill_weight={self.distill_weight}",
                              fix="set distill_from and distill_weight, or remove distill_structures")
        if self.hard_negatives and self.foreign_negative_prob <= 0:
            raise input_error("hard_negatives", expected="foreign_negative_prob > 0 (it weights those negatives)",
                              received=f"foreign_negative_prob={self.foreign_negative_prob}",
                              fix="set e.g. foreign_negative_prob: 0.7, or remove hard_negatives")
        from medvlm.datasets.kinds import KIND_STRUCTURES

        known_names = {n for names in KIND_STRUCTURES.values() for n in names}
        odd = sorted(set(self.distill_structures) - known_names)
        if odd:
            raise input_error("distill_structures", expected=f"canonical structure names ({sorted(known_names)})",
                              received=str(odd), fix="e.g. distill_structures: [heart, left clavicle, right clavicle]")


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a YAML (or JSON) training config; unknown keys are an error."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(raw) - known
    if unknown:
        raise input_error(f"train config {path}", expected=f"keys among {sorted(known)}", received=str(sorted(unknown)),
                          fix="remove or rename them")
    if "data" in raw:
        raw["data"] = [DataSource(**d) if isinstance(d, dict) else DataSource(str(d)) for d in raw["data"]]
    cfg = TrainConfig(**raw)
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------------------------------- data


def _split(cfg: TrainConfig, slice_context: int = 0) -> tuple[list[tuple[str, Any, int, Sequence[str]]],
                                                                list[tuple[str, Any, int, Sequence[str]]]]:
    """(train items, val items) for build_cache: (dataset name, sample, n variants, the structures its labels
    cover: ``Dataset.annotated``, so an unlabelled organ of a partly labelled folder is never a negative). With
    ``slice_context`` >= 1 the slices of volume sources carry their neighbours (:func:`slice_with_context`)."""
    from medvlm.datasets import open_dataset, split_ids

    train: list[tuple[str, Any, int, Sequence[str]]] = []
    val: list[tuple[str, Any, int, Sequence[str]]] = []
    for src in cfg.data:
        ds = open_dataset(src.name, root=cfg.data_root)
        ids = ds.ids()[: src.limit] if src.limit else ds.ids()
        n_cases = len({ds.group(i) for i in ids})
        if src.name == JSRT or (cfg.holdout_all and n_cases >= 5):
            tr, va = split_ids(ids, cfg.val_fraction, cfg.split_seed, group=ds.group)
        else:
            tr, va = ids, []
        if src.every > 1:  # val too: the in-training proxy; `medvlm eval text-seg` scores every val image
            tr, va = thin_per_case(tr, src.every, ds.group), thin_per_case(va, src.every, ds.group)
        for sid in tr:
            sample = slice_with_context(ds, ds.load(sid), slice_context)
            if sample.masks:
                train.append((src.name, sample, src.variants, ds.annotated(sample)))
        for sid in va:
            sample = slice_with_context(ds, ds.load(sid), slice_context)
            val.append((src.name, sample, 1, ds.annotated(sample)))
    return train, val


def slice_with_context(dataset: Any, sample: Any, context: int) -> Any:
    """``sample`` with its image replaced by a :class:`~medvlm.volume.SliceWithNeighbours` (slices ``context``
    below and above, from ``dataset.volume(dataset.group(id))``) when ``context`` >= 1 and the sample is a slice
    of a volume source (its meta has ``slice_index``); otherwise ``sample`` unchanged."""
    from medvlm.volume import with_neighbours

    k = sample.meta.get("slice_index")
    if context < 1 or k is None or not callable(getattr(dataset, "volume", None)):
        return sample
    stack = dataset.volume(dataset.group(sample.id)).image
    return replace(sample, image=with_neighbours(sample.image, stack, int(k), context))


def thin_per_case(ids: Sequence[str], every: int, group: Any) -> list[str]:
    """Every ``every``-th id of each case (``group(id)`` -> case id), in the given order; the first id of each case
    is always kept."""
    seen: dict[str, int] = {}
    kept = []
    for i in ids:
        k = seen.get(group(i), 0)
        seen[group(i)] = k + 1
        if k % every == 0:
            kept.append(i)
    return kept


class Batch(NamedTuple):
    """One training step's rows. ``prefixes`` (B, ...) frozen encoder prefixes; per row r: ``rows[r]`` its image
    in the batch, ``texts[r]``, ``targets[r]`` (1, S, S) in the 256 letterbox frame, ``is_prior[r]`` (a finding
    phrase whose target is the soft anatomical prior in [0, 1]), ``sources[r]`` the image's dataset,
    ``pseudo[r]`` (``distill_structures``: an all-zero target here that the teacher's mask replaces,
    :func:`pseudo_targets`), ``names[r]`` the canonical structure ("" for finding phrases) and ``negative[r]``
    (a foreign negative: another kind's structure, empty target)."""

    prefixes: torch.Tensor
    rows: list[int]
    texts: list[str]
    targets: torch.Tensor
    is_prior: torch.Tensor
    sources: list[str]
    pseudo: torch.Tensor
    names: list[str]
    negative: list[bool]


class HardNegativeMiner:
    """Online hard-negative mining for "not in this image": which foreign structures the model still calls present.

    A uniform draw over the ~16 structures of other kinds spends most negatives on pairs the model already
    rejects (the liver on a chest X-ray) and few on those it does not (the polyp, skin lesion or fetal head on a
    brain MR: one salient blob per image in their own sources, so "the salient thing" is what the model learnt).
    The miner keeps, per (kind of image, structure), an exponential moving average of the existence probability
    the model gave that foreign negative in training (starting at ``start``) and draws negatives in proportion to
    ``score + floor``, so every pair keeps being checked while the hard ones get most of the rows. Keyed by kind
    (``medvlm.datasets.kinds.kind_of``; the folder name for an unknown folder), not by folder, so that the few
    hundred negatives of a CPU run update each key often enough to move it. The state is not checkpointed: after
    a resume it re-learns within a few hundred steps.
    """

    def __init__(self, momentum: float = 0.7, floor: float = 0.05, start: float = 0.5) -> None:
        self.momentum, self.floor, self.start = momentum, floor, start
        self.scores: dict[tuple[str, str], float] = {}

    @staticmethod
    def key(source: str) -> str:
        """The kind of image of dataset ``source`` (the folder's name when it has no kind)."""
        from medvlm.datasets.kinds import kind_of

        return kind_of(source) or source.rstrip("/").rsplit("/", 1)[-1]

    def pick(self, source: str, candidates: Sequence[str], k: int, rng: random.Random) -> list[str]:
        """``min(k, len(candidates))`` distinct candidates for an image of dataset ``source``, drawn without
        replacement by weight."""
        kind = self.key(source)
        pool = list(candidates)
        out: list[str] = []
        while pool and len(out) < k:
            weights = [self.scores.get((kind, c), self.start) + self.floor for c in pool]
            out.append(pool.pop(rng.choices(range(len(pool)), weights=weights)[0]))
        return out

    def update(self, source: str, name: str, probability: float) -> None:
        """Fold the existence probability (0-1) the model gave ``name`` on an image of dataset ``source`` into
        its score."""
        kind = self.key(source)
        old = self.scores.get((kind, name), self.start)
        self.scores[(kind, name)] = self.momentum * old + (1.0 - self.momentum) * float(probability)


def mask_loss_rows(batch: Batch, cfg: TrainConfig) -> torch.Tensor:
    """(R,) bool: the rows whose mask the BCE + Dice loss trains: every structure row (present, absent, pseudo),
    not the finding phrases (``is_prior``: prior mass loss), and not the foreign negatives when
    ``foreign_negative_mask_loss`` is off (those then train only the existence head)."""
    rows = ~batch.is_prior
    if not cfg.foreign_negative_mask_loss:
        rows = rows & ~torch.tensor(batch.negative, dtype=torch.bool)
    return rows


def sample_batch(entries: Sequence[CacheEntry], weights: np.ndarray, cache: FeatureCache, cfg: TrainConfig,
                 rng: random.Random, nrng: np.random.Generator, miner: HardNegativeMiner | None = None) -> Batch:
    """Draw ``batch_images`` cached images (by ``weights``) and their text rows (:class:`Batch`).

    Per image: up to ``texts_per_image`` present structures; with ``negative_prob`` one the source annotates but
    this image lacks, and with ``foreign_negative_prob`` ``negatives_per_image`` structures of other kinds
    (uniformly, or by ``miner`` when given), all with empty targets; one pseudo-labelled row per
    ``distill_sources`` image; ``prior_texts_per_image`` finding phrases on chest radiographs."""
    from finetune.textseg_prior import sample_finding_prior
    from prompts.anatomy import sample_text

    picks = nrng.choice(len(entries), size=cfg.batch_images, replace=False, p=weights)
    levels = list(cfg.level_weights)
    lw = [cfg.level_weights[k] for k in levels]
    prefixes, rows, texts, targets = [], [], [], []
    flags: list[bool] = []
    sources: list[str] = []
    pseudo: list[bool] = []
    names_out: list[str] = []
    negative: list[bool] = []
    distill_sources = set(cfg.distill_sources) if cfg.distill_structures else set()
    for bi, idx in enumerate(picks):
        e = entries[int(idx)]
        prefixes.append(cache.prefix[e.key].float())
        names = list(e.structures)
        rng.shuffle(names)
        names = names[: cfg.texts_per_image]
        chosen: list[tuple[str, bool]] = [(n, True) for n in names]
        negatives: list[str] = []
        if e.absent and rng.random() < cfg.negative_prob:
            negatives.append(rng.choice(list(e.absent)))
        foreign = mismatched_structures(e.dataset)
        if foreign and rng.random() < cfg.foreign_negative_prob:
            if miner is not None:
                negatives += miner.pick(e.dataset, foreign, cfg.negatives_per_image, rng)
            else:
                negatives += rng.sample(list(foreign), min(len(foreign), cfg.negatives_per_image))
        if negatives:
            # negative texts take the last slots when the image already fills texts_per_image
            keep = max(1, cfg.texts_per_image - len(negatives))
            chosen = [*chosen[:keep], *((n, False) for n in negatives)]
        unlabelled = [n for n in cfg.distill_structures if n not in e.structures and n not in e.absent]
        teach = [rng.choice(unlabelled)] if e.dataset in distill_sources and unlabelled else []
        size = next(iter(cache.masks[e.key].values())).shape[-1] if cache.masks[e.key] else 256
        for name, present in [*chosen, *((n, True) for n in teach)]:
            level = rng.choices(levels, weights=lw)[0]
            # the site hint half of the time: at inference only the modality may be known
            site = e.site if e.site and rng.random() < 0.5 else None
            text, _ = sample_text(name, rng, levels=(level,), modality=e.modality,  # type: ignore[arg-type]
                                  site=site)
            texts.append(text)
            rows.append(bi)
            is_pseudo = name in teach
            tgt = cache.masks[e.key][name] if present and not is_pseudo else torch.zeros(size, size, dtype=torch.bool)
            targets.append(tgt[None].float())
            flags.append(False)
            sources.append(e.dataset)
            pseudo.append(is_pseudo)
            names_out.append(name)
            negative.append(name in foreign and not present)
        if cfg.prior_weight > 0:
            for _ in range(cfg.prior_texts_per_image):
                found = sample_finding_prior(cache.masks[e.key], rng)
                if found is None:  # not a chest radiograph with lungs (CT, MR): no prior to learn from
                    break
                texts.append(found[0])
                rows.append(bi)
                targets.append(torch.from_numpy(found[1])[None])
                flags.append(True)
                sources.append(e.dataset)
                pseudo.append(False)
                names_out.append("")
                negative.append(False)
    return Batch(torch.stack(prefixes), rows, texts, torch.stack(targets), torch.tensor(flags, dtype=torch.bool),
                 sources, torch.tensor(pseudo, dtype=torch.bool), names_out, negative)


def _forward_full(model: MedVLM, prefixes: torch.Tensor, rows: list[int], texts: list[str],
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    feats = model.image_encoder.suffix(prefixes)
    feats = feats[torch.as_tensor(rows, device=feats.device)]
    ids, am = model.text_encoder.tokenize(texts, feats.device)
    return model.forward_with_existence(feats, ids, am)


def forward_cached(model: MedVLM, prefixes: torch.Tensor, rows: list[int], texts: list[str]) -> torch.Tensor:
    """Mask logits (R, 1, S, S) of ``texts`` on cached frozen prefixes (B, ...); ``rows[r]`` is text r's image."""
    return _forward_full(model, prefixes, rows, texts)[0]


@torch.no_grad()
def cached_predictions(model: MedVLM, cache: FeatureCache, entries: Sequence[CacheEntry], level: str = "complex",
                       ) -> Iterator[tuple[CacheEntry, list[str], torch.Tensor]]:
    """For each cached image with structures: ``(entry, structure names, logits (n, 1, S, S))`` in the 256
    letterbox frame, every structure prompted with its ``level`` description (one encoder suffix per image)."""
    from prompts.anatomy import describe

    model.eval()
    for e in entries:
        names = list(e.structures)
        if names:
            texts = [describe(n, level, modality=e.modality) for n in names]  # type: ignore[arg-type]
            yield e, names, forward_cached(model, cache.prefix[e.key][None].float(), [0] * len(names), texts)


def evaluate_cached(model: MedVLM, cache: FeatureCache, entries: Sequence[CacheEntry], level: str = "complex",
                    ) -> dict[str, float]:
    """Mean Dice per structure in the 256 letterbox frame on cached (un-augmented) images; a fast proxy used
    during training. The real evaluation is ``medvlm eval text-seg`` at the original resolution."""
    from eval.metrics import dice

    scores: dict[str, list[float]] = {}
    for e, names, logits in cached_predictions(model, cache, entries, level):
        for i, n in enumerate(names):
            scores.setdefault(n, []).append(dice((logits[i, 0] > 0).numpy(), cache.masks[e.key][n].numpy()))
    return {n: float(np.mean(v)) for n, v in sorted(scores.items())}


# ------------------------------------------------------------------------------------------------- train


def _prefix_runner(encoder: Any, precision: str) -> Any:
    """The function that computes the frozen image prefix of a batch ``(B, 3, S, S)`` for the feature cache:
    ``encoder.prefix`` in fp32, or the OpenVINO-compiled prefix (:mod:`segmentation.runtime`) when ``precision``
    resolves to bf16."""
    if precision == "fp32":
        return encoder.prefix
    from segmentation.runtime import compile_encoder, resolve_precision

    if resolve_precision(precision) == "fp32":
        return encoder.prefix

    class _Prefix(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.encoder.prefix(pixels)

    size = encoder.config.image_size
    compiled = compile_encoder(_Prefix().eval(), torch.zeros(1, 3, size, size), "bf16", key="medvlm-prefix")
    # TinyViT's traced graph keeps the example's batch size in its reshapes: one image per call
    return lambda pixels: torch.cat([compiled(pixels[i:i + 1]) for i in range(pixels.shape[0])])


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _init_from(model: MedVLM, model_cfg: MedVLMConfig, directory: str) -> None:
    """Copy the trained weights of checkpoint ``directory`` into ``model``, whose config must be the same (a
    resumed run overwrites them with its own ``last/``)."""
    from segmentation.textseg.checkpoint import load_medvlm, read_checkpoint_config

    theirs, _ = read_checkpoint_config(directory)
    # a new existence head on the same architecture starts from scratch; everything else must match
    # and so does what the images show (neighbouring slices or not): the weights are the same shapes
    free = {"existence_head": None, "slice_context": None, "color_input": None}
    mine_json, theirs_json = model_cfg.to_json(), theirs.to_json()
    # LoRA in more encoder stages than the checkpoint has: the new adapters start at zero, so the model starts
    # from exactly the checkpoint's outputs (fewer stages would drop trained adapters: refused)
    more_stages = _adapted_stages(model_cfg) > _adapted_stages(theirs)
    if more_stages:
        mine_json = {**mine_json, "image_encoder": {**mine_json["image_encoder"], "lora_last_stages": None}}
        theirs_json = {**theirs_json, "image_encoder": {**theirs_json["image_encoder"], "lora_last_stages": None}}
    if {**theirs_json, **free} != {**mine_json, **free}:
        raise input_error("init_from", expected="a checkpoint built by the same model config as this run",
                          received=f"{directory} with config {theirs.to_json()}",
                          fix="set `model:` to that checkpoint's config (its config.json), or drop init_from")
    source, _ = load_medvlm(directory)
    state = source.trainable_state_dict()
    new_stages = set(range(model.image_encoder.first_adapted, source.image_encoder.first_adapted))
    missing = [k for k in model.trainable_state_dict() if k not in state and not k.startswith("existence.")
               and _encoder_stage(k) not in new_stages]
    if missing:
        raise input_error("init_from", expected="every trained weight of this model in the checkpoint",
                          received=f"{len(missing)} missing, e.g. {missing[:3]}", fix="use a matching checkpoint")
    model.load_state_dict(state, strict=False)


def _adapted_stages(config: MedVLMConfig) -> float:
    k = config.image_encoder.lora_last_stages
    return math.inf if k == -1 else float(k if config.image_encoder.lora_rank > 0 else 0)


def _encoder_stage(key: str) -> int | None:
    """The stage index of an image-encoder weight name (``image_encoder.stages.<i>....``), else None."""
    m = re.match(r"image_encoder\.stages\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def load_teacher(cfg: TrainConfig, model_cfg: MedVLMConfig) -> MedVLM:
    """The frozen ``distill_from`` checkpoint; its image encoder must read the same cached prefix."""
    from segmentation.textseg.checkpoint import load_medvlm

    assert cfg.distill_from is not None  # validate() guarantees it when distill_weight > 0
    teacher, _ = load_medvlm(cfg.distill_from)
    if asdict(teacher.config.image_encoder) != asdict(model_cfg.image_encoder):
        raise input_error("distill_from", expected="a teacher with this run's image encoder (same cached features)",
                          received=f"{cfg.distill_from} with {asdict(teacher.config.image_encoder)}",
                          fix="distill from a checkpoint of the same architecture (e.g. the shipped default)")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def distill_loss(teacher: MedVLM, prefixes: torch.Tensor, rows: list[int], texts: list[str],
                  logits: torch.Tensor, targets: torch.Tensor, is_prior: torch.Tensor, sources: list[str],
                  distill_sources: set[str]) -> torch.Tensor:
    """Mean BCE of the student's ``logits`` (R, 1, S, S) against the teacher's probabilities, over the rows of
    ``distill_sources`` whose structure is present (a negative's teacher map would teach a mask); 0 when none."""
    keep = [i for i, src in enumerate(sources) if src in distill_sources and not bool(is_prior[i])
            and bool(targets[i].any())]
    if not keep:
        return logits.sum() * 0.0
    with torch.no_grad():
        soft = torch.sigmoid(forward_cached(teacher, prefixes, [rows[i] for i in keep], [texts[i] for i in keep]))
    return torch.nn.functional.binary_cross_entropy_with_logits(logits[keep], soft)


@torch.no_grad()
def pseudo_targets(teacher: MedVLM, prefixes: torch.Tensor, rows: list[int], texts: list[str],
                   targets: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """``targets`` (R, 1, S, S) with the ``pseudo`` rows replaced by the teacher's mask (logit > 0) of the same
    text on the same cached prefixes (B, ...); the other rows unchanged."""
    idx = [i for i in range(len(texts)) if bool(pseudo[i])]
    if not idx:
        return targets
    logits = forward_cached(teacher, prefixes, [rows[i] for i in idx], [texts[i] for i in idx])
    out = targets.clone()
    out[idx] = (logits > 0).to(out.dtype)
    return out


def _save_state(model: MedVLM, optimizer: torch.optim.Optimizer, step: int, directory: Path,
                meta: dict[str, Any]) -> None:
    from medvlm.io import atomic_open
    from segmentation.textseg.checkpoint import save_medvlm

    save_medvlm(model, directory, meta={**meta, "step": step})
    with atomic_open(directory / "trainer_state.pt", "wb") as fh:
        torch.save({"optimizer": optimizer.state_dict(), "step": step,
                    "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}}, fh)


def train_medvlm(cfg: TrainConfig, *, progress: bool = True, resume: bool = True) -> dict[str, Any]:
    """Build the cache if needed, train (resuming from ``out_dir/last`` when present), evaluate; returns a summary
    {"steps", "seconds", "best_val_dice", "val_dice", "trainable", "total"}."""
    from accelerate import Accelerator
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    cfg.validate()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if cfg.model:
        model_cfg = MedVLMConfig.from_json(cfg.model)
    elif cfg.init_from is not None:  # fine-tuning with no model section: the checkpoint's own architecture
        from segmentation.textseg.checkpoint import read_checkpoint_config

        model_cfg = read_checkpoint_config(cfg.init_from)[0]
    else:
        model_cfg = MedVLMConfig()
    if cfg.slice_context is not None:
        model_cfg = replace(model_cfg, slice_context=cfg.slice_context)
    if cfg.color_input is not None:
        model_cfg = replace(model_cfg, color_input=cfg.color_input)
    if cfg.image_lora_stages is not None:
        model_cfg = replace(model_cfg, image_encoder=replace(model_cfg.image_encoder,
                                                             lora_last_stages=cfg.image_lora_stages))
    model = build_medvlm(model_cfg)
    if cfg.init_from is not None:
        _init_from(model, model_cfg, cfg.init_from)
    if cfg.train_modules:
        model.freeze_except(cfg.train_modules)
    trainable, total = model.parameter_counts()
    log.info("Med-VLM parameters: %d trainable / %d total", trainable, total)
    if progress:
        accelerator.print(f"trainable parameters: {trainable:,} / {total:,} ({100 * trainable / total:.1f} %)")

    train_items, val_items = _split(cfg, model_cfg.slice_context)
    (out / "val_ids.txt").write_text("".join(f"{s.id}\n" for _, s, _, _ in val_items))
    t0 = time.time()
    prefix_fn = _prefix_runner(model.image_encoder, cfg.cache_precision)
    train_entries = build_cache(model.image_encoder, train_items, cfg.cache_dir, seed=cfg.seed, progress=progress,
                                prefix_fn=prefix_fn, wholes=cfg.wholes,
                                zooms={s.name: s.zooms for s in cfg.data if s.zooms},
                                slice_context=model_cfg.slice_context, color_input=model_cfg.color_input)
    build_cache(model.image_encoder, val_items, Path(cfg.cache_dir) / "val", seed=cfg.seed, progress=progress,
                prefix_fn=prefix_fn, wholes=cfg.wholes, slice_context=model_cfg.slice_context,
                color_input=model_cfg.color_input)
    cache_s = time.time() - t0
    cache = FeatureCache(cfg.cache_dir, model.image_encoder, slice_context=model_cfg.slice_context)
    val_cache = FeatureCache(Path(cfg.cache_dir) / "val", model.image_encoder, slice_context=model_cfg.slice_context)
    train_keys = {e.key for e in train_entries}
    entries = [e for e in cache.entries if e.key in train_keys and e.structures]
    val_list = list(val_cache.entries)[: cfg.eval_limit]
    per_source = {s.name: s.weight for s in cfg.data}
    # a source's weight is per image, shared by its variants (or, balance: source, shared by all its entries)
    n_variants = {s.name: s.variants + s.zooms for s in cfg.data}
    n_entries: dict[str, int] = {}
    for e in entries:
        n_entries[e.dataset] = n_entries.get(e.dataset, 0) + 1
    share = (lambda e: n_entries[e.dataset]) if cfg.balance == "source" else (lambda e: n_variants[e.dataset])
    w = np.array([per_source[e.dataset] / share(e) for e in entries], dtype=np.float64)
    weights = w / w.sum()

    teacher = load_teacher(cfg, model_cfg) if cfg.distill_weight > 0 else None
    distill_sources = set(cfg.distill_sources)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    last = out / "last"
    if resume and (last / "trainer_state.pt").is_file():
        state = load_file(str(last / "model.safetensors"))
        model.load_state_dict(state, strict=False)
        tstate = torch.load(last / "trainer_state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(tstate["optimizer"])
        start = int(tstate["step"])
        random.setstate(tstate["rng"]["python"])
        torch.set_rng_state(tstate["rng"]["torch"])
        accelerator.print(f"resumed from {last} at step {start}")
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model: MedVLM = accelerator.unwrap_model(model)
    rng = random.Random(cfg.seed * 1000 + start)
    nrng = np.random.default_rng(cfg.seed * 1000 + start)
    best = -1.0
    log_path = out / "log.jsonl"
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            best = max(best, float(json.loads(line).get("val_mean_dice", -1)))
    meta = {"train_config": asdict(cfg), "val_ids": [s.id for _, s, _, _ in val_items]}
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not progress)
    t_train = time.time()
    ema = None
    miner = HardNegativeMiner() if cfg.hard_negatives else None
    for step in bar:
        raw_model.train()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        batch = sample_batch(entries, weights, cache, cfg, rng, nrng, miner)
        prefixes, rows, texts, targets, is_prior, sources, pseudo = batch[:7]
        if teacher is not None and bool(pseudo.any()):
            targets = pseudo_targets(teacher, prefixes.to(accelerator.device), rows, texts, targets, pseudo)
        logits, exist = _forward_full(raw_model, prefixes.to(accelerator.device), rows, texts)
        targets, is_prior = targets.to(logits.device), is_prior.to(logits.device)
        mask_rows = mask_loss_rows(batch, cfg).to(logits.device)
        loss = bce_dice_loss(logits[mask_rows], targets[mask_rows])
        if cfg.positive_weight > 0:
            loss = loss + cfg.positive_weight * positive_bce_loss(logits[mask_rows], targets[mask_rows])
        if teacher is not None:
            loss = loss + cfg.distill_weight * distill_loss(teacher, prefixes.to(logits.device), rows, texts,
                                                             logits, targets, is_prior, sources, distill_sources)
        if exist is not None and cfg.existence_weight > 0:
            present = targets[~is_prior].flatten(1).amax(1)
            loss = loss + cfg.existence_weight * torch.nn.functional.binary_cross_entropy_with_logits(
                exist[~is_prior], present)
            if miner is not None:
                probs = torch.sigmoid(exist.detach()).tolist()
                for r, neg in enumerate(batch.negative):
                    if neg:
                        miner.update(batch.sources[r], batch.names[r], probs[r])
        if bool(is_prior.any()):
            loss = loss + cfg.prior_weight * prior_mass_loss(logits[is_prior], targets[is_prior])
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        bar.set_postfix(loss=f"{ema:.3f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _save_state(raw_model, optimizer, done, last, meta)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            scores = evaluate_cached(raw_model, val_cache, val_list)
            mean = float(np.mean(list(scores.values()))) if scores else float("nan")
            record = {"step": done, "loss_ema": ema, "val_mean_dice": mean, "val_dice": scores,
                      "seconds": time.time() - t_train}
            with log_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            accelerator.print(f"step {done}: loss {ema:.4f} val Dice (256 frame) "
                              + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
            if mean > best:
                best = mean
                from segmentation.textseg.checkpoint import save_medvlm

                save_medvlm(raw_model, out / "best", meta={**meta, "step": done, "val_dice_256": scores})
    return {"steps": cfg.steps, "seconds": time.time() - t_train, "cache_seconds": cache_s, "best_val_dice": best,
            "trainable": trainable, "total": total}
