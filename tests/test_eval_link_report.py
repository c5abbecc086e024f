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


# ------------------------------------------------------------------------------------------------ eval negation


def _negex_folder(tmp_path: Any) -> Any:
    import csv

    rows = [("1", "edema", "Extremities reveal no peripheral cyanosis or EDEMA.", "Negated"),
            ("2", "chest pain", "She denies any CHEST PAIN.", "Negated"),  # the rules lack "denies"
            ("3", "pneumonia", "Possible PNEUMONIA.", "Affirmed"),
            ("4", "effusion", "Small left EFFUSION.", "Affirmed"),
            ("5", "nodule", "The NODULE has resolved.", "Affirmed"),  # a labelled error the rules follow
            ("6", "CHEST: 1. THYMOMA", "CHEST:     1.", "Affirmed")]  # condition not in the sentence: skipped
    with (tmp_path / "sentences.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "condition", "sentence", "negation", "temporality", "experiencer"])
        writer.writerows([(*r, "Recent", "Patient") for r in rows])
    return tmp_path


def test_negation_suite_counts_and_table(tmp_path: Any) -> None:
    from eval.negation import format_negation_table, load_negex, negation_suite

    folder = _negex_folder(tmp_path)
    assert [r.negated for r in load_negex(folder)] == [True, True, False, False, False, False]
    result = negation_suite(folder, methods=["rules"])
    assert (result["n_rows"], result["n_scored"], result["skipped"]) == (6, 5, ["6"])
    rules = result["methods"]["rules"]
    assert {k: rules[k] for k in ("tp", "fp", "fn", "tn", "n_uncertain")} == \
        {"tp": 1, "fp": 1, "fn": 1, "tn": 2, "n_uncertain": 1}
    assert rules["precision"] == rules["recall"] == rules["f1"] == 0.5
    assert [(e["id"], e["predicted"]) for e in rules["errors"]] == [("2", "present"), ("5", "absent")]
    table = format_negation_table(result)
    assert "5 of 6 sentences scored (1 whose condition is not in the sentence skipped)" in table
    assert "rules          0.500   0.500  0.500     1     1     1     2" in table
    with pytest.raises(InputError, match="--method"):
        negation_suite(folder, methods=["negex"])
    with pytest.raises(InputError, match=r"sentences\.csv"):
        negation_suite(tmp_path / "nowhere")


def test_negation_suite_library_methods(tmp_path: Any) -> None:
    from agents import clinical_nlp
    from eval.negation import negation_suite

    if not clinical_nlp.available():
        pytest.skip("medspaCy is not installed")
    result = negation_suite(_negex_folder(tmp_path), methods=["medspacy", "combined"])
    counts = {method: tuple(m[k] for k in ("tp", "fp", "fn", "tn")) for method, m in result["methods"].items()}
    # both find "denies"; "has resolved" (after the target) is a negation only to the rules, which combined adds
    assert counts == {"medspacy": (2, 0, 0, 3), "combined": (2, 1, 0, 2)}


def test_report_status_suite_and_table(tmp_path: Any) -> None:
    from eval.negation import format_report_status_table, load_iu_reports, report_status_suite

    (tmp_path / "reports.csv").write_text(
        "report_id,findings,impression\n"
        'CXR1,"The heart size is normal. No pneumothorax.",Clear lungs.\n'
        "CXR2,,No acute cardiopulmonary abnormality.\n"
        "CXR3,,\n")
    assert load_iu_reports(tmp_path) == [
        ("CXR1", "FINDINGS: The heart size is normal. No pneumothorax.\nIMPRESSION: Clear lungs."),
        ("CXR2", "IMPRESSION: No acute cardiopulmonary abnormality.")]
    result = report_status_suite(tmp_path, methods=["rules"])
    rules = result["methods"]["rules"]
    assert result["n_reports"] == 2 and rules["counts"] == {"grounded": 2, "negated": 1, "not_groundable": 1}
    assert rules["per_report"] == {"grounded": 1.0, "negated": 0.5, "not_groundable": 0.5}
    assert rules["sentences_per_report"] == 2.0 and result["agreement"] == {}
    assert "rules              4      2.000     1.000    0.500      0.500" in format_report_status_table(result)


@pytest.mark.data
def test_negation_on_the_negex_test_set() -> None:
    from agents import clinical_nlp
    from eval.negation import negation_suite

    folder = data_dir("negation_negex_testset")
    methods = ["rules", "medspacy", "combined"] if clinical_nlp.available() else ["rules"]
    result = negation_suite(folder, methods=methods)
    assert (result["n_rows"], result["n_scored"]) == (2376, 2365)
    rules = result["methods"]["rules"]
    assert (rules["tp"], rules["fp"], rules["fn"], rules["tn"]) == (385, 19, 106, 1855)  # P 0.953, R 0.784
    if "combined" in result["methods"]:
        medspacy, combined = result["methods"]["medspacy"], result["methods"]["combined"]
        assert (medspacy["tp"], medspacy["fp"], medspacy["fn"]) == (470, 23, 21)  # P 0.953, R 0.957, F1 0.955
        assert (combined["tp"], combined["fp"], combined["fn"]) == (476, 23, 15)  # P 0.954, R 0.969, F1 0.962
        assert combined["f1"] > medspacy["f1"] > rules["f1"]


@pytest.mark.data
def test_report_statuses_on_iu_reports() -> None:
    from agents import clinical_nlp
    from eval.negation import report_status_suite

    folder = data_dir("reports_iu_xray")
    rules = report_status_suite(folder, methods=["rules"])["methods"]["rules"]
    assert rules["counts"] == {"grounded": 2596, "negated": 1191, "not_groundable": 2014}
    if clinical_nlp.available():
        result = report_status_suite(folder, methods=["rules", "combined"], limit=100)
        combined = result["methods"]["combined"]
        assert result["n_reports"] == 100 and combined["sentences_per_report"] > 5
        assert 0.8 < result["agreement"]["rules vs combined"] < 1.0


def test_cli_parses_eval_negation(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from medvlm.app.cli import build_parser, main

    args = build_parser().parse_args(["eval", "negation", "--method", "rules", "--limit", "3"])
    assert (args.suite, args.methods, args.limit, args.json_out) == ("negation", ["rules"], 3, None)
    assert args.data.endswith("negation_negex_testset") and args.reports.endswith("reports_iu_xray")
    folder = _negex_folder(tmp_path)
    out = tmp_path / "negation.json"
    assert main(["eval", "negation", "--data", str(folder), "--reports", "", "--method", "rules",
                 "--json", str(out)]) == 0
    assert "negation | NegEx test set" in capsys.readouterr().out
    assert json.loads(out.read_text())["methods"]["rules"]["tp"] == 1
