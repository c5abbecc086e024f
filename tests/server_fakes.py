"""Light stand-ins for the server's models (no weights, milliseconds per call) and request helpers, shared by the
server tests that check the HTTP layer rather than the models (limits, errors, exports, jobs)."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from agents.grounders.base import GroundingResult
from agents.pipeline import Answer
from medvlm.coords import letterbox_frame
from medvlm.types import Box, Mask, Region
from segmentation.base import ImageEmbedding, Prompt, SegmentationResult, SegmenterBase


class BoxFillSegmenter(SegmenterBase):
    """'Segments' the inside of the box (or a 5 px square around each positive point); counts encodings."""

    name = "litemedsam"

    def __init__(self, encode_s: float = 0.0) -> None:
        self.encode_s = encode_s
        self.encodes = 0

    def encode(self, image: Any) -> ImageEmbedding:
        """A (1, 3, 16, 16) feature grid of the letterboxed image (intensity, x, y), shaped as LiteMedSAM's, so
        that reference-guided segmentation runs on it too."""
        import torch

        from medvlm.coords import letterbox_content_shape

        self.encodes += 1
        if self.encode_s:
            time.sleep(self.encode_s)
        h, w = image.shape
        ch, cw = letterbox_content_shape(h, w, 256)
        rows, cols = max(1, -(-ch // 16)), max(1, -(-cw // 16))
        pixels = np.asarray(image.pixels if hasattr(image, "pixels") else image, np.float32)
        small = pixels[np.linspace(0, h - 1, rows).astype(int)][:, np.linspace(0, w - 1, cols).astype(int)]
        grid = np.zeros((1, 3, 16, 16), np.float32)
        grid[0, 0, :rows, :cols] = small / (np.abs(small).max() + 1e-6)
        grid[0, 1, :rows, :cols], grid[0, 2, :rows, :cols] = np.mgrid[0:rows, 0:cols][::-1] / 16.0
        return ImageEmbedding(self.name, (h, w), torch.from_numpy(grid), letterbox_frame(h, w, 256),
                              extra={"input_size": 256, "content_shape": (ch, cw)})

    def _decode(self, embedding: ImageEmbedding, prompts: Sequence[Prompt],
                multimask: bool) -> list[SegmentationResult]:
        out = []
        for p in prompts:
            m = np.zeros(embedding.original_size, bool)
            if p.box is not None:
                b = p.box
                m[int(b.y0):int(np.ceil(b.y1)), int(b.x0):int(np.ceil(b.x1))] = True
            elif p.points is not None:
                for x, y in p.points.positive:
                    m[max(0, int(y) - 5):int(y) + 5, max(0, int(x) - 5):int(x) + 5] = True
            out.append(SegmentationResult(Mask(m), 0.9, None, p))
        return out


class TextFillSegmenter(BoxFillSegmenter):
    """A text-guided stand-in for Med-VLM: every text prompt 'finds' the centre quarter of the image."""

    name = "medvlm"
    accepts_text = True
    accepts_geometry = False

    def _decode(self, embedding: ImageEmbedding, prompts: Sequence[Prompt],
                multimask: bool) -> list[SegmentationResult]:
        h, w = embedding.original_size
        out = []
        for p in prompts:
            m = np.zeros((h, w), bool)
            m[h // 4: max(h // 4 + 1, 3 * h // 4), w // 4: max(w // 4 + 1, 3 * w // 4)] = True
            out.append(SegmentationResult(Mask(m), 0.7, None, p, {"structure": str(p.text).strip().lower()}))
        return out


class FakeAgent:
    """A grounding agent that answers every phrase with the centre quarter of the image."""

    name = "fake"

    def __init__(self) -> None:
        self.grounder = self

    def _region(self, image: Any, phrase: str) -> Region:
        h, w = image.shape
        m = np.zeros((h, w), bool)
        m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
        return Region(box=Box(w // 4, h // 4, 3 * w // 4, 3 * h // 4), label=phrase, mask=Mask(m), score=0.8,
                      provenance={"grounder": "fake"})

    def ground_phrases(self, image: Any, phrases: Sequence[str]) -> list[tuple[GroundingResult, list[Region]]]:
        out = []
        for p in phrases:
            r = self._region(image, p)
            out.append((GroundingResult(phrase=p, regions=[r]), [r]))
        return out

    def ask(self, image: Any, question: str) -> Answer:
        r = self._region(image, question)
        return Answer(question=question, phrase=question, text=f"{question} is in the centre.", regions=[r],
                      grounder="fake")


def fake_services(encode_s: float = 0.0, **kwargs: Any) -> Any:
    from medvlm.app.server.services import Services

    return Services(loaders={"litemedsam": lambda: BoxFillSegmenter(encode_s), "medvlm": TextFillSegmenter,
                             "grounding_agent": FakeAgent}, **kwargs)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def dicom_bytes(pixels: np.ndarray, *, patient_name: str = "Doe^Jane", patient_id: str = "SECRET-123",
                modality: str = "CR", **attrs: Any) -> bytes:
    """A single-frame MONOCHROME2 16-bit DICOM (CR by default) holding ``pixels`` (H, W), with patient tags."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1" if modality == "CR" else "1.2.840.10008.5.1.4.1.1.2"
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20200101", "120000", "1", "ACC1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@contextlib.contextmanager
def uvicorn_server(app: Any, timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` with a real uvicorn server on 127.0.0.1 (ephemeral port) in a thread; yields its base URL."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
