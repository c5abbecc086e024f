"""``medvlm eval link-report``: report-to-region linking scored against reports whose answers are known.

For every image a short radiology report is composed from its annotations (a seeded RNG picks one of several
templates per sentence, so the wording varies but a seed always gives the same report), so that each sentence
has a known status and, when it is groundable, known ground-truth boxes (pixel xyxy of the original image):

- ``nodule`` (images with a nodule box): "There is a 30 mm nodule in the left upper lobe." -> grounded, the
  nodule box; scored by box IoU, the pointing game and the zone hit (nodule centre inside a predicted region);
- ``normal anatomy``: "The heart size is normal." -> grounded, the heart box (from the heart mask; "the
  cardiomediastinal silhouette": the box of the cardiac silhouette + mediastinum regions derived from the
  ground-truth masks, as that phrase names both); "The lungs are otherwise clear." -> grounded, the right and
  left lung boxes (each scored with its best-matching region);
- ``uncertain zone`` (images without a nodule): "Possible small opacity at the left lung base." -> grounded
  (an uncertain assertion is still grounded), the left lower lung zone derived from the ground-truth masks
  (:func:`agents.anatomy.anatomy_from_masks`);
- ``negated`` ("No pneumothorax or pleural effusion.") and, on images without a nodule, ``negated nodule``
  ("No pulmonary nodule is seen.") -> negated;
- ``nothing to ground`` ("Comparison: none.", "Clinical correlation is recommended.") -> not_groundable.

The report keeps a plausible order: comparison first, recommendation last, and in between the heart sentence,
the lung block (finding, then "the lungs are otherwise clear") and the negatives, in seeded order.

:func:`agents.report.link_report` then links the whole report on the image in one call (one image encoding)
with the embedded grounder, and :class:`LinkReportScorer` scores sentence status (accuracy, confusion) and, per
groundable kind, box mIoU / Acc@0.5 (best-overlapping region per ground-truth box; no region = IoU 0), pointing
game (the best-matching region's point in the box), zone hit and laterality errors (any region of a sided
sentence lying mostly on the other side of the ground-truth midline).
"""

from __future__ import annotations

import random
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.report import SentenceLink, Status
from medvlm.errors import MedvlmError, input_error
from medvlm.types import Box, Mask, Region

__all__ = ["ComposedReport", "ExpectedSentence", "LinkReportScorer", "compose_report", "format_link_report_table",
           "link_report_suite"]

STATUSES: tuple[Status, ...] = ("grounded", "negated", "not_groundable")
KINDS = ("nodule", "normal anatomy", "uncertain zone", "negated", "negated nodule", "nothing to ground")
"""Sentence kinds, in table order; the first three are grounded and carry ground-truth boxes."""

UNCERTAIN_ZONE = "left lower lung zone"

_NODULE = ("There is {a_size} nodule in the {location}.",
           "{A_size} pulmonary nodule projects over the {location}.",
           "{A_size} rounded nodular opacity is seen in the {location}.",
           "{A_size} nodule is noted in the {location}.")
_HEART = ("The heart size is normal.", "The cardiomediastinal silhouette is within normal limits.",
          "Heart size is within normal limits.", "The cardiac silhouette is not enlarged.")
_CARDIOMEDIASTINAL = "The cardiomediastinal"
_CARDIOMEDIASTINAL_KEYS = ("cardiac silhouette", "mediastinum")
# every image has a finding sentence (nodule or possible opacity), so the lungs are "otherwise" clear
_LUNGS = ("The lungs are otherwise clear.", "Both lungs are well expanded.",
          "The lungs are well inflated and otherwise clear.", "Lungs are otherwise clear.")
_NEGATED = (("No pneumothorax or pleural effusion.", "There is no pneumothorax or pleural effusion.",
             "No pleural effusion or pneumothorax is identified."),
            ("There is no focal consolidation.", "No focal airspace consolidation.", "No consolidation is seen."))
_NEGATED_NODULE = ("No pulmonary nodule is seen.", "No pulmonary nodule or mass is identified.",
                   "No lung nodule is identified.")
_UNCERTAIN = ("Possible small opacity at the left lung base.", "Questionable faint opacity at the left lung base.",
              "There may be a faint opacity at the left lung base.",
              "A subtle opacity at the left base cannot be excluded.")
_COMPARISON = ("Comparison: none.", "No prior studies are available for comparison.")
_RECOMMEND = ("Clinical correlation is recommended.", "Follow-up as clinically indicated.")
_RECOMMEND_NODULE = ("CT correlation is recommended.", "Follow-up chest CT is recommended.")


@dataclass
class ExpectedSentence:
    """One composed sentence and its known answer: ``kind`` (one of :data:`KINDS`), ``status`` (what
    :func:`~agents.report.link_report` should say), ``boxes`` (ground truth, pixel xyxy; empty unless grounded),
    ``target`` (what the boxes outline) and ``side`` (the patient side the sentence states, if any)."""

    text: str
    kind: str
    status: Status
    boxes: list[Box] = field(default_factory=list)
    target: str = ""
    side: str | None = None


@dataclass
class ComposedReport:
    """The report of one image: its sentences in order, and the ground-truth midline (pixels) for laterality."""

    sample_id: str
    sentences: list[ExpectedSentence]
    midline: float | None = None

    @property
    def text(self) -> str:
        """The report as one string (sentences separated by spaces)."""
        return " ".join(s.text for s in self.sentences)


def _size_phrase(size_mm: Any) -> str:
    """``"a 30 mm"``, ``"an 18 mm"``, or ``"a"`` when the size is unknown."""
    try:
        size = f"{float(size_mm):g}"
    except (TypeError, ValueError):
        return "a"
    whole = size.split(".")[0]
    article = "an" if whole.startswith("8") or whole in ("11", "18") else "a"
    return f"{article} {size} mm"


def _nodule_location(meta: dict[str, Any], phrase: str, box: Box, midline: float | None) -> str:
    """Lobe words of the annotation ("left upper lobe(S5)" -> "left upper lobe"), else the phrase's "in the ...",
    else the lung on the box centre's side of the midline."""
    location = re.sub(r"\s*\([^)]*\)", "", str(meta.get("location") or "")).strip()
    if location:
        return location
    match = re.search(r"\bin the (.+)$", phrase)
    if match:
        return match.group(1).strip(" .")
    if midline is None:
        return "lung"
    return "right lung" if box.center[0] < midline else "left lung"  # patient's right = image left


def _mask_box(masks: dict[str, Any], name: str) -> Box | None:
    mask = masks.get(name)
    return None if mask is None else Mask(np.asarray(mask, dtype=bool)).to_box()


def compose_report(sample: Any, *, seed: int = 0) -> ComposedReport:
    """Compose the report of one sample (``.id``, ``.image.shape``, ``.masks`` name -> bool (H, W), ``.boxes``
    of :class:`~medvlm.datasets.base.BoxAnnotation`) with known answers. The RNG is seeded with ``seed`` and the
    sample id, so an image's report does not depend on which other images are evaluated. Sentences whose ground
    truth is missing (no heart mask, no lung masks) are left out."""
    from agents.anatomy import anatomy_from_masks
    from agents.text import split_sentences
    from prompts.anatomy import side_of

    rng = random.Random(f"{seed}:{sample.id}")
    gt = anatomy_from_masks(sample.masks, tuple(sample.image.shape[:2]), "ground truth")
    lungs = [b for b in (_mask_box(sample.masks, "right lung"), _mask_box(sample.masks, "left lung")) if b]
    midline = gt.midline_x() if len(lungs) == 2 else None
    nodules = [ann for ann in sample.boxes if ann.label == "nodule"]

    findings: list[ExpectedSentence] = []
    for ann in nodules:
        location = _nodule_location(ann.meta, ann.phrase, ann.box, midline)
        a_size = _size_phrase(ann.meta.get("size_mm"))
        text = rng.choice(_NODULE).format(a_size=a_size, A_size=a_size[0].upper() + a_size[1:], location=location)
        findings.append(ExpectedSentence(text, "nodule", "grounded", [ann.box], "nodule", side_of(location)))
    zone_box = gt.region_box(UNCERTAIN_ZONE) if not nodules else None
    if zone_box is not None:
        findings.append(ExpectedSentence(rng.choice(_UNCERTAIN), "uncertain zone", "grounded", [zone_box],
                                         UNCERTAIN_ZONE, "left"))
    lung_block = list(findings)
    if lungs:
        lung_block.append(ExpectedSentence(rng.choice(_LUNGS), "normal anatomy", "grounded", lungs,
                                           "right lung + left lung"))
    heart: list[ExpectedSentence] = []
    heart_text = rng.choice(_HEART)
    if heart_text.startswith(_CARDIOMEDIASTINAL):  # names heart + mediastinum: the same rule on ground truth
        union = gt.union(_CARDIOMEDIASTINAL_KEYS)
        box = Mask(union).to_box() if union is not None else None
        if box is not None:
            heart.append(ExpectedSentence(heart_text, "normal anatomy", "grounded", [box],
                                          " + ".join(_CARDIOMEDIASTINAL_KEYS)))
    elif (box := _mask_box(sample.masks, "heart")) is not None:
        heart.append(ExpectedSentence(heart_text, "normal anatomy", "grounded", [box], "heart"))
    negatives = [ExpectedSentence(rng.choice(group), "negated", "negated") for group in _NEGATED]
    if not nodules:
        negatives.append(ExpectedSentence(rng.choice(_NEGATED_NODULE), "negated nodule", "negated"))
    rng.shuffle(negatives)
    blocks = [b for b in (heart, lung_block, negatives) if b]
    rng.shuffle(blocks)
    sentences = [ExpectedSentence(rng.choice(_COMPARISON), "nothing to ground", "not_groundable")]
    sentences += [s for block in blocks for s in block]
    sentences.append(ExpectedSentence(rng.choice(_RECOMMEND_NODULE if nodules else _RECOMMEND),
                                      "nothing to ground", "not_groundable"))
    report = ComposedReport(str(sample.id), sentences, midline)
    n_split = len(split_sentences(report.text))
    if n_split != len(sentences):  # a template the sentence splitter cuts differently: fix the template
        raise MedvlmError(f"compose_report: {len(sentences)} sentences composed but split_sentences finds {n_split} "
                          f"in {report.text!r}")
    return report


def _point(region: Region) -> tuple[float, float]:
    """The region's first positive point, else its box centre (as in the grounding suite)."""
    if region.points is not None and len(region.points):
        x, y = region.points.positive[0]
        return float(x), float(y)
    return region.box.center


def _contains(region: Region, x: float, y: float) -> bool:
    """Whether (x, y) lies in the region's mask (its box when it has no mask)."""
    if region.mask is None:
        return region.box.contains_point(x, y)
    h, w = region.mask.shape
    return bool(region.mask.data[min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)])


class LinkReportScorer:
    """Accumulates sentence-level scores over reports.

    ``update(report, links)`` aligns the composed sentences with the links of
    :func:`~agents.report.link_report` by position and returns one record per sentence; ``compute()`` returns
    ``{"n_sentences", "status_accuracy", "confusion": {expected: {predicted: n}}, "per_status": {expected:
    {"n", "accuracy"}}, "per_kind": {kind: {...}}}``. A groundable kind adds ``n_boxes``, ``miou``, ``acc@0.5``,
    ``n_missing`` (ground-truth boxes with no region), ``pointing_hit_rate``, ``zone_hit_rate``, ``n_sided`` and
    ``laterality_errors``. Rates are None when nothing was scored.
    """

    def __init__(self) -> None:
        from eval.metrics import BoxAccumulator, PointingGameAccumulator

        self.confusion: dict[str, dict[str, int]] = {e: dict.fromkeys(STATUSES, 0) for e in STATUSES}
        self.kind_counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # [n, n correct]
        self.kind_status: dict[str, str] = {}
        self.boxes: dict[str, Any] = defaultdict(lambda: BoxAccumulator((0.5,)))
        self.pointing: dict[str, Any] = defaultdict(PointingGameAccumulator)
        self.zone_hits: dict[str, list[bool]] = defaultdict(list)
        self.sided: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # [n sided sentences with regions, errors]

    def update(self, report: ComposedReport, links: Sequence[SentenceLink]) -> list[dict[str, Any]]:
        """Score one report; returns per-sentence records (id, number, kind, text, expected, predicted, ious)."""
        from eval.grounding import side_error

        if len(links) != len(report.sentences):
            raise input_error("LinkReportScorer.update", expected=f"{len(report.sentences)} sentence links",
                              received=f"{len(links)} links for report {report.sample_id!r}",
                              fix="pass the links link_report returned for this report's text")
        records = []
        for sentence, link in zip(report.sentences, links):
            kind, expected, predicted = sentence.kind, sentence.status, link.status
            self.confusion[expected][predicted] += 1
            self.kind_status[kind] = expected
            counts = self.kind_counts[kind]
            counts[0] += 1
            counts[1] += int(predicted == expected)
            ious = []
            for gt_box in sentence.boxes:
                best = max(link.regions, key=lambda r: r.box.iou(gt_box), default=None)
                ious.append(round(self.boxes[kind].update(best.box if best else None, gt_box), 4))
                self.pointing[kind].update(_point(best) if best else None, gt_box)
                cx, cy = gt_box.center
                self.zone_hits[kind].append(any(_contains(r, cx, cy) for r in link.regions))
            if sentence.side in ("left", "right") and link.regions and report.midline is not None:
                midline = report.midline
                self.sided[kind][0] += 1
                self.sided[kind][1] += int(any(side_error(r, sentence.side, midline) for r in link.regions))
            record: dict[str, Any] = {"id": report.sample_id, "number": link.number, "kind": kind,
                                      "text": sentence.text, "expected": expected, "predicted": predicted}
            if sentence.boxes:
                record["target"], record["ious"] = sentence.target, ious
            if link.note and predicted != expected:
                record["note"] = link.note
            records.append(record)
        return records

    def compute(self) -> dict[str, Any]:
        """Status accuracy, confusion and per-kind metrics (see the class docstring)."""
        n = sum(sum(row.values()) for row in self.confusion.values())
        correct = sum(self.confusion[s][s] for s in STATUSES)
        per_status = {}
        for status, row in self.confusion.items():
            total = sum(row.values())
            per_status[status] = {"n": total, "accuracy": row[status] / total if total else None}
        per_kind: dict[str, Any] = {}
        for kind in sorted(self.kind_counts, key=lambda k: (KINDS.index(k) if k in KINDS else len(KINDS), k)):
            total, right = self.kind_counts[kind]
            entry: dict[str, Any] = {"n": total, "expected_status": self.kind_status[kind],
                                     "status_accuracy": right / total if total else None}
            if kind in self.boxes:
                box = self.boxes[kind].compute()
                hits = self.zone_hits[kind]
                entry.update({"n_boxes": box["n"], "miou": box["miou"], "acc@0.5": box["acc@0.5"],
                              "n_missing": box["n_missing"],
                              "pointing_hit_rate": self.pointing[kind].compute()["hit_rate"],
                              "zone_hit_rate": float(np.mean(hits)) if hits else None,
                              "n_sided": self.sided[kind][0], "laterality_errors": self.sided[kind][1]})
            per_kind[kind] = entry
        return {"n_sentences": n, "status_accuracy": correct / n if n else None, "confusion": self.confusion,
                "per_status": per_status, "per_kind": per_kind}


def link_report_suite(data: str | Path, *, agent: Any = None, split: str = "auto", limit: int | None = None,
                      ids_file: str | None = None, seed: int = 0, threshold: float = 0.5) -> dict[str, Any]:
    """Compose a report per image of ``data``, link it with ``agent`` (default: the embedded
    ``GroundingAgent("medvlm")``) at ``threshold`` and score it. ``split``: ``auto`` = the Med-VLM checkpoint's
    val ids when present here, else all; ``val`` = only those (error when none is here); ``all``. Returns
    ``{"suite": "link-report", "grounder", "data", "n_images", "split", "seed", "threshold", "n_sentences",
    "status_accuracy", "confusion", "per_status", "per_kind", "per_sentence", "seconds"}``."""
    from agents.pipeline import GroundingAgent
    from agents.report import link_report
    from eval.splits import select_ids
    from medvlm.datasets import open_dataset

    dataset = open_dataset(data)
    agent = agent or GroundingAgent("medvlm")
    meta = getattr(getattr(agent.grounder, "segmenter", None), "meta", {}) or {}
    val_ids = set(meta.get("val_ids", []))
    all_ids = dataset.ids()
    in_val = [i for i in all_ids if i in val_ids]
    if split == "val" and not in_val:
        raise input_error("--split val", expected="a folder holding the checkpoint's val ids",
                          received=f"none of its {len(val_ids)} val ids in {data}", fix="use --split all")
    used = "val" if split == "val" or (split == "auto" and in_val) else "all"
    ids = select_ids(in_val if used == "val" and not ids_file else all_ids, ids_file, limit)
    scorer = LinkReportScorer()
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for sid in ids:
        sample = dataset.load(sid)
        report = compose_report(sample, seed=seed)
        links = link_report(agent, sample.image, report.text, threshold=threshold)
        records.extend(scorer.update(report, links))
    scores = scorer.compute()
    return {"suite": "link-report", "grounder": agent.grounder.name, "data": str(data), "n_images": len(ids),
            "split": used, "seed": seed, "threshold": threshold, **scores, "per_sentence": records,
            "seconds": round(time.perf_counter() - t0, 1)}


def format_link_report_table(payload: dict[str, Any]) -> str:
    """Status accuracy and confusion (expected rows x predicted columns), then one row per sentence kind: n,
    status accuracy, and for grounded kinds box mIoU, Acc@0.5, pointing game, zone hit and laterality errors."""
    title = (f"link-report | grounder {payload['grounder']} | {payload['n_images']} images | split "
             f"{payload['split']} | seed {payload['seed']} | threshold {payload['threshold']} | {payload['data']}")

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    n, acc = payload["n_sentences"], payload["status_accuracy"]
    correct = sum(payload["confusion"][s][s] for s in STATUSES)
    lines = [title, f"status accuracy {f(acc)} ({correct}/{n} sentences)", ""]
    head = "expected \\ predicted".ljust(22) + "".join(f"{s:>16}" for s in STATUSES) + f"{'accuracy':>10}"
    lines += [head, "-" * len(head)]
    for status in STATUSES:
        row = payload["confusion"][status]
        lines.append(f"{status:<22}" + "".join(f"{row[s]:>16}" for s in STATUSES)
                     + f"{f(payload['per_status'][status]['accuracy']):>10}")
    head = (f"{'sentence kind':<18} {'n':>4} {'expected':>15} {'status':>7} {'boxes':>6} {'mIoU':>6} {'Acc@0.5':>8} "
            f"{'point':>6} {'zone':>6} {'sided':>6} {'lat err':>8}")
    lines += ["", head, "-" * len(head)]
    for kind, m in payload["per_kind"].items():
        row = f"{kind:<18} {m['n']:>4} {m['expected_status']:>15} {f(m['status_accuracy']):>7}"
        if "miou" in m:
            row += (f" {m['n_boxes']:>6} {f(m['miou']):>6} {f(m['acc@0.5']):>8} {f(m['pointing_hit_rate']):>6} "
                    f"{f(m['zone_hit_rate']):>6} {m['n_sided']:>6} {m['laterality_errors']:>8}")
        lines.append(row)
    lines.append("status = sentence status accuracy; boxes = ground-truth boxes (lungs: 2 per sentence); mIoU/Acc@0.5 "
                 "= best-overlapping region per box; point = pointing game; zone = box centre inside a predicted "
                 "region; lat err = a region mostly on the other side")
    return "\n".join(lines)
