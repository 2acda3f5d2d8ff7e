"""Training-step speed and memory of SliME at Vicuna-7B + CLIP-L/14-336 shapes (random weights, bf16) on one GPU.

Prints one table: a full step of the vision adapters (stage-3 modules, language model frozen) and a LoRA step (the
authors' LoRA recipe: r 128, alpha 256 on every linear layer of the language model, adapters trained fully), each
with gradient checkpointing off and on: seconds per optimizer step, samples/s and peak memory, for a batch of
1344x672 images with a prompt and an answer. Trained weights are float32 (as `slime_hf.train` keeps them), the rest
bf16; the router keeps the release's top-p 0.95.

    python examples/benchmarks/benchmark_training_gpu.py                   # GPU, full size
    python examples/benchmarks/benchmark_training_gpu.py --tiny --device cpu --batch 2 --steps 1   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import time
from types import SimpleNamespace

import torch
from PIL import Image

from benchmark_gpu import benchmark_parser, build_model, sync
from slime_hf import SliMEImageProcessorPil
from slime_hf.demo import DEMO_IMAGE
from slime_hf.training import apply_stage_config
from slime_hf.training.build import wrap_with_lora
from slime_hf.training.stages import freeze_for_stage


def make_batch(model, batch: int, text_length: int, device: str, dtype: torch.dtype) -> dict:
    pixels = SliMEImageProcessorPil()([Image.open(DEMO_IMAGE).convert("RGB")] * batch)
    input_ids = torch.randint(3, 900, (batch, text_length), device=device)
    input_ids[:, 5] = model.config.image_token_id
    labels = input_ids.clone()
    labels[:, : text_length // 4] = -100  # the prompt; the rest is the answer
    labels[:, 5] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "use_cache": False,
        "pixel_values": pixels["pixel_values"].to(device, dtype),
        "image_sizes": pixels["image_sizes"].to(device),
    }


def train_in_float32(model) -> None:
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


def time_steps(model, batch: dict, steps: int, checkpointing: bool, device: str) -> dict:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
        if checkpointing:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.activation_checkpointing_disable()
    elif checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def step() -> torch.Tensor:
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out = step()  # warm-up (allocates the optimizer state)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    length = int(out.attention_mask.sum(1).max())
    optimizer = out = None  # frees the optimizer state (`step` holds it too) before the next configuration
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "trainable_m": sum(p.numel() for p in trainable) / 1e6,
        "step_s": seconds,
        "samples_s": batch["input_ids"].shape[0] / seconds,
        "peak_gib": peak,
        "length": length,
    }


def run(args: argparse.Namespace) -> list[dict]:
    device, dtype = args.device, getattr(torch, args.dtype)
    model = build_model(args.tiny, dtype, device)
    apply_stage_config(model, "3")
    batch = make_batch(model, args.batch, args.text_length, device, dtype)
    rows = []
    freeze_for_stage(model, "3", train_language_model=False)
    train_in_float32(model)
    for checkpointing in (False, True):
        rows.append(
            {
                "mode": "adapters (LLM frozen)",
                "checkpointing": checkpointing,
                **time_steps(model, batch, args.steps, checkpointing, device),
            }
        )
    lora_args = SimpleNamespace(
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.05,
        lora_target_module_names=None,
        stage="3",
        seed=0,
    )
    model = wrap_with_lora(model, lora_args)
    for checkpointing in (False, True):
        rows.append(
            {
                "mode": f"LoRA r {args.lora_r} + adapters",
                "checkpointing": checkpointing,
                **time_steps(model, batch, args.steps, checkpointing, device),
            }
        )
    return rows


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="samples per step, one 1344x672 image each")
    parser.add_argument("--text-length", type=int, default=256, help="text tokens per sample (a quarter is prompt)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps after one warm-up step")
    parser.add_argument("--lora-r", type=int, default=128)
    args = parser.parse_args()
    rows = run(args)
    print(
        f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}, "
        f"dtype {args.dtype} (trained weights float32), {'tiny' if args.tiny else 'Vicuna-7B + CLIP-L/14-336'} "
        f"shapes, batch {args.batch} x (1344x672 image + {args.text_length} text tokens)"
    )
    print("| training | gradient checkpointing | assembled length | trainable M | s / step | samples/s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {'on' if r['checkpointing'] else 'off'} | {r['length']} | {r['trainable_m']:.1f} | "
            f"{r['step_s']:.3f} | {r['samples_s']:.2f} | {r['peak_gib']:.2f} |"
        )


if __name__ == "__main__":
    main()
