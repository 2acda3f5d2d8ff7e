"""A corrupt `tokenizer.model` is an error naming the file, in the package's saved layout and in the authors'."""

from __future__ import annotations

import base64
import shutil

import pytest

from conftest import FIXTURES
from slime_hf import SliMEProcessor
from slime_hf.tokenization_slime import load_sentencepiece_proto


CHECKPOINT = FIXTURES / "V" / "checkpoint"
AUTHORS_FILES = ("tokenizer_config.json", "special_tokens_map.json", "config.json")


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "processor"
    SliMEProcessor.from_pretrained(CHECKPOINT).save_pretrained(folder)
    return folder


def _authors_folder(root):
    folder = root / "authors"
    folder.mkdir()
    for name in AUTHORS_FILES:
        shutil.copy(CHECKPOINT / name, folder / name)
    return folder


@pytest.mark.parametrize("layout", ["saved", "authors"])
@pytest.mark.parametrize("content", ["empty", "truncated", "garbage"])
def test_corrupt_tokenizer_model_without_tokenizer_json_is_an_error_naming_it(layout, content, saved_folder, tmp_path):
    """Without tokenizer.json the tokenizer is built from tokenizer.model: an empty one used to load (prompts became
    `[3]`, with a false "not found" warning) and a damaged one asked for tiktoken."""
    if layout == "saved":
        folder = tmp_path / "saved"
        shutil.copytree(saved_folder, folder)
        (folder / "tokenizer.json").unlink()
    else:
        folder = _authors_folder(tmp_path)
    data = (CHECKPOINT / "tokenizer.model").read_bytes()
    (folder / "tokenizer.model").write_bytes(
        {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\0" * 1000}[content]
    )
    with pytest.raises(ValueError, match=r"tokenizer\.model is not a valid SentencePiece model") as error:
        SliMEProcessor.from_pretrained(folder)
    assert str(folder / "tokenizer.model") in str(error.value) and "tiktoken" not in str(error.value)


def test_a_corrupt_tokenizer_model_beside_tokenizer_json_is_not_ignored(saved_folder, tmp_path):
    folder = tmp_path / "saved"
    shutil.copytree(saved_folder, folder)
    (folder / "tokenizer.model").write_bytes(b"")
    with pytest.raises(ValueError, match="tokenizer.model is not a valid SentencePiece model"):
        SliMEProcessor.from_pretrained(folder)


def test_a_tiktoken_tokenizer_model_is_not_sentencepiece_and_not_an_error(tmp_path):
    """Llama-3 ships a tiktoken vocabulary as tokenizer.model: not SentencePiece, not corrupt."""
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(bytes([i])) + b" %d\n" % i for i in range(256)))
    assert load_sentencepiece_proto(str(path)) is None
    original = CHECKPOINT / "tokenizer.model"
    assert load_sentencepiece_proto(str(original)) == original.read_bytes()
