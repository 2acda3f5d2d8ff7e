"""Batched generation against one prompt at a time, and SliME's decode step against a plain Llama's.

Builds (random weights, seed 0) a SliME with the demonstration model's vision geometry (336 px views, 576 global
and 144 local queries per view) and a language model of realistic shape for a CPU run (hidden 1024, 8 layers,
16 heads, intermediate 2816: about 104M parameters), then answers 8 (image, prompt) pairs of different sizes:

- one by one, and in batches of 2, 4 and 8: processor, vision (image path: encoder, adapters, router), prefill,
  decode seconds and tokens/s, at 16 and 64 new tokens. Both token counts come from the per-token timestamps of
  the same greedy run of 64 tokens (no early stop), so the 16-token figures are that run's first 16 tokens. Each
  batch size keeps its fastest of `--repeats` rounds (the rounds go over all sizes in turn).
- the decode step of SliME against `LlamaForCausalLM` holding the same language-model weights, fed the same
  assembled prompt, at batch 1 and 8: milliseconds per step and SliME's overhead.

Every batched row is checked against its single run (same greedy ids) before any figure is printed.

    python examples/benchmarks/benchmark_batching.py                  # the full sweep (CPU: about 12 minutes)
    python examples/benchmarks/benchmark_batching.py --tiny           # the demonstration model's shapes, seconds
    python examples/benchmarks/benchmark_batching.py --device cuda --dtype bfloat16 --batches 1 8 32 --pairs 32
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch
from PIL import Image
from transformers import LlamaForCausalLM, LogitsProcessorList

from benchmark_gpu import StepClock, sync
from slime_hf import SliMEForConditionalGeneration, SliMEProcessor
from slime_hf.demo import DEMO_IMAGE, demo_config, demo_processor


# (width, height) of the test images: 3 to 10 views each, so rows differ in length as in a real batch.
IMAGE_SIZES = [(672, 672), (1344, 336), (336, 1008), (900, 700), (1000, 1000), (400, 1300), (700, 500), (1200, 900)]
QUESTIONS = [
    "What is in the image?",
    "Describe the picture in detail, including the colours, the shapes and where each object sits.",
    "Is there any text?",
    "Count the objects you can see and say which one is the largest.",
    "What is unusual here?",
    "Write a short caption.",
    "Which colour dominates the upper half of the image, and which the lower half?",
    "Where was this taken?",
]


def build_model(tiny: bool, dtype: torch.dtype, device: str) -> tuple[SliMEForConditionalGeneration, SliMEProcessor]:
    processor = demo_processor()
    shape = {} if tiny else {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8}
    heads = {} if tiny else {"num_attention_heads": 16, "num_key_value_heads": 16}
    config = demo_config(processor, **shape, **heads)
    torch.manual_seed(0)
    model = SliMEForConditionalGeneration(config).to(device, dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.do_sample = False
    return model, processor


def make_pairs(count: int) -> list[tuple[Image.Image, str]]:
    image = Image.open(DEMO_IMAGE).convert("RGB")
    return [(image.resize(IMAGE_SIZES[i % len(IMAGE_SIZES)]), QUESTIONS[i % len(QUESTIONS)]) for i in range(count)]


@contextmanager
def timing_calls(module: torch.nn.Module, name: str, device: str, spent: list[float]):
    """Adds the seconds spent in `module.<name>` calls to `spent` while the context is open."""
    original = getattr(module, name)

    def timed(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        sync(device)
        spent.append(time.perf_counter() - start)
        return out

    setattr(module, name, timed)
    try:
        yield
    finally:
        delattr(module, name)  # back to the class attribute


def run_batch(model, processor, pairs, new_tokens: int, device: str, dtype: torch.dtype) -> dict:
    """One `generate` call over `pairs`: phase seconds, per-token timestamps, the new ids per row."""
    sync(device)
    start = time.perf_counter()
    prompts = [processor.apply_chat_template(conversation(q), add_generation_prompt=True) for _, q in pairs]
    inputs = processor(images=[image for image, _ in pairs], text=prompts, padding=True, return_tensors="pt")
    inputs = inputs.to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    processor_s = time.perf_counter() - start
    vision: list[float] = []
    clock = StepClock(device)
    with timing_calls(model.model, "get_image_features", device, vision):
        start = time.perf_counter()
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            logits_processor=LogitsProcessorList([clock]),
        )
    new_ids = out[:, inputs["input_ids"].shape[1] :]
    return {
        "processor_s": processor_s,
        "vision_s": sum(vision),
        "start": start,
        "times": clock.times,
        "new_ids": [row.tolist() for row in new_ids],
    }


def conversation(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def sweep(model, processor, pairs, batch_size: int, new_tokens: int, device: str, dtype: torch.dtype) -> dict:
    """All pairs in consecutive batches of `batch_size`: summed phase times and the rows' ids."""
    totals = {"processor_s": 0.0, "vision_s": 0.0, "prefill_s": 0.0, "first_s": 0.0, "decode_s": {}, "ids": []}
    for start in range(0, len(pairs), batch_size):
        result = run_batch(model, processor, pairs[start : start + batch_size], new_tokens, device, dtype)
        times = result["times"]
        totals["processor_s"] += result["processor_s"]
        totals["vision_s"] += result["vision_s"]
        totals["first_s"] += times[0] - result["start"]
        totals["prefill_s"] += times[0] - result["start"] - result["vision_s"]
        for tokens in (16, new_tokens):
            if tokens <= len(times):
                totals["decode_s"][tokens] = totals["decode_s"].get(tokens, 0.0) + times[tokens - 1] - times[0]
        totals["ids"].extend(result["new_ids"])
    return totals


def total_seconds(result: dict, tokens: int) -> float:
    return result["processor_s"] + result["first_s"] + result["decode_s"][tokens]


def decode_step_comparison(model, processor, pairs, batch_size: int, steps: int, device: str) -> dict:
    """Milliseconds per decode step: SliME against a `LlamaForCausalLM` with the same weights and prompt."""
    llama = LlamaForCausalLM(model.config.text_config).to(device, model.dtype).eval()
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    llama.load_state_dict(state)
    llama.generation_config.eos_token_id = None
    llama.generation_config.pad_token_id = model.generation_config.pad_token_id
    chosen = pairs[:batch_size]
    prompts = [processor.apply_chat_template(conversation(q), add_generation_prompt=True) for _, q in chosen]
    inputs = processor(images=[image for image, _ in chosen], text=prompts, padding=True, return_tensors="pt")
    inputs = inputs.to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        prepared = model.model.prepare_multimodal_inputs(
            inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_sizes"]
        )
    result = {}
    for name, call in (
        ("slime", lambda logits: model.generate(**inputs, **logits)),
        (
            "llama",
            lambda logits: llama.generate(
                inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask, **logits
            ),
        ),
    ):
        best = float("inf")
        for _ in range(3):
            clock = StepClock(device)
            call(
                {
                    "max_new_tokens": steps + 1,
                    "min_new_tokens": steps + 1,
                    "do_sample": False,
                    "logits_processor": LogitsProcessorList([clock]),
                }
            )
            best = min(best, (clock.times[-1] - clock.times[0]) / steps)
        result[name] = best * 1000
    return result


def print_profile(model, processor, pairs, new_tokens: int, device: str, dtype: torch.dtype, rows: int) -> None:
    """torch.profiler's top operators (self CPU time) for one generate call over all pairs at once."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as profiler:
        run_batch(model, processor, pairs, new_tokens, device, dtype)
    print(f"\ntorch.profiler, one batch of {len(pairs)}, {new_tokens} new tokens (top {rows} by self CPU time):")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--tiny", action="store_true", help="the demonstration model's tiny language model")
    parser.add_argument("--pairs", type=int, default=8, help="(image, prompt) pairs answered in every mode")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="batch sizes (1: one by one)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per answer (figures at 16 and this)")
    parser.add_argument("--decode-steps", type=int, default=32, help="steps timed in the decode-step comparison")
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds over all batch sizes; each keeps its fastest round (default 2)"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="ROWS", help="only profile one batch of all pairs: top ROWS operators"
    )
    args = parser.parse_args()
    if args.new_tokens < 16:
        parser.error("--new-tokens must be at least 16 (figures are printed at 16 and at --new-tokens)")
    dtype = getattr(torch, args.dtype)
    torch.set_grad_enabled(False)
    model, processor = build_model(args.tiny, dtype, args.device)
    pairs = make_pairs(args.pairs)
    run_batch(model, processor, pairs[:2], 2, args.device, dtype)  # warm-up
    if args.profile:
        print_profile(model, processor, pairs, args.new_tokens, args.device, dtype, args.profile)
        return

    results = {}
    for _ in range(args.repeats):  # rounds over all batch sizes, so a slow spell of the machine hits them alike
        for size in args.batches:
            result = sweep(model, processor, pairs, size, args.new_tokens, args.device, dtype)
            best = results.get(size)
            if best is None or total_seconds(result, args.new_tokens) < total_seconds(best, args.new_tokens):
                results[size] = result
    singles = results[min(args.batches)]["ids"]
    for size, result in results.items():
        for row, (ids, single) in enumerate(zip(result["ids"], singles)):
            if ids != single:
                raise SystemExit(f"batch of {size}: row {row} differs from its single run: {ids} vs {single}")

    parameters = sum(p.numel() for p in model.model.language_model.parameters()) / 1e6
    print(f"device {args.device}, {args.dtype}, language model {parameters:.1f}M parameters, {args.pairs} pairs")
    print("every batched row equals its single run (greedy ids)\n")
    base = results[min(args.batches)]
    header = "| batch | processor s | vision s | prefill s | new tokens | decode s | total s | tokens/s | vs 1 by 1 |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for tokens in sorted({16, args.new_tokens}):
        for size, result in results.items():
            total, base_total = total_seconds(result, tokens), total_seconds(base, tokens)
            print(
                f"| {size} | {result['processor_s']:.2f} | {result['vision_s']:.2f} | {result['prefill_s']:.2f} | "
                f"{tokens} | {result['decode_s'][tokens]:.2f} | {total:.2f} | {args.pairs * tokens / total:.1f} | "
                f"{base_total / total:.2f}x |"
            )

    print("\n| decode step | batch | SliME ms | LlamaForCausalLM ms | SliME overhead |")
    print("|---|---|---|---|---|")
    for size in sorted({1, min(8, args.pairs)}):
        steps = decode_step_comparison(model, processor, pairs, size, args.decode_steps, args.device)
        overhead = steps["slime"] / steps["llama"] - 1
        print(f"| same weights, same prompt | {size} | {steps['slime']:.2f} | {steps['llama']:.2f} | {overhead:+.1%} |")


if __name__ == "__main__":
    main()
