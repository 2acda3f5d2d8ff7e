"""Inference speed of SliME at Vicuna-7B + CLIP-L/14-336 shapes (random weights, bf16) on one GPU.

Prints one table: processor, vision encode, image path (adapters + router), prefill, first-token latency and
decode tokens/s (both from per-token timestamps inside one `generate` call), and peak memory for a 1344x672 image,
at batch 1, 8 and 32, with the dynamic cache and with the static cache + `torch.compile`. The reference row is the
authors' code measured on an H100 (encode 28 ms, prefill 73 ms, decode 43 tokens/s at batch 1).

    python examples/benchmarks/benchmark_gpu.py                # GPU, full size
    python examples/benchmarks/benchmark_gpu.py --tiny --device cpu --new-tokens 8   # smoke run anywhere
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from slime_hf import SliMEConfig, SliMEForConditionalGeneration, SliMEImageProcessor, SliMEImageProcessorPil
from slime_hf.demo import DEMO_IMAGE


REFERENCE = {"encode_ms": 28.0, "prefill_ms": 73.0, "decode_tok_s": 43.0}


def build_model(tiny: bool, dtype: torch.dtype, device: str) -> SliMEForConditionalGeneration:
    if tiny:
        config = SliMEConfig(
            text_config={
                "model_type": "llama",
                "vocab_size": 1000,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
            },
            vision_config={
                "model_type": "clip_vision_model",
                "hidden_size": 128,
                "intermediate_size": 256,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 336,
                "patch_size": 14,
            },
            image_token_id=1000,
            separator_token_id=10,
        )
    else:  # Vicuna-7B (Llama-2 7B shapes) + CLIP-L/14-336, the release geometry
        config = SliMEConfig(
            text_config={
                "model_type": "llama",
                "vocab_size": 32000,
                "hidden_size": 4096,
                "intermediate_size": 11008,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "max_position_embeddings": 4096,
            },
            image_token_id=32000,
            separator_token_id=1919,
        )
    torch.manual_seed(0)
    with torch.device(device):
        model = SliMEForConditionalGeneration(config)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 3) -> tuple[float, object]:
    fn()  # warm-up
    sync(device)
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


class StepClock(LogitsProcessor):
    """Timestamps each decoding step of one `generate` call: `generate` calls it once per new token, right after the
    forward that produced the token's logits. First token and decode rate then come from the same run."""

    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def timed_generate(model, inputs: dict, device: str, repeats: int = 2, **kwargs) -> tuple[float, float]:
    """Seconds to the first token and seconds per later token, both from the timestamps of the same `generate` call
    (best of `repeats` calls after a warm-up); the step time is NaN when only one token is generated."""
    firsts, steps = [], []
    for attempt in range(repeats + 1):
        clock = StepClock(device)
        sync(device)
        start = time.perf_counter()
        model.generate(**inputs, logits_processor=LogitsProcessorList([clock]), **kwargs)
        if attempt == 0:
            continue  # warm-up
        firsts.append(clock.times[0] - start)
        if len(clock.times) > 1:
            steps.append((clock.times[-1] - clock.times[0]) / (len(clock.times) - 1))
    return min(firsts), min(steps, default=float("nan"))


def run(args: argparse.Namespace) -> list[dict]:
    device, dtype = args.device, getattr(torch, args.dtype)
    model = build_model(args.tiny, dtype, device)
    image = Image.open(DEMO_IMAGE).convert("RGB")
    pil, fast = SliMEImageProcessorPil(), SliMEImageProcessor()
    processor_ms = {
        "pil": timed(lambda: pil([image]), "cpu")[0] * 1000,
        "torch": timed(lambda: fast([image]), "cpu")[0] * 1000,
    }
    prompt_length = 40
    rows = []
    for batch in args.batches:
        pixels = pil([image] * batch)
        pixel_values = pixels["pixel_values"].to(device, dtype)
        image_sizes = pixels["image_sizes"].to(device)
        input_ids = torch.randint(3, 900, (batch, prompt_length), device=device)
        input_ids[:, 5] = model.config.image_token_id
        inputs = dict(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes)
        inner = model.model
        with torch.no_grad():
            encode_s, _ = timed(lambda: inner.encode_views(pixel_values.flatten(0, 1)[: 7 * batch]), device)
            features_s, features = timed(lambda: inner.get_image_features(pixel_values, image_sizes, input_ids), device)
            assembled = inner.assemble_inputs(input_ids, None, features.image_features)
            embeds, mask, positions = assembled.inputs_embeds, assembled.attention_mask, assembled.position_ids
            prefill_s, _ = timed(
                lambda: model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1),
                device,
            )
        for mode in args.modes:
            kwargs = dict(do_sample=False, min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens)
            if mode == "static+compile":
                kwargs["cache_implementation"] = "static"
                model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            first_s, step_s = timed_generate(model, inputs, device, **kwargs)
            if mode == "static+compile":
                model.forward = type(model).forward.__get__(model)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
            decode_tok_s = batch / step_s if step_s > 0 else float("nan")  # nan: a single new token, no decode step
            rows.append(
                {
                    "batch": batch,
                    "mode": mode,
                    "processor_pil_ms": processor_ms["pil"],
                    "processor_torch_ms": processor_ms["torch"],
                    "encode_ms": encode_s * 1000,
                    "image_path_ms": features_s * 1000,
                    "prefill_ms": prefill_s * 1000,
                    "first_token_ms": first_s * 1000,
                    "decode_tok_s": decode_tok_s,
                    "peak_gib": peak,
                }
            )
    return rows


def benchmark_parser(description: str) -> argparse.ArgumentParser:
    """The options every GPU benchmark takes: device, dtype and tiny shapes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run on any machine)")
    return parser


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--modes", nargs="+", default=["dynamic", "static+compile"], choices=("dynamic", "static+compile")
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    rows = run(args)
    print(
        f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}, "
        f"dtype {args.dtype}, {'tiny' if args.tiny else 'Vicuna-7B + CLIP-L/14-336'} shapes, image 1344x672"
    )
    print(
        "| batch | cache | processor PIL / torch ms | encode ms | image path ms | prefill ms | first token ms | "
        "decode tok/s | peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['mode']} | {r['processor_pil_ms']:.1f} / {r['processor_torch_ms']:.1f} | "
            f"{r['encode_ms']:.1f} | {r['image_path_ms']:.1f} | {r['prefill_ms']:.1f} | {r['first_token_ms']:.1f} | "
            f"{r['decode_tok_s']:.1f} | {r['peak_gib']:.2f} |"
        )
    print(
        f"| 1 | original (H100, reference) | - | {REFERENCE['encode_ms']:.0f} | - | "
        f"{REFERENCE['prefill_ms']:.0f} | - | {REFERENCE['decode_tok_s']:.0f} | - |"
    )


if __name__ == "__main__":
    main()
