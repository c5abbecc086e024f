"""``medvlm ask``, ``medvlm link-report``, ``medvlm batch`` and ``medvlm bench ask``: thin CLI handlers over
:mod:`agents.pipeline`, :mod:`agents.report` and :mod:`agents.batch`."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medvlm.errors import input_error

__all__ = ["build_agent", "run_ask", "run_batch_cli", "run_bench_ask", "run_link_report", "run_serve_llm"]


def build_agent(args: argparse.Namespace) -> Any:
    """A :class:`~agents.pipeline.GroundingAgent` from the shared options (--grounder, --llm-url, --llm-model,
    --checkpoint, --refine, --check)."""
    from agents.pipeline import GroundingAgent

    grounder = getattr(args, "grounder", "medvlm")
    url, model = getattr(args, "llm_url", None), getattr(args, "llm_model", None)
    options: dict[str, Any] = {}
    if grounder == "openai":
        if not url or not model:
            raise input_error("--grounder openai", expected="--llm-url URL and --llm-model NAME",
                              received=f"--llm-url {url!r}, --llm-model {model!r}",
                              fix="e.g. --llm-url http://127.0.0.1:8000/v1 --llm-model my-grounding-model")
        options = {"base_url": url, "model": model, "answer": getattr(args, "llm_answer", "json")}
    elif grounder == "transformers":
        if not model:
            raise input_error("--grounder transformers", expected="--llm-model PATH (a local HF model folder or id)",
                              received="no --llm-model", fix="pass the model path with --llm-model")
        options = {"model": model, "answer": getattr(args, "llm_answer", "json")}
    elif grounder == "mini" and url:  # the shipped medvlm-mini served by `medvlm serve-llm --model mini`
        grounder, options = "openai", {"base_url": url, "model": model or "mini", "answer": "tokens"}
    elif grounder == "mini":  # in process; --llm-model may name another adapter (a run's checkpoint)
        options = {"adapter": model} if model else {}
    llm = None
    # a model fine-tuned to answer location tokens is no chat model: phrases then come from the rule path
    if url and model and getattr(args, "llm_answer", "json") == "json" and getattr(args, "grounder", "") != "mini":
        from agents.llm import OpenAIChatClient

        llm = OpenAIChatClient(url, model)
    return GroundingAgent(grounder, grounder_options=options, refine=getattr(args, "refine", "auto"),
                          check=getattr(args, "check", "repair"), llm=llm,
                          medvlm_checkpoint=getattr(args, "checkpoint", None))


def _load(args: argparse.Namespace) -> Any:
    from medvlm.io import load_image

    return load_image(args.image, slice_index=getattr(args, "slice_index", None))


def _print_regions(regions: list[Any]) -> None:
    for k, r in enumerate(regions, start=1):
        box = " ".join(f"{v:.0f}" for v in r.box.to_list())
        score = f"{r.score:.3f}" if r.score is not None else "-"
        action = r.checks.get("action", "-")
        print(f"  {k:>2} {r.label:<34} box {box:<20} score {score:>6}  check: {action}")


def run_ask(args: argparse.Namespace) -> int:
    from medvlm.outputs import write_regions

    image = _load(args)
    agent = build_agent(args)
    if agent.llm is not None and not args.no_chat:
        from agents.chat import chat_answer

        answer = chat_answer(agent, image, args.question)
    else:
        answer = agent.ask(image, args.question)
    print(answer.text)
    _print_regions(answer.regions)
    if args.out:
        stem = Path(args.image).name.split(".")[0]
        written = write_regions(args.out, stem, image, answer.regions, extra=answer.to_json(),
                                title=f"{answer.phrase}")
        print(f"wrote {written.json_path} and {written.overlay_path}")
    return 0


def links_to_regions(links: list[Any]) -> tuple[list[Any], list[int], list[dict[str, Any]]]:
    """Report links -> (all regions in order, the sentence number of each, one JSON entry per sentence)."""
    regions: list[Any] = []
    numbers: list[int] = []
    sentences: list[dict[str, Any]] = []
    for link in links:
        ids = []
        for r in link.regions:
            regions.append(r)
            numbers.append(link.number)
            ids.append(len(regions))
        sentences.append(link.to_json(region_ids=ids))
    return regions, numbers, sentences


def print_links(links: list[Any], say: Callable[[str], None] = print) -> None:
    """One line per sentence (+ grounded, - negated, ? not groundable), then its regions or the reason; each line
    goes to ``say`` (default ``print``)."""
    marks = {"grounded": "+", "negated": "-", "not_groundable": "?"}
    for link in links:
        where = "; ".join(f"{r.label} [{' '.join(f'{v:.0f}' for v in r.box.to_list())}]" for r in link.regions)
        say(f"{link.number:>2} {marks[link.status]} {link.status:<15} {link.text}")
        if where or link.note:
            say(f"     {where or link.note}")


def run_link_report(args: argparse.Namespace) -> int:
    from agents.report import link_report
    from medvlm.outputs import write_regions

    report_path = Path(args.report)
    if not report_path.is_file():
        raise input_error("REPORT", expected="a text file with the report", received=f"{report_path} (not a file)",
                          fix="save the report as a .txt file and pass its path")
    image = _load(args)
    agent = build_agent(args)
    links = link_report(agent, image, report_path.read_text(encoding="utf-8", errors="replace"),
                        threshold=args.threshold, method=getattr(args, "nlp", None))
    print_links(links)
    regions, numbers, sentences = links_to_regions(links)
    if args.out:
        stem = Path(args.image).name.split(".")[0]
        written = write_regions(args.out, stem, image, regions, numbers=numbers,
                                extra={"report": str(report_path), "sentences": sentences,
                                       "threshold": args.threshold, "grounder": agent.grounder.name},
                                title="numbers = report sentences")
        print(f"wrote {written.json_path} and {written.overlay_path}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``medvlm demo [--out DIR]``: the main job on the embedded default, offline. The grounding agent (Med-VLM
    text-guided masks, anatomy-checked) answers two chat questions on the bundled chest X-ray and links a
    two-sentence report to it, then finds the liver on the bundled CT slice. Writes ``DIR/<stem>.ask.*``
    (both answers' regions on one overlay), ``DIR/<stem>.report.*`` and ``DIR/<ct stem>.*``."""
    import json

    from agents.pipeline import GroundingAgent
    from agents.report import link_report
    from medvlm.assets import asset_path
    from medvlm.io import load_image
    from medvlm.outputs import write_regions

    spec = json.loads(asset_path("demo.json").read_text())
    out = Path(args.out)
    agent = GroundingAgent("medvlm")
    image = load_image(asset_path(spec["image"]))
    stem = Path(spec["image"]).stem
    print(f"medvlm demo: {spec['description']}")
    print(f"image: {spec['image']} ({image.width}x{image.height}); grounder: medvlm (Med-VLM, bundled weights)\n")
    regions: list[Any] = []
    answers = []
    for question in spec["questions"]:
        answer = agent.ask(image, question)
        answers.append(answer.to_json())
        print(f"Q: {question}\nA: {answer.text}")
        _print_regions(answer.regions)
        print()
        regions += answer.regions
    written = write_regions(out / "ask", stem, image, regions, extra={"answers": answers,
                                                                     "attribution": spec["attribution"]},
                            title="medvlm ask: " + " | ".join(spec["questions"]))
    print(f"overlay: {written.overlay_path}\n")
    print(f"report: {spec['report']}")
    links = link_report(agent, image, spec["report"])
    print_links(links)
    regions, numbers, sentences = links_to_regions(links)
    written = write_regions(out / "report", stem, image, regions, numbers=numbers,
                            extra={"report": spec["report"], "sentences": sentences},
                            title="medvlm link-report: numbers = report sentences")
    print(f"overlay: {written.overlay_path}\n")
    ct = spec.get("ct")
    if ct and asset_path(ct["image"]).is_file():
        ct_image = load_image(asset_path(ct["image"]), modality=ct["modality"])
        answer = agent.ask(ct_image, ct["question"])
        print(f"CT slice {ct['image']}\nQ: {ct['question']}\nA: {answer.text}")
        _print_regions(answer.regions)
        written = write_regions(out / "ct", Path(ct["image"]).stem, ct_image, answer.regions,
                                extra={"answer": answer.to_json(), "attribution": ct["attribution"]},
                                title=f"medvlm ask: {ct['question']}")
        print(f"overlay: {written.overlay_path}")
    return 0


#: the options of build_agent (the grounding options of a command)
AGENT_OPTIONS = ("grounder", "llm_url", "llm_model", "llm_answer", "checkpoint", "refine", "check")


class AgentFactory:
    """A picklable ``build_agent`` call for worker processes: the grounding options and the precision of the
    command (``$MEDVLM_PRECISION``, set in the worker before the agent is built)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.options = {k: getattr(args, k) for k in AGENT_OPTIONS if hasattr(args, k)}
        self.precision = os.environ.get("MEDVLM_PRECISION")

    def __call__(self) -> Any:
        if self.precision:
            os.environ["MEDVLM_PRECISION"] = self.precision
        return build_agent(argparse.Namespace(**self.options))


def run_batch_cli(args: argparse.Namespace) -> int:
    from agents.batch import batch_inputs, run_batch_items

    items = batch_inputs(args.input, args.phrase or [])
    if getattr(args, "engine", "local") == "ray":
        from agents.batch_ray import run_batch_ray

        summary = run_batch_ray(AgentFactory(args), items, args.out, address=args.address,
                                num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker,
                                gpus_per_worker=args.gpus_per_worker, retry_errors=args.retry_errors,
                                progress=not args.no_progress)
    else:
        summary = run_batch_items(build_agent(args), items, args.out, retry_errors=args.retry_errors,
                                  progress=not args.no_progress)
    print("medvlm batch: " + "\n  ".join(summary.lines()))
    print(f"results: {Path(args.out) / 'results.jsonl'}")
    return 0 if summary.errors == 0 else 1


#: questions of ``bench ask`` (cycled): anatomy, zones and findings with and without location words
BENCH_QUESTIONS = (
    "where is the right apical pneumothorax?",
    "where is the heart?",
    "show me the left lung",
    "Is there a nodule in the left upper lobe?",
    "where is the left costophrenic angle?",
    "find the right clavicle",
)


def _agent_at(precision: str | None) -> Any:
    """The embedded-default agent with its Med-VLM at ``precision`` (None: the command's, i.e. the chosen one)."""
    old = os.environ.get("MEDVLM_PRECISION")
    if precision is not None:
        os.environ["MEDVLM_PRECISION"] = precision  # read when the segmenter is built (its plan)
    try:
        return build_agent(argparse.Namespace(grounder="medvlm", refine="auto", check="repair"))
    finally:
        if old is None:
            os.environ.pop("MEDVLM_PRECISION", None)
        else:
            os.environ["MEDVLM_PRECISION"] = old


def _cold_ask(image_path: Any, question: str, precision: str | None) -> float:
    env = dict(os.environ)
    if precision is not None:
        env["MEDVLM_PRECISION"] = precision
    cmd = [sys.executable, "-m", "medvlm.app.cli", "ask", str(image_path), question]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"cold `medvlm ask` failed ({done.returncode}): {done.stderr[-500:]}")
    return seconds


def run_bench_ask(args: argparse.Namespace) -> int:
    """Per-question latency of ``medvlm ask`` with the embedded default, torch fp32 beside the chosen precision
    (``--precision`` / auto) in the same run: warm (one process, questions interleaved between the two agents,
    model load timed apart) and cold (new ``medvlm ask`` processes end to end)."""
    from medvlm.assets import DEMO_IMAGE, asset_path
    from medvlm.io import load_image
    from medvlm.outputs import write_json_atomic

    image_path = args.image or asset_path(DEMO_IMAGE)
    paths: dict[str, Any] = {}
    load_s: dict[str, float] = {}
    for name, precision in (("fp32", "fp32"), ("chosen", None)):
        t0 = time.perf_counter()
        paths[name] = _agent_at(precision)
        load_s[name] = time.perf_counter() - t0
    notes = {name: _precision_note(agent) for name, agent in paths.items()}
    rows: list[dict[str, Any]] = []
    for k in range(args.questions):
        question = BENCH_QUESTIONS[k % len(BENCH_QUESTIONS)]
        row: dict[str, Any] = {"question": question}
        for name, agent in paths.items():
            # a fresh image object per question: nothing cached from the previous one, as for a new request
            t1 = time.perf_counter()
            answer = agent.ask(load_image(image_path), question)
            row[name] = time.perf_counter() - t1
            row[f"{name}_regions"] = len(answer.regions)
        rows.append(row)
        print(f"measured: {question}", file=sys.stderr)
    # cold: new processes, after the warm run compiled the encoders and saved their bundle (as on any machine
    # after its first question)
    cold: dict[str, list[float]] = {"fp32": [], "chosen": []}
    for k in range(args.cold):
        for name, precision in (("fp32", "fp32"), ("chosen", None)):
            cold[name].append(_cold_ask(image_path, BENCH_QUESTIONS[1], precision))
        print(f"measured: cold processes {k + 1}/{args.cold}", file=sys.stderr)
    med = {name: statistics.median(float(r[name]) for r in rows) for name in paths}
    print(f"medvlm bench ask: {Path(image_path).name}, grounder medvlm (embedded default), {len(rows)} questions; "
          f"fp32 = {notes['fp32']}, chosen = {notes['chosen']}")
    print(f"{'question':<44} {'fp32 s':>8} {'chosen s':>9} {'ratio':>6} {'regions':>8}")
    for r in rows:
        print(f"{r['question']:<44} {r['fp32']:>8.3f} {r['chosen']:>9.3f} {r['fp32'] / r['chosen']:>6.2f} "
              f"{r['chosen_regions']:>8}")
    print(f"{'warm median (in process)':<44} {med['fp32']:>8.3f} {med['chosen']:>9.3f} "
          f"{med['fp32'] / med['chosen']:>6.2f}")
    print(f"{'model load (once per process)':<44} {load_s['fp32']:>8.3f} {load_s['chosen']:>9.3f}")
    if args.cold:
        cf, cc = statistics.median(cold["fp32"]), statistics.median(cold["chosen"])
        print(f"{'cold median (new process, end to end)':<44} {cf:>8.3f} {cc:>9.3f} {cf / cc:>6.2f}")
        print(f"cold = `medvlm ask IMAGE \"{BENCH_QUESTIONS[1]}\"` in a new process, {args.cold} runs per path")
    if args.json_out:
        write_json_atomic({"suite": "bench-ask", "paths": notes, "load_s": load_s, "rows": rows,
                           "warm_median_s": med, "cold_s": cold,
                           "cold_median_s": {n: statistics.median(v) for n, v in cold.items() if v}},
                          Path(args.json_out))
    return 0


def run_bench_batch(args: argparse.Namespace) -> int:
    """``medvlm bench batch``: items/s of the local engine and of Ray with each worker count, on the same inputs;
    the outputs must agree (masks identical; lines identical but for scores within 1e-5, which depend on the
    torch thread count)."""
    import shutil

    from agents.batch import list_inputs, run_batch
    from agents.batch_ray import RayBatch, import_ray
    from medvlm.datasets import default_data_root as data_root
    from medvlm.outputs import write_json_atomic

    ray = import_ray()
    phrases = args.phrase or ["heart", "left lung"]
    if args.input:
        inputs = list_inputs(args.input)
    else:
        inputs = sorted((data_root() / "cxr_jsrt_scr" / "images").glob("*.png"))[: args.images]
        if not inputs:
            raise input_error("--input", expected="images (default: JSRT of ../shared/data)",
                              received=f"none under {data_root()}", fix="pass --input FOLDER")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    rows: list[dict[str, Any]] = []
    factory = AgentFactory(argparse.Namespace(grounder="medvlm", refine="auto", check="repair"))
    t0 = time.perf_counter()
    agent = factory()
    load = time.perf_counter() - t0
    summary = run_batch(agent, inputs, phrases, work / "local", progress=False)
    rows.append({"engine": "local (this process)", "workers": 1, "items": summary.done_now,
                 "total_s": load + summary.seconds, "run_s": summary.seconds})
    del agent
    cpus = os.cpu_count() or 1
    for n in args.workers:
        t0 = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
        try:
            batch = RayBatch(factory, num_workers=n, cpus_per_worker=max(1, cpus // n))
            summary = batch.run(inputs, phrases, work / f"ray{n}", progress=False)
        finally:
            ray.shutdown()
        total = time.perf_counter() - t0
        rows.append({"engine": f"ray, {n} worker(s) x {max(1, cpus // n)} CPU", "workers": n,
                     "items": summary.done_now, "total_s": total, "run_s": summary.seconds})
    reference = _batch_output(work / "local")
    for row, name in zip(rows[1:], [f"ray{n}" for n in args.workers]):
        lines, masks = _batch_output(work / name)
        row["same_output"] = masks == reference[1] and lines.keys() == reference[0].keys() and all(
            _same_record(lines[k], reference[0][k]) for k in lines)
    print(f"medvlm bench batch: {len(inputs)} images x {len(phrases)} phrases = {len(inputs) * len(phrases)} items, "
          f"{cpus} CPUs, grounder medvlm (embedded default)")
    print(f"{'engine':<28} {'items':>6} {'items/s (all)':>14} {'items/s (run)':>14} {'same output':>12}")
    for row in rows:
        same = row.get("same_output")
        verdict = "-" if same is None else ("yes" if same else "NO")
        print(f"{row['engine']:<28} {row['items']:>6} {row['items'] / row['total_s']:>14.2f} "
              f"{row['items'] / max(row['run_s'], 1e-9):>14.2f} {verdict:>12}")
    print("all = with the start (Ray, every worker loading the agent); run = images streaming through warm workers "
          "(local: after the agent load)")
    if args.json_out:
        write_json_atomic({"suite": "bench-batch", "rows": rows}, Path(args.json_out))
    return 0 if all(r.get("same_output", True) for r in rows) else 1


def _batch_output(out: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    import json

    lines = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        lines[rec["key"]] = rec
    masks = {p.name: p.read_bytes() for p in sorted((out / "masks").iterdir())}
    return lines, masks


def _same_record(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal records, scores within 1e-5 (they depend on the torch thread count)."""
    strip = [{k: v for k, v in r.items() if k != "score"} for r in a["regions"]]
    if strip != [{k: v for k, v in r.items() if k != "score"} for r in b["regions"]]:
        return False
    if {k: v for k, v in a.items() if k != "regions"} != {k: v for k, v in b.items() if k != "regions"}:
        return False
    return all(abs(float(x["score"]) - float(y["score"])) <= 1e-5 for x, y in zip(a["regions"], b["regions"]))


def _precision_note(agent: Any) -> str:
    """How the agent's Med-VLM runs: engine, precision, and whether it started from its bundle."""
    segmenter = getattr(agent.grounder, "segmenter", None)
    plan = getattr(segmenter, "plan", None)
    if plan is None:
        return "?"
    return f"{plan.engine} {plan.precision}" + (" (bundle)" if getattr(segmenter, "light", False) else "")


def run_serve_llm(args: argparse.Namespace) -> int:
    """``medvlm serve-llm``: start vLLM, say where it listens, keep it until Ctrl-C or SIGTERM, then stop it."""
    import signal

    from agents.vllm_server import VLLMServer, parse_lora

    extra = list(args.vllm_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    from agents.mini import resolve_model

    mini = args.model == "mini"  # the shipped medvlm-mini, merged into its base on first use
    server = VLLMServer(resolve_model(args.model), loras=parse_lora(args.lora), host=args.host, port=args.port,
                        served_name=args.served_name or ("mini" if mini else None),
                        max_model_len=args.max_model_len, extra_args=extra, log_path=args.log)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        server.start(timeout_s=args.timeout)
        names = [server.served_name, *server.loras]
        print(f"serving {', '.join(names)} at {server.base_url} (pid {server.process.pid if server.process else '?'}); "
              "Ctrl-C stops it", flush=True)
        if mini:
            print(f"ground with: medvlm ask IMAGE \"where is the heart?\" --grounder mini --llm-url {server.base_url}",
                  flush=True)
        else:
            print(f"ground with: medvlm ask IMAGE \"where is the heart?\" --grounder openai --llm-url "
                  f"{server.base_url} --llm-model {names[-1]}{' --llm-answer tokens' if server.loras else ''}",
                  flush=True)
        code = server.process.wait() if server.process else 0
        return 1 if code else 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def run_refseg(args: argparse.Namespace) -> int:
    """``medvlm refseg``: the reference's structure in every target (mask, box, overlay, JSON per target)."""
    from agents.refseg import (
        add_reference,
        as_region,
        laterality_check,
        llm_reference_box,
        reference_mask_from_file,
        transfer_region,
    )
    from medvlm.io import load_image
    from medvlm.outputs import write_regions
    from medvlm.types import Box, Mask
    from segmentation.base import Prompt
    from segmentation.refseg import ReferenceSegmenter, RefSegConfig
    from segmentation.registry import build_segmenter

    mini = getattr(args, "grounder", "medvlm") == "mini"
    if mini and args.llm_url and not args.llm_model:
        args.llm_model = "mini"  # the name `medvlm serve-llm --model mini` serves it under
    if bool(args.llm_url) != bool(args.llm_model) and not mini:
        raise input_error("refseg MLLM path", expected="both --llm-url and --llm-model, or neither",
                          received=f"--llm-url {args.llm_url!r}, --llm-model {args.llm_model!r}",
                          fix="pass both to use a fine-tuned MLLM, none for the embedded method")
    name = args.label.strip() or "structure"
    reference = load_image(args.reference)
    sam = build_segmenter("litemedsam")
    # the label-transfer segmenter also turns a reference box into the reference mask, on the one encoding it keeps
    rs = ReferenceSegmenter(sam, RefSegConfig(mask_source=args.mask_source))
    ref_mask = add_reference(rs, reference, name, box=Box(*args.reference_box) if args.reference_box else None,
                             mask=reference_mask_from_file(args.reference_mask, reference.shape)
                             if args.reference_mask else None)
    ref_box = Mask(ref_mask).to_box()
    assert ref_box is not None  # add_reference refuses empty masks
    client: Any = None
    if args.llm_url:
        from agents.llm import OpenAIChatClient

        client = OpenAIChatClient(args.llm_url, args.llm_model)
    elif mini:
        from agents.mini import MiniChatClient

        client = MiniChatClient(args.llm_model)  # --llm-model names another adapter folder here
    for path in args.target:
        target = load_image(path)
        if client is not None:
            found_box, prov = llm_reference_box(client, reference, ref_box, target, name)
            mask = sam.segment(target, [Prompt(box=found_box)])[0].mask if found_box is not None else None
            region = as_region(name, mask, found_box, None, {**prov, "refined_by": sam.name})
            if region is not None:
                region.checks.update(laterality_check(name, ref_mask, region))
        else:
            region = transfer_region(rs, target, name, ref_mask)
        stem = Path(path).name.split(".")[0]
        regions = [] if region is None else [region]
        written = write_regions(args.out, stem, target, regions,
                                extra={"model": "refseg", "reference": str(args.reference), "structure": name})
        found = (f"box {' '.join(f'{v:.0f}' for v in region.box.to_list())}" if region is not None
                 else "not found")
        check = region.checks.get("laterality", "") if region is not None else ""
        print(f"{Path(path).name}: {name} {found} {check}".rstrip() + f" -> {written.json_path}")
    return 0


def run_heatmap(args: argparse.Namespace) -> int:
    import numpy as np

    from agents.heatmap import DEFAULT_MEDVLM_CAM_LAYER, HeatmapConfig, check_options, heatmap_overlay, localize
    """``medvlm heatmap IMAGE FINDING [--gate anatomy|none] [--source medvlm|gradcam] [--out DIR]``: writes
    ``DIR/<stem>.heatmap.overlay.png``, ``DIR/<stem>.heatmap.png`` (the final map, 8-bit, scaled to its maximum)
    and ``DIR/<stem>.heatmap.json``; prints the box, peak and gate."""
    from medvlm.io import load_image, save_png
    from medvlm.outputs import write_json_atomic
    from segmentation.textseg.predictor import MedVLMSegmenter

    check_options(args.finding, args.gate, args.source)
    config = HeatmapConfig(box_fraction=args.box_fraction, cam_layer=args.layer or DEFAULT_MEDVLM_CAM_LAYER)
    image = load_image(args.image, slice_index=getattr(args, "slice_index", None))
    segmenter = MedVLMSegmenter(args.checkpoint)
    result = localize(segmenter, image, args.finding, source=args.source, gate=args.gate, config=config)
    box = "none" if result.box is None else " ".join(f"{v:.0f}" for v in result.box.to_list())
    print(f"{result.phrase}: finding {result.finding or '-'} | source {result.source} | gate {result.gate_used}"
          + (f" ({', '.join(result.regions)})" if result.gate_used == "anatomy" else ""))
    if result.gate_reason and args.gate != "none":
        print(f"  not gated: {result.gate_reason}")
    print(f"  box {box} | peak {result.peak[0]:.0f} {result.peak[1]:.0f} (value {result.peak_value:.3f})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).name.split(".")[0]
    overlay_path, map_path, json_path = (out / f"{stem}.heatmap.overlay.png", out / f"{stem}.heatmap.png",
                                         out / f"{stem}.heatmap.json")
    save_png(heatmap_overlay(image, result), overlay_path)
    top = float(result.final.max())
    scaled = result.final / top if top > 0 else result.final
    save_png(np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8), map_path)
    payload = {"image": str(image.source), "size": [image.height, image.width], **result.to_json(),
               "box_fraction": config.box_fraction, "checkpoint": segmenter.checkpoint,
               "cam": {"layer": config.cam_layer, "method": config.cam_method} if args.source == "gradcam" else None,
               "overlay": overlay_path.name, "heatmap": map_path.name}
    write_json_atomic(payload, json_path)
    print(f"wrote {json_path}, {overlay_path} and {map_path}")
    return 0
