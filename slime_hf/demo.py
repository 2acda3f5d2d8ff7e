"""`make demo` / `python -m slime_hf.demo`: SliME slices an image, routes its local tokens and answers.

Without `--model` it runs on an embedded UNTRAINED DEMONSTRATION MODEL: a tiny random SliME generated
deterministically from the tokenizer shipped in `slime_hf/assets/`, so the pipeline runs anywhere in seconds (its
answer is noise). With `--model` it runs a real release: a Hub id or a local folder, converted or in the authors'
layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path


ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_IMAGE = ASSETS / "demo_image.png"
DEMO_TOKENIZER = ASSETS / "demo_tokenizer"
DEMO_LABEL = "UNTRAINED DEMONSTRATION MODEL (random weights: the pipeline is real, the answer is noise)"
DEMO_SEED = 0
DTYPES = ("float32", "bfloat16", "float16")


def default_demo_dir() -> Path:
    """Where the demo model is generated (override with `SLIME_DEMO_DIR`)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("SLIME_DEMO_DIR", cache / "slime-hf" / "demo-model-v1"))


def demo_processor():
    """The demonstration model's processor: the shipped tokenizer and the PIL image processor."""
    from transformers import AutoTokenizer

    from .image_processing_slime import SliMEImageProcessorPil
    from .processing_slime import SliMEProcessor

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER))
    return SliMEProcessor(image_processor=SliMEImageProcessorPil(), tokenizer=tokenizer)


def demo_config(processor, **text_config):
    """The demonstration model's configuration for `processor` (see [`demo_processor`]): tiny CLIP with SliME's
    geometry and a tiny Llama, whose `text_config` entries the keyword arguments override (a bigger language model
    for a benchmark, another head size for an engine)."""
    from .checkpoints import separator_token_id
    from .configuration_slime import SliMEConfig

    tokenizer = processor.tokenizer
    return SliMEConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": tokenizer.vocab_size,  # the image token, added by the processor, is the first id after it
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **text_config,
        },
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 336,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
        },
        image_token_id=processor.image_token_id,
        separator_token_id=separator_token_id(processor),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_demo_model(output_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Generates the demonstration model (tiny CLIP + tiny Llama, SliME geometry: 336 px views, 576 global
    queries, 144 local queries) deterministically and saves model + processor to `output_dir`.

    Returns the folder, which `AutoModel.from_pretrained(folder, trust_remote_code=True)` and
    `SliMEProcessor.from_pretrained(folder)` load.
    """
    import torch

    from .modeling_slime import SliMEForConditionalGeneration

    folder = Path(output_dir) if output_dir is not None else default_demo_dir()
    if (folder / "config.json").is_file() and not force:
        return folder
    processor = demo_processor()
    tokenizer = processor.tokenizer
    config = demo_config(processor)
    torch.manual_seed(DEMO_SEED)
    model = SliMEForConditionalGeneration(config).eval()
    with torch.no_grad():  # a visible gate: mix the two global experts unevenly
        model.model.global_adapter.gate_weight.normal_(0.0, 0.04)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    model.config.demo_model_label = DEMO_LABEL
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def load(model_id: str | None, device: str = "cpu", dtype: str = "float32"):
    """Loads (model, processor, label) for the demo: the embedded demo model or a release."""
    import torch

    from .checkpoints import read_slime_config
    from .modeling_slime import SliMEForConditionalGeneration
    from .processing_slime import SliMEProcessor

    label = None
    if model_id is None:
        folder, label = build_demo_model(), DEMO_LABEL
    elif os.path.isdir(model_id) or os.path.isabs(model_id) or model_id.startswith((".", "~")):
        folder = Path(model_id)  # a local path, never a Hub id
    else:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_id))
    if model_id is not None:
        read_slime_config(folder)  # a missing folder, broken config.json or another model type, named by its path
    model = SliMEForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    processor = SliMEProcessor.from_pretrained(folder)
    return model, processor, label


def check_args(args: argparse.Namespace) -> None:
    """Rejects bad arguments before anything is loaded or printed."""
    import torch

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.router_top_p is not None and not 0.0 < args.router_top_p <= 1.0:
        raise ValueError(f"--router-top-p must be in (0, 1], got {args.router_top_p}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {args.device!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {args.device!r} requested but CUDA is not available")
    if not os.path.isfile(args.image):
        raise ValueError(f"image file not found: {args.image}")


class StageTimer:
    """Wall time of the vision tower and of the whole image path, measured inside one `generate` call."""

    def __init__(self, model):
        self.vision = 0.0
        self.image_path = 0.0
        inner = model.model
        encode, features = inner.encode_views, inner.get_image_features

        def timed_encode(*args, **kwargs):
            start = time.perf_counter()
            out = encode(*args, **kwargs)
            self.vision += time.perf_counter() - start
            return out

        def timed_features(*args, **kwargs):
            start = time.perf_counter()
            out = features(*args, **kwargs)
            self.image_path += time.perf_counter() - start
            return out

        inner.encode_views, inner.get_image_features = timed_encode, timed_features


def run(args: argparse.Namespace, out=sys.stdout) -> str:
    """Runs the demo and prints the slicing grid, the token budget, the time per stage and the streamed answer.
    Returns the answer."""
    import torch
    from PIL import Image
    from transformers import TextIteratorStreamer

    from .image_processing_slime import get_slice_grid

    check_args(args)
    torch.manual_seed(DEMO_SEED)
    model, processor, label = load(args.model, args.device, args.dtype)
    if label:
        print(f"*** {label} ***", file=out)
    image = Image.open(args.image)
    width, height = image.size
    rows, cols = get_slice_grid((height, width))
    print(f"image: {args.image} ({width}x{height})", file=out)
    print(f"slicing: 1 global view + {rows} x {cols} grid = {rows * cols} local crops of 336x336", file=out)

    if "<image>" in args.prompt:
        content = [{"type": "text", "text": args.prompt}]
    else:
        content = [{"type": "image"}, {"type": "text", "text": args.prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    start = time.perf_counter()
    inputs = processor(images=[image], text=text, return_tensors="pt").to(args.device)
    processor_time = time.perf_counter() - start

    timer = StageTimer(model)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate_kwargs = dict(
        **inputs,
        streamer=streamer,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        router_top_p=args.router_top_p,
        return_dict_in_generate=True,
    )
    errors, results = [], []

    def target():
        try:
            results.append(model.generate(**generate_kwargs))
        except Exception as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)
            streamer.end()

    start = time.perf_counter()
    thread = threading.Thread(target=target)
    thread.start()
    pieces, first_token_at = [], None
    print("answer: ", end="", file=out, flush=True)
    for piece in streamer:
        if first_token_at is None:
            first_token_at = time.perf_counter()
        pieces.append(piece)
        print(piece, end="", file=out, flush=True)
    thread.join()
    end = time.perf_counter()
    print(file=out)
    if errors:
        raise errors[0]
    first_token_at = first_token_at or end

    budget = results[0].image_token_budget[0]
    print(
        f"token budget: global {budget['global']} + separator {budget['separator']} + local kept "
        f"{budget['local_kept']} of {budget['local_total']} = {budget['total']} image tokens "
        f"(router_top_p={args.router_top_p if args.router_top_p is not None else model.config.router_top_p})",
        file=out,
    )
    new_tokens = len(processor.tokenizer("".join(pieces), add_special_tokens=False).input_ids)
    decode_time = end - first_token_at
    print("time per stage:", file=out)
    print(f"  processor          {processor_time * 1000:8.1f} ms", file=out)
    print(f"  vision tower       {timer.vision * 1000:8.1f} ms", file=out)
    print(f"  adapters + router  {(timer.image_path - timer.vision) * 1000:8.1f} ms", file=out)
    print(f"  prefill            {(first_token_at - start - timer.image_path) * 1000:8.1f} ms", file=out)
    print(f"  decode             {decode_time * 1000:8.1f} ms ({max(new_tokens - 1, 0)} tokens)", file=out)
    return "".join(pieces)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slime_hf.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a release: Hub id or local folder (default: demo model)")
    parser.add_argument("--image", default=str(DEMO_IMAGE), help="image file (default: the shipped demo image)")
    parser.add_argument("--prompt", default="What is shown in this image?", help="the question")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--router-top-p", type=float, default=None, help="router top-p (default: the config's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    from .command_line import run_reporting_errors

    hf_logging.disable_progress_bar()
    return run_reporting_errors(run, args)


if __name__ == "__main__":
    sys.exit(main())
