"""The prompt the original SliME evaluation feeds the language model, built from an lmms-eval context.

lmms-eval gives a model the task's text (question, options, post-prompt) and the sample's images. The authors' eval
scripts (`llava/eval/model_vqa_loader.py`, `model_vqa.py`, `model_vqa_mmbench.py`, `model_vqa_science.py` and MMMU's
`run_llava.py`) turn that text into the prompt in two steps:

1. `qs = DEFAULT_IMAGE_TOKEN + '\\n' + qs` (SliME releases have `mm_use_im_start_end=False`; the model refuses
   checkpoints that set it), one image per question;
2. one user turn of the release's conversation template (`--conv-mode vicuna_v1` in `scripts/vicuna/eval/*.sh`,
   `--conv-mode llama3` in `scripts/llama/eval/*.sh`) followed by the empty assistant turn that asks for the answer.

[`render_prompt`] does both with the package's own chat templates, so the evaluation prompt and the processor's
prompt are one definition. The template family is read from the tokenizer, as [`default_chat_template_name`] does.
"""

from __future__ import annotations

from typing import Any

from ..processing_slime import CHAT_TEMPLATES, IMAGE_TOKEN, default_chat_template_name


__all__ = ["EVAL_TEMPLATES", "render_prompt", "eval_template_name"]

EVAL_TEMPLATES: dict[str, str] = {"vicuna_v1": "vicuna_v1", "llama3": "llama3_original"}
"""Template family (what [`default_chat_template_name`] returns) -> the template the original evaluated with.

`llama3_original` is the original `conv_llama_3` inference prompt; for the single user turn of an evaluation prompt
it renders the same text as `llama3` (they differ only after assistant turns)."""


def eval_template_name(processor: Any) -> str:
    """
    The name of the chat template the original evaluation used for this processor's release.

    Args:
        processor ([`SliMEProcessor`]):
            A SliME processor (its tokenizer decides the family: Llama-3 header tokens mean `llama3`).

    Returns:
        `str`: A key of [`CHAT_TEMPLATES`]: `"vicuna_v1"` or `"llama3_original"`.
    """
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"render_prompt needs a SliME processor with a tokenizer, got {type(processor).__name__}.")
    return EVAL_TEMPLATES[default_chat_template_name(tokenizer)]


def _place_images(context: str, num_images: int) -> str:
    """`<image>` placeholders as the original: each image's `<image>` + newline before the question text.

    The original evaluated one image per question (`DEFAULT_IMAGE_TOKEN + '\\n' + qs`); several images follow the same
    rule, one `<image>\\n` each in order, the layout the processor's image content items render. A context that
    already holds one `<image>` per image (an interleaved task) is kept as it is.
    """
    found = context.count(IMAGE_TOKEN)
    if found == num_images:
        return context
    if found:
        raise ValueError(
            f"The context holds {found} {IMAGE_TOKEN} placeholder(s) but the sample has {num_images} image(s); "
            f"give one placeholder per image or none (they are then placed before the text)."
        )
    return (IMAGE_TOKEN + "\n") * num_images + context


def render_prompt(processor: Any, context: str, num_images: int, template: str | None = None) -> str:
    """
    Turns an lmms-eval context (a question with its task's post-prompt) into the original evaluation's prompt string.

    Example (Vicuna release): `render_prompt(processor, "What is this?\\nAnswer the question using a single word or
    phrase.", 1)` returns `"A chat between ... questions. USER: <image>\\nWhat is this?\\nAnswer the question using a
    single word or phrase. ASSISTANT:"`.

    Args:
        processor ([`SliMEProcessor`]):
            The release's processor; its tokenizer decides the conversation template (`vicuna_v1` or `llama3`).
        context (`str`):
            The text lmms-eval gives the model for one sample, used verbatim (no stripping: the original did not
            strip the question file's text).
        num_images (`int`):
            How many images the sample has. Without `<image>` in the context, each gets `<image>\\n` before the
            text, as the original's `DEFAULT_IMAGE_TOKEN + '\\n' + qs`; 0 renders a text-only prompt.
        template (`str`, *optional*):
            A key of [`CHAT_TEMPLATES`] to use instead of the release's evaluation template (e.g. `"plain"` for a
            stage-1/2 checkpoint).

    Returns:
        `str`: The full prompt, ending with the template's assistant prefix (`" ASSISTANT:"` for Vicuna,
        `"<|start_header_id|>assistant<|end_header_id|>\\n\\n"` for Llama-3), ready for the processor.
    """
    if not isinstance(context, str):
        raise ValueError(f"render_prompt: context must be a string, got {type(context).__name__}.")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"render_prompt: num_images must be a non-negative integer, got {num_images!r}.")
    name = template if template is not None else eval_template_name(processor)
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"Unknown SliME chat template {name!r}; choose one of {sorted(CHAT_TEMPLATES)}.")
    messages = [{"role": "user", "content": _place_images(context, num_images)}]
    return processor.apply_chat_template(messages, chat_template=CHAT_TEMPLATES[name], add_generation_prompt=True)
