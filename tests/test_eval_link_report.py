"""``medvlm eval link-report``: the report composer, the sentence scorer, the table, and one real run."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from agents.report import SentenceLink
from eval.link_report import (
    UNCERTAIN_ZONE,
    ComposedReport,
    ExpectedSentence,
    LinkReportScorer,
    compose_report,
    format_link_report_table,
)
from medvlm.datasets.base import BoxAnnotation
from medvlm.errors import InputError
from medvlm.types import Box, Mask, Points, Region
from tests.conftest import data_dir


def _rect(y0: int, y1: int, x0: int, x1: int, shape: tuple[int, int] = (200, 200)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _sample(nodule: bool, sample_id: str = "fake") -> Any:
    """A Sample-like chest: right lung on the image left, left lung on the image right, heart in between."""
    masks = {"right lung": _rect(20, 180, 20, 90), "left lung": _rect(20, 180, 110, 180),
             "heart": _rect(110, 170, 70, 140)}
    boxes = []
    if nodule:
        boxes.append(BoxAnnotation(box=Box(140.0, 40.0, 160.0, 60.0), label="nodule",
                                   phrase="18 mm benign lung nodule in the left upper lobe",
                                   meta={"location": "left upper lobe(S5)", "size_mm": "18"}))
    return SimpleNamespace(id=sample_id, image=SimpleNamespace(shape=(200, 200)), masks=masks, boxes=boxes)


def test_compose_is_deterministic_for_a_seed_and_wording_varies() -> None:
    sample = _sample(nodule=True)
    assert compose_report(sample, seed=3).text == compose_report(sample, seed=3).text
    texts = {compose_report(sample, seed=s).text for s in range(20)}
    assert len(texts) > 5
    # the seed is mixed with the id: an image's report does not depend on the other images evaluated
    assert any(compose_report(_sample(True, "a"), seed=s).text != compose_report(_sample(True, "b"), seed=s).text
               for s in range(5))


def test_compose_nodule_image_has_known_statuses_and_boxes() -> None:
    sample = _sample(nodule=True)
    seen: set[str] = set()
    for seed in range(30):  # every template combination still splits into one sentence each (compose checks it)
        report = compose_report(sample, seed=seed)
        kinds = [s.kind for s in report.sentences]
        assert kinds[0] == kinds[-1] == "nothing to ground"
        assert sorted(kinds[1:-1]) == ["negated", "negated", "nodule", "normal anatomy", "normal anatomy"]
        by_kind = {s.kind: s for s in report.sentences}
        nodule = by_kind["nodule"]
        assert nodule.status == "grounded" and nodule.boxes == [Box(140.0, 40.0, 160.0, 60.0)]
        assert "an 18 mm" in nodule.text.lower() and nodule.text.endswith(" the left upper lobe.")
        assert "(S5)" not in nodule.text and nodule.side == "left"
        anatomy = {s.target: s for s in report.sentences if s.kind == "normal anatomy"}
        if "heart" in anatomy:  # heart sentences: the heart mask's box
            assert anatomy["heart"].boxes == [Box(70.0, 110.0, 140.0, 170.0)]
        else:  # "the cardiomediastinal silhouette": heart + mediastinum (between the lungs, apex to heart)
            assert anatomy["cardiac silhouette + mediastinum"].boxes == [Box(70.0, 20.0, 140.0, 170.0)]
            assert "cardiomediastinal" in anatomy["cardiac silhouette + mediastinum"].text
        seen.update(anatomy)
        assert anatomy["right lung + left lung"].boxes == [Box(20.0, 20.0, 90.0, 180.0), Box(110.0, 20.0, 180.0, 180.0)]
        assert [s.status for s in report.sentences if s.kind == "negated"] == ["negated", "negated"]
        assert [s.status for s in report.sentences if s.kind == "nothing to ground"] == ["not_groundable"] * 2
        lung_pos = next(i for i, s in enumerate(report.sentences) if s.target == "right lung + left lung")
        assert kinds.index("nodule") == lung_pos - 1  # "the lungs are otherwise clear" follows the finding
        assert report.midline == pytest.approx(100.0)
    assert {"heart", "cardiac silhouette + mediastinum"} <= seen


def test_compose_image_without_nodule_adds_negated_nodule_and_uncertain_left_base() -> None:
    from agents.anatomy import anatomy_from_masks

    sample = _sample(nodule=False)
    zone = anatomy_from_masks(sample.masks, (200, 200), "gt").region_box(UNCERTAIN_ZONE)
    assert zone is not None and zone.x0 >= 110 and zone.center[1] > 100  # patient's left (image right), low
    for seed in range(30):
        report = compose_report(sample, seed=seed)
        kinds = [s.kind for s in report.sentences]
        assert "nodule" not in kinds and kinds.count("negated nodule") == 1 and kinds.count("uncertain zone") == 1
        uncertain = next(s for s in report.sentences if s.kind == "uncertain zone")
        assert uncertain.status == "grounded" and uncertain.boxes == [zone] and uncertain.side == "left"
        assert next(s for s in report.sentences if s.kind == "negated nodule").status == "negated"
        assert len(report.sentences) == 8


def _region(box: Box, *, point: tuple[float, float] | None = None, mask: np.ndarray | None = None) -> Region:
    return Region(box=box, points=Points.from_lists(positive=[point]) if point else None,
                  mask=Mask(mask) if mask is not None else None)


def _hand_made() -> tuple[ComposedReport, list[SentenceLink]]:
    """Five sentences; the negated one is wrongly grounded, everything else has the right status."""
    nodule_gt, right_gt, left_gt = Box(60, 0, 70, 10), Box(0, 0, 40, 100), Box(60, 0, 100, 100)
    report = ComposedReport("fake", [
        ExpectedSentence("Comparison: none.", "nothing to ground", "not_groundable"),
        ExpectedSentence("A nodule in the left upper lobe.", "nodule", "grounded", [nodule_gt], "nodule", "left"),
        ExpectedSentence("The lungs are clear.", "normal anatomy", "grounded", [right_gt, left_gt], "lungs"),
        ExpectedSentence("No pneumothorax.", "negated", "negated"),
        ExpectedSentence("No pulmonary nodule is seen.", "negated nodule", "negated"),
    ], midline=50.0)
    links = [
        SentenceLink(1, "none.", "not_groundable"),
        # IoU with the nodule box: 100 / 200 = 0.5; point (65, 5) inside; wrong-side second region (x < midline)
        SentenceLink(2, "A nodule in the left upper lobe.", "grounded",
                     [_region(Box(60, 0, 70, 20), point=(65, 5)), _region(Box(0, 0, 10, 10))]),
        # right lung exact (IoU 1); the left lung box gets its best match, the region (0,0,40,100): IoU 0
        SentenceLink(3, "The lungs are clear.", "grounded", [_region(Box(0, 0, 40, 100))]),
        SentenceLink(4, "No pneumothorax.", "grounded", [_region(Box(0, 0, 5, 5))]),
        SentenceLink(5, "No pulmonary nodule is seen.", "negated"),
    ]
    return report, links


def test_scorer_gives_known_accuracy_iou_pointing_and_laterality() -> None:
    report, links = _hand_made()
    scorer = LinkReportScorer()
    records = scorer.update(report, links)
    assert [r["predicted"] == r["expected"] for r in records] == [True, True, True, False, True]
    assert records[1]["ious"] == [0.5] and records[2]["ious"] == [1.0, 0.0]
    out = scorer.compute()
    assert out["n_sentences"] == 5 and out["status_accuracy"] == pytest.approx(0.8)
    assert out["confusion"]["negated"] == {"grounded": 1, "negated": 1, "not_groundable": 0}
    assert out["confusion"]["grounded"]["grounded"] == 2
    assert out["per_status"]["negated"] == {"n": 2, "accuracy": 0.5}
    assert out["per_status"]["not_groundable"] == {"n": 1, "accuracy": 1.0}
    nodule = out["per_kind"]["nodule"]
    assert nodule["miou"] == pytest.approx(0.5) and nodule["acc@0.5"] == 1.0 and nodule["n_missing"] == 0
    assert nodule["pointing_hit_rate"] == 1.0 and nodule["zone_hit_rate"] == 1.0
    assert nodule["n_sided"] == 1 and nodule["laterality_errors"] == 1  # the second region is on the right
    anatomy = out["per_kind"]["normal anatomy"]
    assert anatomy["n_boxes"] == 2 and anatomy["miou"] == pytest.approx(0.5) and anatomy["acc@0.5"] == 0.5
    assert anatomy["pointing_hit_rate"] == 0.5 and anatomy["zone_hit_rate"] == 0.5
    assert out["per_kind"]["negated"]["status_accuracy"] == 0.0 and "miou" not in out["per_kind"]["negated"]
    assert list(out["per_kind"]) == ["nodule", "normal anatomy", "negated", "negated nodule", "nothing to ground"]


def test_scorer_counts_a_missing_region_as_iou_zero_and_uses_masks_for_the_zone_hit() -> None:
    gt = Box(10, 10, 20, 20)
    report = ComposedReport("m", [ExpectedSentence("x", "uncertain zone", "grounded", [gt], "zone", "left"),
                                  ExpectedSentence("y", "nodule", "grounded", [gt], "nodule")])
    mask = np.zeros((40, 40), dtype=bool)
    mask[12:18, 12:18] = True  # holds the centre (15, 15)
    links = [SentenceLink(1, "x", "grounded", [_region(Box(0, 0, 40, 40), mask=mask)]),
             SentenceLink(2, "y", "not_groundable")]
    scorer = LinkReportScorer()
    scorer.update(report, links)
    out = scorer.compute()
    zone, nodule = out["per_kind"]["uncertain zone"], out["per_kind"]["nodule"]
    assert zone["zone_hit_rate"] == 1.0 and zone["miou"] == pytest.approx(100 / 1600)
    assert zone["n_sided"] == 0  # no midline: laterality is not scored
    assert nodule["miou"] == 0.0 and nodule["n_missing"] == 1 and nodule["pointing_hit_rate"] == 0.0
    assert nodule["zone_hit_rate"] == 0.0 and out["status_accuracy"] == 0.5


def test_scorer_rejects_links_of_another_report() -> None:
    report, links = _hand_made()
    with pytest.raises(InputError, match="5 sentence links"):
        LinkReportScorer().update(report, links[:3])


def test_table_lists_confusion_and_kinds() -> None:
    report, links = _hand_made()
    scorer = LinkReportScorer()
    scorer.update(report, links)
    payload = {"grounder": "fake", "n_images": 1, "split": "all", "seed": 0, "threshold": 0.5, "data": "d",
               **scorer.compute()}
    table = format_link_report_table(payload)
    assert "status accuracy 0.800 (4/5 sentences)" in table
    assert "nodule" in table and "normal anatomy" in table and "not_groundable" in table


def test_cli_parses_eval_link_report() -> None:
    from medvlm.app.cli import build_parser

    args = build_parser().parse_args(["eval", "link-report", "--limit", "2", "--seed", "7", "--split", "all",
                                      "--json", "out.json"])
    assert (args.suite, args.limit, args.seed, args.split, args.json_out) == ("link-report", 2, 7, "all", "out.json")
    assert args.data.endswith("cxr_jsrt_scr") and args.ids is None


@pytest.mark.slow
@pytest.mark.data
def test_suite_on_two_jsrt_val_images() -> None:
    from eval.link_report import link_report_suite

    result = link_report_suite(data_dir("cxr_jsrt_scr"), limit=2)
    assert result["suite"] == "link-report" and result["split"] == "val" and result["n_images"] == 2
    assert result["n_sentences"] == len(result["per_sentence"]) >= 14
    assert result["status_accuracy"] >= 0.8
    assert result["per_status"]["negated"]["accuracy"] == 1.0
    assert result["per_status"]["not_groundable"]["accuracy"] == 1.0
    assert result["per_kind"]["normal anatomy"]["miou"] > 0.5
