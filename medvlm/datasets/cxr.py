"""Chest X-ray readers: JSRT/SCR, V7 COVID lungs, NIH ChestX-ray14 boxes, Shenzhen lungs, torchxrayvision tests.

All chest X-rays are in radiographic display (the PATIENT's right on the IMAGE left); mask names are the
patient's sides, checked against mask centroids (``tests/test_datasets.py``).
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any, ClassVar

from medvlm.datasets.base import (
    CXR_STRUCTURES,
    BoolArray,
    BoxAnnotation,
    Dataset,
    Sample,
    nonempty,
    read_mask_png,
    split_left_right,
)
from medvlm.errors import input_error
from medvlm.io import MedicalImage, load_image
from medvlm.types import Box

__all__ = ["JsrtScr", "NihBbox", "ShenzhenLungs", "TxvTests", "V7CovidLungs"]

XRAY_MODALITY = "CR"
"""Modality code given to every chest radiograph here (the PNGs carry none)."""

DISPLAY_NOTE = "radiographic display: patient's right on the image left"


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise input_error(f"annotation table {path}", expected="an existing CSV file", received="file not found",
                          fix="check that the data folder is complete")
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _xray(path: Path, spacing: tuple[float, float] | None = None) -> MedicalImage:
    image = load_image(path, modality=XRAY_MODALITY)
    image.spacing_mm = spacing
    image.meta["display"] = DISPLAY_NOTE
    return image


def _stems(folder: Path, suffixes: tuple[str, ...] = (".png",)) -> list[str]:
    if not folder.is_dir():
        raise input_error(f"image folder {folder}", expected="an existing folder", received="folder not found",
                          fix="check that the data folder is complete")
    return sorted(p.stem for p in folder.iterdir() if p.suffix.lower() in suffixes)


# ------------------------------------------------------------------------------------------------- JSRT


class JsrtScr(Dataset):
    """JSRT PA chest radiographs (1024 x 1024, 0.35 mm/px) with SCR anatomy masks and JSRT nodule boxes.

    Masks: heart, right/left lung, right/left clavicle, read from ``masks/<structure>/<id>.png`` (0/255). SCR's
    left/right are already the patient's (``left_lung`` lies on the image right), so folder ``left_lung`` is
    "left lung". Boxes: one per nodule image from ``nodules.csv`` (box_x0..box_y1 on the 1024 grid, a box
    circumscribed around centre + diameter, not drawn by a reader), label "nodule", phrase from the CSV's
    ``phrase`` column; the 62 non-nodule images have no box.
    """

    name = "cxr_jsrt_scr"
    licence = ("JSRT/SCR: research and education only; redistribution and commercial use prohibited; "
               "acknowledge SCR (van Ginneken et al. 2006) and cite JSRT (Shiraishi et al. 2000)")
    structures = CXR_STRUCTURES
    findings = ("nodule",)
    description = "JSRT PA chest X-rays with SCR heart/lung/clavicle masks and nodule boxes"
    spacing_mm = (0.35, 0.35)
    image_size = 1024
    _folders: ClassVar[dict[str, str]] = {"heart": "heart", "right lung": "right_lung", "left lung": "left_lung",
                "right clavicle": "right_clavicle", "left clavicle": "left_clavicle"}

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self._nodules: dict[str, dict[str, str]] | None = None

    def _list_ids(self) -> list[str]:
        return _stems(self.root / "images")

    def nodules(self) -> dict[str, dict[str, str]]:
        """Rows of ``nodules.csv`` by image id (stem)."""
        if self._nodules is None:
            path = self.root / "nodules.csv"
            rows = _read_csv(path) if path.is_file() else []
            self._nodules = {Path(r["image"]).stem: r for r in rows}
        return self._nodules

    def _load(self, sample_id: str) -> Sample:
        path = self.root / "images" / f"{sample_id}.png"
        image = _xray(path, self.spacing_mm)
        if image.shape != (self.image_size, self.image_size):
            raise input_error(f"JSRT image {path}", expected=f"{self.image_size} x {self.image_size} pixels "
                              "(the grid where 0.35 mm/px holds)", received=f"{image.height} x {image.width}",
                              fix="use the 1024 x 1024 images of shared/data/cxr_jsrt_scr")
        masks: dict[str, BoolArray] = {}
        for name, folder in self._folders.items():
            mpath = self.root / "masks" / folder / f"{sample_id}.png"
            if mpath.is_file():
                masks[name] = read_mask_png(mpath)
        boxes: list[BoxAnnotation] = []
        meta: dict[str, Any] = {"view": "PA", "has_nodule": sample_id in self.nodules(),
                                "mask_source": "SCR (patient's left/right)"}
        row = self.nodules().get(sample_id)
        if row is not None:
            box = Box(*(float(row[k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1")))
            keys = ("x_center_1024", "y_center_1024", "size_mm", "radius_px_1024", "subtlety_1to5", "malignancy",
                    "location", "diagnosis")
            boxes.append(BoxAnnotation(box=box, phrase=row["phrase"].strip(), label="nodule",
                                       meta={k: _number(row[k]) for k in keys if k in row}))
            meta.update({k: _number(row[k]) for k in ("age", "sex") if row.get(k)})
        return Sample(id=sample_id, image=image, masks=nonempty(masks), boxes=boxes, source=str(path),
                      licence=self.licence, meta=meta)


def _number(text: str) -> Any:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value


# ---------------------------------------------------------------------------------------------- V7 COVID


class V7CovidLungs(Dataset):
    """COVID-19 chest X-rays (longest side <= 1024) with V7 Labs right/left lung masks (include the
    retro-cardiac lung) and "Ignore" masks (4 images), which go to :attr:`Sample.ignore`, not to ``masks``.

    ``index.csv`` gives per-image licence (CC BY 3.0 / 4.0), view, sex, age, DOI/URL, original size and the
    downsampling scale; its ``v7_json`` column names V7's image ids (``1676574.json.gz``) while the files in
    ``v7_json/`` are named by image stem; the reader uses the stem. Pixel spacing is not stated: None.
    """

    name = "cxr_covid_v7_lungs"
    licence = "images CC BY 3.0 / CC BY 4.0 (per image, see sample.licence); V7 Labs lung masks CC BY 4.0"
    structures = ("right lung", "left lung")
    description = "COVID-19 chest X-rays (PA/AP) with V7 Labs left/right lung masks"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self._index: dict[str, dict[str, str]] | None = None
        self._patients: dict[str, str] = {}

    def index(self) -> dict[str, dict[str, str]]:
        if self._index is None:
            self._index = {Path(r["image"]).stem: r for r in _read_csv(self.root / "index.csv")}
        return self._index

    def _list_ids(self) -> list[str]:
        on_disk = set(_stems(self.root / "images"))
        missing = sorted(set(self.index()) - on_disk)
        if missing:
            raise input_error(f"{self.root}/index.csv", expected="every listed image in images/",
                              received=f"{len(missing)} missing, e.g. {missing[:3]}",
                              fix="restore the data folder")
        return sorted(self.index())

    def _v7_json(self, sample_id: str) -> dict[str, Any] | None:
        path = self.root / "v7_json" / f"{sample_id}.json.gz"
        if not path.is_file():
            return None
        with gzip.open(path, "rt") as fh:
            data: dict[str, Any] = json.load(fh)
        return data

    def group(self, sample_id: str) -> str:
        """Patient (from the V7 ``PatientID:`` tag) when stated, else the image id."""
        if sample_id not in self._patients:
            data = self._v7_json(sample_id) or {}
            tags = [a.get("name", "") for a in data.get("annotations", []) if "tag" in a]
            pid = next((t.split(":", 1)[1] for t in tags if t.startswith("PatientID:")), None)
            self._patients[sample_id] = f"patient:{pid}" if pid else sample_id
        return self._patients[sample_id]

    def _load(self, sample_id: str) -> Sample:
        row = self.index()[sample_id]
        path = self.root / "images" / row["image"]
        image = _xray(path)
        masks = {name: read_mask_png(self.root / "masks" / folder / row["image"])
                 for name, folder in (("right lung", "right_lung"), ("left lung", "left_lung"))
                 if (self.root / "masks" / folder / row["image"]).is_file()}
        ignore_path = self.root / "masks" / "ignore" / row["image"]
        ignore = read_mask_png(ignore_path) if ignore_path.is_file() else None
        meta: dict[str, Any] = {k: row[k] for k in ("original_filename", "view", "sex", "finding", "doi", "url")
                                if row.get(k)}
        meta["image_licence"] = row.get("license", "")
        if row.get("age"):
            meta["age"] = _number(row["age"])
        meta["original_size"] = (int(row["orig_width"]), int(row["orig_height"]))  # (width, height)
        meta["scale"] = float(row["scale"])
        meta["mask_source"] = "V7 Labs polygons (lungs include the retro-cardiac part)"
        meta["has_ignore"] = ignore is not None
        licence = f"image {row.get('license', '?')}; masks CC BY 4.0 (V7 Labs)"
        return Sample(id=sample_id, image=image, masks=nonempty(masks), source=str(path), licence=licence,
                      meta=meta, ignore=ignore)


# --------------------------------------------------------------------------------------------------- NIH


NIH_PHRASES = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Effusion": "pleural effusion",
    "Infiltrate": "infiltrate",
    "Infiltration": "infiltrate",
    "Mass": "mass",
    "Nodule": "nodule",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
}
"""NIH box finding label -> natural phrase; the box label is the NIH label in lower case."""


class NihBbox(Dataset):
    """NIH ChestX-ray14 images (1024 x 1024) that have official boxes in ``BBox_List_2017.csv``.

    Only the images present in ``images/`` are samples (12). Boxes: the CSV's x, y, w, h -> pixel xyxy
    ``(x, y, x + w, y + h)``; label = the NIH finding in lower case ("infiltrate", "effusion", ...), phrase =
    natural text ("pleural effusion"). Two images are RGBA (alpha = 255, R = G = B): read as gray.
    Image-level labels, age, sex, view and the original size/spacing come from ``data_entry_subset.csv``;
    the spacing on the 1024 grid is not stated (the originals were resized, aspect not kept): None.
    """

    name = "cxr_nih_bbox"
    licence = ("NIH ChestX-ray14: unrestricted use; link https://nihcc.app.box.com/v/ChestXray-NIHCC, acknowledge "
               "the NIH Clinical Center and cite Wang et al., CVPR 2017")
    findings = ("atelectasis", "cardiomegaly", "effusion", "infiltrate", "mass", "nodule", "pneumonia",
                "pneumothorax")
    description = "NIH ChestX-ray14 images with official finding boxes"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self._boxes: dict[str, list[tuple[str, float, float, float, float]]] | None = None
        self._entries: dict[str, dict[str, str]] | None = None

    def _list_ids(self) -> list[str]:
        return _stems(self.root / "images")

    def box_rows(self) -> dict[str, list[tuple[str, float, float, float, float]]]:
        """``{image stem: [(finding, x, y, w, h), ...]}`` from the full official list."""
        if self._boxes is None:
            path = self.root / "BBox_List_2017.csv"
            if not path.is_file():
                raise input_error(f"box list {path}", expected="an existing CSV file", received="file not found",
                                  fix="check that the data folder is complete")
            out: dict[str, list[tuple[str, float, float, float, float]]] = {}
            with path.open(newline="") as fh:
                reader = csv.reader(fh)
                next(reader, None)  # header "Image Index,Finding Label,Bbox [x,y,w,h]": split over 4 columns
                for row in reader:
                    if len(row) < 6 or not row[0]:
                        continue
                    x, y, w, h = (float(v) for v in row[2:6])
                    out.setdefault(Path(row[0]).stem, []).append((row[1].strip(), x, y, w, h))
            self._boxes = out
        return self._boxes

    def entries(self) -> dict[str, dict[str, str]]:
        if self._entries is None:
            path = self.root / "data_entry_subset.csv"
            self._entries = {Path(r["Image Index"]).stem: r for r in _read_csv(path)} if path.is_file() else {}
        return self._entries

    def group(self, sample_id: str) -> str:
        return "patient:" + sample_id.split("_")[0]

    def _load(self, sample_id: str) -> Sample:
        path = self.root / "images" / f"{sample_id}.png"
        image = _xray(path)
        boxes = [BoxAnnotation(box=Box.from_xywh(x, y, w, h), phrase=NIH_PHRASES.get(f, f.lower()), label=f.lower(),
                               meta={"finding_label": f, "xywh": (x, y, w, h)})
                 for f, x, y, w, h in self.box_rows().get(sample_id, [])]
        meta: dict[str, Any] = {}
        entry = self.entries().get(sample_id)
        if entry is not None:
            meta["labels"] = [s.strip().lower() for s in entry["Finding Labels"].split("|") if s.strip()]
            meta["age"] = _number(entry["Patient Age"])
            meta["sex"] = entry["Patient Gender"]
            meta["view"] = entry["View Position"]
            values = list(entry.values())
            # The header "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]" is split over 4 columns.
            try:
                meta["original_size"] = (int(values[7]), int(values[8]))
                meta["original_pixel_spacing_mm"] = (float(values[9]), float(values[10]))
            except (IndexError, ValueError):
                pass
        return Sample(id=sample_id, image=image, boxes=boxes, source=str(path), licence=self.licence, meta=meta)


# ---------------------------------------------------------------------------------------------- Shenzhen


class ShenzhenLungs(Dataset):
    """Shenzhen chest X-rays (normal, about 750 x 730) with one two-lung mask each (``lungmasks/<id>_mask.png``).

    The masks are anti-aliased (values 0..255), so they are thresholded at 128; the two lungs are split into
    "right lung" (component on the image left) and "left lung" (image right). Spacing not stated: None.
    """

    name = "cxr_shenzhen_lungs"
    licence = "images: NLM terms (Shenzhen set); masks CC BY-NC-SA 4.0"
    structures = ("right lung", "left lung")
    description = "Shenzhen chest X-rays (normal) with lung masks"
    threshold = 128

    def _list_ids(self) -> list[str]:
        return _stems(self.root / "lungs")

    def _load(self, sample_id: str) -> Sample:
        path = self.root / "lungs" / f"{sample_id}.png"
        image = _xray(path)
        mpath = self.root / "lungmasks" / f"{sample_id}_mask.png"
        masks: dict[str, BoolArray] = {}
        meta: dict[str, Any] = {"finding": "normal" if sample_id.endswith("_0") else "abnormal",
                                "mask_threshold": self.threshold}
        if mpath.is_file():
            both = read_mask_png(mpath, self.threshold)
            if both.shape != image.shape:
                raise input_error(f"Shenzhen mask {mpath}", expected=f"the image's shape {image.shape}",
                                  received=f"shape {both.shape}", fix="check that mask and image belong together")
            masks, meta["lung_split"] = split_left_right(both)
        return Sample(id=sample_id, image=image, masks=masks, source=str(path), licence=self.licence, meta=meta)


# ------------------------------------------------------------------------------------- torchxrayvision tests


TBX11K_PHRASES = {
    "ActiveTuberculosis": "active tuberculosis",
    "ObsoletePulmonaryTuberculosis": "obsolete pulmonary tuberculosis",
    "PulmonaryTuberculosis": "pulmonary tuberculosis",
}


class TxvTests(Dataset):
    """The torchxrayvision test images: TBX11K (3, 512 x 512, COCO boxes of TB; ``h0001`` is healthy, no box),
    NIH (2, 512 x 512, no annotation in this folder) and one COVID image with a V7 two-lung mask (JPEG,
    thresholded at 128 and split into right/left lung).

    Ids are ``<subfolder>_<stem>``: ``tbx11k_tb0005``, ``nih_00000001_000``, ``covid_v7labs_16747_3_1``.
    COCO boxes are ``[x, y, w, h]`` -> pixel xyxy.
    """

    name = "cxr_txv_tests"
    licence = ("torchxrayvision tests (repo Apache-2.0); images keep their upstream terms (TBX11K, NIH "
               "ChestX-ray14, COVID-19 image data collection); V7 Labs masks CC BY 4.0")
    structures = ("right lung", "left lung")
    findings = tuple(TBX11K_PHRASES.values())
    description = "torchxrayvision test images: TBX11K TB boxes, NIH, one COVID image with lung mask"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self._coco: dict[str, Any] | None = None

    def coco(self) -> dict[str, Any]:
        if self._coco is None:
            path = self.root / "tbx11k" / "TBX11K_train_subset.json"
            self._coco = json.loads(path.read_text()) if path.is_file() else {}
        return self._coco

    def _files(self) -> dict[str, Path]:
        files: dict[str, Path] = {}
        tbx = self.root / "tbx11k" / "imgs"
        if tbx.is_dir():
            for p in sorted(tbx.glob("*/*.png")):
                files[f"tbx11k_{p.stem}"] = p
        nih = self.root / "nih"
        if nih.is_dir():
            for p in sorted(nih.glob("*.png")):
                files[f"nih_{p.stem}"] = p
        cov = self.root / "covid_v7labs"
        if cov.is_dir():
            for p in sorted(cov.iterdir()):
                if p.suffix.lower() in (".jpg", ".jpeg", ".png") and not p.stem.endswith("_lungmask"):
                    files[f"covid_v7labs_{p.stem}"] = p
        return files

    def _list_ids(self) -> list[str]:
        return sorted(self._files())

    def _load(self, sample_id: str) -> Sample:
        path = self._files()[sample_id]
        image = _xray(path)
        masks: dict[str, BoolArray] = {}
        boxes: list[BoxAnnotation] = []
        meta: dict[str, Any] = {"subset": sample_id.split("_", 1)[0] if not sample_id.startswith("covid_v7labs")
                                else "covid_v7labs"}
        if sample_id.startswith("tbx11k_"):
            coco = self.coco()
            rel = path.relative_to(self.root / "tbx11k" / "imgs").as_posix()
            cats = {c["id"]: c["name"] for c in coco.get("categories", [])}
            entry = next((im for im in coco.get("images", []) if im.get("file_name") == rel), None)
            meta["category_folder"] = path.parent.name  # "tb" or "health"
            if entry is not None:
                if (entry.get("height"), entry.get("width")) != image.shape:
                    raise input_error(f"TBX11K annotation of {rel}", expected=f"image size {image.shape} (H, W)",
                                      received=f"{entry.get('height')} x {entry.get('width')}",
                                      fix="check the COCO json against the image files")
                for ann in coco.get("annotations", []):
                    if ann.get("image_id") == entry["id"]:
                        cat = cats.get(ann["category_id"], str(ann["category_id"]))
                        phrase = TBX11K_PHRASES.get(cat, cat)
                        boxes.append(BoxAnnotation(box=Box.from_xywh(*ann["bbox"]), phrase=phrase, label=phrase,
                                                   meta={"category": cat, "coco_id": ann.get("id")}))
        elif sample_id.startswith("covid_v7labs_"):
            mpath = path.with_name(f"{path.stem}_lungmask{path.suffix}")
            if mpath.is_file():
                both = read_mask_png(mpath, 128)
                if both.shape != image.shape:
                    raise input_error(f"lung mask {mpath}", expected=f"the image's shape {image.shape}",
                                      received=f"shape {both.shape}", fix="check that mask and image belong together")
                masks, meta["lung_split"] = split_left_right(both)
                meta["mask_threshold"] = 128
        else:
            meta["note"] = "image-level labels are not included in this folder"
        return Sample(id=sample_id, image=image, masks=masks, boxes=boxes, source=str(path), licence=self.licence,
                      meta=meta)

