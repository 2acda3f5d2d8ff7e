"""Answer one prompt about every image of a folder (or a list of files), in batches, and write the answers as JSONL.

    python examples/generate.py --images photos/ --prompt "Describe the image." --batch-size 4 --output answers.jsonl

Each line of the output holds the image, the prompt, the answer, the slicing grid and the image token budget
(global, separator, local kept of total). Images are answered grouped by their number of crops (batches of similar
length), so lines come in that order. Lines are written and flushed as answers come, so a long run that stops
keeps what it has written. An existing output file is never replaced silently: pass `--resume` to skip the images it
already answers and append the others, or `--overwrite` to replace it (the old file stays until the first answer is
ready). Without `--model` it runs the untrained demonstration model, whose answers are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from _common import (
    IMAGE_SUFFIXES,
    add_model_arguments,
    check_image_files,
    check_placeholders,
    demo_image,
    generation_kwargs,
    load_model,
    run_cli,
    user_content,
)


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


def by_slice_count(images: list[Path]) -> list[Path]:
    """The images ordered by their number of local crops (stable): a batch then holds images whose assembled rows
    (576 global tokens, a separator and the kept share of 144 tokens per crop) are of similar length, so little of
    the batched decoding is spent on padding. Only the image headers are read."""
    from PIL import Image

    from slime_hf.image_processing_slime import get_slice_grid

    def crops(path: Path) -> int:
        with Image.open(path) as image:
            rows, cols = get_slice_grid((image.height, image.width))
        return rows * cols

    return sorted(images, key=crops)


def _image_key(path: str | os.PathLike) -> str:
    return os.path.normpath(os.path.abspath(path))


def answered_images(output: Path, prompt: str) -> tuple[set[str], int]:
    """
    The images an earlier run already answered in `output` (for `--resume`), and the byte length of its complete
    lines.

    An unfinished last line (a run stopped while writing it: no newline, not valid JSON) is not counted, and is cut
    off when the run appends. Any other line that is not a JSON record of this script, or a record made with another
    prompt, is a `ValueError`: the file is left as it is.
    """
    if not output.exists():
        return set(), 0
    data = output.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else its last line without one
    keys: set[str] = set()

    def read(line: bytes, number: int) -> None:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"--resume: line {number} of {output} is not JSON ({error}); the file is left as it is"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise ValueError(
                f"--resume: line {number} of {output} is not an answer record of this script (no "
                "'image'); the file is left as it is"
            )
        if record.get("prompt") != prompt:
            raise ValueError(
                f"--resume: {output} was written with another prompt ({record.get('prompt')!r} on line "
                f"{number}); pass that --prompt, or another --output"
            )
        keys.add(_image_key(record["image"]))

    for number, line in enumerate(lines, start=1):
        if line.strip():
            read(line, number)
    keep = len(data) - len(tail)
    if tail.strip():
        try:
            json.loads(tail)
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # the unfinished last line of a stopped run: not counted, cut off when the run appends
        else:
            read(tail, len(lines) + 1)
            keep = -1  # a complete last record without its newline: the run adds the newline first
    return keys, keep


class LineSink:
    """Opens the output only when the first line is ready (a run that fails before it leaves any existing file as it
    was), then writes and flushes line by line."""

    def __init__(self, path: Path, append: bool, keep_bytes: int):
        self.path, self.append, self.keep_bytes = path, append, keep_bytes
        self.handle = None

    def write(self, record: dict) -> None:
        if self.handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.append and self.path.exists():
                self.handle = self.path.open("r+b")
                if self.keep_bytes < 0:  # the last record lacks its newline
                    self.handle.seek(0, os.SEEK_END)
                    self.handle.write(b"\n")
                else:
                    if self.handle.seek(0, os.SEEK_END) > self.keep_bytes:
                        print(f"--resume: cut off the unfinished last line of {self.path}", file=sys.stderr)
                    self.handle.truncate(self.keep_bytes)
                    self.handle.seek(self.keep_bytes)
            else:
                self.handle = self.path.open("wb")
        self.handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def generate(args: argparse.Namespace) -> None:
    """Runs the model over all images and writes one JSON line per image, flushed line by line (a long run keeps
    what it has written so far; `--resume` continues it)."""
    images, skipped, keep_bytes = plan_images(args)
    output = Path(args.output)
    if not images:
        print(f"all {skipped} image(s) already answered in {output}: nothing to do", file=sys.stderr)
        return
    from tqdm.auto import tqdm

    from slime_hf.image_processing_slime import get_slice_grid

    model, processor = load_model(args, err=sys.stderr)  # the stream of this call (in-process callers swap it)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": user_content(args.prompt)}], add_generation_prompt=True
    )
    if skipped:
        print(f"--resume: {skipped} image(s) already answered in {output}, {len(images)} to go", file=sys.stderr)
    sink = LineSink(output, append=args.resume, keep_bytes=keep_bytes)
    try:
        with tqdm(total=len(images), unit="image", file=sys.stderr) as bar:
            for batch in batches(by_slice_count(images), args.batch_size):
                # One prompt per image; the processor pads them on the left, as generation needs.
                inputs = processor(images=[str(path) for path in batch], text=[prompt] * len(batch)).to(args.device)
                out = model.generate(**inputs, **generation_kwargs(args), return_dict_in_generate=True)
                answers = processor.batch_decode(
                    out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
                )
                for path, size, answer, budget in zip(
                    batch, inputs["image_sizes"].tolist(), answers, out.image_token_budget
                ):
                    sink.write(
                        {
                            "image": str(path),
                            "prompt": args.prompt,
                            "answer": answer.strip(),
                            "grid": list(get_slice_grid(tuple(size))),
                            "image_tokens": budget,
                        }
                    )
                bar.update(len(batch))
    finally:
        sink.close()
    print(
        f"wrote {len(images)} answer(s) to {output}" + (f" ({skipped} kept from before)" if skipped else ""),
        file=sys.stderr,
    )


def check_output(args: argparse.Namespace) -> None:
    output = Path(args.output)
    if output.is_dir():
        raise ValueError(f"--output is a folder: {output}")
    if output.exists() and not (args.overwrite or args.resume):
        raise ValueError(
            f"output file already exists: {output} (pass --resume to skip the images it already "
            "answers and append, or --overwrite to replace it)"
        )


def plan_images(args: argparse.Namespace) -> tuple[list[Path], int, int]:
    """The images still to answer, how many `--resume` skips, and the bytes of the existing output to keep."""
    images = list_images(args.images)
    if not args.resume:
        return images, 0, 0
    done, keep_bytes = answered_images(Path(args.output), args.prompt)
    todo = [path for path in images if _image_key(path) not in done]
    return todo, len(images) - len(todo), keep_bytes


def check(args: argparse.Namespace) -> None:
    list_images(args.images)
    check_placeholders(args.prompt, 1)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_output(args)
    if args.resume:
        answered_images(Path(args.output), args.prompt)  # a file that cannot be resumed fails before the model loads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images",
        nargs="+",
        default=[str(demo_image())],
        metavar="DIR_OR_FILE",
        help="image files and/or folders of images (default: the shipped demo image)",
    )
    parser.add_argument(
        "--prompt",
        default="Describe the image.",
        help="the question asked about each image; the image goes before it unless the prompt "
        "places it with one <image>",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="images answered per generate call (default 4). A batch encodes its images in one vision pass, "
        "prefills each row on its own (no padding) and decodes the rows together; images are grouped by their "
        "number of crops so rows in a batch are of similar length, and answers are written in that order. On a "
        "CPU, batching saves decoding time (one pass over the weights per step for the whole batch) from about 4 "
        "images per batch: 8 answers of 64 tokens came about 1.3x faster in batches of 8 than one by one "
        "(examples/benchmarks/benchmark_batching.py); batches of 2 are about as fast as single calls. On a GPU, "
        "each decoding step also reads the weights once for the whole batch, so larger batches raise throughput "
        "until memory runs out (examples/benchmarks/benchmark_gpu.py measures batches of 1, 8 and 32)",
    )
    parser.add_argument(
        "--output",
        default="answers.jsonl",
        help="JSONL file, one line per image, written and flushed line by line; an existing file is "
        "refused unless --resume or --overwrite is given",
    )
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="keep the existing --output, skip the images it already answers (same prompt) and append the others",
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output (it is kept until the first new answer is ready)",
    )
    add_model_arguments(parser, max_new_tokens=64)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(generate, build_parser(), argv, check=check)


if __name__ == "__main__":
    sys.exit(main())
