# Copyright 2024 The SliME authors and the slime-hf contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Processor for SliME: tokenizer + image processor + chat templates.

Every `<image>` placeholder in a prompt becomes ONE image token id in `input_ids` (the model replaces it by the
image's global, separator and routed local tokens). The text around the placeholders is tokenised exactly as the
original `tokenizer_image_token` did: every chunk between placeholders on its own, as the original (slow)
tokenizer would.
"""

import functools
import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import AddedToken, PreTrainedTokenizerBase
from transformers.utils import cached_file, logging

from .image_processing_slime import SliMEImageProcessor, SliMEImageProcessorPil
from .tokenization_slime import (
    IMAGE_TOKEN,
    SentencePieceLlamaEncoder,
    is_sentencepiece_style,
    load_sentencepiece_proto,
    tokenize_prompt_with_images,
)


logger = logging.get_logger(__name__)

SENTENCEPIECE_MODEL_FILE = "tokenizer.model"
_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_PROCESSOR_CONFIG_FILE = "processor_config.json"
_IMAGE_PROCESSOR_CONFIG_FILE = "preprocessor_config.json"
_LLAMA3_SPECIAL_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_HUB_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "subfolder",
    "proxies",
    "trust_remote_code",
    "code_revision",
)

VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# ---------------------------------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------------------------------

# Content items: `{"type": "image"}` renders "<image>", followed by "\n" unless it is the last item of the message (the
# original eval scripts build "<image>\n" + question); text items render verbatim; a plain string renders verbatim.
_CONTENT_MACRO = (
    "{%- macro slime_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is not none -%}"
    "{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>' -}}{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- else -%}{{- raise_exception('SliME chat templates accept only image and text content items, got: '"
    " + item['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

# conv_vicuna_v1 (SeparatorStyle.TWO): system + " ", then "ROLE: message" + sep per message (sep " " after the user,
# "</s>" after the assistant) and a bare "ROLE:" for an empty message, as the original `get_prompt`.
_VICUNA_V1_TEMPLATE = (
    _CONTENT_MACRO + "{%- set ns = namespace(system='" + VICUNA_SYSTEM_PROMPT.replace("'", "\\'") + "') -%}"
    "{%- set loop_messages = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = slime_content(messages[0]['content']) -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for message in loop_messages -%}"
    "{%- set text = slime_content(message['content']) -%}"
    "{%- if message['role'] == 'user' -%}{%- set role = 'USER' -%}{%- set sep = ' ' -%}"
    "{%- elif message['role'] == 'assistant' -%}{%- set role = 'ASSISTANT' -%}{%- set sep = '</s>' -%}"
    "{%- else -%}{{- raise_exception('The vicuna_v1 template accepts system (first), user and assistant messages,"
    " got role: ' + message['role']) -}}"
    "{%- endif -%}"
    # `{% generation %}` marks what training learns: an assistant answer and its end marker (as SliMEDataset's labels).
    "{%- if text and message['role'] == 'assistant' -%}"
    "{{- role + ': ' -}}{%- generation -%}{{- text + sep -}}{%- endgeneration -%}"
    "{%- elif text -%}{{- role + ': ' + text + sep -}}{%- else -%}{{- role + ':' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def _llama3_template(original: bool) -> str:
    # conv_llama_3: "<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>" per message, no system turn unless
    # given, no BOS in the text (the tokenizer adds it). At inference the original also appended its splitting marker
    # "<|eot_conversation|>" (not a token) after each assistant turn; training stripped it, so only
    # `llama3_original` keeps it.
    # `{% generation %}` marks what training learns: a non-empty assistant answer and its end (as SliMEDataset's
    # labels).
    marker = " + '<|eot_conversation|>'" if original else ""
    return (
        _CONTENT_MACRO + "{%- for message in messages -%}"
        "{%- set text = slime_content(message['content']) -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
        "{%- if text and message['role'] == 'assistant' -%}"
        "{%- generation -%}{{- text + '<|eot_id|>'" + marker + " -}}{%- endgeneration -%}"
        "{%- elif message['role'] == 'assistant' -%}{{- text + '<|eot_id|>'" + marker + " -}}"
        "{%- else -%}{{- text + '<|eot_id|>' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    )


# conv_llava_plain at inference: each non-empty user message + "\n"; an empty one renders nothing. The original raises
# on an assistant message (its sep2 is None); training captions ("<image>" + caption + "\n") are built by the training
# data code, not by this template.
_PLAIN_TEMPLATE = (
    _CONTENT_MACRO + "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set text = slime_content(message['content']) -%}"
    "{%- if text -%}{{- text + '\\n' -}}{%- endif -%}"
    "{%- else -%}{{- raise_exception('The plain template renders user messages only (inference prompts), got role: '"
    " + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "vicuna_v1": _VICUNA_V1_TEMPLATE,
    "llama3": _llama3_template(original=False),
    "llama3_original": _llama3_template(original=True),
    "plain": _PLAIN_TEMPLATE,
}
"""SliME chat templates (Jinja), by name: `vicuna_v1`, `llama3` (what training saw), `llama3_original` (the original
inference prompt, with its `<|eot_conversation|>` marker after assistant turns) and `plain` (stage 1-2 inference)."""

_TEMPLATE_FAMILIES = {
    "vicuna_v1": ("vicuna_v1", "plain"),
    "llama3": ("llama3", "llama3_original", "plain"),
}


def _has_llama3_special_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    vocab = tokenizer.get_vocab()
    return all(token in vocab for token in _LLAMA3_SPECIAL_TOKENS)


def default_chat_template_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """
    The template a SliME checkpoint was trained with, read from its tokenizer.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The checkpoint's tokenizer.

    Returns:
        `str`: `"llama3"` when the tokenizer has the Llama-3 header and end-of-turn tokens, else `"vicuna_v1"`.
    """
    return "llama3" if _has_llama3_special_tokens(tokenizer) else "vicuna_v1"


def chat_templates_for(tokenizer: PreTrainedTokenizerBase, default: str | None = None) -> dict[str, str]:
    """
    The chat templates that fit a tokenizer, as a processor's `chat_template` dict.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The checkpoint's tokenizer; its special tokens choose the family (Llama-3 or Vicuna).
        default (`str`, *optional*):
            Name of the template used when none is named (a key of [`CHAT_TEMPLATES`]). Defaults to
            [`default_chat_template_name`].

    Returns:
        `dict[str, str]`: `{"default": ..., name: template, ...}` with the family's templates and `plain`.
    """
    family = default_chat_template_name(tokenizer)
    default = default or family
    if default not in CHAT_TEMPLATES:
        raise ValueError(f"Unknown SliME chat template {default!r}; choose one of {sorted(CHAT_TEMPLATES)}.")
    names = dict.fromkeys((default, *_TEMPLATE_FAMILIES[family]))
    return {"default": CHAT_TEMPLATES[default], **{name: CHAT_TEMPLATES[name] for name in names}}


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _is_empty_media(value: Any) -> bool:
    """Whether a `videos` / `audio` argument holds nothing: `None`, or (nested) empty lists."""
    if value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_empty_media(item) for item in value)
    return False


def _read_json(path: str | None) -> dict:
    if path is None:
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _resolve_file(path: str, file_kwargs: dict, filename: str) -> str | None:
    """The local path of one file of a folder or Hub repo, or `None` where it has none."""
    return cached_file(
        path,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **file_kwargs,
    )


def _choose_chat_template(
    chat_template: str | dict[str, str] | None, name: str | None, tokenizer: PreTrainedTokenizerBase
) -> str | dict[str, str]:
    """
    The processor's chat templates: the saved (or given) ones, or those chosen from the tokenizer (Llama-3 special
    tokens -> `llama3`, else `vicuna_v1`); `name` makes one of them (or of [`CHAT_TEMPLATES`]) the default.
    """
    if chat_template is None or (name is not None and not isinstance(chat_template, dict)):
        return chat_templates_for(tokenizer, default=name)
    if name is None:
        return chat_template
    if name not in CHAT_TEMPLATES and name not in chat_template:
        raise ValueError(f"Unknown SliME chat template {name!r}; choose one of {sorted(CHAT_TEMPLATES)}.")
    chat_template = dict(chat_template)
    chat_template.setdefault(name, CHAT_TEMPLATES.get(name))
    chat_template["default"] = chat_template[name]
    return chat_template


def _is_tokenizer_option(key: str) -> bool:
    """Whether a `from_pretrained` kwarg is for the tokenizer: a special token (`cls_token`, ...) or a tokenizer
    option of [`_TOKENIZER_OPTIONS`]."""
    return key in _TOKENIZER_OPTIONS or key in PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES


# ---------------------------------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------------------------------


class _TextOptions(NamedTuple):
    """The text options of one `SliMEProcessor.__call__`, with SliME's defaults, checked."""

    padding: bool | str
    padding_side: str
    return_tensors: str | None
    add_special_tokens: bool
    max_length: int | None
    pad_to_multiple_of: int | None
    return_attention_mask: bool
    truncation: bool

    @classmethod
    def from_kwargs(cls, text_kwargs: dict) -> "_TextOptions":
        max_length = text_kwargs.get("max_length")
        truncation = text_kwargs.get("truncation")
        if truncation not in (None, False, True, "do_not_truncate", "longest_first", "only_first"):
            raise ValueError(f"SliMEProcessor truncates the text at the end only; got truncation={truncation!r}.")
        truncation = truncation not in (None, False, "do_not_truncate")
        if truncation and max_length is None:
            raise ValueError("truncation=True needs max_length (the number of text ids to keep).")
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1
        ):
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}.")
        return cls(
            padding=text_kwargs.get("padding", True),
            padding_side=text_kwargs.get("padding_side") or "left",
            return_tensors=text_kwargs.get("return_tensors"),
            add_special_tokens=text_kwargs.get("add_special_tokens", True),
            max_length=max_length,
            pad_to_multiple_of=text_kwargs.get("pad_to_multiple_of"),
            return_attention_mask=text_kwargs.get("return_attention_mask", True),
            truncation=truncation,
        )


_IMAGE_PROCESSOR_CLASSES = {
    SliMEImageProcessorPil.__name__: SliMEImageProcessorPil,
    SliMEImageProcessor.__name__: SliMEImageProcessor,
}
_IMAGE_PROCESSOR_BACKENDS = {"pil": SliMEImageProcessorPil, "torch": SliMEImageProcessor}


class SliMEProcessorKwargs(ProcessingKwargs, total=False):
    """
    Keyword arguments of [`SliMEProcessor.__call__`], with SliME's defaults: prompts are padded to the longest one, on
    the left (generation; training collators pass `padding_side="right"`), with the BOS id, and returned as PyTorch
    tensors.
    """

    # `return_tensors` is a text default rather than a `common_kwargs` one: the `_merge_kwargs` of transformers 5.17
    # updates the class-level `common_kwargs` defaults in place with a caller's `common_kwargs`, so one call would
    # change every later one. The image processor gets the text's `return_tensors` (one `BatchFeature`).
    _defaults = {
        "text_kwargs": {
            "padding": True,
            "padding_side": "left",
            "add_special_tokens": True,
            "return_attention_mask": True,
            "return_tensors": "pt",
        },
    }


# Text options that `SliMEProcessor.__call__` honours; the ones below them are accepted but refused when set (no offset
# mapping on the exact path, no control-token sanitising) or ignored (SliME has no token types).
_TEXT_OPTIONS = frozenset(
    (
        "padding",
        "padding_side",
        "return_tensors",
        "add_special_tokens",
        "max_length",
        "pad_to_multiple_of",
        "return_attention_mask",
        "truncation",
    )
)
_REFUSED_TEXT_OPTIONS = ("sanitize_control_tokens", "return_offsets_mapping")
_IGNORED_TEXT_OPTIONS = ("return_text_replacement_offsets", "return_mm_token_type_ids", "return_token_type_ids")
# Tokenizer options `from_pretrained` hands to the tokenizer (besides its special tokens); other unknown kwargs, e.g.
# the model's `dtype` or `device_map` that `pipeline` passes to the processor as well, are ignored.
_TOKENIZER_OPTIONS = frozenset(
    (
        "extra_special_tokens",
        "additional_special_tokens",
        "model_max_length",
        "padding_side",
        "truncation_side",
        "model_input_names",
        "clean_up_tokenization_spaces",
        "split_special_tokens",
        "add_bos_token",
        "add_eos_token",
        "add_prefix_space",
    )
)


class SliMEProcessor(ProcessorMixin):
    r"""
    Constructs a SliME processor: the SliME image processor, the checkpoint's tokenizer and its chat templates.

    Each `<image>` placeholder in the text becomes one `image_token_id` in `input_ids` (the model expands it into the
    image's global, separator and routed local tokens), and `pixel_values` / `image_sizes` hold the images in
    placeholder order. The text around placeholders is tokenised exactly as the original `tokenizer_image_token`;
    for SentencePiece tokenizers (Vicuna / Llama-2) this uses [`SentencePieceLlamaEncoder`] on the checkpoint's
    `tokenizer.model`, which [`~SliMEProcessor.save_pretrained`] therefore always writes.

    `<image>` is added to the tokenizer as a special token if missing; its id is then the first id after the
    vocabulary (`len(tokenizer)` before adding), the `image_token_id` of the model config. The pad token stays the
    checkpoint's (`<unk>` for Vicuna, `<|end_of_text|>` for Llama-3).

    Args:
        image_processor ([`SliMEImageProcessorPil`] or [`SliMEImageProcessor`], *optional*):
            The image processor. Defaults to [`SliMEImageProcessorPil`] (exact).
        tokenizer ([`PreTrainedTokenizerBase`]):
            The checkpoint's tokenizer.
        chat_template (`str` or `dict[str, str]`, *optional*):
            A Jinja template, or a dict of named templates with a `"default"` one. Defaults to
            [`chat_templates_for`] the tokenizer (`vicuna_v1` or `llama3`, plus `plain`, ...).
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The image placeholder.
        sentencepiece_legacy (`bool`, *optional*):
            The slow tokenizer's `legacy` flag for the exact SentencePiece path; defaults to `tokenizer.legacy`.
    """

    image_processor: Any
    tokenizer: Any
    valid_processor_kwargs = SliMEProcessorKwargs

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | dict[str, str] | None = None,
        image_token: str = IMAGE_TOKEN,
        sentencepiece_legacy: bool | None = None,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("SliMEProcessor needs a tokenizer.")
        if image_processor is None:
            image_processor = SliMEImageProcessorPil()
        self.image_token = image_token
        self.image_token_id = self._ensure_image_token(tokenizer, image_token)
        self._ensure_pad_token(tokenizer)
        if chat_template is None:
            chat_template = chat_templates_for(tokenizer)
        if sentencepiece_legacy is None and getattr(tokenizer, "legacy", None) is not None:
            sentencepiece_legacy = bool(tokenizer.legacy)
        self.sentencepiece_legacy = sentencepiece_legacy
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self._sentencepiece_encoder = None
        vocab_file = getattr(tokenizer, "vocab_file", None) or tokenizer.init_kwargs.get("vocab_file")
        model_proto = load_sentencepiece_proto(vocab_file) if isinstance(vocab_file, str) else None
        if model_proto is not None:
            self.set_sentencepiece_model(model_proto)
        elif is_sentencepiece_style(tokenizer):
            logger.warning(
                "The tokenizer is SentencePiece-style but its tokenizer.model was not found: prompts are tokenised by "
                "the transformers tokenizer, whose ids can differ from the original SliME ids (e.g. around <image>)."
            )

    @staticmethod
    def _ensure_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str) -> int:
        vocab = tokenizer.get_vocab()
        if image_token in vocab:
            return vocab[image_token]
        expected_id = len(tokenizer)
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [AddedToken(image_token, special=True, normalized=False)]},
            replace_extra_special_tokens=False,
        )
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id != expected_id:
            raise ValueError(
                f"Adding {image_token!r} to the tokenizer gave id {image_token_id}, expected {expected_id} "
                "(the first id after the vocabulary)."
            )
        return image_token_id

    @staticmethod
    def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
        # The original training set pad = unk (Vicuna) or <|end_of_text|> (Llama-3, which has no unk); never add <pad>.
        if tokenizer.pad_token is not None:
            return
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif "<|end_of_text|>" in tokenizer.get_vocab():
            tokenizer.pad_token = "<|end_of_text|>"
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token

    def set_sentencepiece_model(self, model_proto: bytes) -> None:
        """
        Switches prompt tokenisation to the exact SentencePiece path.

        Args:
            model_proto (`bytes`):
                The content of the tokenizer's SentencePiece `tokenizer.model`.
        """
        encoder = SentencePieceLlamaEncoder.from_tokenizer(
            self.tokenizer, model_proto, legacy=self.sentencepiece_legacy
        )
        if encoder.vocab_size != self.tokenizer.vocab_size:
            raise ValueError(
                f"The SentencePiece model has {encoder.vocab_size} pieces but the tokenizer's vocabulary has "
                f"{self.tokenizer.vocab_size}: they do not belong together."
            )
        self.sentencepiece_legacy = encoder.legacy
        self._sentencepiece_encoder = encoder
        self._encoder_vocab_size = len(self.tokenizer)

    @property
    def prompt_encoder(self) -> Any:
        """
        What encodes each text chunk: the exact [`SentencePieceLlamaEncoder`] for SentencePiece tokenizers, else the
        tokenizer itself.
        """
        encoder = self._sentencepiece_encoder
        if encoder is None:
            return self.tokenizer
        if self._encoder_vocab_size != len(self.tokenizer):
            # Tokens were added to the tokenizer since: they must be split out of the text too.
            self.set_sentencepiece_model(encoder.model_proto)
        return self._sentencepiece_encoder

    @property
    def uses_exact_sentencepiece(self) -> bool:
        """Whether prompts are tokenised by the exact SentencePiece path."""
        return self._sentencepiece_encoder is not None

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs) -> Any:
        """
        As [`~transformers.ProcessorMixin.apply_chat_template`], with two SliME rules when it tokenizes:

        - The prompt gets the tokenizer's BOS exactly as at inference: SliME's templates never write it, so an
          `add_special_tokens` passed in `processor_kwargs` is ignored (trl's collators pass `False`, meant for
          templates that write their own BOS); training rows built this way equal the inference ids and
          [`~training.SliMEDataset`]'s.
        - `return_assistant_tokens_mask=True` (with `return_dict=True`) returns `assistant_masks` from the templates'
          `{% generation %}` spans (each non-empty assistant answer and its end marker), mapped to tokens as
          [`~training.SliMEDataset`] maps its targets (a token straddling a span's start counts as the span's); the
          exact SentencePiece path has no offset mapping, so the spans are located by tokenizing the text up to
          each boundary.
        """
        if not kwargs.get("tokenize", False):
            return super().apply_chat_template(conversation, chat_template, **kwargs)
        processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
        processor_kwargs.pop("add_special_tokens", None)
        kwargs.pop("add_special_tokens", None)
        with_mask = kwargs.pop("return_assistant_tokens_mask", False) and kwargs.get("return_dict", False)
        out = super().apply_chat_template(conversation, chat_template, processor_kwargs=processor_kwargs, **kwargs)
        if not with_mask:
            return out
        from transformers.utils.chat_template_utils import render_jinja_template

        template = self._template_string(chat_template)
        batched = (
            isinstance(conversation, (list, tuple))
            and bool(conversation)
            and (isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
        )
        conversations = [list(getattr(c, "messages", c)) for c in (conversation if batched else [conversation])]
        template_kwargs = {
            key: value
            for key, value in kwargs.items()
            if key not in ("tokenize", "return_dict", "return_tensors", "load_audio_from_video", "tools", "documents")
        }
        prompts, spans = render_jinja_template(
            conversations=conversations,
            tools=kwargs.get("tools"),
            documents=kwargs.get("documents"),
            chat_template=template,
            return_assistant_tokens_mask=True,
            **{**self.tokenizer.special_tokens_map, **template_kwargs},
        )
        input_ids, attention_mask = out["input_ids"], out["attention_mask"]
        rows = input_ids.tolist() if hasattr(input_ids, "tolist") else [list(row) for row in input_ids]
        masks = attention_mask.tolist() if hasattr(attention_mask, "tolist") else [list(m) for m in attention_mask]
        assistant_masks = []
        for prompt, row_spans, row, real in zip(prompts, spans, rows, masks):
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos is not None and prompt.startswith(bos))
            ids = self.tokenize_prompt(prompt, add_special_tokens=add_special_tokens)
            targets = [0] * len(ids)
            for start, end in row_spans:
                first = _common_prefix_length(self.tokenize_prompt(prompt[:start], add_special_tokens), ids)
                last = _common_prefix_length(self.tokenize_prompt(prompt[:end], add_special_tokens), ids)
                targets[first:last] = [1] * (last - first)
            kept = [token for token, keep in zip(row, real) if keep]
            if kept != ids[: len(kept)]:
                raise ValueError("The rendered chat template does not tokenize to the returned input_ids.")
            targets = iter(targets[: len(kept)])
            assistant_masks.append([next(targets) if keep else 0 for keep in real])
        return_tensors = "pt" if hasattr(input_ids, "tolist") and hasattr(input_ids, "dim") else None
        if return_tensors is None and isinstance(input_ids, np.ndarray):
            return_tensors = "np"
        out["assistant_masks"] = assistant_masks
        out.convert_to_tensors(tensor_type=return_tensors)
        return out

    def _template_string(self, chat_template: str | None) -> str:
        """The Jinja source of a chat template given by name (a key of the processor's templates), source or `None`."""
        templates = self.chat_template
        if chat_template is None:
            chat_template = "default"
        if isinstance(templates, dict) and chat_template in templates:
            return templates[chat_template]
        if chat_template == "default" and isinstance(templates, str):
            return templates
        if chat_template in CHAT_TEMPLATES:
            return CHAT_TEMPLATES[chat_template]
        return chat_template

    def tokenize_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """
        Token ids of one prompt, as the original `tokenizer_image_token` (one `image_token_id` per `<image>`).

        Args:
            text (`str`):
                The prompt (already rendered by a chat template).
            add_special_tokens (`bool`, *optional*, defaults to `True`):
                Whether to add the BOS id (the original always did).

        Returns:
            `list[int]`: The ids.
        """
        return tokenize_prompt_with_images(
            self.prompt_encoder, text, self.image_token_id, self.image_token, add_special_tokens=add_special_tokens
        )

    def _flatten_images(self, images: Any, placeholders: list[int] | None) -> list:
        """Images in placeholder order; `placeholders` (per sample) checks images given per sample."""
        if images is None:
            return []
        if not isinstance(images, (list, tuple)):
            if (isinstance(images, np.ndarray) or hasattr(images, "detach")) and images.ndim == 4:
                return list(images)
            return [images]
        if placeholders is None:
            return [image for item in images for image in self._flatten_images(item, None)]
        if any(isinstance(item, (list, tuple)) for item in images):
            if len(images) != len(placeholders):
                raise ValueError(
                    f"Images were given per sample for {len(images)} samples, but there are {len(placeholders)} texts."
                )
            flat = []
            for i, (sample_images, count) in enumerate(zip(images, placeholders)):
                sample_images = [] if sample_images is None else sample_images
                if not isinstance(sample_images, (list, tuple)):
                    sample_images = [sample_images]
                sample_images = [image for image in sample_images if image is not None]
                if len(sample_images) != count:
                    raise ValueError(
                        f"Sample {i} has {count} {self.image_token} placeholder(s) but {len(sample_images)} image(s)."
                    )
                flat.extend(sample_images)
            return flat
        return [image for image in images if image is not None]

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        **kwargs: Unpack[SliMEProcessorKwargs],
    ) -> BatchFeature:
        """
        Tokenises prompts and processes their images.

        Options are given flat (`padding="max_length"`) or per modality (`text_kwargs={...}`, `images_kwargs={...}`,
        `common_kwargs={...}`), and merged by [`~transformers.ProcessorMixin._merge_kwargs`] over
        [`SliMEProcessorKwargs`]'s defaults; an option given both flat and in its modality's dict is a `ValueError`.
        The tokenizer's own settings (e.g. its `padding_side`) are not used: SliME's prompts are encoded and padded
        here, and its defaults are the processor's.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str` or a list of them, *optional*):
                The images, one per `<image>` placeholder: a flat list in placeholder order over the whole batch, or
                one list per sample. Strings are paths or URLs.
            text (`str` or `list[str]`, *optional*):
                The prompt(s), already rendered by a chat template, with `<image>` where each image goes (any number,
                anywhere).
            **kwargs:
                Text options: `padding` (default `True`: `True` / `"longest"` pads to the longest prompt,
                `"max_length"` to `max_length`, `False` / `"do_not_pad"` not at all), `padding_side` (`"left"`, the
                default, for generation, or `"right"` for training), `return_tensors` (default `"pt"`; `"np"` or
                `None` for lists), `add_special_tokens` (default `True`), `max_length`, `pad_to_multiple_of`,
                `return_attention_mask` (default `True`), `truncation` (with `max_length`: each row's text ids are cut
                at the end to `max_length`; a cut that would drop an `<image>` placeholder raises a `ValueError`
                naming the sample; the model's own limit on the assembled sequence is separate). Image processor
                options (flat or in `images_kwargs`) go to the image processor. `videos` / `audio` / `audios` are
                accepted when empty (`None`, `[]`); SliME takes no other media. Unknown options are a `TypeError`.

        Returns:
            [`BatchFeature`]: `input_ids`, `attention_mask` and, with images, `pixel_values`
            `(num_images, max_views, 3, 336, 336)` and `image_sizes` `(num_images, 2)` (height, width).
        """
        kwargs = dict(kwargs)
        for unsupported in ("videos", "audio", "audios"):
            # Generic callers (lmms-eval, `apply_chat_template`) pass `videos=None` / `[]`; only actual content is
            # refused.
            if not _is_empty_media(kwargs.pop(unsupported, None)):
                raise ValueError(f"SliME takes images and text only, got {unsupported}.")
        merged = self._merge_call_kwargs(kwargs)
        text_kwargs = merged["text_kwargs"]
        images_kwargs = merged["images_kwargs"]
        # One `BatchFeature`, one tensor type: the image processor gets the text's.
        images_kwargs.pop("return_tensors", None)
        options = _TextOptions.from_kwargs(text_kwargs)
        if text is None and images is None:
            raise ValueError("Give text, images, or both.")
        if options.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {options.padding_side!r}.")

        data = {}
        if text is not None:
            texts, placeholders = self._check_texts(text)
            flat_images = self._flatten_images(images, placeholders)
            if len(flat_images) != sum(placeholders):
                raise ValueError(
                    f"The text has {sum(placeholders)} {self.image_token} placeholder(s) but {len(flat_images)} "
                    "image(s) were given; give one image per placeholder."
                )
            data.update(self._encode_texts(texts, options))
        else:
            flat_images = self._flatten_images(images, None)

        if flat_images:
            # Paths, URLs and bytes are opened by the image processor (with its checks and mode conversions).
            image_inputs = self.image_processor(flat_images, return_tensors=options.return_tensors, **images_kwargs)
            data.update(image_inputs)
        return BatchFeature(data=data, tensor_type=options.return_tensors)

    def _check_texts(self, text: str | list[str]) -> tuple[list[str], list[int]]:
        """The prompts as a list and their placeholder counts; an empty prompt without an image is a `ValueError`."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a non-empty list of strings.")
        placeholders = [t.count(self.image_token) for t in texts]
        for i, (sample, count) in enumerate(zip(texts, placeholders)):
            if count == 0 and not sample.strip():
                which = f"Prompt {i}" if len(texts) > 1 else "The prompt"
                raise ValueError(f"{which} is empty (or whitespace only) and has no image.")
        return texts, placeholders

    def _encode_texts(self, texts: list[str], options: "_TextOptions") -> dict[str, list]:
        """`input_ids` (and `attention_mask`) of the prompts: tokenised exactly, truncated and padded as asked."""
        ids = [self.tokenize_prompt(t, add_special_tokens=options.add_special_tokens) for t in texts]
        if options.truncation:
            ids = [self._truncate(row, options.max_length, i, len(ids)) for i, row in enumerate(ids)]
        data = self._pad(
            ids,
            options.padding,
            options.padding_side,
            options.max_length,
            options.pad_to_multiple_of,
            options.return_tensors is not None,
        )
        if not options.return_attention_mask:
            data.pop("attention_mask")
        return data

    def _merge_call_kwargs(self, kwargs: dict) -> dict[str, dict]:
        """
        `__call__`'s options by modality: unknown ones refused, unsupported ones refused when set, then
        [`~transformers.ProcessorMixin._merge_kwargs`] over [`SliMEProcessorKwargs`] (which raises a `ValueError` for
        an option given both flat and in its modality's dict). The tokenizer's init kwargs are deliberately not merged
        in: SliME's defaults (left padding, ...) do not depend on how the tokenizer was configured.
        """
        image_options = set(getattr(getattr(self.image_processor, "valid_kwargs", None), "__annotations__", {}))
        known = _TEXT_OPTIONS.union(_REFUSED_TEXT_OPTIONS, _IGNORED_TEXT_OPTIONS)
        nested = ("text_kwargs", "common_kwargs", "images_kwargs")
        for name in nested:
            if name in kwargs:
                if kwargs[name] is None:
                    kwargs.pop(name)
                elif not isinstance(kwargs[name], dict):
                    kind = type(kwargs[name]).__name__
                    raise TypeError(f"SliMEProcessor.__call__: {name} must be a dict, got {kind}.")
                else:
                    kwargs[name] = dict(kwargs[name])
        unexpected = sorted(key for key in kwargs if key not in known | image_options and key not in nested)
        unexpected += sorted(f"text_kwargs[{key!r}]" for key in kwargs.get("text_kwargs", {}) if key not in known)
        unexpected += sorted(
            f"common_kwargs[{key!r}]" for key in kwargs.get("common_kwargs", {}) if key not in known | image_options
        )
        if unexpected:
            raise TypeError(f"SliMEProcessor.__call__ got unexpected keyword arguments: {unexpected}.")
        # Accepted for generic callers (transformers' `apply_chat_template`, trl), handled here: not every transformers
        # version knows them, and `_merge_kwargs` would drop the unknown ones with a warning.
        places = [kwargs, kwargs.get("text_kwargs", {}), kwargs.get("common_kwargs", {})]
        if any(place.pop("sanitize_control_tokens", False) for place in places):
            raise ValueError("SliMEProcessor does not support sanitize_control_tokens.")
        if any(place.pop("return_offsets_mapping", False) for place in places):
            raise ValueError("SliMEProcessor does not return offset mappings.")
        for place in places:
            for ignored in _IGNORED_TEXT_OPTIONS:
                place.pop(ignored, None)
        try:
            return self._merge_kwargs(SliMEProcessorKwargs, tokenizer_init_kwargs=None, **kwargs)
        except StrictDataclassError as error:
            # transformers validates the merged options against their types (e.g. `do_normalize="x"` in the image
            # options); bad input is a ValueError here, as everywhere in SliME.
            raise ValueError(f"SliMEProcessor.__call__: invalid option. {error}") from error

    def _truncate(self, ids: list[int], max_length: int, index: int, batch_size: int) -> list[int]:
        """Cuts one row of text ids at the end to `max_length`; a cut that would drop an image placeholder raises."""
        if len(ids) <= max_length:
            return ids
        lost = ids[max_length:].count(self.image_token_id)
        if lost:
            which = f"Sample {index}" if batch_size > 1 else "The sample"
            raise ValueError(
                f"{which} has {len(ids)} text ids; cutting them to max_length={max_length} would drop {lost} "
                f"{self.image_token} placeholder(s) (SliMEProcessor truncates only after the last image). Raise "
                "max_length or shorten the text."
            )
        return ids[:max_length]

    def _pad(
        self,
        ids: list[list[int]],
        padding: bool | str,
        padding_side: str,
        max_length: int | None,
        pad_to_multiple_of: int | None,
        need_rectangular: bool,
    ) -> dict[str, list[list[int]]]:
        lengths = [len(row) for row in ids]
        if padding in (True, "longest"):
            target = max(lengths)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length.")
            if max(lengths) > max_length:
                raise ValueError(
                    f"A prompt has {max(lengths)} tokens, more than max_length={max_length}; SliMEProcessor does not "
                    "truncate."
                )
            target = max_length
        elif padding in (False, None, "do_not_pad"):
            target = None
        else:
            raise ValueError(f"Unknown padding {padding!r}.")
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if target is None:
            if need_rectangular and len(set(lengths)) > 1:
                raise ValueError("Prompts of different lengths need padding=True to be returned as tensors.")
            return {"input_ids": ids, "attention_mask": [[1] * n for n in lengths]}
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has no pad token.")
        input_ids, attention_mask = [], []
        for row in ids:
            pad = target - len(row)
            if padding_side == "left":
                input_ids.append([pad_id] * pad + row)
                attention_mask.append([0] * pad + [1] * len(row))
            else:
                input_ids.append(row + [pad_id] * pad)
                attention_mask.append([1] * len(row) + [0] * pad)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # -----------------------------------------------------------------------------------------------------------------
    # Saving and loading
    # -----------------------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """
        Saves the processor (tokenizer, image processor config, chat templates) so that
        [`~SliMEProcessor.from_pretrained`] restores it; also writes `tokenizer.model` for the exact SentencePiece path
        (transformers 5 tokenizers write only `tokenizer.json`).

        Args:
            save_directory (`str` or `os.PathLike`):
                The folder (created if missing).
            push_to_hub (`bool`, *optional*, defaults to `False`):
                Whether to push the folder to the Hub afterwards.
            **kwargs:
                Passed to `push_to_hub` (e.g. `repo_id`, `commit_message`, `token`).

        Returns:
            `list[str]`: The processor config file.
        """
        os.makedirs(save_directory, exist_ok=True)
        # The tokenizer and the processor write their chat templates to the same files (`chat_template.jinja`,
        # `additional_chat_templates/`); the processor's are the folder's. A tokenizer loaded from a saved folder holds
        # that folder's templates: saved as they are, its named ones would outlive a replaced `processor.chat_template`
        # and come back on loading (or conflict with a `chat_template.json`). So the tokenizer saves the processor's.
        tokenizer_template = self.tokenizer.chat_template
        self.tokenizer.chat_template = self.chat_template
        try:
            files = super().save_pretrained(save_directory, push_to_hub=False)
        finally:
            self.tokenizer.chat_template = tokenizer_template
        if self._sentencepiece_encoder is not None:
            with open(os.path.join(save_directory, SENTENCEPIECE_MODEL_FILE), "wb") as f:
                f.write(self._sentencepiece_encoder.model_proto)
        if push_to_hub:
            # `push_to_hub` saves again (through this method) into a temporary folder and uploads that.
            kwargs.pop("max_shard_size", None)
            repo_id = kwargs.pop("repo_id", str(save_directory).rstrip(os.path.sep).split(os.path.sep)[-1])
            self.push_to_hub(repo_id, **kwargs)
        return files

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        chat_template_name: str | None = None,
        **kwargs,
    ) -> "SliMEProcessor":
        """
        Loads a processor from a folder saved by [`~SliMEProcessor.save_pretrained`] (or a Hub repo of one), or from a
        checkpoint in the SliME authors' layout (tokenizer files only): there the image processor is the default
        [`SliMEImageProcessorPil`], `<image>` is added to the tokenizer and the chat template is chosen from the
        tokenizer (Llama-3 special tokens -> `llama3`, else `vicuna_v1`).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A local folder or a Hub repo id.
            chat_template_name (`str`, *optional*):
                Name of the default chat template (a key of [`CHAT_TEMPLATES`]), overriding the saved or chosen one.
            **kwargs:
                Hub arguments (`revision`, `token`, `cache_dir`, `subfolder`, ...), `tokenizer` / `image_processor`
                (instances to use instead of the saved ones), `SliMEProcessor` arguments (`chat_template`,
                `image_token`, `sentencepiece_legacy`), image processor options (e.g. `do_normalize=False`) and
                tokenizer options (special tokens such as `cls_token="<cls>"`, `model_max_length`, `padding_side`,
                ...), which are passed on to them as [`~transformers.ProcessorMixin.from_pretrained`] does. Other
                keyword arguments (e.g. the model's `dtype` or `device_map`, which `pipeline` passes to the processor
                too) are ignored.

        Returns:
            [`SliMEProcessor`]
        """
        hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
        backend = kwargs.pop("backend", None)
        for key in ("_from_auto", "_from_pipeline", "use_fast", "return_unused_kwargs"):
            kwargs.pop(key, None)
        path = str(pretrained_model_name_or_path)
        file_kwargs = {k: v for k, v in hub_kwargs.items() if k not in ("trust_remote_code", "code_revision")}
        resolve = functools.partial(_resolve_file, path, file_kwargs)

        has_processor_config = resolve(_PROCESSOR_CONFIG_FILE) is not None
        processor_dict = {}
        if has_processor_config or resolve("chat_template.jinja") or resolve("chat_template.json"):
            processor_dict, _ = cls.get_processor_dict(path, **file_kwargs)

        # Checked before the tokenizer is built from it: a corrupt tokenizer.model is an error naming the file.
        model_file = resolve(SENTENCEPIECE_MODEL_FILE)
        model_proto = load_sentencepiece_proto(model_file)
        tokenizer = kwargs.pop("tokenizer", None)
        if tokenizer is None:
            tokenizer_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if _is_tokenizer_option(key)}
            tokenizer = cls._load_tokenizer(path, resolve, {**hub_kwargs, **tokenizer_kwargs})

        image_processor = kwargs.pop("image_processor", None)
        if image_processor is None:
            image_processor = cls._load_image_processor(
                processor_dict.get("image_processor"), resolve, backend, options=kwargs
            )

        legacy = kwargs.pop("sentencepiece_legacy", processor_dict.get("sentencepiece_legacy"))
        if legacy is None and model_proto is not None:
            # The authors' layout: the slow tokenizer read `legacy` from tokenizer_config.json (default True).
            config_file = resolve(_TOKENIZER_CONFIG_FILE)
            legacy = bool(_read_json(config_file).get("legacy", True))

        chat_template = _choose_chat_template(
            kwargs.pop("chat_template", processor_dict.get("chat_template")), chat_template_name, tokenizer
        )

        init_kwargs = {"image_token": processor_dict.get("image_token", IMAGE_TOKEN)}
        # As `ProcessorMixin.from_pretrained`, other kwargs are ignored: `pipeline(...)` passes the model's loading
        # kwargs (`dtype`, `device_map`, ...) to the processor as well.
        init_kwargs.update({key: value for key, value in kwargs.items() if key in ("image_token",)})
        processor = cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=chat_template,
            sentencepiece_legacy=legacy,
            **init_kwargs,
        )
        if model_proto is not None and not processor.uses_exact_sentencepiece:
            processor.set_sentencepiece_model(model_proto)
        return processor

    @staticmethod
    def _load_tokenizer(path: str, resolve: Callable[[str], str | None], hub_kwargs: dict) -> PreTrainedTokenizerBase:
        config_file = resolve(_TOKENIZER_CONFIG_FILE)
        tokenizer_config = _read_json(config_file)
        class_name = tokenizer_config.get("tokenizer_class")
        if class_name and "AutoTokenizer" not in (tokenizer_config.get("auto_map") or {}):
            from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

            # Loading by class skips config.json, whose model_type (llava_llama in the authors' layout) is unknown.
            tokenizer_class = tokenizer_class_from_name(class_name) or tokenizer_class_from_name(
                class_name.removesuffix("Fast")
            )
            if tokenizer_class is not None:
                return tokenizer_class.from_pretrained(path, **hub_kwargs)
        return AutoTokenizer.from_pretrained(path, **hub_kwargs)

    @staticmethod
    def _load_image_processor(
        config: dict | None,
        resolve: Callable[[str], str | None],
        backend: str | None = None,
        options: dict | None = None,
    ) -> Any:
        """The image processor of a folder; `options` (the caller's kwargs) that are image processor options (its
        `valid_kwargs`) are popped from it and override the saved config."""
        if backend is not None and backend not in _IMAGE_PROCESSOR_BACKENDS:
            raise ValueError(
                f"Unknown image processor backend {backend!r}; choose one of {sorted(_IMAGE_PROCESSOR_BACKENDS)}."
            )
        options = {} if options is None else options
        if config is None:
            config = _read_json(resolve(_IMAGE_PROCESSOR_CONFIG_FILE)) or None
        image_processor_class = _IMAGE_PROCESSOR_BACKENDS[backend] if backend is not None else None
        saved_class = _IMAGE_PROCESSOR_CLASSES.get(config.get("image_processor_type")) if config is not None else None
        if config is not None and saved_class is None:
            # e.g. a CLIP preprocessor config: SliME slices images itself.
            logger.warning(
                f"Ignoring the image processor config of type {config.get('image_processor_type')!r}: SliME uses "
                "its own image processor."
            )
        image_processor_class = image_processor_class or saved_class or SliMEImageProcessorPil
        valid = getattr(getattr(image_processor_class, "valid_kwargs", None), "__annotations__", {})
        overrides = {key: options.pop(key) for key in list(options) if key in valid}
        if saved_class is not None:
            return image_processor_class.from_dict(config, **overrides)
        return image_processor_class(**overrides)


__all__ = [
    "CHAT_TEMPLATES",
    "IMAGE_TOKEN",
    "SentencePieceLlamaEncoder",
    "SliMEProcessor",
    "chat_templates_for",
    "default_chat_template_name",
    "tokenize_prompt_with_images",
]
