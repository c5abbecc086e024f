"""Inference precision and the OpenVINO image-encoder runtime (segmentation/runtime.py) and its use by the
segmenters: precision resolution, OpenVINO vs torch outputs, the IR disk cache, the dynamic batch dimension,
fallbacks without OpenVINO, and LiteMedSAM / Med-VLM masks at fp32 vs bf16.

Nothing here asserts that a path is faster: the tests hold on any x86 CPU, with or without bf16 units (without
them OpenVINO runs a bf16 request in f32, which the tolerances cover as well).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medvlm.errors import InputError
from segmentation import runtime
from segmentation.runtime import (
    clear_compiled_cache,
    compile_encoder,
    cpu_has_bf16,
    encoder_plan,
    openvino_cache_dir,
    requested_precision,
    resolve_precision,
    runtime_stats,
)

REPO = Path(__file__).resolve().parents[1]

needs_openvino = pytest.mark.skipif(not runtime.openvino_available(), reason="openvino is not installed")


@pytest.fixture(autouse=True)
def _no_precision_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDVLM_PRECISION", raising=False)


@pytest.fixture
def ov_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty IR cache ($MEDVLM_HOME/openvino) and an empty in-process LRU."""
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path))
    clear_compiled_cache()
    yield tmp_path
    clear_compiled_cache()


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Fake CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    return path


class TinyConv(nn.Module):
    """A small random conv net: (B, 3, 16, 16) -> (B, 8, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(),
                                 nn.Conv2d(16, 8, 3, stride=2, padding=1))
        self.net[1].running_mean.uniform_(-0.5, 0.5)
        self.net[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(x)


# ------------------------------------------------------------------------------------------------ precision


def test_requested_precision_argument_env_and_default(monkeypatch: pytest.MonkeyPatch):
    assert requested_precision(None) == "auto"
    assert requested_precision(" BF16 ") == "bf16"
    monkeypatch.setenv("MEDVLM_PRECISION", "fp32")
    assert requested_precision(None) == "fp32"
    assert resolve_precision(None) == "fp32"
    assert requested_precision("bf16") == "bf16"  # the argument wins over the environment
    monkeypatch.setenv("MEDVLM_PRECISION", "bf16")
    assert resolve_precision(None) == "bf16"
    monkeypatch.setenv("MEDVLM_PRECISION", "")
    assert requested_precision(None) == "auto"


def test_auto_follows_the_cpu_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    plain = _cpuinfo(tmp_path, "fpu sse sse2 avx avx2 fma avx512f")  # no bf16 units
    monkeypatch.setattr(runtime, "CPUINFO_PATH", str(plain))
    assert not cpu_has_bf16()
    assert resolve_precision("auto") == "fp32"
    assert resolve_precision("bf16") == "bf16"  # asked explicitly: kept (OpenVINO decides what runs)
    amx = tmp_path / "amx"
    amx.mkdir()
    monkeypatch.setattr(runtime, "CPUINFO_PATH", str(_cpuinfo(amx, "fpu avx512f amx_tile amx_bf16")))
    assert resolve_precision(None) == "bf16"
    avx = tmp_path / "avx"
    avx.mkdir()
    monkeypatch.setattr(runtime, "CPUINFO_PATH", str(_cpuinfo(avx, "fpu avx512f avx512_bf16")))
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(runtime, "CPUINFO_PATH", str(tmp_path / "missing"))
    assert resolve_precision("auto") == "fp32"  # unreadable (macOS, Windows): fp32


def test_invalid_precision_is_an_input_error(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(InputError) as err:
        resolve_precision("fp16")
    assert "auto, fp32, bf16" in err.value.expected and "'fp16'" in err.value.received and err.value.fix
    monkeypatch.setenv("MEDVLM_PRECISION", "half")
    with pytest.raises(InputError, match="MEDVLM_PRECISION"):
        encoder_plan(None)


def test_encoder_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(runtime, "CPUINFO_PATH", str(_cpuinfo(tmp_path, "fpu avx2")))
    assert encoder_plan("fp32").engine == "torch"
    assert encoder_plan("bf16", device="cuda:0").engine == "torch"
    monkeypatch.setattr(runtime, "openvino_available", lambda: True)
    auto = encoder_plan(None)
    assert (auto.precision, auto.engine) == ("fp32", "openvino")
    assert encoder_plan("bf16").engine == "openvino"
    monkeypatch.setattr(runtime, "openvino_available", lambda: False)
    assert (encoder_plan("auto").engine, encoder_plan("auto").precision) == ("torch", "fp32")
    assert encoder_plan("bf16").engine == "torch-autocast"


# ---------------------------------------------------------------------------------------------- compile


@needs_openvino
def test_openvino_fp32_matches_torch_and_batch_is_dynamic(ov_home: Path):
    module = TinyConv()
    x = torch.randn(5, 3, 16, 16)
    ref = _reference(module, x)
    enc = compile_encoder(module, x[:1], "fp32", key="tiny", max_batch=2)  # traced with batch 1
    assert enc.engine == "openvino" and enc.precision == "fp32" and enc.inference_precision == "f32"
    for b in (1, 2, 5):  # 5 goes through in chunks of 2, 2, 1
        out = enc(x[:b])
        assert out.dtype == torch.float32 and out.shape == (b, 8, 8, 8)
        torch.testing.assert_close(out, ref[:b], atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="shape"):
        enc(torch.zeros(1, 3, 32, 32))


@needs_openvino
def test_openvino_bf16_within_three_percent(ov_home: Path):
    module = TinyConv()
    x = torch.randn(3, 3, 16, 16)
    ref = _reference(module, x)
    enc = compile_encoder(module, x[:1], "bf16", key="tiny")
    assert enc.precision == "bf16" and enc.inference_precision in ("bf16", "f32")  # f32: no bf16 units
    out = enc(x)
    assert float((out - ref).norm() / ref.norm()) < 3e-2


@needs_openvino
def test_ir_cache_is_reused_instead_of_converting(ov_home: Path):
    module = TinyConv()
    x = torch.randn(1, 3, 16, 16)
    before = runtime_stats()
    first = compile_encoder(module, x, "fp32", key="tiny")
    assert first.converted and first.ir_path is not None and first.ir_path.is_file()
    assert first.ir_path.parent.parent == ov_home / "openvino"
    assert json.loads((first.ir_path.parent / "info.json").read_text())["key"] == "tiny"
    mtime = first.ir_path.stat().st_mtime_ns
    assert compile_encoder(module, x, "fp32", key="tiny") is first  # in-process LRU
    clear_compiled_cache()  # as a new process would: the IR is read from disk, not converted
    second = compile_encoder(module, x, "fp32", key="tiny")
    after = runtime_stats()
    assert not second.converted and second.ir_path == first.ir_path
    assert first.ir_path.stat().st_mtime_ns == mtime
    assert after["conversions"] - before["conversions"] == 1
    assert after["ir_loads"] - before["ir_loads"] == 1 and after["lru_hits"] - before["lru_hits"] == 1
    torch.testing.assert_close(second(x), first(x))
    # other weights, key or input size: another IR
    third = compile_encoder(module, torch.randn(1, 3, 24, 24), "fp32", key="tiny")
    assert third.ir_path != first.ir_path and third.converted


def test_without_openvino_auto_falls_back_to_torch_fp32(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture, ov_home: Path):
    monkeypatch.setattr(runtime, "openvino_available", lambda: False)
    module = TinyConv()
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level(logging.DEBUG, logger="segmentation.runtime"):
        enc = compile_encoder(module, x[:1], "auto")
    assert enc.engine == "torch" and enc.precision == "fp32"
    assert torch.equal(enc(x), _reference(module, x))
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    assert not (ov_home / "openvino").exists()


def test_without_openvino_bf16_warns_and_uses_autocast(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr(runtime, "openvino_available", lambda: False)
    module = TinyConv()
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="segmentation.runtime"):
        enc = compile_encoder(module, x[:1], "bf16")
    assert enc.engine == "torch" and enc.inference_precision == "bf16-autocast"
    assert any('pip install "openvino>=2026.4"' in r.getMessage() for r in caplog.records)
    ref = _reference(module, x)
    out = enc(x)
    assert out.dtype == torch.float32
    assert float((out - ref).norm() / ref.norm()) < 3e-2


# --------------------------------------------------------------------------------------------- segmenters


def _demo() -> tuple[object, list]:
    from medvlm.assets import DEMO_IMAGE, asset_path
    from medvlm.io import load_image
    from medvlm.types import Box
    from segmentation.base import Prompt

    spec = json.loads(asset_path("demo.json").read_text())
    boxes = [Prompt(box=Box(*r["box"])) for r in spec["regions"]][:3]
    assert len(boxes) == 3
    return load_image(asset_path(DEMO_IMAGE)), boxes


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


@pytest.mark.slow
@needs_openvino
def test_litemedsam_fp32_and_bf16_masks_agree():
    # the IR goes to the machine's cache ($MEDVLM_HOME/openvino or ~/.cache/medvlm/openvino): converted once
    from segmentation.base import as_rgb_uint8
    from segmentation.litemedsam import LiteMedSAMSegmenter

    image, prompts = _demo()
    fp32 = LiteMedSAMSegmenter(precision="fp32")
    bf16 = LiteMedSAMSegmenter(precision="bf16")
    assert bf16.plan.engine == "openvino"
    ref = fp32.segment(image, prompts)
    out = bf16.segment(image, prompts)
    assert bf16.encoder_info()["inference_precision"] in ("bf16", "f32")
    # where bf16 is native (avx512_bf16/AMX) the masks move at their boundary: Dice 0.964 / 0.966 / 0.987 on an AMD
    # EPYC with avx512_bf16; where OpenVINO keeps f32 they are identical
    dices = [_dice(r.mask.data, o.mask.data) for r, o in zip(ref, out)]
    assert all(r.mask.data.any() for r in ref)
    assert min(dices) >= 0.95 and float(np.mean(dices)) >= 0.965, dices
    # the dynamic batch dimension: three images in one call give what three encodes give
    rgb = as_rgb_uint8(image)
    embs = bf16.encode_batch([rgb, rgb[::2, ::2], rgb])
    single = bf16.encode(image)
    assert [e.original_size for e in embs] == [rgb.shape[:2], rgb[::2, ::2].shape[:2], rgb.shape[:2]]
    torch.testing.assert_close(embs[2].features, single.features, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_forced_fp32_uses_no_openvino():
    # in a fresh process, as `MEDVLM_PRECISION=fp32 medvlm segment ...` (the path of a machine without OpenVINO)
    code = (  # (not importing this test module: its skip mark imports openvino)
        "import sys, json\n"
        "from medvlm.assets import DEMO_IMAGE, asset_path\n"
        "from medvlm.io import load_image\n"
        "from medvlm.types import Box\n"
        "from segmentation.base import Prompt\n"
        "from segmentation.registry import build_segmenter\n"
        "from segmentation.runtime import runtime_stats\n"
        "spec = json.loads(asset_path('demo.json').read_text())\n"
        "prompts = [Prompt(box=Box(*r['box'])) for r in spec['regions']][:3]\n"
        "image = load_image(asset_path(DEMO_IMAGE))\n"
        "seg = build_segmenter('litemedsam')\n"
        "masks = seg.segment(image, prompts)\n"
        "print(json.dumps({'engine': seg.plan.engine, 'openvino': 'openvino' in sys.modules,\n"
        "                  'stats': runtime_stats(), 'found': all(m.mask.data.any() for m in masks)}))\n"
    )
    env = {**__import__("os").environ, "MEDVLM_PRECISION": "fp32", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["engine"] == "torch" and report["found"]
    assert report["openvino"] is False
    assert report["stats"]["conversions"] == report["stats"]["compiles"] == 0


def test_medvlm_text_cache_and_forward_match_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from segmentation.base import Prompt
    from segmentation.textseg.checkpoint import save_medvlm
    from segmentation.textseg.config import tiny_test_config
    from segmentation.textseg.model import build_medvlm
    from segmentation.textseg.predictor import MedVLMSegmenter

    torch.manual_seed(0)
    folder = save_medvlm(build_medvlm(tiny_test_config()), tmp_path / "ckpt")
    seg = MedVLMSegmenter(folder, precision="fp32", text_cache_size=2)
    image = (np.random.default_rng(0).random((40, 70)) * 255).astype(np.uint8)
    emb = seg.encode(image)
    model = seg.model
    texts = ["a round opacity", "the left lung apex", "heart"]
    with torch.inference_mode():
        ids, mask = model.text_encoder.tokenize(texts)
        ref = model.forward_with_existence(emb.features.expand(3, -1, -1, -1), ids, mask)
        f_text, text_mask = seg.text_features(texts)
        got = model.forward_text_features(emb.features, f_text, text_mask)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-4)
    assert (got[1] is None) == (ref[1] is None)

    calls = {"n": 0}
    encode_text = model.encode_text

    def counting(*args, **kwargs):
        calls["n"] += 1
        return encode_text(*args, **kwargs)

    monkeypatch.setattr(model, "encode_text", counting)
    seg.clear_text_cache()
    first = seg.predict_many(emb, [Prompt(text="a round opacity"), Prompt(text="the left lung apex")])
    again = seg.predict_many(emb, [Prompt(text="the left lung apex"), Prompt(text="a round opacity")])
    assert calls["n"] == 1  # the repeated phrases cost no text-encoder pass
    assert np.array_equal(first[0].mask.data, again[1].mask.data)
    np.testing.assert_allclose(first[1].logits, again[0].logits, atol=1e-5)
    seg.predict(emb, Prompt(text="heart"))  # a third text evicts the least recently used one (size 2)
    assert calls["n"] == 2 and len(seg._text_cache) == 2


@needs_openvino
def test_medvlm_encoder_through_openvino_matches_torch(ov_home: Path, tmp_path: Path):
    from segmentation.base import Prompt
    from segmentation.textseg.checkpoint import save_medvlm
    from segmentation.textseg.config import tiny_test_config
    from segmentation.textseg.model import build_medvlm
    from segmentation.textseg.predictor import MedVLMSegmenter

    torch.manual_seed(0)
    model = build_medvlm(tiny_test_config())
    with torch.no_grad():  # non-zero LoRA so that merging it matters
        for name, p in model.image_encoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    folder = save_medvlm(model, tmp_path / "ckpt")
    ref = MedVLMSegmenter(folder, precision="fp32")
    ov = MedVLMSegmenter(folder, precision="auto")
    assert ov.plan.engine == "openvino"
    images = [(np.random.default_rng(k).random((40, 70)) * 255).astype(np.uint8) for k in range(3)]
    a = ref.encode(images[0]).features
    b = ov.encode(images[0]).features
    if ov.precision == "fp32":
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)
    else:  # bf16 on a CPU with bf16 units
        assert float((b - a).norm() / a.norm()) < 3e-2
    batch = ov.encode_batch(images)
    assert len(batch) == 3 and batch[0].features.shape == a.shape
    prompt = Prompt(text="heart")
    assert ref.predict(ref.encode(images[1]), prompt).mask.data.shape == (40, 70)
    assert ov.predict(batch[1], prompt).mask.data.shape == (40, 70)
    # the text encoder (+ projection) through OpenVINO: padded batches and lengths other than the traced ones
    texts = ["a", "a round opacity in the right upper zone of the lung", "left clavicle"]
    with torch.inference_mode():
        ids, mask = ref.model.text_encoder.tokenize(texts)
        want = ref.model.encode_text(ids, mask)
        got = ov._encode_text(ids, mask)
        keep = mask.bool()
        if ov.precision == "fp32":
            torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=1e-3)
        else:
            assert float((got[keep] - want[keep]).norm() / want[keep].norm()) < 3e-2
        single = ov._encode_text(*ref.model.text_encoder.tokenize(texts[1:2]))
        torch.testing.assert_close(single[0], got[1], atol=1e-4, rtol=1e-3)
    assert ov.encoder_info()["text"]["engine"] == "openvino"


def test_registry_passes_precision(monkeypatch: pytest.MonkeyPatch):
    from segmentation import registry

    seen = {}
    preset = registry.SEGMENTERS["litemedsam"]
    monkeypatch.setitem(registry.SEGMENTERS, "litemedsam", registry.SegmenterPreset(
        preset.name, preset.description, preset.weights, lambda **kw: seen.update(kw) or "built",
        preset.weights_present, supports_precision=True))
    assert registry.build_segmenter("litemedsam", precision="bf16") == "built"
    assert seen == {"precision": "bf16"}
    with pytest.raises(InputError):
        registry.build_segmenter("sam2", precision="int4")


def test_cli_precision_option_sets_the_environment_for_the_command(monkeypatch: pytest.MonkeyPatch):
    from medvlm.app import cli

    parser = cli.build_parser()
    for argv in (["segment", "x.png", "--precision", "bf16"], ["eval", "oracle-box", "--precision", "fp32"],
                 ["bench", "segment", "--precision", "auto"], ["ask", "x.png", "q", "--precision", "fp32"],
                 ["heatmap", "x.png", "f", "--precision", "bf16"]):
        assert parser.parse_args(argv).precision == argv[-1]
    with pytest.raises(SystemExit):
        parser.parse_args(["segment", "x.png", "--precision", "fp16"])
    seen = {}

    def handler(args):
        seen["env"] = __import__("os").environ.get("MEDVLM_PRECISION")
        return 0

    fake = type(sys)("fake_precision_commands")
    fake.run_segment = handler
    monkeypatch.setitem(sys.modules, "fake_precision_commands", fake)
    monkeypatch.setitem(cli.COMMANDS, "segment", (*cli.COMMANDS["segment"][:2], "fake_precision_commands:run_segment"))
    assert cli.main(["segment", "x.png", "--precision", "fp32"]) == 0
    assert seen["env"] == "fp32"
    assert "MEDVLM_PRECISION" not in __import__("os").environ  # restored after the command


# ------------------------------------------------------------------------------------------------------ bench


class _FakePath:
    """A segmenter stand-in that records the order of its calls (bench_paths interleaves the paths)."""

    name = "fake"

    def __init__(self, tag: str, log: list, offset: int = 0) -> None:
        self.tag, self.log, self.offset = tag, log, offset
        self.cleared = 0

    def encode(self, image):
        self.log.append((self.tag, "encode"))
        return image

    def encode_batch(self, images):
        self.log.append((self.tag, f"batch{len(images)}"))
        return list(images)

    def predict(self, embedding, prompt):
        self.log.append((self.tag, "predict"))

    def clear_text_cache(self):
        self.cleared += 1

    def encoder_info(self):
        return {"requested": self.tag}

    def segment(self, image, prompts):
        from medvlm.types import Mask
        from segmentation.base import SegmentationResult

        mask = np.zeros((10, 10), dtype=bool)
        mask[2:6, 2 + self.offset:6 + self.offset] = True
        return [SegmentationResult(mask=Mask(mask), score=1.0, logits=None, prompt=p, meta={}) for p in prompts]


def test_bench_paths_interleaves_and_reports_each_path():
    from segmentation.base import Prompt
    from segmentation.bench import bench_paths, compare_paths

    log: list = []
    a, b = _FakePath("fp32", log), _FakePath("auto", log, offset=1)
    image = np.zeros((10, 10), dtype=np.uint8)
    rows = bench_paths([a, b], image, [Prompt(text="heart"), Prompt(text="lung")], repeats=2, batch_images=5)
    assert [r["encoder"]["requested"] for r in rows] == ["fp32", "auto"]
    encodes = [tag for tag, what in log if what == "encode"]
    assert encodes == ["fp32", "auto"] * 3  # warm-up, then the repeats alternate
    assert [what for tag, what in log if tag == "auto" and what.startswith("batch")] == ["batch3", "batch2"]
    for r in rows:
        assert r["images_per_s"] > 0 and r["peak_rss_mib"] > 0 and len(r["encode_samples"]) == 2
        assert r["decode_ms_p90"] >= r["decode_ms_p50"] >= 0 and r["cached_decode_ms_p50"] is not None
    assert a.cleared == b.cleared == 4

    truth = np.zeros((10, 10), dtype=bool)
    truth[2:6, 2:6] = True
    cases = iter([("x", image, [Prompt(text="heart")], [truth])] * 2)
    acc = compare_paths(a, b, cases)
    assert acc["n_images"] == 2 and acc["n_masks"] == 2 and acc["identical"] == 0
    assert acc["agreement_dice_mean"] == pytest.approx(0.75)  # 12 of 16 pixels shared
    assert acc["dice_gt_reference"] == 1.0 and acc["dice_gt_candidate"] == pytest.approx(0.75)
    assert acc["abs_dice_diff_max"] == pytest.approx(0.25)


@needs_openvino
def test_bundle_starts_without_torch_encoders_and_answers_the_same(ov_home: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    import shutil

    import segmentation.runtime as runtime

    # `auto` as on a CPU without bf16 units (OpenVINO f32) on every CPU: the bundle runs the heads from their IR too,
    # so with native bf16 its masks would differ from the torch heads' by bf16 rounding, not by a bundle bug
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda *_: False)
    from segmentation.base import Prompt
    from segmentation.textseg.bundle import LightImageEncoder, LightTextEncoder, bundle_dir
    from segmentation.textseg.checkpoint import save_medvlm
    from segmentation.textseg.config import tiny_test_config
    from segmentation.textseg.model import build_medvlm
    from segmentation.textseg.predictor import IMAGE_EXPORT_KEY, TEXT_EXPORT_KEY, MedVLMSegmenter

    torch.manual_seed(0)
    model = build_medvlm(tiny_test_config())
    with torch.no_grad():  # non-zero LoRA: the IRs must carry it merged
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    folder = save_medvlm(model, tmp_path / "ckpt")
    keys = (IMAGE_EXPORT_KEY, TEXT_EXPORT_KEY)
    image = (np.random.default_rng(3).random((40, 70)) * 255).astype(np.uint8)
    prompts = [Prompt(text="heart"), Prompt(text="a round opacity in the right upper zone"), Prompt(text="x")]

    full = MedVLMSegmenter(folder, precision="auto")
    assert not full.light and not bundle_dir(folder, keys).exists()
    want = full.predict_many(full.encode(image), prompts)  # compiles both encoders -> writes the bundle
    assert (bundle_dir(folder, keys) / "manifest.json").is_file()

    clear_compiled_cache()
    before = runtime_stats()["conversions"]
    light = MedVLMSegmenter(folder, precision="auto")
    assert light.light and isinstance(light.model.image_encoder, LightImageEncoder)
    assert isinstance(light.model.text_encoder, LightTextEncoder)
    got = light.predict_many(light.encode(image), prompts)
    assert runtime_stats()["conversions"] == before  # read from the IRs, nothing converted
    assert "torch" not in light.encoder_info()["engine"]
    for w, g in zip(want, got):
        # the heads IR reorders float sums: logits agree to ~1e-3 here, masks but for a boundary pixel
        np.testing.assert_allclose(g.logits, w.logits, atol=2e-2)
        assert np.mean(g.mask.data != w.mask.data) <= 0.002 and g.score == pytest.approx(w.score, abs=2e-3)
        assert isinstance(g.logits, np.ndarray) and g.meta["found"] == w.meta["found"]
    # the tokenizers-library tokenizer gives the transformers tokenizer's ids, truncation included
    texts = ["heart", "Left  lung, apex!", "the " * 400, "ünïcode ≥ 5 mm"]
    for a, b in zip(light.model.text_encoder.tokenize(texts), full.model.text_encoder.tokenize(texts)):
        assert np.array_equal(a, b.numpy())
    assert light.torch_model().image_encoder.stages  # Grad-CAM gets the full model

    # bench segment --text --profile: per-node times of the three IRs, by model part
    from segmentation.bench import profile_medvlm

    assert set(light.ir_paths()) == {"image", "text", "heads"} and "heads" not in full.ir_paths()
    table = profile_medvlm(light, image, ["heart", "x"])
    assert "image encoder (1 image)" in table and "text encoder (2 texts)" in table and "heads (2 texts)" in table
    assert "mixer.blocks.0" in table and "by op type:" in table
    with pytest.raises(ValueError, match="bundle"):
        profile_medvlm(full, image, ["heart"])

    # a new process that starts from the bundle never imports torch (1.4 s of a cold `medvlm ask`)
    code = ("import sys, json, numpy as np\n"
            "from segmentation.base import Prompt\n"
            "import segmentation.runtime as rt\n"
            "rt.cpu_has_bf16 = lambda *_: False\n"  # as above: OpenVINO f32 whatever the CPU
            "from segmentation.textseg.predictor import MedVLMSegmenter\n"
            f"seg = MedVLMSegmenter({str(folder)!r}, precision='auto')\n"
            "image = (np.random.default_rng(3).random((40, 70)) * 255).astype(np.uint8)\n"
            "r = seg.predict_many(seg.encode(image), [Prompt(text='heart')])[0]\n"
            "print(json.dumps({'light': seg.light, 'torch': 'torch' in sys.modules,\n"
            "                  'pixels': int(r.mask.data.sum())}))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"light": True, "torch": False, "pixels": int(got[0].mask.data.sum())}

    # another checkpoint in the same folder: another key, no stale bundle
    with torch.no_grad():
        next(model.decoder.parameters()).add_(0.5)
    save_medvlm(model, folder)
    assert not MedVLMSegmenter(folder, precision="auto").light
    # an IR deleted from the cache: the full model is built (and the bundle written again when it compiles)
    save_medvlm(build_medvlm(tiny_test_config()), tmp_path / "other")
    first = MedVLMSegmenter(tmp_path / "other", precision="auto")
    first.predict_many(first.encode(image), prompts[:1])
    manifest = json.loads((bundle_dir(tmp_path / "other", keys) / "manifest.json").read_text())
    shutil.rmtree(ov_home / "openvino" / manifest["image"]["ir"])
    clear_compiled_cache()
    assert not MedVLMSegmenter(tmp_path / "other", precision="auto").light
    assert not MedVLMSegmenter(folder, precision="fp32").light  # the torch reference never starts light


def test_openvino_cache_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$MEDVLM_OPENVINO_CACHE, then $MEDVLM_HOME/openvino, then ~/.cache/medvlm/openvino."""
    monkeypatch.delenv("MEDVLM_OPENVINO_CACHE", raising=False)
    monkeypatch.delenv("MEDVLM_HOME", raising=False)
    assert openvino_cache_dir() == Path.home() / ".cache" / "medvlm" / "openvino"
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path / "home"))
    assert openvino_cache_dir() == tmp_path / "home" / "openvino"
    monkeypatch.setenv("MEDVLM_OPENVINO_CACHE", str(tmp_path / "shared"))
    assert openvino_cache_dir() == tmp_path / "shared"
