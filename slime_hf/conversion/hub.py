"""Inputs from the Hub (only the files a conversion reads are downloaded) and the upload of a verified output."""

from __future__ import annotations

import logging
import os
import re

from ..checkpoints import (
    ADAPTER_WEIGHTS_NAME,
    LORA_CONFIG_NAME,
    LORA_WEIGHTS_NAMES,
    NON_LORA_TRAINABLES_FILES,
    ORIGINAL_ADAPTER_FILES,
)
from .errors import ConversionError


logger = logging.getLogger("slime_hf.conversion")

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


PROCESSOR_FILES = ("processor_config.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json")


HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")


def _weight_file_names(files: list[str]) -> list[str]:
    safetensors = [f for f in files if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", f)]
    if safetensors:
        return safetensors
    return [f for f in files if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?", f)]


def needed_files(files: list[str], role: str) -> list[str]:
    """
    The files of a repo a conversion reads, by role: `"input"` (any SliME layout), `"base"` (a language model or
    SliME checkpoint) or `"vision"` (a CLIP checkpoint). Optimizer states, DeepSpeed folders, duplicate weight
    formats and other checkpoints are left out.

    Args:
        files (`list[str]`): the repo's file names (relative paths).
        role (`str`): `"input"`, `"base"` or `"vision"`.
    """
    root = [f for f in files if "/" not in f]
    wanted = ["config.json"] + _weight_file_names(root)
    if role in ("input", "base"):
        wanted += ["generation_config.json", *TOKENIZER_FILES, *PROCESSOR_FILES]
    if role == "input":
        adapter_model = [f for f in LORA_WEIGHTS_NAMES if f in root][:1]
        wanted += [
            LORA_CONFIG_NAME,
            *adapter_model,
            *NON_LORA_TRAINABLES_FILES,
            *ORIGINAL_ADAPTER_FILES,
            ADAPTER_WEIGHTS_NAME,
        ]
    return [f for f in dict.fromkeys(wanted) if f in root]


def resolve_path(reference: str, role: str = "input") -> str:
    """
    A local folder (or file) for `reference`: the path itself when it exists, else a Hub repo id (optionally followed
    by a subfolder, `owner/name/sub/folder`) downloaded with `huggingface_hub.snapshot_download`, needed files only.

    Raises:
        `ConversionError`: neither an existing path nor a repo id.
    """
    if os.path.exists(reference):
        return os.path.abspath(reference)
    if not HUB_REPO_ID.match(reference):
        raise ConversionError(f"{reference!r} is neither an existing path nor a Hub repo id")
    import huggingface_hub

    owner, name, *sub = reference.split("/")
    repo_id, subfolder = f"{owner}/{name}", "/".join(sub)
    prefix = subfolder + "/" if subfolder else ""
    files = [f[len(prefix) :] for f in huggingface_hub.HfApi().list_repo_files(repo_id) if f.startswith(prefix)]
    wanted = needed_files(files, role)
    if not wanted:
        raise ConversionError(
            f"the Hub repo {reference} holds none of the files a SliME conversion reads: {files[:20]}"
        )
    logger.info(f"downloading {len(wanted)} files of {reference}: {wanted}")
    local = huggingface_hub.snapshot_download(repo_id, allow_patterns=[prefix + f for f in wanted])
    return os.path.join(local, subfolder) if subfolder else local


def hub_like(name: str | None) -> str | None:
    """`name` where it reads as a Hub repo id (`owner/name`), for the model card's metadata; else `None`."""
    if name and HUB_REPO_ID.match(name) and not name.startswith((".", "/")) and name.count("/") == 1:
        return name
    return None


def push_to_hub(folder: str, repo_id: str, private: bool) -> None:
    """Uploads the verified folder to a (new or existing) Hub model repo."""
    import huggingface_hub

    api = huggingface_hub.HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id, repo_type="model", folder_path=folder, commit_message="Upload SliME converted with slime-hf"
    )
    logger.info(f"uploaded {folder} to https://huggingface.co/{repo_id}")
