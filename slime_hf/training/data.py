"""Training data for SliME: LLaVA-format conversations -> token ids, labels and image inputs.

A sample is `{"id", "image" (optional: a file under the image folder, a list of them, or a PIL image),
"conversations": [{"from": "human" | "gpt", "value": ...}, ...]}` (LLaVA JSON or JSONL, or a Hugging Face
`datasets.Dataset` with the same columns). The conversation is rendered with the processor's chat template
(`vicuna_v1`, `llama3`) or the `plain` caption format of stages 1-2, tokenised exactly as the original
(`SliMEProcessor.tokenize_prompt`), and the labels are derived from the tokens: every assistant turn and its end
marker are targets, everything else is -100.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers.utils import logging

from ..image_processing_slime import get_slice_grid, load_image
from ..processing_slime import CHAT_TEMPLATES, IMAGE_TOKEN, _common_prefix_length, default_chat_template_name


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
TRAINING_TEMPLATES = ("plain", "vicuna_v1", "llama3")
_TEMPLATE_ALIASES = {"v1": "vicuna_v1", "vicuna": "vicuna_v1", "llama_3": "llama3"}
_USER_ROLES = {"human": "user", "user": "user"}
_ASSISTANT_ROLES = {"gpt": "assistant", "assistant": "assistant", "model": "assistant"}
# Private-use sentinels stand in for message contents while a chat template renders, so that every content's span
# in the rendered text is known exactly.
_SENTINEL = re.compile("\ue000(\\d+)\ue001")


def resolve_template(template: str | None, processor: Any) -> str:
    """
    The training template name for a processor: `template` if given (aliases `v1`, `vicuna`, `llama_3` accepted),
    else the chat template family of its tokenizer (`llama3` or `vicuna_v1`).
    """
    if template is None:
        return default_chat_template_name(processor.tokenizer)
    name = _TEMPLATE_ALIASES.get(template, template)
    if name not in TRAINING_TEMPLATES:
        raise ValueError(f"unknown training template {template!r}; choose one of {TRAINING_TEMPLATES}")
    return name


# ----------------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------------
def load_records(data_path: str | os.PathLike | Sequence) -> list[dict] | Any:
    """
    Reads LLaVA-format samples.

    Args:
        data_path: a `.json` file (a list of samples), a `.jsonl` file (one sample per line), a list of such files
            (concatenated in order), or already loaded records (a list of dicts or a `datasets.Dataset`).

    Returns:
        The records (a list, or the `datasets.Dataset` as given).
    """
    if isinstance(data_path, (str, os.PathLike)):
        path = os.fspath(data_path)
        if not os.path.isfile(path):
            raise ValueError(f"training data file not found: {path}")
        with open(path, encoding="utf-8") as handle:
            if path.endswith(".jsonl"):
                records = []
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as error:
                            raise ValueError(f"{path}, line {number}: not valid JSON: {error}") from None
            else:
                try:
                    records = json.load(handle)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a list of samples (LLaVA JSON) or one sample per line (JSONL)")
        return records
    if isinstance(data_path, Sequence) and data_path and all(isinstance(p, (str, os.PathLike)) for p in data_path):
        return [record for path in data_path for record in load_records(path)]
    if hasattr(data_path, "__getitem__") and hasattr(data_path, "__len__"):
        return data_path
    raise ValueError(
        f"data_path must be a JSON/JSONL file, a list of them, or a sequence of records; got {data_path!r}"
    )


class SampleError(ValueError):
    """A training sample that cannot be used (bad conversation, missing or corrupt image, cut through an image)."""


@dataclass
class Conversation:
    """One sample's normalised conversation: `(role, text)` turns with roles `system`, `user`, `assistant`."""

    sample_id: str
    turns: list[tuple[str, str]]
    images: list[Any]


def normalize_record(record: dict, index: int) -> Conversation:
    """Validates one LLaVA record and maps its roles; the original's `<image>` placement is applied here."""
    sample_id = str(record.get("id", index)) if isinstance(record, dict) else str(index)
    where = f"sample {sample_id!r} (index {index})"
    if not isinstance(record, dict):
        raise SampleError(f"{where} must be a JSON object (id, image, conversations), got {type(record).__name__}")
    images = record.get("image", record.get("images"))
    if images is None or (isinstance(images, str) and not images):
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    images = [image for image in images if image is not None]
    raw_turns = record.get("conversations")
    if raw_turns is None:
        raise SampleError(f"{where} has no 'conversations' list")
    if not isinstance(raw_turns, list):
        raise SampleError(f"{where}: 'conversations' must be a list of turns, got {type(raw_turns).__name__}")
    if not raw_turns:
        raise SampleError(f"{where} has an empty 'conversations' list (no turn to learn from)")
    turns = []
    for turn in raw_turns:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SampleError(f"{where}: every turn needs 'from' and 'value', got {turn!r}")
        speaker = str(turn["from"]).lower()
        role = _USER_ROLES.get(speaker) or _ASSISTANT_ROLES.get(speaker) or ("system" if speaker == "system" else None)
        if role is None:
            raise SampleError(f"{where}: unknown speaker {turn['from']!r} (human/gpt/user/assistant/system)")
        value = turn["value"]
        if not isinstance(value, str):
            raise SampleError(f"{where}: turn values must be strings, got {type(value).__name__}")
        turns.append((role, value))
    system = [turns.pop(0)] if turns[0][0] == "system" else []
    if turns and turns[0][0] != "user":
        turns = turns[1:]  # as the original: a conversation starts with the human
    for position, (role, _) in enumerate(turns):
        if role != ("user" if position % 2 == 0 else "assistant"):
            raise SampleError(f"{where}: turns must alternate human/gpt, got {[r for r, _ in turns]}")
    if not any(role == "assistant" for role, _ in turns):
        raise SampleError(f"{where} has no gpt turn to learn from")

    if len(images) == 1:
        # As the original's preprocess_multimodal: the placeholder moves to the start of its turn, then "\n".
        turns = [
            (
                role,
                (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip() if IMAGE_TOKEN in text else text,
            )
            for role, text in turns
        ]
    placeholders = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if placeholders != len(images):
        raise SampleError(
            f"{where} has {len(images)} image(s) but {placeholders} {IMAGE_TOKEN} placeholder(s) in its conversation; "
            f"put one {IMAGE_TOKEN} where each image goes"
        )
    return Conversation(sample_id, system + turns, images)


# ----------------------------------------------------------------------------------------------------------------
# Rendering and labels
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RenderedConversation:
    """A rendered training text and the character spans `[start, end)` of its targets."""

    text: str
    target_spans: list[tuple[int, int]]
    # Per assistant turn, in characters: start of its round, start and end of the answer, end of its end marker (for
    # the original's label arithmetic).
    rounds: list[tuple[int, int, int, int]]


def render_conversation(conversation: Conversation, template: str, processor: Any) -> RenderedConversation:
    """
    Renders a conversation for training and locates its targets.

    `plain` (stages 1-2, as the original's pretraining): the human turn is dropped; the text is one `<image>` per image,
    the caption and `"\\n"` (no end token); caption and newline are the targets. Chat templates: the processor's
    template renders the turns; each assistant answer and the end marker that follows it (`</s>`, `<|eot_id|>`)
    are the targets.
    """
    if template == "plain":
        turns = [turn for turn in conversation.turns if turn[0] != "system"]
        if len(turns) != 2 or not conversation.images:
            raise SampleError(
                f"sample {conversation.sample_id!r}: the plain template takes one image caption (one human turn with "
                f"{IMAGE_TOKEN}, one gpt turn), got {len(turns)} turns and {len(conversation.images)} image(s)"
            )
        prefix = IMAGE_TOKEN * len(conversation.images)
        text = prefix + turns[1][1] + "\n"
        return RenderedConversation(text, [(len(prefix), len(text))], [])

    chat_template = CHAT_TEMPLATES[template]
    messages = [
        {"role": role, "content": f"\ue000{i}\ue001" if text else ""}
        for i, (role, text) in enumerate(conversation.turns)
    ]
    rendered = processor.tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
    end_marker = _end_marker(processor, chat_template)
    pieces, spans, rounds = [], [], []
    position, round_start = 0, 0
    for match in _SENTINEL.finditer(rendered):
        pieces.append(rendered[position : match.start()])
        start = sum(len(p) for p in pieces)
        role, text = conversation.turns[int(match.group(1))]
        pieces.append(text)
        position = match.end()
        if role == "assistant":
            answer_end = end = start + len(text)
            if rendered.startswith(end_marker, position):
                end += len(end_marker)
                pieces.append(end_marker)
                position += len(end_marker)
            spans.append((start, end))
            rounds.append((round_start, start, answer_end, end))
            round_start = end
    pieces.append(rendered[position:])
    return RenderedConversation("".join(pieces), spans, rounds)


def _end_marker(processor: Any, chat_template: str) -> str:
    """What a template writes after an assistant answer (its end-of-turn marker), read off the template itself."""
    messages = [{"role": "user", "content": "\ue0000\ue001"}, {"role": "assistant", "content": "\ue0001\ue001"}]
    rendered = processor.tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
    return rendered.split("\ue0001\ue001", 1)[1]


def tokenize_with_targets(rendered: RenderedConversation, processor: Any) -> tuple[list[int], list[int]]:
    """
    Token ids of a rendered conversation (exactly as the original) and labels derived from the tokens.

    A character boundary maps to the token boundary where the tokens of the text before it stop agreeing with the
    tokens of the whole text: a token that straddles the start of an answer (SentencePiece's "▁The" after
    "ASSISTANT:") counts as the answer's, as in the original; no per-tokenizer length arithmetic is involved.
    """
    ids = processor.tokenize_prompt(rendered.text)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in rendered.target_spans:
        first = _common_prefix_length(processor.tokenize_prompt(rendered.text[:start]), ids)
        last = _common_prefix_length(processor.tokenize_prompt(rendered.text[:end]), ids)
        labels[first:last] = ids[first:last]
    return ids, labels


# The original's per-template label arithmetic (its preprocess_v1 / preprocess_llama3), only to count the samples where
# the labels derived from the tokens differ from it.
_ORIGINAL_ARITHMETIC = {
    # template: (masked leading positions, tokens trimmed off the instruction length, when later rounds get -1,
    # whether a round's length counts its end marker: vicuna's "</s>" is the split separator, llama3 splits after it)
    "vicuna_v1": (1, 2, "not_legacy", False),
    "llama3": (0, 0, "always", True),
}


def original_arithmetic_labels(
    rendered: RenderedConversation, ids: list[int], template: str, processor: Any, max_length: int
) -> list[int] | None:
    """Labels as the original's `preprocess_v1` / `preprocess_llama3` arithmetic computes them (all -100 on its
    'tokenization mismatch'), or `None` for templates it has no arithmetic for."""
    if template not in _ORIGINAL_ARITHMETIC:
        return None
    cursor, trim, later, round_has_marker = _ORIGINAL_ARITHMETIC[template]
    minus_one = later == "always" or not processor.sentencepiece_legacy
    labels = list(ids)
    labels[:cursor] = [IGNORE_INDEX] * min(cursor, len(ids))
    for index, (round_start, answer_start, answer_end, end) in enumerate(rendered.rounds):
        round_end = end if round_has_marker else answer_end
        round_len = len(processor.tokenize_prompt(rendered.text[round_start:round_end]))
        instruction_len = len(processor.tokenize_prompt(rendered.text[round_start:answer_start])) - trim
        if index > 0 and minus_one:
            round_len -= 1
            instruction_len -= 1
        labels[cursor : cursor + instruction_len] = [IGNORE_INDEX] * len(labels[cursor : cursor + instruction_len])
        cursor += round_len
    labels[cursor:] = [IGNORE_INDEX] * len(labels[cursor:])
    pad_id = processor.tokenizer.pad_token_id
    total = sum(1 for i in ids if i != pad_id) if template == "vicuna_v1" else len(ids)
    if cursor < max_length and cursor != total:
        labels = [IGNORE_INDEX] * len(ids)
    return labels


# ----------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------
def image_token_bound(config: Any | None, num_local_crops: int) -> int:
    """The most positions one image can take in the assembled sequence (every local token kept)."""
    if config is None:
        return 576 + 1 + 144 * num_local_crops
    use_global = not config.use_local_only
    use_local = not config.use_global_only
    tokens = 0
    if use_global:
        tokens += config.num_global_queries if config.global_adapter_mode != "mlp" else config.num_vision_patches
    if use_local:
        tokens += config.local_compressor_num_queries * num_local_crops
    return tokens + (1 if use_global and use_local else 0)


def _leaves_folder(relative: str) -> bool:
    """Whether an image path, joined to the image folder, points outside it (absolute, or `..` above it)."""
    if os.path.isabs(relative) or os.path.splitdrive(relative)[0]:
        return True
    normalized = os.path.normpath(relative)
    return normalized == os.pardir or normalized.startswith(os.pardir + os.sep)


def _log_count(kind: str, count: int, message: str) -> None:
    # Every event is logged at INFO; WARNING for the first ten and then at each power of ten, so that a large run
    # neither hides nor floods them.
    if count <= 10 or math.log10(count).is_integer():
        logger.warning(f"{message} ({count} {kind} so far in this process)")
    else:
        logger.info(message)


class SliMEDataset(Dataset):
    """
    LLaVA-format training samples for SliME, with lazily loaded images.

    `dataset[i]` is a dict with 1-D `input_ids` and `labels` (`torch.LongTensor`) and, for a sample with images,
    `pixel_values` `(num_images, max_views, 3, 336, 336)` and `image_sizes` `(num_images, 2)` (height, width), as
    [`SliMEProcessor`] returns them; [`SliMEDataCollator`] batches such items.

    Args:
        data_path (`str`, `list[str]`, `list[dict]` or `datasets.Dataset`):
            LLaVA JSON / JSONL file(s) or loaded records (see [`load_records`]).
        image_folder (`str`, *optional*):
            Folder the records' `image` paths are relative to.
        processor ([`SliMEProcessor`]):
            Tokenises exactly as the original and slices images.
        template (`str`, *optional*):
            `"plain"` (stages 1-2), `"vicuna_v1"` or `"llama3"`; defaults to the tokenizer's chat template family.
        model_max_length (`int`, *optional*, defaults to 2048):
            Longest training sequence. As in the original, the text alone is cut to this many tokens here and the
            model cuts the assembled sequence (text + image tokens after routing) at the end to the same length
            (`config.training_max_length`). A sample whose image block could reach past it (with every local token
            kept: `576 + 1 + 144 * crops`, or what `model_config` uses) is refused, so the model's cut never falls
            inside an image.
        model_config ([`SliMEConfig`], *optional*):
            The model's config (stage switches) for the image token budgets; without it the full budget is assumed.
        skip_bad_samples (`bool`, *optional*, defaults to `False`):
            Skip (return `None`, dropped by the collator) and count samples that cannot be used: missing or corrupt
            image, an image outside `image_folder`, malformed conversation, cut through an image. By default they
            raise a `ValueError` naming the sample.
        allow_images_outside_folder (`bool`, *optional*, defaults to `False`):
            Read image paths that leave `image_folder` (absolute, or with `..` above it). By default such a sample is
            refused when it is read, so a data file cannot point training at arbitrary files.

    Attributes:
        num_truncated (`int`): samples whose text was cut at the end so far (in this process); cuts of the assembled
            sequence are counted by [`SliMETrainer`].
        num_skipped (`int`): samples skipped so far (in this process).
        num_label_fixes (`int`): samples whose labels differ from what the original's label arithmetic gives.
    """

    def __init__(
        self,
        data_path: Any,
        image_folder: str | os.PathLike | None,
        processor: Any,
        template: str | None = None,
        model_max_length: int = 2048,
        model_config: Any | None = None,
        skip_bad_samples: bool = False,
        allow_images_outside_folder: bool = False,
    ):
        self.records = load_records(data_path)
        self.image_folder = None if image_folder is None else os.fspath(image_folder)
        self.processor = processor
        self.template = resolve_template(template, processor)
        self.model_max_length = int(model_max_length)
        self.model_config = model_config
        self.skip_bad_samples = skip_bad_samples
        self.allow_images_outside_folder = allow_images_outside_folder
        self.num_truncated = 0
        self.num_skipped = 0
        self.num_label_fixes = 0

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Per sample, the word count of its conversation, negative for text-only samples (as upstream LLaVA's
        modality-grouped sampler reads it). Computed without loading images."""
        lengths = []
        for record in self.records:
            words = sum(len(str(turn.get("value", "")).split()) for turn in record.get("conversations") or [])
            has_image = bool(record.get("image", record.get("images")))
            lengths.append(max(words, 1) if has_image else -max(words, 1))
        return lengths

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        record = self.records[index]
        try:
            return self.build_item(record, index)
        except SampleError as error:
            if not self.skip_bad_samples:
                raise
            self.num_skipped += 1
            _log_count("skipped", self.num_skipped, f"skipped a training sample: {error}")
            return None

    def _open_image(self, image: Any, where: str) -> Any:
        if isinstance(image, dict):  # an undecoded `datasets.Image` value
            image = image.get("bytes") or image.get("path")
        if isinstance(image, (str, os.PathLike)) and self.image_folder is not None:
            relative = os.fspath(image)
            if not self.allow_images_outside_folder and _leaves_folder(relative):
                raise SampleError(
                    f"{where}: image {relative!r} is outside the image folder {self.image_folder} (an absolute path "
                    "or '..' above it); pass --allow_images_outside_folder true to read it"
                )
            image = os.path.join(self.image_folder, relative)
        try:
            return load_image(image)
        except (ValueError, OSError) as error:
            raise SampleError(f"{where}: cannot load image {image!r}: {error}") from error

    def build_item(self, record: dict, index: int) -> dict[str, torch.Tensor]:
        """Builds one item (raises [`SampleError`], a `ValueError`, for an unusable sample)."""
        conversation = normalize_record(record, index)
        where = f"sample {conversation.sample_id!r} (index {index})"
        rendered = render_conversation(conversation, self.template, self.processor)
        ids, labels = tokenize_with_targets(rendered, self.processor)
        original = original_arithmetic_labels(rendered, ids, self.template, self.processor, self.model_max_length)
        if original is not None and original != labels:
            self.num_label_fixes += 1
            _log_count(
                "label fixes",
                self.num_label_fixes,
                f"{where}: labels derived from the tokens differ from the original's length arithmetic "
                "(which would have masked the whole sample)"
                if all(x == IGNORE_INDEX for x in original)
                else f"{where}: labels derived from the tokens differ from the original's length arithmetic",
            )
        item = {}
        crops = []
        if conversation.images:
            images = [self._open_image(image, where) for image in conversation.images]
            item.update(self.processor.image_processor(images, return_tensors="pt"))
            crops = [rows * cols for rows, cols in (get_slice_grid(tuple(s)) for s in item["image_sizes"].tolist())]
        ids, labels = self._truncate(ids, labels, crops, where)
        item["input_ids"] = torch.tensor(ids, dtype=torch.long)
        item["labels"] = torch.tensor(labels, dtype=torch.long)
        return item

    def _truncate(self, ids: list[int], labels: list[int], crops: list[int], where: str) -> tuple[list, list]:
        """Applies the data side of the length limit (the model cuts the assembled sequence after routing).

        As the original's collator, the text alone is cut to `model_max_length` tokens. A sample whose image block
        could reach past `model_max_length` (every local token kept) is refused: the model's cut after routing
        could then fall inside it.
        """
        limit = self.model_max_length
        if len(ids) > limit:
            if self.processor.image_token_id in ids[limit:]:
                raise SampleError(
                    f"{where}: its text alone ({len(ids)} tokens) exceeds model_max_length={limit} "
                    "and the cut would remove an image"
                )
            self.num_truncated += 1
            _log_count(
                "truncated",
                self.num_truncated,
                f"{where}: text truncated at the end from {len(ids)} to model_max_length={limit} tokens",
            )
            ids, labels = ids[:limit], labels[:limit]
        image_positions = [i for i, token in enumerate(ids) if token == self.processor.image_token_id]
        bounds = [image_token_bound(self.model_config, n) for n in crops]
        for number, position in enumerate(image_positions):
            # The text before this image (position - number tokens), then every image block up to and including it.
            end = position - number + sum(bounds[: number + 1])
            if end > limit:
                raise SampleError(
                    f"{where}: image {number} may end at assembled position {end} (every local token kept), past "
                    f"model_max_length={limit}: the cut after routing could fall inside it"
                )
        return ids, labels


# ----------------------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------------------
def pad_views(pixel_values: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates per-sample `(num_images, views, 3, H, W)` tensors, zero-padding views to the batch's maximum."""
    max_views = max(p.shape[1] for p in pixel_values)
    total = sum(p.shape[0] for p in pixel_values)
    out = pixel_values[0].new_zeros((total, max_views, *pixel_values[0].shape[2:]))
    start = 0
    for p in pixel_values:
        out[start : start + p.shape[0], : p.shape[1]] = p
        start += p.shape[0]
    return out


class SliMEDataCollator:
    """
    Batches [`SliMEDataset`] items for `model(**batch)`: `input_ids` right-padded with the pad id, `labels` with
    -100, `attention_mask` from the lengths (a genuine pad-id token inside a sample stays), and, when the batch holds
    images, `pixel_values` `(num_images, max_views, 3, 336, 336)` padded with zero views to the batch's own maximum
    and `image_sizes` (height, width) from which the model reads each image's view count. Items that
    [`SliMEDataset`] skipped (`None`) are dropped.

    Args:
        processor ([`SliMEProcessor`]): gives the pad id.
        pad_to_multiple_of (`int`, *optional*): pad the text length to a multiple of this.
    """

    def __init__(self, processor: Any, pad_to_multiple_of: int | None = None):
        self.pad_token_id = processor.tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
        items = [item for item in items if item is not None]
        if not items:
            raise ValueError("every sample of this batch was skipped as unusable (see the warnings above)")
        lengths = [len(item["input_ids"]) for item in items]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (item, length) in enumerate(zip(items, lengths)):
            input_ids[row, :length] = item["input_ids"]
            labels[row, :length] = item["labels"]
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        with_images = [item for item in items if item.get("pixel_values") is not None]
        if with_images:
            batch["pixel_values"] = pad_views([item["pixel_values"] for item in with_images])
            batch["image_sizes"] = torch.cat([item["image_sizes"] for item in with_images])
        return batch


__all__ = [
    "IGNORE_INDEX",
    "TRAINING_TEMPLATES",
    "SampleError",
    "SliMEDataCollator",
    "SliMEDataset",
    "load_records",
    "normalize_record",
    "render_conversation",
    "resolve_template",
    "tokenize_with_targets",
]
