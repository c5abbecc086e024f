"""``medvlm eval SUITE``: argument handling for the suites of :mod:`eval` (which stay free of argparse and of each
other), the tables printed and the JSON written."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from eval.suites import format_table, oracle_box, text_seg
from medvlm.errors import input_error


def _emit(result: dict[str, Any], table: str, json_out: str | None) -> int:
    """Print a suite's table and write its JSON when asked."""
    from medvlm.outputs import write_json_atomic

    print(table)
    if json_out:
        write_json_atomic(result, Path(json_out))
        print(f"wrote {json_out}")
    return 0


def _is_volume_folder(data: str | None) -> bool:
    """True for a dataset folder whose reader yields whole 3D volumes (scored in 3D)."""
    if not data:
        return False
    from medvlm.datasets import open_dataset

    return hasattr(open_dataset(data), "volume_ids")


def run_eval(args: argparse.Namespace) -> int:
    from medvlm.outputs import write_json_atomic

    if args.suite == "oracle-box":
        payload, worst = oracle_box(args.data, segmenter_name=args.segmenter, checkpoint=args.checkpoint,
                                    limit=args.limit, ids_file=args.ids)
    elif args.suite == "text-seg" and getattr(args, "all_folders", False):
        from eval.textseg_all import format_all_tables, text_seg_all

        result = text_seg_all(checkpoint=args.checkpoint, split=args.split, limit=args.limit,
                              kind_gate=not args.no_kind_gate, postprocess=args.postprocess,
                              specialists=not args.no_specialists)
        return _emit(result, format_all_tables(result), args.json_out)
    elif args.suite == "text-seg" and _is_volume_folder(args.data):
        from eval.textseg_all import volume_suite
        from segmentation.textseg.predictor import MedVLMSegmenter

        segmenter = MedVLMSegmenter(args.checkpoint, text_level=args.level, specialists=not args.no_specialists)
        result = volume_suite(args.data, segmenter, split=args.split, limit=args.limit)
        return _emit(result, format_table(result), args.json_out)
    elif args.suite == "text-seg" and getattr(args, "ablation", None):
        from finetune.textseg_ablation import format_ablation, run_ablation
        from finetune.textseg_train import load_train_config

        result = run_ablation(args.ablation, load_train_config(args.config), args.ablation_steps, args.ablation_out)
        return _emit(result, format_ablation(result), args.json_out)
    elif args.suite == "grounding":
        from eval.grounding import format_grounding_table, grounding_suite
        from medvlm.app.agent_commands import build_agent

        args.check = "off"  # the suite scores the raw regions and applies the anatomy check itself
        result = grounding_suite(args.data, agent=build_agent(args), split=args.split, limit=args.limit,
                                 ids_file=args.ids, types=args.types, mirror=args.mirror)
        return _emit(result, format_grounding_table(result), args.json_out)
    elif args.suite == "mask-codec":
        from eval.codec import codec_suite, format_codec_table, format_model_codec_table, model_codec_suite

        if getattr(args, "grounder", None) == "mini":  # the model's generated tokens, not the round trip
            from agents.mini import MiniGrounder

            result = model_codec_suite(args.data, MiniGrounder(args.llm_model), split=args.split, limit=args.limit,
                                       ids_file=args.ids)
            return _emit(result, format_model_codec_table(result), args.json_out)
        result = codec_suite(args.data, budgets=args.budgets or (16, 32, 64), limit=args.limit)
        return _emit(result, format_codec_table(result), args.json_out)
    elif args.suite == "mini-probe":
        import json

        from finetune.mllm_train import format_probe_table, probe_adapters

        if not args.adapters and not args.curve:
            raise input_error("medvlm eval mini-probe", expected="--adapter DIR (repeatable) or --curve PROBE.jsonl",
                              received="neither", fix="e.g. --adapter agents/weights/mini")
        rows = [json.loads(line) for line in Path(args.curve).read_text().splitlines()] if args.curve else []
        rows += probe_adapters(args.adapters or [], n_images=args.images, swap_images=args.swap_images)
        return _emit({"suite": "mini-probe", "records": rows}, format_probe_table(rows), args.json_out)
    elif args.suite == "link-report":
        from eval.link_report import format_link_report_table, link_report_suite

        result = link_report_suite(args.data, split=args.split, limit=args.limit, ids_file=args.ids, seed=args.seed)
        return _emit(result, format_link_report_table(result), args.json_out)
    elif args.suite == "negation":
        from eval.negation import (
            format_negation_table,
            format_report_status_table,
            negation_suite,
            report_status_suite,
        )

        methods = args.methods or ("rules", "medspacy", "combined")
        result = negation_suite(args.data, methods=methods, limit=args.limit)
        table = format_negation_table(result)
        if args.reports:
            result = {**result, "reports": report_status_suite(args.reports, methods=methods, limit=args.limit)}
            table += "\n\n" + format_report_status_table(result["reports"])
        return _emit(result, table, args.json_out)
    elif args.suite == "refseg":
        from eval.refseg import format_refseg_table, refseg_suite

        result = refseg_suite(args.data, args.references, ks=tuple(args.ks or (1, 5)), seeds=tuple(range(args.seeds)),
                              limit=args.limit, compare=not args.no_compare)
        return _emit(result, format_refseg_table(result), args.json_out)
    elif args.suite == "weakloc":
        from agents.heatmap import HeatmapConfig
        from eval.weakloc import DEFAULT_DATASETS, format_weakloc_table, weakloc_suite

        result = weakloc_suite(args.datasets or DEFAULT_DATASETS, sources=args.sources or ("medvlm", "gradcam"),
                               split=args.split, limit=args.limit, checkpoint=args.checkpoint,
                               config=HeatmapConfig(box_fraction=args.box_fraction),
                               learned=args.learned)
        return _emit(result, format_weakloc_table(result), args.json_out)
    elif args.suite == "text-seg":
        payload, worst = text_seg(args.data, checkpoint=args.checkpoint, split=args.split, level=args.level,
                                  limit=args.limit, ids_file=args.ids, postprocess=args.postprocess,
                                  specialists=not args.no_specialists)
    else:
        raise input_error("medvlm eval",
                          expected="a known suite (oracle-box, text-seg, grounding, link-report, negation)",
                          received=repr(args.suite), fix="run `medvlm eval --help`")
    print(format_table(payload))
    if args.json_out:
        write_json_atomic(payload, Path(args.json_out))
        print(f"wrote {args.json_out}")
    if args.report:
        from eval.report import write_segmentation_report

        path = write_segmentation_report(payload, worst, args.report, data=args.data)
        print(f"wrote {path}")
    return 0
