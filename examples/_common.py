"""Command-line plumbing shared by the example scripts: arguments, input checks, loading, prompts, streaming, errors.

Heavy imports (torch, transformers, slime_hf) happen inside the functions that need them, so that bad command-line
input is reported in a fraction of a second.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO


ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("slime_hf") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

IMAGE_TOKEN = "<image>"
DTYPES = ("float32", "bfloat16", "float16")  # the choices of `python -m slime_hf.demo --dtype`
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def demo_image() -> Path:
    """The image shipped with the package (found without importing it)."""
    spec = importlib.util.find_spec("slime_hf")
    return Path(list(spec.submodule_search_locations)[0]) / "assets" / "demo_image.png"


def add_model_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 32) -> None:
    """The options every example shares: which model, where and in which dtype it runs, and how it generates."""
    parser.add_argument(
        "--model",
        default=None,
        help="Hub id or local folder, converted or in the authors' layout (default: the untrained "
        "demonstration model, generated on first use)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument(
        "--router-top-p",
        type=float,
        default=None,
        help="router top-p in (0, 1] for the local tokens (default: the model config's)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)


def check_image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The given image files, or a `ValueError` naming the first one that does not exist."""
    files = [Path(path) for path in paths]
    for path in files:
        if not path.is_file():
            raise ValueError(f"image file not found: {path}")
    return files


def check_placeholders(prompt: str, num_images: int) -> None:
    """A prompt may hold `<image>` placeholders only if they match the images it goes with."""
    count = prompt.count(IMAGE_TOKEN)
    if count and count != num_images:
        raise ValueError(f"the prompt has {count} {IMAGE_TOKEN} placeholder(s) but {num_images} image(s) go with it")


def check_router_top_p(value: float | None) -> None:
    """The router keeps a top-p share of the local tokens: the value must be a probability above 0."""
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"--router-top-p must be in (0, 1], got {value}")


def user_content(prompt: str, images: Sequence[Any] = (None,)) -> list[dict]:
    """Content items of a user message: one image item per image (before the text) unless the prompt places
    them itself with `<image>`. An image item carries its image when given (what `pipeline` and
    `apply_chat_template(..., tokenize=True)` read); otherwise the images go to the processor separately."""
    text = [{"type": "text", "text": prompt}]
    if IMAGE_TOKEN in prompt:
        return text
    items = [{"type": "image"} if image is None else {"type": "image", "image": image} for image in images]
    return items + text


def check_device(device: str) -> None:
    """A clear error for a device this machine does not have, before anything is loaded onto it."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}: {error}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")


def model_folder(model_id: str | None) -> str:
    """What `from_pretrained` / `pipeline` should load: the given Hub id or folder, or the demo model's folder."""
    if model_id is not None:
        return model_id
    from slime_hf.demo import build_demo_model

    return str(build_demo_model())


def load_model(args: argparse.Namespace, err: TextIO = sys.stderr):
    """Loads (model, processor) from `--model` in `--dtype` on `--device`; says so when it is the demo model."""
    from slime_hf.demo import load

    check_device(args.device)
    model, processor, label = load(args.model, args.device, args.dtype)
    label = label or getattr(model.config, "demo_model_label", None)  # also a saved copy of the demo model
    if label:
        print(f"*** {label} ***", file=err)
    return model, processor


def generation_kwargs(args: argparse.Namespace) -> dict:
    """Greedy decoding with the chosen length and router top-p (the releases' generation configs sample)."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    if args.router_top_p is not None:
        kwargs["router_top_p"] = args.router_top_p
    return kwargs


def stream_generate(model, tokenizer, inputs: dict, out: TextIO = sys.stdout, **generate_kwargs) -> str:
    """Runs `model.generate` in a thread and prints the answer while it is produced; returns the answer."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            model.generate(**inputs, streamer=streamer, **generate_kwargs)
        except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(error)
            streamer.end()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        print(piece, end="", file=out, flush=True)
    thread.join()
    print(file=out, flush=True)
    if errors:
        raise errors[0]
    return "".join(pieces)


def run_cli(
    main: Callable[[argparse.Namespace], None],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    check: Callable[[argparse.Namespace], None] | None = None,
) -> int:
    """Parses the arguments, checks them (cheaply, before heavy imports), runs `main`; bad input ends with a
    one-line `error: ...` on stderr and exit status 2, without a traceback."""
    args = parser.parse_args(argv)
    try:
        check_router_top_p(getattr(args, "router_top_p", None))
        if check is not None:
            check(args)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        main(args)
    except (ValueError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
