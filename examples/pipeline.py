"""SliME through the transformers `image-text-to-text` pipeline, with the image carried by the chat message.

    python examples/pipeline.py --image photo.png --prompt "What is shown in this image?"
    python examples/pipeline.py --model your-name/SliME-vicuna-7B-hf --trust-remote-code

`import slime_hf` registers SliME with the pipeline's Auto classes; with `--trust-remote-code` the folder's own code
is used instead (as on a machine without this package). Without `--model` it runs the untrained demonstration
model, whose answers are noise.
"""

from __future__ import annotations

import argparse
import sys

from _common import (
    IMAGE_TOKEN,
    add_model_arguments,
    check_device,
    check_image_files,
    check_placeholders,
    demo_image,
    generation_kwargs,
    model_folder,
    run_cli,
    user_content,
)


def answer(args: argparse.Namespace) -> None:
    """Builds the pipeline and asks the question about the image."""
    import torch
    from transformers import pipeline

    if not args.trust_remote_code:
        import slime_hf  # noqa: F401 - registers SliME with the Auto classes

    (image,) = check_image_files([args.image])
    check_device(args.device)
    pipe = pipeline(
        "image-text-to-text",
        model=model_folder(args.model),
        trust_remote_code=args.trust_remote_code,
        dtype=getattr(torch, args.dtype),
        device=args.device,
    )
    label = getattr(pipe.model.config, "demo_model_label", None)
    if label:
        print(f"*** {label} ***", file=sys.stderr)
    kwargs = generation_kwargs(args)
    max_new_tokens = kwargs.pop("max_new_tokens")
    if IMAGE_TOKEN in args.prompt:
        # A prompt that places the image itself: render it with the chat template, give the image beside it.
        messages = [{"role": "user", "content": user_content(args.prompt)}]
        text = pipe.processor.apply_chat_template(messages, add_generation_prompt=True)
        outputs = pipe(
            images=[str(image)],
            text=text,
            max_new_tokens=max_new_tokens,
            generate_kwargs=kwargs,
            return_full_text=False,
        )
        print(outputs[0]["generated_text"])
        return
    messages = [{"role": "user", "content": user_content(args.prompt, images=[str(image)])}]
    outputs = pipe(text=messages, max_new_tokens=max_new_tokens, generate_kwargs=kwargs)
    # The pipeline returns the conversation continued by one assistant message.
    print(outputs[0]["generated_text"][-1]["content"])


def check(args: argparse.Namespace) -> None:
    check_image_files([args.image])
    check_placeholders(args.prompt, 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(demo_image()), help="the image (default: the shipped demo image)")
    parser.add_argument("--prompt", default="What is shown in this image?", help="the question")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="load the model folder's own code instead of the installed slime_hf",
    )
    add_model_arguments(parser, max_new_tokens=32)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(answer, build_parser(), argv, check=check)


if __name__ == "__main__":
    sys.exit(main())
