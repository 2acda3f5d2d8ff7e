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
"""The exact SentencePiece tokenization of SliME's prompts.

transformers 5 has no slow tokenizers, and its `tokenizers`-backed Llama tokenizer differs from the slow one the
original SliME code used on text chunks that start with a space. [`SentencePieceLlamaEncoder`] reproduces the slow
tokenizer on `sentencepiece` directly, and [`tokenize_prompt_with_images`] splits a prompt at its `<image>`
placeholders as the original `tokenizer_image_token`.
"""

import json
import os
import re
from collections.abc import Sequence
from typing import Any

from transformers.tokenization_utils_base import AddedToken, PreTrainedTokenizerBase


IMAGE_TOKEN = "<image>"
SPIECE_UNDERLINE = "\u2581"


class SentencePieceLlamaEncoder:
    """
    Encodes text exactly as the slow `LlamaTokenizer` of transformers 4.x (the one the original SliME code loaded with
    `use_fast=False`), on `sentencepiece` directly.

    transformers 5 only has the `tokenizers`-backed Llama tokenizer, which differs from the slow one on text that
    starts with spaces (the slow one keeps them after its own "▁" prefix: " and" -> "▁▁", "and"); the original prompt
    ids depend on it because every chunk between `<image>` placeholders was tokenised on its own, and the chunk after
    a placeholder often starts with a space. This class reproduces the slow
    tokenizer: added/special token strings typed in the text are split out and become their ids, and with
    `legacy=False` SentencePiece's dummy prefix is disabled, the text gets one "▁" prefix (dropped before a leading
    special token) and pieces starting with a space are encoded behind the `unk` string, which is then removed.

    Args:
        model_proto (`bytes`):
            The content of the SentencePiece `tokenizer.model` file.
        added_tokens (`dict[str, int]` or `dict[int, AddedToken]`):
            Added (special) tokens, as `tokenizer.added_tokens_decoder` (id -> `AddedToken`) or content -> id.
        special_tokens (`Sequence[str]`):
            The tokenizer's special token strings (`all_special_tokens`).
        unk_token (`str`, *optional*, defaults to `"<unk>"`):
            The unknown token string (used by the non-legacy prefix trick).
        bos_token_id (`int`, *optional*):
            Id added at the start when `add_bos_token`.
        eos_token_id (`int`, *optional*):
            Id added at the end when `add_eos_token`.
        add_bos_token (`bool`, *optional*, defaults to `True`):
            Whether `encode` adds the BOS id.
        add_eos_token (`bool`, *optional*, defaults to `False`):
            Whether `encode` adds the EOS id.
        legacy (`bool`, *optional*, defaults to `False`):
            The slow tokenizer's `legacy` flag (Llama-2 / Vicuna v1.5 tokenizers set `false`).
    """

    def __init__(
        self,
        model_proto: bytes,
        added_tokens: dict,
        special_tokens: Sequence[str],
        unk_token: str = "<unk>",
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        legacy: bool = False,
    ):
        self.model_proto = bytes(model_proto)
        self._added = {}
        for key, value in added_tokens.items():
            token = value if isinstance(value, AddedToken) else AddedToken(str(key), special=True, normalized=False)
            token_id = key if isinstance(value, AddedToken) else int(value)
            self._added[token.content] = (token_id, token)
        self.special_tokens = set(special_tokens)
        self.unk_token = str(unk_token)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.legacy = legacy
        self._build()

    def _build(self) -> None:
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor()
        if self.legacy:
            processor.LoadFromSerializedProto(self.model_proto)
        else:
            # As the slow tokenizer's `get_spm_processor`: the non-legacy mode switches the dummy prefix off and adds
            # its own "▁" in `tokenize`.
            from transformers.convert_slow_tokenizer import import_protobuf

            model_pb2 = import_protobuf()
            proto = model_pb2.ModelProto.FromString(self.model_proto)
            proto.normalizer_spec.add_dummy_prefix = False
            processor.LoadFromSerializedProto(proto.SerializeToString())
        self.sp_model = processor
        self.unk_token_length = len(processor.encode(self.unk_token, out_type=str))
        # Longest first, so that the leftmost-longest added token wins, as the slow tokenizer's trie.
        contents = sorted(self._added, key=len, reverse=True)
        self._split_pattern = re.compile("|".join(re.escape(c) for c in contents)) if contents else None

    @classmethod
    def from_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, model_proto: bytes, legacy: bool | None = None
    ) -> "SentencePieceLlamaEncoder":
        """
        Builds the encoder for a transformers tokenizer of the same vocabulary.

        Args:
            tokenizer (`PreTrainedTokenizerBase`):
                The tokenizer (its added tokens, special tokens and BOS/EOS settings are used).
            model_proto (`bytes`):
                The content of its SentencePiece `tokenizer.model`.
            legacy (`bool`, *optional*):
                The slow tokenizer's `legacy` flag; defaults to `tokenizer.legacy` if set, else `True` (the slow
                tokenizer's default).

        Returns:
            `SentencePieceLlamaEncoder`
        """
        if legacy is None:
            legacy = getattr(tokenizer, "legacy", None)
            legacy = True if legacy is None else bool(legacy)
        # What the tokenizer adds around a text, probed: transformers 5 keeps it in the post-processor and does not
        # save `add_bos_token` / `add_eos_token` in tokenizer_config.json.
        probe = tokenizer.encode("", add_special_tokens=True)
        bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        add_bos_token = bool(probe) and bos_id is not None and probe[0] == bos_id
        add_eos_token = (
            bool(probe) and eos_id is not None and probe[-1] == eos_id and (len(probe) > 1 or not add_bos_token)
        )
        return cls(
            model_proto,
            added_tokens=dict(tokenizer.added_tokens_decoder),
            special_tokens=list(tokenizer.all_special_tokens),
            unk_token=tokenizer.unk_token if tokenizer.unk_token is not None else "<unk>",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            legacy=legacy,
        )

    def __getstate__(self) -> dict:
        # The SentencePiece processor is rebuilt from the proto (pickling for data-loader workers, deep copies).
        state = self.__dict__.copy()
        for key in ("sp_model", "_split_pattern", "unk_token_length"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build()

    def __deepcopy__(self, memo: dict) -> "SentencePieceLlamaEncoder":
        # Immutable after construction.
        return self

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces."""
        return self.sp_model.get_piece_size()

    def _sp_tokenize(self, text: str) -> list[str]:
        tokens = self.sp_model.encode(text, out_type=str)
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return tokens
        # Without the dummy prefix SentencePiece would drop a leading "▁": encode behind the unk string, then cut it.
        tokens = self.sp_model.encode(self.unk_token + text, out_type=str)
        return tokens[self.unk_token_length :] if len(tokens) >= self.unk_token_length else tokens

    def _split_added_tokens(self, text: str) -> list[str]:
        if self._split_pattern is None:
            return [text]
        pieces = []
        position = 0
        for match in self._split_pattern.finditer(text):
            pieces.append(text[position : match.start()])
            pieces.append(match.group())
            position = match.end()
        pieces.append(text[position:])
        pieces = [piece for piece in pieces if piece != ""] or [""]
        # AddedToken lstrip / rstrip / single_word, as the slow tokenizer applied them.
        for i, piece in enumerate(pieces):
            if piece not in self._added:
                continue
            token = self._added[piece][1]
            left = pieces[i - 1] if i > 0 else None
            right = pieces[i + 1] if i < len(pieces) - 1 else None
            if token.rstrip and right:
                pieces[i + 1] = right.lstrip()
            if token.lstrip and left:
                pieces[i - 1] = left.rstrip()
            if token.single_word and left and left[-1] != " ":
                pieces[i - 1] += piece
                pieces[i] = ""
            elif token.single_word and right and right[0] != " ":
                pieces[i] += right
                pieces[i + 1] = ""
        return pieces

    def _tokenize_pieces(self, text: str) -> list[str]:
        tokens = []
        for piece in self._split_added_tokens(text):
            if not piece:
                continue
            if piece in self._added:
                tokens.append(piece)
            else:
                tokens.extend(self._sp_tokenize(piece))
        return tokens

    def tokenize(self, text: str) -> list[str]:
        """
        Splits a text into tokens (SentencePiece pieces and added-token strings), as the slow tokenizer's `tokenize`.

        Args:
            text (`str`):
                The text.

        Returns:
            `list[str]`: The tokens.
        """
        if self.legacy or len(text) == 0:
            return self._tokenize_pieces(text)
        tokens = self._tokenize_pieces(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.special_tokens:
            tokens = tokens[1:]
        return tokens

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        """
        Converts tokens to ids (added tokens first, then SentencePiece pieces).

        Args:
            tokens (`list[str]`):
                Tokens from [`~SentencePieceLlamaEncoder.tokenize`].

        Returns:
            `list[int]`: The ids.
        """
        return [self._added[t][0] if t in self._added else self.sp_model.piece_to_id(t) for t in tokens]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """
        Encodes a text as the slow tokenizer's `tokenizer(text).input_ids`.

        Args:
            text (`str`):
                The text.
            add_special_tokens (`bool`, *optional*, defaults to `True`):
                Whether to add the BOS (and EOS, if configured) ids.

        Returns:
            `list[int]`: The ids.
        """
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids


def tokenize_prompt_with_images(
    tokenizer: Any,
    text: str,
    image_token_id: int,
    image_token: str = IMAGE_TOKEN,
    add_special_tokens: bool = True,
) -> list[int]:
    """
    Tokenises a prompt with `<image>` placeholders as the original `tokenizer_image_token`.

    The text is split at every placeholder and each chunk is encoded on its own (each with its BOS). If the first
    chunk starts with the BOS id, that one BOS is kept and the first token of every chunk after it is dropped; the
    chunks are joined by one `image_token_id` each (the original used -200).

    Args:
        tokenizer:
            What encodes each chunk: an object with `encode(text, add_special_tokens=...) -> list[int]` and
            `bos_token_id`, e.g. [`SliMEProcessor.prompt_encoder`] ([`SentencePieceLlamaEncoder`] for SentencePiece
            tokenizers, exact; a transformers tokenizer for byte-level BPE ones).
        text (`str`):
            The prompt.
        image_token_id (`int`):
            The id written at each placeholder.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The placeholder string.
        add_special_tokens (`bool`, *optional*, defaults to `True`):
            Whether chunks are encoded with their special tokens (the original always did).

    Returns:
        `list[int]`: The prompt ids, one `image_token_id` per placeholder.
    """
    chunks = [tokenizer.encode(chunk, add_special_tokens=add_special_tokens) for chunk in text.split(image_token)]
    bos_token_id = getattr(tokenizer, "bos_token_id", None)
    input_ids = []
    offset = 0
    if chunks and chunks[0] and bos_token_id is not None and chunks[0][0] == bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i > 0:
            input_ids.append(image_token_id)
        input_ids.extend(chunk[offset:])
    return input_ids


def is_tiktoken_file(data: bytes) -> bool:
    """Whether a file's bytes are a tiktoken vocabulary (Llama-3's `tokenizer.model`): lines `<base64 token> <rank>`."""
    import base64

    lines = data.splitlines()[:100]
    try:
        for line in lines:
            token, rank = line.split()
            base64.b64decode(token, validate=True)
            int(rank)
    except ValueError:  # also binascii.Error
        return False
    return bool(lines)


def load_sentencepiece_proto(path: str | None) -> bytes | None:
    """The file's bytes if it is a SentencePiece model; None if there is no file or it is Llama-3's tiktoken
    `tokenizer.model`. Anything else (corrupt, truncated, empty) is a `ValueError` naming the file: transformers would
    otherwise build a wrong tokenizer from it, or ask for tiktoken."""
    if not path or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    try:
        import sentencepiece as spm
    except ImportError:
        return None
    try:
        spm.SentencePieceProcessor().LoadFromSerializedProto(data)
    except Exception:
        if is_tiktoken_file(data):
            return None
        content = "empty" if not data else f"{len(data)} bytes that do not parse"
        raise ValueError(
            f"{path} is not a valid SentencePiece model ({content}): the file is corrupt or truncated; restore it "
            "from the original checkpoint"
        ) from None
    return data


def is_sentencepiece_style(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        return "Metaspace" in backend.to_str() or SPIECE_UNDERLINE in json.dumps(
            json.loads(backend.to_str()).get("normalizer")
        )
    except Exception:
        return False


__all__ = [
    "SentencePieceLlamaEncoder",
    "is_sentencepiece_style",
    "load_sentencepiece_proto",
    "tokenize_prompt_with_images",
]
