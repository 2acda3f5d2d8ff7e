"""Multi-turn chat about one image in the terminal, with the answers streamed as they are generated.

    python examples/chat.py --image photo.png
    printf 'What is shown?\nAnd the colours?\n' | python examples/chat.py --image photo.png --transcript chat.json

Each line you type is a user turn (`/reset` starts over, `/quit` or end of input stops). The image goes with the
first turn; every turn re-reads the whole conversation, so the router sees the whole dialogue too. Without
`--model` it runs the untrained demonstration model, whose answers are noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from _common import (
    add_model_arguments,
    check_image_files,
    demo_image,
    generation_kwargs,
    load_model,
    run_cli,
    stream_generate,
    user_content,
)


def read_turns(stdin=sys.stdin, stdout=sys.stdout) -> Iterator[str]:
    """User turns: prompted lines on a terminal, plain lines (echoed) when the input is piped."""
    if stdin.isatty():
        while True:
            try:
                yield input("you: ")
            except EOFError:
                print(file=stdout)
                return
    for line in stdin:
        line = line.rstrip("\n")
        print(f"you: {line}", file=stdout)
        yield line


def chat(args: argparse.Namespace) -> None:
    """The chat loop: render the conversation with the model's template, generate, stream, remember the answer."""
    from PIL import Image

    from slime_hf.image_processing_slime import get_slice_grid

    (image_path,) = check_image_files([args.image])
    model, processor = load_model(args)
    image = Image.open(image_path)
    image.load()
    rows, cols = get_slice_grid((image.height, image.width))
    print(
        f"image: {image_path} ({image.width}x{image.height}, {rows} x {cols} local crops); "
        "/reset starts over, /quit stops",
        file=sys.stderr,
    )

    messages: list[dict] = []
    for line in read_turns():
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            messages = []
            print("(conversation reset)")
            continue
        content = user_content(text) if not messages else [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        try:
            inputs = processor(images=[image], text=prompt).to(args.device)
        except ValueError as error:  # e.g. a typed "<image>": drop the turn, keep chatting
            messages.pop()
            print(f"error: {error}", file=sys.stderr)
            continue
        print("assistant: ", end="", flush=True)
        answer = stream_generate(model, processor.tokenizer, inputs, **generation_kwargs(args)).strip()
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})

    if args.transcript:
        for item in (item for message in messages for item in message["content"]):
            if item["type"] == "image":
                item["image"] = str(image_path)
        Path(args.transcript).write_text(json.dumps(messages, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def check(args: argparse.Namespace) -> None:
    check_image_files([args.image])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(demo_image()), help="the image (default: the shipped demo image)")
    parser.add_argument("--transcript", default=None, help="write the conversation as JSON messages to this file")
    add_model_arguments(parser, max_new_tokens=128)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(chat, build_parser(), argv, check=check)


if __name__ == "__main__":
    sys.exit(main())
