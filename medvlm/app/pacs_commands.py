"""``medvlm pacs find | segment | link-report``: the segmenter and the report linker on studies of a DICOMweb PACS.

The transport (QIDO-RS / WADO-RS / STOW-RS, auth, retries, the instance cache) is :mod:`medvlm.pacs`; the SR is
:mod:`medvlm.sr`; segmenting is :mod:`segmentation.volume` (CT/MR series) and the 2D text-guided segmenter
(CR/DX); report linking is :mod:`agents.report`. These handlers wire them, write the usual outputs to ``--out``
and, with ``--store``, send the results back in ONE STOW-RS request, after every object has been built and
checked: a failure before that stores nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from medvlm.errors import InputError, input_error

__all__ = ["Progress", "Say", "pacs_client", "pacs_link_report", "pacs_segment", "run_pacs", "run_pacs_find",
           "run_pacs_link_report", "run_pacs_segment"]

#: where a task's messages go: ``print`` on the command line, the job's log in ``medvlm serve``
Say = Callable[[str], None]
#: ``progress(stage, done, total)``: how far a task is (a server job's progress)
Progress = Callable[[str, int, int], None]


def run_pacs(args: argparse.Namespace) -> int:
    handlers = {"find": run_pacs_find, "segment": run_pacs_segment, "link-report": run_pacs_link_report}
    return handlers[args.pacs_command](args)


def _client(args: argparse.Namespace) -> Any:
    return pacs_client(args.url, args.user, args.password, args.token, timeout_s=args.timeout,
                       retries=args.retries, cache_dir=args.cache_dir)


def pacs_client(url: str, user: str | None = None, password: str | None = None, token: str | None = None, *,
                timeout_s: float = 30.0, retries: int = 3, cache_dir: str | Path | None = None) -> Any:
    """A :class:`medvlm.pacs.PacsClient` for ``url``; each credential falls back to its environment variable."""
    from medvlm.pacs import PacsClient, resolve_auth

    auth = resolve_auth(user, password, token)
    return PacsClient(url, auth, timeout_s=timeout_s, retries=retries, cache_dir=cache_dir)


def _cell(text: Any, width: int) -> str:
    value = "" if text is None else str(text)
    return value if len(value) <= width else value[: width - 1] + "…"


# ------------------------------------------------------------------------------------------------------ find


def run_pacs_find(args: argparse.Namespace) -> int:
    client = _client(args)
    studies = client.find_studies(patient=args.patient, modality=args.modality, since=args.since, limit=args.limit)
    if not studies:
        print(f"no study at {client.where} matches" + _filters(args))
        return 0
    header = f"{'study UID':<64}  {'date':<8}  {'patient id':<12}  {'mod':<4}  {'series UID':<64}  {'inst':>5}  " \
             "description"
    print(header)
    for study in studies:
        rows = study.series or [None]
        for series in rows:
            print(f"{study.study_uid:<64}  {_cell(study.date, 8):<8}  {_cell(study.patient_id, 12):<12}  "
                  + (f"{_cell(series.modality, 4):<4}  {series.series_uid:<64}  "
                     f"{'' if series.n_instances is None else series.n_instances:>5}  "
                     f"{_cell(series.description or study.description, 40)}" if series is not None
                     else f"{'-':<4}  {'(no series)':<64}  {'':>5}  {_cell(study.description, 40)}"))
    n_series = sum(len(s.series) for s in studies)
    print(f"{len(studies)} study(ies), {n_series} series at {client.where}" + _filters(args))
    return 0


def _filters(args: argparse.Namespace) -> str:
    parts = [f"{k} {v}" for k, v in (("patient", args.patient), ("modality", args.modality), ("since", args.since))
             if v]
    return f" ({', '.join(parts)})" if parts else ""


# --------------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _series_folder(paths: Sequence[Path]) -> Iterator[Path]:
    """A temporary folder holding (links to) the cached files of one series, for medvlm.volume.read_volume."""
    with tempfile.TemporaryDirectory(prefix="medvlm-pacs-") as tmp:
        folder = Path(tmp)
        for p in paths:
            target = folder / p.name
            try:
                os.symlink(p.resolve(), target)
            except OSError:
                import shutil

                shutil.copyfile(p, target)
        yield folder


def _read_series_volume(paths: Sequence[Path], study: str, series: Any) -> Any:
    """The retrieved series as a medvlm Volume; medvlm.volume's refusals (missing slices, mixed orientations, ...)
    surface with the series named instead of the temporary folder."""
    from medvlm.volume import read_volume

    with _series_folder(paths) as folder:
        try:
            return read_volume(folder)
        except InputError as exc:
            raise input_error(f"series {series.series_uid} ({series.modality}) of study {study}",
                              expected=exc.expected or "a readable series", received=exc.received or str(exc),
                              fix="the series on the PACS is incomplete or mixes stacks; pick a complete single "
                                  "stack with --series (`medvlm pacs find` lists the series), or repair the "
                                  "series on the PACS (re-send the missing instances)") from exc


def _say_stored(say: Say, stored: Sequence[Any], where: str) -> None:
    for s in stored:
        say(f"stored {s.modality or '?'} SOP Instance UID {s.sop_instance_uid} in series {s.series_uid} "
              f"(study {s.study_uid}) at {where}")


def _store(client: Any, objects: Sequence[Any], summary: dict[str, Any], say: Say, progress: Progress) -> None:
    """Send every object in one STOW-RS request; record and say what was stored."""
    progress("store", 0, len(objects))
    stored = client.store(objects)
    progress("store", len(objects), len(objects))
    summary["stored"] = _stored_json(stored)
    _say_stored(say, stored, client.where)


def _stored_json(stored: Sequence[Any]) -> list[dict[str, str]]:
    return [{"modality": s.modality, "sop_instance_uid": s.sop_instance_uid, "series_uid": s.series_uid,
             "study_uid": s.study_uid, "sop_class_uid": s.sop_class_uid} for s in stored]


def _write_summary(out: Path, name: str, payload: dict[str, Any]) -> Path:
    from medvlm.outputs import write_json_atomic

    path = out / name
    write_json_atomic(payload, path)
    return path


def _segmenter(args: argparse.Namespace) -> Any:
    from segmentation.registry import build_segmenter

    kwargs = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    return build_segmenter("medvlm", **kwargs)


# --------------------------------------------------------------------------------------------------- segment


def run_pacs_segment(args: argparse.Namespace) -> int:
    labels = list(args.label) if args.label else None
    window = (float(args.window[0]), float(args.window[1])) if args.window else None
    pacs_segment(_client(args), args.study, args.series, args.text, labels, Path(args.out),
                 segmenter=lambda: _segmenter(args), window=window, store=args.store, bar=sys.stderr.isatty())
    return 0


def pacs_segment(client: Any, study: str, series_uid: str | None, texts: Sequence[str],
                 labels: Sequence[str] | None, out: Path, *, segmenter: Callable[[], Any],
                 window: tuple[float, float] | None = None, store: bool = False, say: Say = print,
                 progress: Progress | None = None, bar: bool = False) -> dict[str, Any]:
    """Segment the series ``series_uid`` of study ``study`` (default: its only CT/MR/CR/DX series) on the PACS of
    ``client`` (a :class:`medvlm.pacs.PacsClient`) for every text; write the outputs and one DICOM SEG per volume
    (CT/MR) or per image (CR/DX) to ``out``; with ``store``, send every SEG in one STOW-RS request once all are
    built and checked (a failure before that stores nothing).

    ``segmenter()``: the text-guided segmenter, asked for only after the series is retrieved and read (refusals
    come before a model loads). ``window``: (center, width) display window (default: soft tissue for CT, else
    the image's own). ``say``: where the messages go (the CLI prints them; a server job keeps them).
    ``progress(stage, done, total)``: stages ``retrieve``, ``segment`` (slices or images), ``store``.
    Returns the summary also written to ``out/pacs_segment.json``.
    """
    import pydicom

    from medvlm.pacs import RADIOGRAPH_MODALITIES, VOLUME_MODALITIES, check_seg, select_series

    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise input_error("--text", expected="at least one phrase to segment", received="none",
                          fix="pass e.g. --text liver (repeat for several)")
    labels = list(labels) if labels else texts
    if len(labels) != len(texts):
        raise input_error("--label", expected=f"one label per --text ({len(texts)})", received=f"{len(labels)}",
                          fix="give one --label per --text, in the same order, or none")
    report = progress or (lambda stage, done, total: None)
    series = select_series(client.list_series(study), study, series_uid,
                           modalities=VOLUME_MODALITIES + RADIOGRAPH_MODALITIES, purpose="segment")
    report("retrieve", 0, 1)
    paths = client.retrieve_series(study, series.series_uid)
    report("retrieve", 1, 1)
    say(f"{series.label()}, study {study}: {len(paths)} instance(s) from {client.where} (cache {client.cache_dir})")
    summary: dict[str, Any] = {"pacs": client.where, "study": study, "series": series.series_uid,
                               "modality": series.modality, "texts": texts, "labels": labels}
    if series.modality in VOLUME_MODALITIES:
        seg_files, summary["outputs"] = _segment_volume(paths, study, series, texts, labels, out, segmenter, window,
                                                        say, report, bar)
    else:
        seg_files, summary["outputs"] = _segment_images(paths, texts, labels, out, segmenter, window, say, report)
    # every SEG is read back and checked before anything is sent
    datasets = []
    for path, sources in seg_files:
        ds = pydicom.dcmread(str(path))
        check_seg(ds, sources, labels)
        datasets.append(ds)
    summary["dicom_seg"] = [p.name for p, _ in seg_files]
    if store:
        if not datasets:
            raise input_error("--store", expected="a DICOM SEG to store", received="none: no phrase was found "
                              "on any image of the series (a SEG needs at least one frame)",
                              fix="check the phrases (medvlm models lists what the segmenter knows), or drop "
                                  "--store")
        _store(client, datasets, summary, say, report)
    else:
        say("not stored (add --store to send the DICOM SEG to the PACS)")
    say(f"wrote {_write_summary(out, 'pacs_segment.json', summary)}")
    return summary


def _segment_volume(paths: Sequence[Path], study: str, series: Any, texts: list[str], labels: list[str],
                    out: Path, segmenter: Callable[[], Any], window: tuple[float, float] | None, say: Say,
                    report: Progress, bar: bool) -> tuple[list[tuple[Path, list[Any]]], Any]:
    from medvlm.volume_outputs import write_volume_outputs
    from segmentation.volume import segment_volume

    volume = _read_series_volume(paths, study, series)  # refusals come before the model loads
    result = segment_volume(segmenter(), volume, texts, labels, window=window, progress=bar,
                            on_slice=lambda done, total: report("segment", done, total))
    stem = f"{series.modality.lower()}-series-{series.number if series.number is not None else 'x'}"
    per_text = [{"text": r.text, "structure": r.structure, "existence_source": r.existence_source}
                for r in result.results]
    written = write_volume_outputs(out, stem, volume, result.masks(), [r.label for r in result.results],
                                   existence=[r.existence for r in result.results], per_text=per_text,
                                   extra={"model": result.model, "study": study, "series": series.series_uid},
                                   window=result.window, dicom_seg=True)
    say(f"{'#':>2}  {'label':<20} {'found':>5} {'volume':>12} {'slices':>11}")
    for entry in written.payload["texts"]:
        rng = entry["slice_range"]
        say(f"{entry['id']:>2}  {entry['label']:<20} {'yes' if entry['found'] else 'no':>5} "
            f"{entry['volume_ml']:>9.1f} mL {(f'{rng[0]}-{rng[1]}' if rng else '-'):>11}")
    files = [written.label_path, written.json_path, written.overlay_path, written.montage_path]
    segs: list[tuple[Path, list[Any]]] = []
    if written.dicom_seg_path is not None:
        files.insert(0, written.dicom_seg_path)
        segs.append((written.dicom_seg_path, list(volume.datasets)))
    say("wrote " + ", ".join(str(p) for p in files))
    return segs, {"json": written.json_path.name, "label_volume": written.label_path.name}


def _segment_images(paths: Sequence[Path], texts: list[str], labels: list[str], out: Path,
                    segmenter: Callable[[], Any], window: tuple[float, float] | None, say: Say,
                    report: Progress) -> tuple[list[tuple[Path, list[Any]]], Any]:
    import numpy as np
    import pydicom

    from medvlm.export import write_dicom_seg
    from medvlm.io import load_image
    from medvlm.outputs import write_regions
    from segmentation.requests import segment_to_regions, text_prompts

    prompts, _ = text_prompts(texts, labels)
    model = segmenter()
    segs: list[tuple[Path, list[Any]]] = []
    outputs = []
    for k, path in enumerate(paths, start=1):
        header = pydicom.dcmread(str(path), stop_before_pixels=True)
        image = load_image(path, format="dicom", window=window)
        regions = segment_to_regions(model, image, prompts, labels)
        stem = f"{str(header.get('Modality', 'image')).lower()}-{header.get('InstanceNumber') or k}"
        written = write_regions(out, stem, image, regions, extra={"model": model.name,
                                                                  "sop_instance_uid": str(header.SOPInstanceUID)})
        masks = [r.mask.data if r.mask is not None else np.zeros(image.shape, dtype=bool) for r in regions]
        seg_path = write_dicom_seg(masks, labels, header, out / f"{stem}.seg.dcm", software_version="medvlm")
        for r in regions:
            area = r.mask.area_px if r.mask is not None else 0
            say(f"  {stem}: {r.label:<20} {'found' if area else 'not found':<9} {area:>8} px")
        say(f"wrote {written.json_path}, {written.overlay_path}, {seg_path}")
        segs.append((seg_path, [header]))
        outputs.append({"sop_instance_uid": str(header.SOPInstanceUID), "json": written.json_path.name,
                        "dicom_seg": seg_path.name})
        report("segment", k, len(paths))
    return segs, outputs


# ----------------------------------------------------------------------------------------------- link-report


def _report_text(args: argparse.Namespace) -> tuple[str, str]:
    if args.report_text is not None:
        return args.report_text, "--report-text"
    path = Path(args.report)
    if not path.is_file():
        raise input_error("--report", expected="a text file with the report", received=f"{path} (not a file)",
                          fix="save the report as a .txt file, or pass it inline with --report-text")
    return path.read_text(encoding="utf-8", errors="replace"), str(path)


def run_pacs_link_report(args: argparse.Namespace) -> int:
    from medvlm.app.agent_commands import build_agent

    report, report_source = _report_text(args)
    pacs_link_report(_client(args), args.study, args.series, args.instance, report, report_source, Path(args.out),
                     agent=lambda: build_agent(args), threshold=args.threshold, nlp=getattr(args, "nlp", None),
                     store=args.store)
    return 0


def pacs_link_report(client: Any, study: str, series_uid: str | None, instance: str | None, report: str,
                     report_source: str, out: Path, *, agent: Callable[[], Any], threshold: float = 0.5,
                     nlp: str | None = None, store: bool = False, say: Say = print,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Ground every sentence of ``report`` on the radiograph (CR/DX) of study ``study`` (``series_uid`` /
    ``instance`` pick it when the study has several) on the PACS of ``client``; write a Comprehensive SR (one
    item per sentence: text, status, outlines in the image's pixel frame) and a DICOM SEG of the grounded masks to
    ``out``; with ``store``, send both in one STOW-RS request after both were built and validated.

    ``agent()``: the grounding agent, asked for after the radiograph is retrieved. ``threshold``: a sentence whose
    regions all score below it is not groundable. ``nlp``: the sentence/negation method of
    :func:`agents.report.link_report`. ``report_source``: what the JSON names as the report's origin.
    ``say`` / ``progress``: as :func:`pacs_segment` (stages ``retrieve``, ``ground``, ``store``).
    Returns the summary also written to ``out/<stem>.pacs.json``.
    """
    import pydicom

    from agents.report import link_report
    from medvlm.app.agent_commands import links_to_regions, print_links
    from medvlm.export import write_dicom_seg
    from medvlm.io import atomic_open, load_image
    from medvlm.outputs import write_regions
    from medvlm.pacs import RADIOGRAPH_MODALITIES, check_seg, select_series
    from medvlm.sr import SRRegion, SRSentence, box_polygon, build_report_sr, mask_polygons, validate_report_sr

    if not report.strip():
        raise input_error("report", expected="the report text (one or more sentences)", received="an empty text",
                          fix="pass the report with --report FILE or --report-text TEXT")
    tell = progress or (lambda stage, done, total: None)
    series = select_series(client.list_series(study), study, series_uid, modalities=RADIOGRAPH_MODALITIES,
                           purpose="link-report")
    tell("retrieve", 0, 1)
    paths = client.retrieve_series(study, series.series_uid)
    tell("retrieve", 1, 1)
    headers = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in paths]
    if instance:
        picked = [k for k, h in enumerate(headers) if str(h.SOPInstanceUID) == instance]
        if not picked:
            raise input_error(f"--instance {instance}", expected=f"an instance of series {series.series_uid}",
                              received="not in the series",
                              fix="pick one of: " + ", ".join(str(h.SOPInstanceUID) for h in headers[:6]))
        index = picked[0]
    elif len(paths) == 1:
        index = 0
    else:
        raise input_error(f"series {series.series_uid}", expected="one radiograph to ground the report on",
                          received=f"{len(paths)} images: " + ", ".join(str(h.SOPInstanceUID) for h in headers[:4])
                                   + (" ..." if len(paths) > 4 else ""),
                          fix="pick the image with --instance SOP_INSTANCE_UID")
    path, source = paths[index], pydicom.dcmread(str(paths[index]))
    image = load_image(path, format="dicom")
    say(f"radiograph {source.SOPInstanceUID} ({image.width}x{image.height}) in {series.label()}, study {study}, "
        f"from {client.where}")
    grounding = agent()
    tell("ground", 0, 1)
    links = link_report(grounding, image, report, threshold=threshold, method=nlp)
    tell("ground", 1, 1)
    print_links(links, say)
    regions, numbers, sentences_json = links_to_regions(links)

    # the SEG: one segment per region with a non-empty mask
    stem = f"{str(source.get('Modality', 'image')).lower()}-{source.get('InstanceNumber') or 1}.report"
    seg_regions = [(r, n) for r, n in zip(regions, numbers) if r.mask is not None and not r.mask.is_empty()]
    seg_labels = [f"{r.label or 'region'} (sentence {n})"[:64] for r, n in seg_regions]
    seg_ds = None
    seg_path = None
    if seg_regions:
        seg_path = write_dicom_seg([r.mask.data for r, _ in seg_regions if r.mask is not None], seg_labels, source,
                                   out / f"{stem}.seg.dcm", series_description="medvlm report regions",
                                   software_version="medvlm")
        seg_ds = pydicom.dcmread(str(seg_path))
        check_seg(seg_ds, [source], seg_labels)
    segment_of = {id(r): k for k, (r, _) in enumerate(seg_regions, start=1)}

    sr_sentences = []
    for link in links:
        sr_regions = []
        for r in link.regions:
            polygons = mask_polygons(r.mask.data) if r.mask is not None and not r.mask.is_empty() else []
            if not polygons:
                polygons = [box_polygon(r.box.x0, r.box.y0, r.box.x1, r.box.y1)]
            sr_regions.append(SRRegion(label=r.label, polygons=polygons, segment_number=segment_of.get(id(r))))
        sr_sentences.append(SRSentence(number=link.number, text=link.text, status=link.status, note=link.note,
                                       regions=sr_regions if link.status == "grounded" else []))
    sr = build_report_sr(source, sr_sentences, seg=seg_ds, software_version="medvlm")
    validate_report_sr(sr, source, sr_sentences)
    sr_path = out / f"{stem}.sr.dcm"
    with atomic_open(sr_path, "wb") as fh:
        sr.save_as(fh, enforce_file_format=True)
    written = write_regions(out, stem, image, regions, numbers=numbers,
                            extra={"report": report_source, "sentences": sentences_json,
                                   "threshold": threshold, "grounder": getattr(grounding.grounder, "name", "?"),
                                   "study": study, "series": series.series_uid,
                                   "sop_instance_uid": str(source.SOPInstanceUID),
                                   "dicom_seg": seg_path.name if seg_path else None, "dicom_sr": sr_path.name,
                                   "seg_segments": seg_labels},
                            title="numbers = report sentences")
    say(f"wrote {written.json_path}, {written.overlay_path}, {sr_path}" + (f", {seg_path}" if seg_path else ""))
    summary: dict[str, Any] = {"pacs": client.where, "study": study, "series": series.series_uid,
                               "sop_instance_uid": str(source.SOPInstanceUID), "json": written.json_path.name,
                               "dicom_sr": sr_path.name, "dicom_seg": seg_path.name if seg_path else None,
                               "sentences": [{"number": link.number, "status": link.status, "text": link.text}
                                             for link in links]}
    if store:
        _store(client, ([seg_ds] if seg_ds is not None else []) + [sr], summary, say, tell)
    else:
        say("not stored (add --store to send the DICOM SR and SEG to the PACS)")
    say(f"wrote {_write_summary(out, f'{stem}.pacs.json', summary)}")
    return summary
