"""A DICOM Structured Report of report-to-image links: one item per report sentence, with its status and, for
grounded sentences, where on the image (highdicom Comprehensive SR).

Why a Comprehensive SR and not a TID 1500 Measurement Report: TID 1500 holds measurements and coded qualitative
evaluations of regions, but no free-text sentence, and a negated or not-groundable sentence has no region at all.
The Comprehensive SR keeps every sentence as written, in order, with the standard relationships:

.. code-block:: text

    CONTAINER (18748-4, LN, "Diagnostic imaging report")
      HAS OBS CONTEXT   device observer: medvlm (TID 1004)
      CONTAINS TEXT (121071, DCM, "Finding") = the sentence                       one per sentence, in order
        HAS PROPERTIES CODE (LINKSTATUS, 99MEDVLM, "Report sentence link status")
                       = GROUNDED | NEGATED | NOTGROUNDABLE (99MEDVLM, a private coding scheme)
        HAS PROPERTIES TEXT (121106, DCM, "Comment") = why not grounded           when there is a note
        INFERRED FROM TEXT (112039, DCM, "Tracking Identifier") = region label     one per region
          HAS PROPERTIES CODE (363698007, SCT, "Finding Site") = SNOMED CT code    when the label names one
          INFERRED FROM SCOORD (111030, DCM, "Image Region") POLYLINE, closed      one per outline
            SELECTED FROM IMAGE (121324, DCM, "Source Image") -> the radiograph
          INFERRED FROM IMAGE (121191, DCM, "Referenced Segment") -> the SEG, its segment number   with a SEG

Coordinates are DICOM image coordinates in pixels: ``(column, row)``, ``(0, 0)`` the top-left corner of the
top-left pixel (pixel centres at ``+0.5``). A region with a mask gets the outer outline of each of its connected
parts (OpenCV contours through the boundary pixels' centres, simplified); a region without one gets its box.

:func:`validate_report_sr` checks what the STOW would send: the relationship constraints of the Comprehensive SR
IOD (PS3.3 A.35.3), one item per sentence with the right text and status, closed outlines inside the image,
every outline selected from the source image, and a round trip through pydicom and highdicom.
:func:`read_report_sr` reads the sentences back.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error, missing_dependency

__all__ = [
    "STATUSES",
    "SRRegion",
    "SRSentence",
    "box_polygon",
    "build_report_sr",
    "mask_polygons",
    "read_report_sr",
    "validate_report_sr",
]

#: sentence status -> code value in the private scheme 99MEDVLM
STATUSES = {"grounded": ("GROUNDED", "Grounded"), "negated": ("NEGATED", "Negated"),
            "not_groundable": ("NOTGROUNDABLE", "Not groundable")}
_SCHEME = "99MEDVLM"
_STATUS_NAME = ("LINKSTATUS", _SCHEME, "Report sentence link status")
_REPORT = ("18748-4", "LN", "Diagnostic imaging report")
_FINDING = ("121071", "DCM", "Finding")
_COMMENT = ("121106", "DCM", "Comment")
_TRACKING = ("112039", "DCM", "Tracking Identifier")
_FINDING_SITE = ("363698007", "SCT", "Finding Site")
_IMAGE_REGION = ("111030", "DCM", "Image Region")
_SOURCE_IMAGE = ("121324", "DCM", "Source Image")
_REFERENCED_SEGMENT = ("121191", "DCM", "Referenced Segment")
_MAX_COMPONENTS = 8

# Comprehensive SR relationship content constraints (PS3.3 Table A.35.3-2), for the value types used here.
_ANY = "*"
_DATA = {"TEXT", "CODE", "NUM", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME"}
_ALLOWED: dict[tuple[str, str], set[str]] = {
    ("CONTAINER", "CONTAINS"): _DATA | {"SCOORD", "TCOORD", "COMPOSITE", "IMAGE", "WAVEFORM", "CONTAINER"},
    (_ANY, "HAS OBS CONTEXT"): _DATA | {"COMPOSITE"},
    (_ANY, "HAS CONCEPT MOD"): {"TEXT", "CODE"},
    ("TEXT", "HAS PROPERTIES"): _DATA | {"IMAGE", "WAVEFORM", "COMPOSITE", "SCOORD", "TCOORD", "CONTAINER"},
    ("CODE", "HAS PROPERTIES"): _DATA | {"IMAGE", "WAVEFORM", "COMPOSITE", "SCOORD", "TCOORD", "CONTAINER"},
    ("CONTAINER", "HAS PROPERTIES"): _DATA | {"IMAGE", "WAVEFORM", "COMPOSITE", "SCOORD", "TCOORD", "CONTAINER"},
    ("TEXT", "INFERRED FROM"): _DATA | {"IMAGE", "WAVEFORM", "COMPOSITE", "SCOORD", "TCOORD", "CONTAINER"},
    ("CODE", "INFERRED FROM"): _DATA | {"IMAGE", "WAVEFORM", "COMPOSITE", "SCOORD", "TCOORD", "CONTAINER"},
    ("SCOORD", "SELECTED FROM"): {"IMAGE"},
}


@dataclass
class SRRegion:
    """One region of a grounded sentence: its label, its outlines (closed, ``(N, 2)`` ``(column, row)`` DICOM
    image coordinates) and, when a SEG is stored with the SR, its segment number there."""

    label: str
    polygons: list[npt.NDArray[np.float64]]
    segment_number: int | None = None


@dataclass
class SRSentence:
    """One report sentence: ``status`` is grounded / negated / not_groundable; ``regions`` only when grounded."""

    number: int
    text: str
    status: str
    note: str = ""
    regions: list[SRRegion] = field(default_factory=list)


def box_polygon(x0: float, y0: float, x1: float, y1: float) -> npt.NDArray[np.float64]:
    """A box (pixel edges, exclusive right/bottom as :class:`medvlm.types.Box`) as a closed outline in DICOM image
    coordinates: the four corners and the first again."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def mask_polygons(mask: npt.ArrayLike, *, max_points: int = 96) -> list[npt.NDArray[np.float64]]:
    """The outer outline of each connected part of ``mask`` (bool ``(H, W)``; largest first, at most 8, parts
    under 1 % of the largest dropped) as closed polygons in DICOM image coordinates (boundary pixel centres, so
    ``+0.5``), each simplified to at most ``max_points`` vertices. A part too thin for an outline gets its box."""
    import cv2

    m = np.asarray(mask).astype(np.uint8)
    if m.ndim != 2 or not m.any():
        return []
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    sized = sorted(((float(cv2.contourArea(c)) + len(c), c) for c in contours), key=lambda t: -t[0])
    biggest = sized[0][0]
    out = []
    for size, contour in sized[:_MAX_COMPONENTS]:
        if size < 0.01 * biggest:
            break
        pts = np.asarray(contour, dtype=np.int32)
        eps = 0.5
        approx = cv2.approxPolyDP(pts, eps, True)
        while len(approx) > max_points:
            eps *= 1.5
            approx = cv2.approxPolyDP(pts, eps, True)
        poly = np.asarray(approx, dtype=np.float64).reshape(-1, 2)
        if len(poly) < 3 or float(cv2.contourArea(np.asarray(approx, dtype=np.float32))) <= 0:
            x, y, w, h = cv2.boundingRect(pts)
            out.append(box_polygon(float(x), float(y), float(x + w), float(y + h)))
            continue
        poly = poly + 0.5
        out.append(np.vstack([poly, poly[:1]]))
    return out


def _code(triple: tuple[str, str, str]) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value=triple[0], scheme_designator=triple[1], meaning=triple[2])


def _hd() -> Any:
    try:
        import highdicom as hd
    except ImportError as exc:
        raise missing_dependency("DICOM SR export", "pip install highdicom") from exc
    return hd


def build_report_sr(source: Any, sentences: Sequence[SRSentence], *, seg: Any = None,
                    series_description: str = "medvlm report links", software_version: str = "",
                    observer_uid: str | None = None) -> Any:
    """A Comprehensive SR (highdicom ``ComprehensiveSR``, a pydicom Dataset) of ``sentences`` linked to the image
    ``source`` (its pydicom Dataset; the header is enough). ``seg``: the DICOM SEG stored with it (its regions'
    ``segment_number`` point into it; it becomes evidence). The tree is in the module docstring."""
    hd = _hd()
    from medvlm.export import segment_codes

    if source is None:
        raise input_error("DICOM SR", expected="the DICOM image the sentences were grounded on",
                          received="no source image", fix="ground the report on a DICOM radiograph")
    rel = hd.sr.RelationshipTypeValues
    sop_class, sop_uid = str(source.SOPClassUID), str(source.SOPInstanceUID)
    items: list[Any] = list(hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=observer_uid or hd.UID(), name="medvlm", manufacturer_name="medvlm",
            model_name="medvlm link-report")))
    for sentence in sentences:
        if sentence.status not in STATUSES:
            raise input_error(f"DICOM SR sentence {sentence.number}", expected=f"a status in {sorted(STATUSES)}",
                              received=repr(sentence.status), fix="pass the status agents.report gave")
        value, meaning = STATUSES[sentence.status]
        children: list[Any] = [hd.sr.CodeContentItem(name=_code(_STATUS_NAME), value=_code((value, _SCHEME, meaning)),
                                                     relationship_type=rel.HAS_PROPERTIES)]
        if sentence.note:
            children.append(hd.sr.TextContentItem(name=_code(_COMMENT), value=sentence.note[:1024],
                                                  relationship_type=rel.HAS_PROPERTIES))
        for region in sentence.regions:
            region_item = hd.sr.TextContentItem(name=_code(_TRACKING), value=region.label or "region",
                                                relationship_type=rel.INFERRED_FROM)
            sub: list[Any] = []
            _, site = segment_codes(region.label)
            if str(site.value) != "91723000":  # only a specific structure, not the generic Anatomical Structure
                sub.append(hd.sr.CodeContentItem(name=_code(_FINDING_SITE), value=site,
                                                 relationship_type=rel.HAS_PROPERTIES))
            for polygon in region.polygons:
                scoord = hd.sr.ScoordContentItem(
                    name=_code(_IMAGE_REGION), graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=np.asarray(polygon, dtype=np.float64), relationship_type=rel.INFERRED_FROM)
                scoord.ContentSequence = hd.sr.ContentSequence([hd.sr.ImageContentItem(
                    name=_code(_SOURCE_IMAGE), referenced_sop_class_uid=sop_class, referenced_sop_instance_uid=sop_uid,
                    relationship_type=rel.SELECTED_FROM)])
                sub.append(scoord)
            if seg is not None and region.segment_number is not None:
                sub.append(hd.sr.ImageContentItem(
                    name=_code(_REFERENCED_SEGMENT), referenced_sop_class_uid=str(seg.SOPClassUID),
                    referenced_sop_instance_uid=str(seg.SOPInstanceUID),
                    referenced_segment_numbers=int(region.segment_number), relationship_type=rel.INFERRED_FROM))
            region_item.ContentSequence = hd.sr.ContentSequence(sub)
            children.append(region_item)
        text = hd.sr.TextContentItem(name=_code(_FINDING), value=sentence.text, relationship_type=rel.CONTAINS)
        text.ContentSequence = hd.sr.ContentSequence(children)
        items.append(text)
    root = hd.sr.ContainerContentItem(name=_code(_REPORT))
    root.ContentSequence = hd.sr.ContentSequence(items)
    evidence = [source] + ([seg] if seg is not None else [])
    try:
        sr = hd.sr.ComprehensiveSR(
            evidence=evidence, content=root, series_instance_uid=hd.UID(), series_number=9002,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medvlm", is_complete=True,
            is_final=False, is_verified=False, series_description=series_description[:64],
            software_versions=software_version or "0")
    except (ValueError, TypeError, AttributeError) as exc:
        raise input_error("DICOM SR", expected="a Comprehensive SR highdicom can build",
                          received=f"{type(exc).__name__}: {exc}",
                          fix="this is a bug in medvlm's SR export: please report it with the command you ran") from exc
    return sr


# ------------------------------------------------------------------------------------------------ reading


def _concept(item: Any) -> tuple[str, str]:
    seq = getattr(item, "ConceptNameCodeSequence", None) or []
    if not seq:
        return ("", "")
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator))


def _children(item: Any) -> list[Any]:
    return list(getattr(item, "ContentSequence", None) or [])


def read_report_sr(ds: Any) -> list[dict[str, Any]]:
    """The sentences of an SR written by :func:`build_report_sr`: ``[{"text", "status", "note", "regions":
    [{"label", "finding_site", "polygons", "images", "segment"}]}]`` in order (``polygons``: ``(N, 2)`` arrays of
    ``(column, row)``; ``images``: the SOP Instance UIDs they are selected from; ``segment``: ``(SEG SOP Instance
    UID, segment number)`` or None)."""
    codes = {v[0]: k for k, v in STATUSES.items()}
    out = []
    for item in _children(ds):
        if str(item.ValueType) != "TEXT" or _concept(item) != _FINDING[:2]:
            continue
        entry: dict[str, Any] = {"text": str(item.TextValue), "status": None, "note": "", "regions": []}
        for child in _children(item):
            concept = _concept(child)
            if concept == _STATUS_NAME[:2]:
                entry["status"] = codes.get(str(child.ConceptCodeSequence[0].CodeValue))
            elif concept == _COMMENT[:2]:
                entry["note"] = str(child.TextValue)
            elif concept == _TRACKING[:2]:
                region: dict[str, Any] = {"label": str(child.TextValue), "finding_site": None, "polygons": [],
                                          "images": [], "segment": None}
                for sub in _children(child):
                    sub_concept = _concept(sub)
                    if sub_concept == _FINDING_SITE[:2]:
                        region["finding_site"] = str(sub.ConceptCodeSequence[0].CodeMeaning)
                    elif str(sub.ValueType) == "SCOORD":
                        data = np.asarray([float(v) for v in sub.GraphicData], dtype=np.float64).reshape(-1, 2)
                        region["polygons"].append(data)
                        region["images"] += [str(ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                                             for ref in _children(sub)]
                    elif sub_concept == _REFERENCED_SEGMENT[:2]:
                        ref = sub.ReferencedSOPSequence[0]
                        region["segment"] = (str(ref.ReferencedSOPInstanceUID),
                                             int(ref.ReferencedSegmentNumber))
                entry["regions"].append(region)
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------- validation


def _walk(item: Any, path: str, problems: list[str]) -> None:
    parent = str(getattr(item, "ValueType", "CONTAINER"))
    for n, child in enumerate(_children(item), start=1):
        where = f"{path}.{n}"
        vt = str(getattr(child, "ValueType", ""))
        rel = str(getattr(child, "RelationshipType", ""))
        allowed = _ALLOWED.get((parent, rel)) or _ALLOWED.get((_ANY, rel))
        if not vt or not rel:
            problems.append(f"item {where} lacks its value type or relationship type")
        elif allowed is None or vt not in allowed:
            problems.append(f"item {where}: {parent} {rel} {vt} is not allowed in a Comprehensive SR")
        if not getattr(child, "ConceptNameCodeSequence", None) and rel != "SELECTED FROM":
            problems.append(f"item {where} ({vt}) has no concept name")
        _walk(child, where, problems)


def validate_report_sr(sr: Any, source: Any, sentences: Sequence[SRSentence]) -> None:
    """Check the SR before it is stored (see the module docstring); raises InputError naming every problem."""
    hd = _hd()
    import pydicom

    problems: list[str] = []
    try:
        buf = io.BytesIO()
        sr.save_as(buf, enforce_file_format=True)
        ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
        hd.sr.srread(io.BytesIO(buf.getvalue()))
    except Exception as exc:  # any failure to write or read it back is a validation failure
        raise input_error("DICOM SR", expected="an SR that pydicom writes and highdicom reads back",
                          received=f"{type(exc).__name__}: {str(exc)[:200]}",
                          fix="this is a bug in medvlm's SR export: please report it with the command you ran"
                          ) from exc
    if str(ds.SOPClassUID) != "1.2.840.10008.5.1.4.1.1.88.33":
        problems.append(f"SOP class {ds.SOPClassUID} is not Comprehensive SR")
    if str(ds.get("ValueType", "")) != "CONTAINER" or _concept(ds) != _REPORT[:2]:
        problems.append("the root is not the CONTAINER 'Diagnostic imaging report'")
    for key in ("StudyInstanceUID", "PatientID"):
        if str(ds.get(key, "")) != str(source.get(key, "")):
            problems.append(f"{key} differs from the source image's")
    _walk(ds, "1", problems)
    rows, cols = int(source.Rows), int(source.Columns)
    read = read_report_sr(ds)
    if len(read) != len(sentences):
        problems.append(f"{len(read)} sentence item(s) for {len(sentences)} sentence(s)")
    for got, want in zip(read, sentences):
        label = f"sentence {want.number}"
        if got["text"] != want.text:
            problems.append(f"{label}: text {got['text'][:40]!r} instead of {want.text[:40]!r}")
        if got["status"] != want.status:
            problems.append(f"{label}: status {got['status']} instead of {want.status}")
        polygons = [p for r in got["regions"] for p in r["polygons"]]
        if want.status == "grounded" and not polygons:
            problems.append(f"{label}: grounded without spatial coordinates")
        if want.status != "grounded" and got["regions"]:
            problems.append(f"{label}: {want.status} but has regions")
        for region in got["regions"]:
            if len(region["images"]) != len(region["polygons"]) or \
                    any(uid != str(source.SOPInstanceUID) for uid in region["images"]):
                problems.append(f"{label}, region {region['label']!r}: an outline not selected from the source image")
            for poly in region["polygons"]:
                if len(poly) < 4 or not np.allclose(poly[0], poly[-1]):
                    problems.append(f"{label}, region {region['label']!r}: an outline that is not a closed "
                                    f"polygon ({len(poly)} points)")
                elif not np.all(np.isfinite(poly)) or poly[:, 0].min() < 0 or poly[:, 1].min() < 0 or \
                        poly[:, 0].max() > cols or poly[:, 1].max() > rows:
                    lo, hi = poly.min(axis=0), poly.max(axis=0)
                    problems.append(f"{label}, region {region['label']!r}: coordinates outside the {cols} x {rows} "
                                    f"image (columns {lo[0]:.1f}..{hi[0]:.1f}, rows {lo[1]:.1f}..{hi[1]:.1f})")
    if problems:
        raise input_error("DICOM SR", expected="a valid Comprehensive SR with one item per report sentence, "
                                               "closed outlines inside the image",
                          received=f"{len(problems)} problem(s): " + "; ".join(problems[:6])
                                   + (" ..." if len(problems) > 6 else ""),
                          fix="nothing was stored; if the regions came from medvlm this is a bug: please report "
                              "it with the command you ran")
