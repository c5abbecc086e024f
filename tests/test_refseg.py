"""Reference-guided segmentation: label transfer on a synthetic feature grid (exact geometry through the letterbox
frame of a non-square image), input errors, the real LiteMedSAM path on JSRT, the CLI (embedded and MLLM paths)
and the eval suite."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eval.metrics import dice
from medvlm.coords import letterbox_content_shape, letterbox_frame
from medvlm.errors import InputError
from medvlm.io import MedicalImage
from medvlm.types import Box, Mask
from segmentation.base import ImageEmbedding, Prompt, SegmentationResult, SegmenterBase
from segmentation.refseg import ReferenceSegmenter, RefSegConfig
from tests.conftest import data_dir

torch = pytest.importorskip("torch")


class GridSegmenter(SegmenterBase):
    """A stand-in promptable segmenter: features are [brightness, darkness] per cell of a 64x64 grid over a 256
    letterbox (as LiteMedSAM's); a box prompt decodes to the bright pixels inside the box."""

    name = "grid"

    def encode(self, image: Any) -> ImageEmbedding:
        import cv2

        pixels = np.asarray(image.pixels, np.float32)
        height, width = pixels.shape
        ch, cw = letterbox_content_shape(height, width, 256)
        small = cv2.resize(pixels, (-(-cw // 4), -(-ch // 4)), interpolation=cv2.INTER_AREA)
        grid = np.zeros((2, 64, 64), np.float32)
        grid[0, : small.shape[0], : small.shape[1]] = small + 0.05
        grid[1, : small.shape[0], : small.shape[1]] = 1.05 - small
        return ImageEmbedding(self.name, (height, width), torch.from_numpy(grid)[None],
                              letterbox_frame(height, width, 256),
                              {"input_size": 256, "content_shape": (ch, cw), "pixels": pixels})

    def _decode(self, embedding: ImageEmbedding, prompts: Sequence[Prompt],
                multimask: bool) -> list[SegmentationResult]:
        out = []
        for p in prompts:
            assert p.box is not None
            mask = np.zeros(embedding.original_size, bool)
            x0, y0, x1, y1 = (round(v) for v in p.box.to_list())
            mask[y0:y1, x0:x1] = embedding.extra["pixels"][y0:y1, x0:x1] > 0.5
            out.append(SegmentationResult(mask=Mask(mask), score=1.0, logits=None, prompt=p))
        return out


def square(height: int, width: int, box: Box) -> MedicalImage:
    pixels = np.zeros((height, width), np.float32)
    pixels[int(box.y0):int(box.y1), int(box.x0):int(box.x1)] = 1.0
    return MedicalImage(pixels=pixels)


def test_label_transfer_follows_the_structure_through_the_letterbox() -> None:
    ref_box, tgt_box = Box(100, 60, 220, 150), Box(130, 80, 250, 170)  # 400 wide x 200 high: letterbox pads rows
    reference, target = square(200, 400, ref_box), square(200, 400, tgt_box)
    truth = target.pixels > 0.5
    for source in ("vote", "segmenter"):
        rs = ReferenceSegmenter(GridSegmenter(), RefSegConfig(mask_source=source, position_weight=0.5))
        rs.add_reference(reference, {"blob": reference.pixels > 0.5})
        result = rs.segment(target)["blob"]
        assert result.mask is not None and dice(result.mask.data, truth) > 0.9, source
        assert result.box is not None and result.box.iou(tgt_box) > 0.85
        assert result.vote.shape == (64, 64) and result.vote[40:, :].max() == 0  # padding rows never vote
        assert result.meta["mask_source"] == source and result.meta["references"] == 1
    # a box-only reference is turned into its mask first, by the same segmenter
    rs = ReferenceSegmenter(GridSegmenter())
    used = rs.add_reference(reference, boxes={"blob": Box(90, 50, 230, 160)})
    assert dice(used["blob"], reference.pixels > 0.5) == 1.0


def test_positions_keep_mirror_structures_apart() -> None:
    # two squares that look alike; the reference marks the left one. On the target the right one is the larger,
    # so only the position term (not features, not "largest component") can pick the left one
    ref = np.zeros((256, 256), np.float32)
    ref[80:160, 20:100] = ref[80:160, 156:236] = 1.0
    tgt = np.zeros((256, 256), np.float32)
    tgt[84:164, 24:104] = tgt[70:170, 146:246] = 1.0
    left_ref, left_tgt = np.zeros((256, 256), bool), np.zeros((256, 256), bool)
    left_ref[80:160, 20:100] = True
    left_tgt[84:164, 24:104] = True
    rs = ReferenceSegmenter(GridSegmenter())
    rs.add_reference(MedicalImage(pixels=ref), {"left": left_ref})
    result = rs.segment(MedicalImage(pixels=tgt))["left"]
    assert result.mask is not None and dice(result.mask.data, left_tgt) > 0.9
    assert result.box is not None and result.box.x1 < 128


def test_bad_references_and_requests_are_input_errors() -> None:
    image = square(100, 100, Box(10, 10, 50, 50))
    rs = ReferenceSegmenter(GridSegmenter())
    with pytest.raises(InputError, match="reference first"):
        rs.segment(image)
    with pytest.raises(InputError, match="at least one mask or box"):
        rs.add_reference(image)
    with pytest.raises(InputError, match="size 100x100"):
        rs.add_reference(image, {"a": np.ones((50, 50), bool)})
    with pytest.raises(InputError, match="non-empty"):
        rs.add_reference(image, {"a": np.zeros((100, 100), bool)})
    rs.add_reference(image, {"a": image.pixels > 0.5})
    with pytest.raises(InputError, match="names among"):
        rs.segment(image, ["b"])
    with pytest.raises(InputError, match="mask_source"):
        RefSegConfig(mask_source="sam").validate()
    with pytest.raises(InputError):
        RefSegConfig(knn=0).validate()


@pytest.fixture(scope="module")
def jsrt() -> Any:
    from medvlm.datasets import open_dataset

    return open_dataset(data_dir("cxr_jsrt_scr"))


@pytest.mark.data
def test_one_reference_segments_lungs_and_heart_on_jsrt(jsrt: Any) -> None:
    reference, target = jsrt.load("JPCLN002"), jsrt.load("JPCNN001")
    rs = ReferenceSegmenter()
    rs.add_reference(reference.image, {k: reference.masks[k] for k in ("heart", "left lung", "right lung")})
    results = rs.segment(target.image)
    scores = {k: dice(r.mask.data, target.masks[k]) for k, r in results.items() if r.mask is not None}
    assert scores["left lung"] > 0.9 and scores["right lung"] > 0.9 and scores["heart"] > 0.6, scores
    # the patient's left lung is on the image right, as on the reference
    left = results["left lung"].box
    assert left is not None and (left.x0 + left.x1) / 2 > target.image.width / 2


@pytest.mark.data
def test_refseg_cli_embedded_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medvlm.app.cli import main

    root = data_dir("cxr_jsrt_scr")
    code = main(["refseg", "--reference", str(root / "images/JPCLN002.png"), "--reference-box", "560", "80", "960",
                 "900", "--label", "left lung", "--target", str(root / "images/JPCNN001.png"), "--out",
                 str(tmp_path)])
    assert code == 0
    payload = json.loads((tmp_path / "JPCNN001.json").read_text())
    [region] = payload["regions"]
    assert region["label"] == "left lung" and region["checks"]["laterality"] == "same side as the reference"
    assert (tmp_path / region["mask"]).is_file() and (tmp_path / "JPCNN001.overlay.png").is_file()
    assert "JPCNN001.png: left lung box" in capsys.readouterr().out


@pytest.mark.data
def test_refseg_cli_mllm_path_sends_both_images_and_the_reference_box(tmp_path: Path) -> None:
    from agents.grounders.openai import TOKEN_ANSWER_REGEX
    from medvlm.app.cli import main
    from medvlm.tokens import decode_box, encode_box
    from tests.fake_http import serve_json

    root = data_dir("cxr_jsrt_scr")
    answer = "heart: " + encode_box(Box(380, 420, 720, 760), 1024, 1024)
    bodies: list[Any] = []

    def respond(path: str, headers: dict[str, str], body: Any) -> tuple[int, bytes]:
        bodies.append(body)
        return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()

    with serve_json(respond) as url:
        code = main(["refseg", "--reference", str(root / "images/JPCLN002.png"), "--reference-mask",
                     str(root / "masks/heart/JPCLN002.png"), "--label", "heart", "--target",
                     str(root / "images/JPCNN001.png"), "--llm-url", url, "--llm-model", "tuned", "--out",
                     str(tmp_path)])
    assert code == 0
    [body] = bodies
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert parts[2]["text"].startswith("The first image is a reference in which the heart is at <box><loc")
    assert body["structured_outputs"] == {"regex": TOKEN_ANSWER_REGEX} and body["model"] == "tuned"
    [region] = json.loads((tmp_path / "JPCNN001.json").read_text())["regions"]
    expected = decode_box(answer, 1024, 1024)
    assert expected is not None and Box(*region["box"]).iou(expected) > 0.99
    assert region["provenance"]["method"] == "mllm reference pair"


@pytest.mark.data
def test_eval_refseg_runs_and_scores(tmp_path: Path) -> None:
    from eval.refseg import format_refseg_table, refseg_suite

    payload = refseg_suite(data_dir("cxr_jsrt_scr"), ks=(1,), seeds=(0,), limit=1, compare=False,
                           structures=("left lung", "right lung"))
    assert set(payload["methods"]) == {"refseg k=1 (vote)", "refseg k=1 (segmenter)"}
    vote = payload["methods"]["refseg k=1 (vote)"]
    assert set(vote["per_structure"]) == {"left lung", "right lung"} and 0.8 < vote["mean"]["dice"] <= 1.0
    assert payload["n_images"] == 1 and "refseg k=1 (vote)" in format_refseg_table(payload)
    with pytest.raises(InputError, match="--k"):
        refseg_suite(data_dir("cxr_jsrt_scr"), ks=(10_000,), limit=1, compare=False)
