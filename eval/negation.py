"""``medvlm eval negation``: how each way of reading report text (:data:`agents.report.METHODS`: the hand-written
rules of :mod:`agents.text`, medspaCy's ConText, and the two combined) does on real text.

1. **Negation** on the NegEx test set (Chapman et al., J Biomed Inform 2001;34:301-310; 2,376 de-identified
   clinical sentences, each with one condition labelled negated or affirmed; ``../shared/data/
   negation_negex_testset/sentences.csv``): each method asserts the condition in its sentence
   (:func:`agents.report.target_assertions`); "negated" is the positive class, so uncertain and affirmed both
   count as not negated. Rows whose condition does not occur in the sentence are skipped (the data README lists
   12 such rows). Precision, recall and F1 of "negated" per method, with the confusion counts.
2. **Sentence statuses** on real chest X-ray reports (the Indiana University collection, ``../shared/data/
   reports_iu_xray/reports.csv``; each report is ``"FINDINGS: ..."`` and ``"IMPRESSION: ..."`` on two lines):
   the text-level status of every sentence (:func:`agents.report.sentence_links`: grounded = something to
   ground, negated, not_groundable = abstention), as sentences per report. No image and no grounder: on an image a
   "grounded" sentence stays grounded only when the grounder returns a region.
"""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvlm.errors import input_error

__all__ = ["NegexRow", "format_negation_table", "format_report_status_table", "load_iu_reports", "load_negex",
           "negation_suite", "report_status_suite"]

NEGEX_DATA = "../shared/data/negation_negex_testset"
IU_REPORTS = "../shared/data/reports_iu_xray"
STATUSES = ("grounded", "negated", "not_groundable")


@dataclass(frozen=True)
class NegexRow:
    """One NegEx test sentence: ``id``, the ``condition`` phrase, the ``sentence`` and whether it is ``negated``."""

    id: str
    condition: str
    sentence: str
    negated: bool


def _csv_rows(folder: str | Path, name: str, columns: set[str], what: str) -> list[dict[str, str]]:
    path = Path(folder) / name
    if not path.is_file():
        raise input_error(what, expected=f"a folder holding {name}", received=f"{folder} (no {name})",
                          fix=f"pass the data folder, e.g. {NEGEX_DATA if 'negex' in what else IU_REPORTS}")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not columns <= set(rows[0]):
        raise input_error(what, expected=f"columns {sorted(columns)}", received=f"{sorted(rows[0])} in {path}",
                          fix="use the file as shipped (see its SOURCES.md)")
    return rows


def load_negex(folder: str | Path = NEGEX_DATA) -> list[NegexRow]:
    """The rows of ``folder/sentences.csv`` (id, condition, sentence, negation: Negated / Affirmed)."""
    rows = _csv_rows(folder, "sentences.csv", {"id", "condition", "sentence", "negation"}, "negex data")
    return [NegexRow(r["id"], r["condition"], r["sentence"], r["negation"].strip().lower() == "negated")
            for r in rows]


def load_iu_reports(folder: str | Path = IU_REPORTS) -> list[tuple[str, str]]:
    """``(report_id, text)`` of ``folder/reports.csv``: "FINDINGS: ..." and "IMPRESSION: ..." lines (an empty
    section is left out)."""
    rows = _csv_rows(folder, "reports.csv", {"report_id", "findings", "impression"}, "IU reports")
    out = []
    for r in rows:
        text = "\n".join(f"{head}: {r[key].strip()}" for head, key in (("FINDINGS", "findings"),
                                                                         ("IMPRESSION", "impression"))
                         if r[key].strip())
        if text:
            out.append((r["report_id"], text))
    return out


def _has(sentence: str, phrase: str) -> bool:
    words = phrase.split()
    return bool(words) and re.search(r"\s+".join(map(re.escape, words)), sentence, re.IGNORECASE) is not None


def _check_methods(methods: Sequence[str]) -> list[str]:
    from agents.report import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise input_error("--method", expected=f"methods among {', '.join(METHODS)}", received=repr(list(methods)),
                          fix="leave it out for all of them")
    return list(dict.fromkeys(methods))


def negation_suite(data: str | Path = NEGEX_DATA, *, methods: Sequence[str] = ("rules", "medspacy", "combined"),
                   limit: int | None = None) -> dict[str, Any]:
    """Score "negated" on the NegEx test set per method. Returns ``{"suite": "negation", "data", "n_rows",
    "n_scored", "skipped": [ids], "methods": {method: {"tp", "fp", "fn", "tn", "precision", "recall", "f1",
    "n_uncertain", "seconds", "errors": [{"id", "condition", "expected", "predicted"}]}}}``."""
    from agents.report import target_assertions

    chosen = _check_methods(methods)
    rows = load_negex(data)[:limit] if limit else load_negex(data)
    scored = [r for r in rows if _has(r.sentence, r.condition)]
    out: dict[str, Any] = {"suite": "negation", "data": str(data), "n_rows": len(rows), "n_scored": len(scored),
                           "skipped": [r.id for r in rows if not _has(r.sentence, r.condition)], "methods": {}}
    for method in chosen:
        t0 = time.perf_counter()
        counts = dict.fromkeys(("tp", "fp", "fn", "tn"), 0)
        uncertain = 0
        errors = []
        for row in scored:
            [assertion] = target_assertions(row.sentence, [row.condition], method=method)
            predicted = assertion == "absent"
            uncertain += assertion == "uncertain"
            key = ("t" if predicted == row.negated else "f") + ("p" if predicted else "n")
            counts[key] += 1
            if predicted != row.negated:
                errors.append({"id": row.id, "condition": row.condition, "expected": "negated" if row.negated
                               else "affirmed", "predicted": assertion})
        tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
        precision = tp / (tp + fp) if tp + fp else None
        recall = tp / (tp + fn) if tp + fn else None
        f1 = (2 * precision * recall / (precision + recall)) if precision and recall else None
        out["methods"][method] = {**counts, "precision": precision, "recall": recall, "f1": f1,
                                  "n_uncertain": uncertain, "seconds": round(time.perf_counter() - t0, 1),
                                  "errors": errors}
    return out


def report_status_suite(data: str | Path = IU_REPORTS, *, methods: Sequence[str] = ("rules", "medspacy", "combined"),
                        limit: int | None = None) -> dict[str, Any]:
    """Text-level sentence statuses of the IU reports per method. Returns ``{"suite": "report-status", "data",
    "n_reports", "methods": {method: {"n_sentences", "counts": {status: n}, "per_report": {status: mean},
    "sentences_per_report", "seconds"}}, "agreement": {"a vs b": fraction of reports whose sentences and statuses
    are identical}}``."""
    from agents.report import sentence_links

    chosen = _check_methods(methods)
    reports = load_iu_reports(data)[:limit] if limit else load_iu_reports(data)
    out: dict[str, Any] = {"suite": "report-status", "data": str(data), "n_reports": len(reports), "methods": {}}
    readings: dict[str, list[list[tuple[str, str]]]] = {}
    for method in chosen:
        t0 = time.perf_counter()
        counts = dict.fromkeys(STATUSES, 0)
        readings[method] = []
        for _, text in reports:
            links = sentence_links(text, method=method)
            readings[method].append([(link.text, link.status) for link in links])
            for link in links:
                counts[link.status] += 1
        n = max(len(reports), 1)
        out["methods"][method] = {"n_sentences": sum(counts.values()), "counts": counts,
                                  "per_report": {s: counts[s] / n for s in STATUSES},
                                  "sentences_per_report": sum(counts.values()) / n,
                                  "seconds": round(time.perf_counter() - t0, 1)}
    out["agreement"] = {f"{a} vs {b}": sum(x == y for x, y in zip(readings[a], readings[b])) / max(len(reports), 1)
                        for i, a in enumerate(chosen) for b in chosen[i + 1:]}
    return out


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_negation_table(payload: dict[str, Any]) -> str:
    """Precision / recall / F1 of "negated" per method, with TP / FP / FN / TN."""
    skipped = payload["n_rows"] - payload["n_scored"]
    lines = [f"negation | NegEx test set | {payload['n_scored']} of {payload['n_rows']} sentences scored "
             f"({skipped} whose condition is not in the sentence skipped) | {payload['data']}"]
    head = (f"{'method':<10} {'precision':>9} {'recall':>7} {'F1':>6} {'TP':>5} {'FP':>5} {'FN':>5} {'TN':>5} "
            f"{'uncertain':>9} {'seconds':>8}")
    lines += [head, "-" * len(head)]
    for method, m in payload["methods"].items():
        lines.append(f"{method:<10} {_f(m['precision']):>9} {_f(m['recall']):>7} {_f(m['f1']):>6} {m['tp']:>5} "
                     f"{m['fp']:>5} {m['fn']:>5} {m['tn']:>5} {m['n_uncertain']:>9} {m['seconds']:>8}")
    lines.append("positive class = negated; uncertain = predicted uncertain (counted as not negated); "
                 "reference: GenNegEx 1.2 precision 0.933, recall 0.959 on this set (its TestSet page)")
    return "\n".join(lines)


def format_report_status_table(payload: dict[str, Any]) -> str:
    """Sentences per report by status, per method, and how often two methods read a report the same."""
    lines = [f"report statuses | {payload['n_reports']} IU chest X-ray reports (findings + impression), text only "
             f"| {payload['data']}"]
    head = (f"{'method':<10} {'sentences':>9} {'per report':>10} {'grounded':>9} {'negated':>8} "
            f"{'abstained':>10} {'seconds':>8}")
    lines += [head, "-" * len(head)]
    for method, m in payload["methods"].items():
        per = m["per_report"]
        lines.append(f"{method:<10} {m['n_sentences']:>9} {m['sentences_per_report']:>10.3f} "
                     f"{per['grounded']:>9.3f} {per['negated']:>8.3f} {per['not_groundable']:>10.3f} "
                     f"{m['seconds']:>8}")
    lines.append("grounded / negated / abstained = sentences per report (abstained = not_groundable: nothing to "
                 "ground); grounded = the text names something to ground (on an image it needs a region)")
    for pair, share in payload.get("agreement", {}).items():
        lines.append(f"same sentences and statuses, {pair}: {share:.3f} of reports")
    return "\n".join(lines)
