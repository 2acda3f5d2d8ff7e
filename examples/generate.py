"""Answer one prompt about every image of a folder (or a list of files), in batches, and write the answers as JSONL.

    python examples/generate.py --images photos/ --prompt "Describe the image." --batch-size 4 --output answers.jsonl

Each line of the output holds the image, the prompt, the answer, the slicing grid and the image token budget
(global, separator, local kept of total). Without `--model` it runs the untrained demonstration model, whose answers
are noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import IMAGE_SUFFIXES, add_model_arguments, check_image_files, check_placeholders, demo_image
from _common import generation_kwargs, load_model, run_cli, user_content


def list_images(sources: list[str]) -> list[Path]:
    """Image files from files and folders (a folder contributes its image files, sorted by name)."""
    files = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder: {path}")
            files.extend(found)
        else:
            files.extend(check_image_files([path]))
    return files


def batches(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def generate(args: argparse.Namespace) -> None:
    """Runs the model over all images and writes one JSON line per image, batch by batch (a long run keeps what it
    has written so far)."""
    from tqdm.auto import tqdm

    from slime_hf.image_processing_slime import get_slice_grid

    images = list_images(args.images)
    model, processor = load_model(args)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": user_content(args.prompt)}], add_generation_prompt=True
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as sink, tqdm(total=len(images), unit="image", file=sys.stderr) as bar:
        for batch in batches(images, args.batch_size):
            # One prompt per image; the processor pads them on the left, as generation needs.
            inputs = processor(images=[str(path) for path in batch], text=[prompt] * len(batch)).to(args.device)
            out = model.generate(**inputs, **generation_kwargs(args), return_dict_in_generate=True)
            answers = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for path, size, answer, budget in zip(
                batch, inputs["image_sizes"].tolist(), answers, out.image_token_budget
            ):
                record = {
                    "image": str(path),
                    "prompt": args.prompt,
                    "answer": answer.strip(),
                    "grid": list(get_slice_grid(tuple(size))),
                    "image_tokens": budget,
                }
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
            bar.update(len(batch))
    print(f"wrote {len(images)} answer(s) to {output}", file=sys.stderr)


def check(args: argparse.Namespace) -> None:
    list_images(args.images)
    check_placeholders(args.prompt, 1)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", default=[str(demo_image())], metavar="DIR_OR_FILE",
                        help="image files and/or folders of images (default: the shipped demo image)")
    parser.add_argument("--prompt", default="Describe the image.",
                        help="the question asked about each image; the image goes before it unless the prompt "
                             "places it with one <image>")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output", default="answers.jsonl", help="JSONL file, one line per image")
    add_model_arguments(parser, max_new_tokens=64)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(generate, build_parser(), argv, check=check)


if __name__ == "__main__":
    sys.exit(main())
