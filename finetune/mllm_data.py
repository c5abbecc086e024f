"""SFT data for the multimodal LLM: the task builders (:mod:`finetune.tasks`) run over dataset folders, with every
image rendered once to a PNG that any processor reads.

The readers give DICOM, NIfTI slices and volumes as well as PNGs; a VLM processor takes RGB pictures. Each image is
rendered with its own windowing (``MedicalImage.to_rgb_uint8``), downscaled so that its longer side is at most
``image_max_side`` (aspect kept; answers are location tokens, i.e. fractions of the image, so they stay valid),
and written to ``<out_dir>/images/<dataset>/<id>.png``. The examples go to ``<out_dir>/data/train.jsonl``: a rerun
with the same config reuses both.

JSRT/SCR is split as the Med-VLM recipe splits it (``split_ids(val_fraction, split_seed)`` by patient group), and
its val ids are never turned into examples, so the two models share one held-out set.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlm.errors import input_error

__all__ = ["TASKS", "MLLMDataSource", "build_examples", "pack_turns", "render_image"]

TASKS: tuple[str, ...] = ("anatomy_grounding", "finding_grounding", "anatomy_segmentation", "relative_position",
                          "reference_pair", "drr")
"""Task builders a data source may ask for (names of :mod:`finetune.tasks` functions; ``drr``: synthetic
radiographs projected from the CT volumes of a TotalSegmentator-style folder, with grounding and mask examples)."""

JSRT = "cxr_jsrt_scr"


@dataclass
class MLLMDataSource:
    """One data folder: ``name`` (a :func:`medvlm.datasets.open_dataset` name or path), the ``tasks`` built from
    each of its samples, ``limit`` (first N ids, for quick runs), ``reference_pairs`` (number of
    reference-pair examples drawn among its samples, when ``"reference_pair"`` is in ``tasks``) and ``augment``
    (geometrically augmented copies per sample, :mod:`finetune.augment`, each with its own rendered image and
    the same tasks; ``augment_scale`` and ``augment_rotation`` set the zoom-out range and the largest rotation
    in degrees)."""

    name: str
    tasks: list[str] = field(default_factory=lambda: ["anatomy_grounding", "finding_grounding"])
    limit: int | None = None
    reference_pairs: int = 0
    augment: int = 0
    augment_scale: tuple[float, float] = (0.6, 1.0)
    augment_rotation: float = 5.0

    def validate(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise input_error(f"data source {self.name!r} tasks", expected=f"a non-empty list among {TASKS}",
                              received=repr(self.tasks), fix="e.g. tasks: [anatomy_grounding, finding_grounding]")
        if self.augment < 0:
            raise input_error(f"data source {self.name!r} augment", expected="copies per sample >= 0",
                              received=repr(self.augment), fix="use e.g. augment: 3 (0 = none)")
        self.augmentation()  # validates the range and the rotation

    def augmentation(self) -> Any:
        """The :class:`finetune.augment.GeometricAugment` of this source."""
        from finetune.augment import GeometricAugment

        lo, hi = self.augment_scale
        return GeometricAugment(scale=(float(lo), float(hi)), max_rotation_deg=float(self.augment_rotation))


def render_image(sample: Any, path: Path, max_side: int) -> Path:
    """Write ``sample.image`` as an RGB PNG whose longer side is at most ``max_side`` pixels; kept if present."""
    from PIL import Image

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(sample.image.to_rgb_uint8())
        scale = max_side / max(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.LANCZOS)
        tmp = path.with_suffix(".tmp.png")
        img.save(tmp)
        tmp.replace(path)  # a killed run never leaves a half-written PNG under the final name
    return path


def build_examples(sources: Sequence[MLLMDataSource], out_dir: str | Path, *, data_root: str | None = None,
                   image_max_side: int = 512, val_fraction: float = 0.2, split_seed: int = 0,
                   seed: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
    """Examples of every source (images rendered under ``out_dir/images``), and the held-out JSRT ids.

    Returns ``(examples, val_ids)``; each example is TRL prompt-completion with ``images`` = PNG paths. Also
    writes ``out_dir/data/train.jsonl`` (one example per line) and ``out_dir/data/val_ids.txt``.
    """
    from finetune.augment import augment_sample
    from medvlm.datasets import open_dataset, split_ids

    rng = random.Random(seed)
    out = Path(out_dir)
    examples: list[dict[str, Any]] = []
    val_all: list[str] = []
    for src in sources:
        src.validate()
        ds = open_dataset(src.name, root=data_root)
        ids = ds.ids()[: src.limit] if src.limit else ds.ids()
        if Path(src.name).name == JSRT:
            ids, val = split_ids(ids, val_fraction, split_seed, group=ds.group)
            val_all += val
        samples = []
        per_sample = [t for t in src.tasks if t not in ("reference_pair", "drr")]
        augmentation = src.augmentation()
        folder = out / "images" / Path(src.name).name
        for sid in ids if per_sample or "reference_pair" in src.tasks else []:
            original = ds.load(sid)
            copies = [original]
            for k in range(src.augment):
                # its own stream per (sample, copy): a rerun, or another source added, draws the same copies
                copies.append(augment_sample(original, random.Random(f"{seed}/{src.name}/{sid}/{k}"), augmentation,
                                             suffix=f"aug{k}"))
            for sample in copies:
                png = render_image(sample, folder / f"{sample.id}.png", image_max_side)
                sample.source = str(png)  # the builders name the image by ``source``
                examples += _sample_examples(sample, per_sample, rng)
            samples.append(original)
        if "reference_pair" in src.tasks:
            examples += _reference_pairs(samples, src.reference_pairs, rng)
        if "drr" in src.tasks:
            examples += _drr(ds, out / "images" / Path(src.name).name / "drr", rng)
    (out / "data").mkdir(parents=True, exist_ok=True)
    with open(out / "data" / "train.jsonl", "w") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")
    (out / "data" / "val_ids.txt").write_text("".join(f"{v}\n" for v in val_all))
    return examples, val_all


def pack_turns(examples: Sequence[dict[str, Any]], turns: int, rng: random.Random) -> list[dict[str, Any]]:
    """TRL prompt-completion ``examples`` as conversational ones (``{"messages", "images"}``), the questions about
    one image grouped up to ``turns`` at a time into one multi-turn conversation: the image (64 tokens for
    medvlm-mini) and the system prompt are paid once per group instead of once per question, and a loss on every
    assistant turn (TRL ``assistant_only_loss``) trains each answer. The image part stays in the first user turn
    only, where inference puts it; which questions share a conversation is drawn by ``rng``. Examples with several
    images (reference pairs) are converted one to one. ``turns`` = 1 converts every example as it is."""
    if turns < 1:
        raise input_error("turns_per_image", expected="an integer >= 1", received=repr(turns),
                          fix="use 1 (one question per example) or e.g. 5")
    by_image: dict[str, list[dict[str, Any]]] = {}
    out: list[dict[str, Any]] = []
    for example in examples:
        if len(example["images"]) == 1:
            by_image.setdefault(example["images"][0], []).append(example)
        else:
            out.append(_conversation([example]))
    for items in by_image.values():
        items = list(items)
        rng.shuffle(items)
        out += [_conversation(items[k:k + turns]) for k in range(0, len(items), turns)]
    return out


def _conversation(group: Sequence[dict[str, Any]]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    for k, example in enumerate(group):
        for message in example["prompt"]:
            content = message["content"]
            if k and isinstance(content, list):  # later turns refer to the image of the first one
                content = [part for part in content if part.get("type") != "image"]
            messages.append({"role": message["role"], "content": content})
        messages += [dict(m) for m in example["completion"]]
    return {"messages": messages, "images": list(group[0]["images"]), "task": group[0].get("task"),
            "meta": [e.get("meta") for e in group]}


def _sample_examples(sample: Any, per_sample: Sequence[str], rng: random.Random) -> list[dict[str, Any]]:
    from finetune import tasks

    examples: list[dict[str, Any]] = []
    for task in per_sample:
        if task == "anatomy_grounding" and sample.masks:
            examples += tasks.anatomy_grounding(sample, rng)
        elif task == "anatomy_segmentation" and sample.masks:
            examples += tasks.anatomy_segmentation(sample, rng)
        elif task == "finding_grounding":
            examples += tasks.finding_grounding(sample)
        elif task == "relative_position" and sample.masks:
            examples += tasks.relative_position(sample, rng)
    return examples


def _reference_pairs(samples: Sequence[Any], n: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n`` pairs of distinct samples sharing a structure, each asked for one shared structure."""
    from finetune.tasks import reference_pair

    with_masks = [s for s in samples if s.masks]
    out: list[dict[str, Any]] = []
    for _ in range(n if len(with_masks) >= 2 else 0):
        ref, tgt = rng.sample(with_masks, 2)
        shared = sorted(set(ref.masks) & set(tgt.masks))
        if shared:
            out.append(reference_pair(ref, tgt, rng.choice(shared)))
    return out


def _drr(ds: Any, out: Path, rng: random.Random) -> list[dict[str, Any]]:
    """DRR grounding + segmentation examples of every CT volume (with its label volume) of a TotalSegmentator-style
    dataset (``PAIRS`` of image/label files and ``labels()`` naming the label values)."""
    from finetune.tasks import drr_examples, write_drr_sample

    pairs = getattr(ds, "_pairs", None)
    if pairs is None:
        raise input_error("task drr", expected="a TotalSegmentator-style folder (CT + label volumes)",
                          received=type(ds).__name__, fix="use drr with ct_totalsegmentator_example-like data")
    examples: list[dict[str, Any]] = []
    for image_file, seg_file, task, modality in pairs():
        if modality != "CT":  # Beer-Lambert needs Hounsfield units
            continue
        names = {int(k): v for k, v in ds.labels().get(task, {}).get("label_names", {}).items()}
        drr, png = write_drr_sample(ds.root / image_file, ds.root / seg_file, out, names)
        examples += drr_examples(drr, png, rng)
    return examples
