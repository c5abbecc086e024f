"""Batch grounding: many images x a few phrases -> one JSONL line per (image, phrase), masks on disk, resumable.

Layout of ``out_dir``:

- ``results.jsonl``: one JSON object per line, ``{"key", "image", "phrase", "status": "ok" | "error",
  "regions": [...], "error"?}``; ``key`` = "<image path>\\t<phrase>" identifies an item;
- ``masks/<image stem>-<hash>.<phrase slug>.<k>.png``: 0/255 masks on the original pixel grid.

Masks are written atomically before their line, and a line is appended in one ``write`` followed by ``fsync``,
so a run killed at any moment leaves every finished item complete and at most one torn last line, which the next
run drops. A rerun reads ``results.jsonl`` and skips the keys already there, so every item ends up exactly once.
Items that failed (unreadable image) are recorded as errors and not retried unless ``retry_errors``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlm.errors import MedvlmError, input_error

__all__ = ["IMAGE_SUFFIXES", "BatchItems", "BatchOutput", "BatchSummary", "ImageResult", "batch_inputs",
           "batch_items", "check_phrases", "ground_image", "list_inputs", "read_batch_csv", "read_done", "run_batch",
           "run_batch_items", "tally"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".nii", ".nii.gz", ".tif", ".tiff")


@dataclass
class BatchSummary:
    images: int = 0
    items: int = 0
    done_now: int = 0
    skipped_done: int = 0
    errors: int = 0
    regions: int = 0
    seconds: float = 0.0
    error_examples: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"images: {self.images}, items (image x phrase): {self.items}",
               f"done now: {self.done_now}, already done (skipped): {self.skipped_done}, errors: {self.errors}",
               f"regions found: {self.regions}, time: {self.seconds:.1f} s"]
        out += [f"error: {e}" for e in self.error_examples]
        return out


def list_inputs(source: str | os.PathLike[str]) -> list[Path]:
    """Image paths from a folder (recursive, sorted, files with :data:`IMAGE_SUFFIXES`) or from a text file
    listing one path per line (relative paths are relative to that file; blank lines and # comments skipped)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise input_error("--input", expected=f"a folder with images ({', '.join(IMAGE_SUFFIXES)})",
                              received=f"{path} with no such file", fix="point --input at the image folder")
        return files
    if path.is_file() and not path.name.lower().endswith(IMAGE_SUFFIXES):
        entries = [ln.strip() for ln in path.read_text().splitlines()]
        return [(path.parent / e) if not Path(e).is_absolute() else Path(e)
                for e in entries if e and not e.startswith("#")]
    if path.is_file():
        return [path]
    raise input_error("--input", expected="an image folder, a text file listing image paths, or one image",
                      received=f"{path} (does not exist)", fix="check the path")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "phrase"


def _stem(path: Path) -> str:
    # the hash keeps two images with the same file name in different folders apart
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{path.name.split('.')[0]}-{digest}"


def read_done(results: Path) -> set[str]:
    """Keys already in ``results`` (a JSONL file); a torn last line (killed mid-write) is cut off the file."""
    if not results.exists():
        return set()
    data = results.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(results, "r+b") as fh:
            fh.truncate(len(keep))
    done = set()
    for line in keep.decode("utf-8").splitlines():
        if line.strip():
            done.add(json.loads(line)["key"])
    return done


def _append(results: Path, record: dict[str, Any]) -> None:
    line = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ImageResult:
    """What grounding one image produced, before anything is written: its result lines (in phrase order) and
    the masks they name (``masks/<name>.png`` -> PNG bytes). Workers of another process or machine return it."""

    path: str
    records: list[dict[str, Any]]
    masks: dict[str, bytes]
    error: str | None = None


def ground_image(agent: Any, path: str | os.PathLike[str], todo: Sequence[tuple[str, str]]) -> ImageResult:
    """Ground the phrases of ``todo`` (``(key, phrase)`` pairs) on the image at ``path`` with ``agent``; the image
    is loaded and encoded once. An unreadable image gives one error line per phrase (not an exception)."""
    from medvlm.io import load_image, mask_png_bytes

    src = Path(path)
    try:
        image = load_image(src)
        grounded = agent.ground_phrases(image, [p for _, p in todo])
    except MedvlmError as exc:
        return ImageResult(str(src), [{"key": key, "image": str(src), "phrase": phrase, "status": "error",
                                       "error": str(exc), "regions": []} for key, phrase in todo], {}, str(exc))
    stem = _stem(src)
    records, masks = [], {}
    for (key, phrase), (result, regions) in zip(todo, grounded):
        entries = []
        for k, region in enumerate(regions, start=1):
            mask_name = None
            if region.mask is not None:
                mask_name = f"masks/{stem}.{_slug(phrase)}.{k}.png"
                masks[mask_name] = mask_png_bytes(region.mask.data)
            entries.append({"id": k, **region.to_json(mask_path=mask_name, spacing_mm=image.spacing_mm)})
        records.append({"key": key, "image": str(src), "phrase": phrase, "status": "ok",
                        "size": [image.height, image.width], "regions": entries, "note": result.note})
    return ImageResult(str(src), records, masks)


class BatchOutput:
    """``out_dir``'s ``results.jsonl`` and ``masks/`` (module docstring): which keys are done, and the writer.

    ``retry_errors``: forget the error lines of an earlier run (they are done again). Only one writer per folder.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, retry_errors: bool = False) -> None:
        self.out = Path(out_dir)
        (self.out / "masks").mkdir(parents=True, exist_ok=True)
        self.results = self.out / "results.jsonl"
        self.done = read_done(self.results)
        if retry_errors:
            self.done -= _drop_errors(self.results)

    def todo(self, path: Path, phrases: Sequence[str]) -> list[tuple[str, str]]:
        """``(key, phrase)`` of the items of ``path`` not done yet."""
        return [(f"{path}\t{p}", p) for p in phrases if f"{path}\t{p}" not in self.done]

    def write(self, result: ImageResult) -> list[dict[str, Any]]:
        """Masks first (atomically), then one fsync-ed line per item not written yet (a result that arrives
        twice, e.g. from a retried worker, is written once); returns the records written."""
        from medvlm.io import atomic_open

        fresh = [r for r in result.records if r["key"] not in self.done]
        names = {e["mask"] for r in fresh for e in r["regions"] if e.get("mask")}
        for name in sorted(names):
            with atomic_open(self.out / name, "wb") as fh:
                fh.write(result.masks[name])
        for record in fresh:
            _append(self.results, record)
            self.done.add(record["key"])
        return fresh


def check_phrases(phrases: Sequence[str]) -> list[str]:
    """The phrases stripped; refuses an empty list or an empty phrase."""
    cleaned = [p.strip() for p in phrases]
    if not cleaned or not all(cleaned):
        raise input_error("--phrase", expected="one or more non-empty phrases", received=repr(list(phrases)),
                          fix="add --phrase 'left lung' (repeat for several)")
    return cleaned


def tally(summary: BatchSummary, result: ImageResult, written: Sequence[dict[str, Any]]) -> None:
    """Add the records of ``result`` just written to ``summary``."""
    if result.error is not None:
        summary.errors += len(written)
        if written and len(summary.error_examples) < 5:
            summary.error_examples.append(f"{result.path}: {result.error}")
        return
    summary.done_now += len(written)
    summary.regions += sum(len(r["regions"]) for r in written)


#: the work of a batch: each image with the phrases to ground on it
BatchItems = list[tuple[Path, list[str]]]


def batch_items(inputs: Iterable[Path], phrases: Sequence[str]) -> BatchItems:
    """Every image of ``inputs`` with every phrase (checked: non-empty)."""
    cleaned = check_phrases(phrases)
    return [(Path(p), list(cleaned)) for p in inputs]


def read_batch_csv(path: str | os.PathLike[str], phrases: Sequence[str] = ()) -> BatchItems:
    """The items of a CSV with a header row naming an ``image`` column (relative paths are relative to the CSV's
    folder) and a ``phrase`` column: one (image, phrase) per row, rows of one image grouped in file order; the
    ``phrases`` (``--phrase``) are added to every image. A row without a phrase adds the image with ``phrases``."""
    import csv

    src = Path(path)
    with open(src, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip().lower() for f in reader.fieldnames or []]
        if "image" not in fields:
            raise input_error(f"--input {src}", expected="a CSV whose header names an 'image' column (and a "
                              "'phrase' column, or --phrase)", received=f"columns {fields or 'none'}",
                              fix="add the header row: image,phrase")
        extra = [p.strip() for p in phrases if p.strip()]
        grouped: dict[Path, list[str]] = {}
        for row in reader:
            cells = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            if not cells.get("image"):
                continue
            image = Path(cells["image"])
            image = image if image.is_absolute() else src.parent / image
            entry = grouped.setdefault(image, [])
            phrase = cells.get("phrase", "")
            if phrase and phrase not in entry:
                entry.append(phrase)
    items = [(image, own + [p for p in extra if p not in own]) for image, own in grouped.items()]
    missing = [str(image) for image, phr in items if not phr]
    if not items or missing:
        raise input_error(f"--input {src}", expected="rows with an image and a phrase (or --phrase for all)",
                          received="no rows" if not items else f"images without a phrase, e.g. {missing[0]}",
                          fix="fill the phrase column, or pass --phrase")
    return items


def batch_inputs(source: str | os.PathLike[str], phrases: Sequence[str]) -> BatchItems:
    """``medvlm batch --input``: a ``.csv`` of image,phrase rows (:func:`read_batch_csv`), else a folder, a list
    file or one image (:func:`list_inputs`), each with every ``--phrase``."""
    if str(source).lower().endswith(".csv") and Path(source).is_file():
        return read_batch_csv(source, phrases)
    return batch_items(list_inputs(source), phrases)


def run_batch(agent: Any, inputs: Iterable[Path], phrases: Sequence[str], out_dir: str | os.PathLike[str], *,
              retry_errors: bool = False, progress: bool = True) -> BatchSummary:
    """Ground every phrase on every image with ``agent`` (a :class:`~agents.pipeline.GroundingAgent`); resumable.
    See :func:`run_batch_items`."""
    return run_batch_items(agent, batch_items(inputs, phrases), out_dir, retry_errors=retry_errors,
                           progress=progress)


def run_batch_items(agent: Any, items: BatchItems, out_dir: str | os.PathLike[str], *, retry_errors: bool = False,
                    progress: bool = True) -> BatchSummary:
    """Ground the phrases of each image of ``items`` with ``agent``; resumable (module docstring). Each image is
    loaded and encoded once for all its phrases. Returns the counts of this run."""
    from tqdm import tqdm

    output = BatchOutput(out_dir, retry_errors=retry_errors)
    summary = BatchSummary(images=len(items), items=sum(len(phr) for _, phr in items))
    t0 = time.perf_counter()
    bar = tqdm(total=summary.items, disable=not progress, unit="item", desc="medvlm batch")
    for path, phrases in items:
        todo = output.todo(path, phrases)
        summary.skipped_done += len(phrases) - len(todo)
        bar.update(len(phrases) - len(todo))
        if not todo:
            continue
        result = ground_image(agent, path, todo)
        tally(summary, result, output.write(result))
        bar.update(len(todo))
    bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _drop_errors(results: Path) -> set[str]:
    """Rewrite ``results`` without its error lines (atomically); returns their keys, to be done again."""
    from medvlm.io import atomic_open

    if not results.exists():
        return set()
    keep, dropped = [], set()
    for line in results.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("status") == "error":
            dropped.add(rec["key"])
        else:
            keep.append(line + "\n")
    with atomic_open(results, "w") as fh:
        fh.writelines(keep)
    return dropped
