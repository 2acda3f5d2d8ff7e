"""Hub model cards (`README.md`) for SliME repos: converted releases, stage checkpoints and fine-tunes."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any


PAPER_ARXIV_ID = "2406.08487"
PAPER_TITLE = "Beyond LLaVA-HD: Diving into High-Resolution Large Multimodal Models"
CODE_URL = "https://github.com/yfzhang114/SliME"
DEFAULT_DATASETS = ("yifanzhang114/SMR", "liuhaotian/LLaVA-Pretrain", "Lin-Chen/ShareGPT4V")
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
RESEARCH_LICENSE_NAME = "slime-research-only"
# Where each licence's text is (the `license_link` metadata). The research-only terms of the SliME checkpoints and data
# are stated in the authors' repository.
LICENSE_LINKS = {
    "llama3": "https://www.llama.com/llama3/license/",
    "llama2": "https://www.llama.com/llama2/license/",
    "apache-2.0": "https://www.apache.org/licenses/LICENSE-2.0",
    "cc-by-nc-4.0": "https://creativecommons.org/licenses/by-nc/4.0/",
    "mit": "https://opensource.org/licenses/MIT",
    RESEARCH_LICENSE_NAME: CODE_URL,
}
LICENSE_TITLES = {"llama3": "Meta Llama 3 Community License", "llama2": "Llama 2 Community License"}
RESULT_COLUMNS = ("TextVQA", "GQA", "VQAv2", "MMB", "MMB-CN", "MMMU-val", "LLaVA-W", "MME-P", "MME-C", "MM-Vet")

CITATION = """@misc{zhang2024llavahd,
      title={Beyond LLaVA-HD: Diving into High-Resolution Large Multimodal Models},
      author={Yi-Fan Zhang and Qingsong Wen and Chaoyou Fu and Xue Wang and Zhang Zhang and Liang Wang and Rong Jin},
      year={2024},
      eprint={2406.08487},
      archivePrefix={arXiv},
      primaryClass={cs.CV}
}"""


@dataclass(frozen=True)
class SliMERelease:
    """One released SliME checkpoint (see the authors' Hub collection "SliME").

    Args:
        repo_id (`str`): the authors' Hub repo.
        name (`str`): the paper's name for the model (e.g. `"SliME-7B"`).
        llm (`str`): the language model, as the paper names it.
        base_model (`str`): the Hub id of that language model.
        license (`str`): Hub licence id of the base model.
        chat_template (`str`): the conversation template of the release.
        results (`dict[str, str]`, *optional*): the paper's benchmark row, as printed (`None`: no published numbers).
        lora (`bool`): whether the release is a LoRA fine-tune.
        text_shape (`tuple[int, int, int]`, *optional*): `(hidden_size, num_hidden_layers, vocab_size)` of its LLM.
    """

    repo_id: str
    name: str
    llm: str
    base_model: str
    license: str
    chat_template: str
    results: dict[str, str] | None = None
    lora: bool = False
    text_shape: tuple[int, int, int] | None = None


def _row(values: str) -> dict[str, str]:
    # Kept as the paper prints them (e.g. "37.20").
    return dict(zip(RESULT_COLUMNS, values.split()))


RELEASES: dict[str, SliMERelease] = {
    release.repo_id: release
    for release in (
        SliMERelease(
            "yifanzhang114/SliME-vicuna-7B",
            "SliME-7B",
            "Vicuna-7B",
            "lmsys/vicuna-7b-v1.5",
            "llama2",
            "vicuna_v1",
            _row("64.39 63.13 80.32 69.32 61.85 37.20 76.10 1544 383 35.40"),
            text_shape=(4096, 32, 32000),
        ),
        SliMERelease(
            "yifanzhang114/SliME-Llama3-8B",
            "SliME-8B",
            "Llama3-8B",
            "meta-llama/Meta-Llama-3-8B-Instruct",
            "llama3",
            "llama3",
            _row("64.76 63.94 80.69 75.00 71.80 41.20 73.90 1578 337 37.40"),
            text_shape=(4096, 32, 128256),
        ),
        SliMERelease(
            "yifanzhang114/SliME-vicuna-13B",
            "SliME-13B",
            "Vicuna-13B",
            "lmsys/vicuna-13b-v1.5",
            "llama2",
            "vicuna_v1",
            _row("66.11 63.60 80.43 71.13 65.20 38.00 73.10 1606 293 41.20"),
            text_shape=(5120, 40, 32000),
        ),
        SliMERelease(
            "yifanzhang114/SliME-llama3-70B",
            "SliME-70B",
            "Llama3-70B",
            "meta-llama/Meta-Llama-3-70B-Instruct",
            "llama3",
            "llama3",
            None,
            lora=True,
            text_shape=(8192, 80, 128256),
        ),
    )
}


def find_release(name: str | None) -> SliMERelease | None:
    """The release whose repo id or repo name (any case) is `name`, else `None`."""
    if not name:
        return None
    key = name.strip().rstrip("/").lower()
    for release in RELEASES.values():
        if key in (release.repo_id.lower(), release.repo_id.split("/")[1].lower()):
            return release
    return None


def match_release(hidden_size: int, num_hidden_layers: int, vocab_size: int) -> SliMERelease | None:
    """The release whose language model has this shape (the releases differ in these three numbers), else `None`."""
    shape = (hidden_size, num_hidden_layers, vocab_size)
    return next((release for release in RELEASES.values() if release.text_shape == shape), None)


def license_for(base_model: str | list[str] | None) -> str:
    """Hub licence id for a model built on `base_model`: `llama3` / `llama2` where the base model (a SliME release or
    a language model) has that licence, else `other` (the research-only SliME terms, named `slime-research-only`)."""
    models = list(base_model) if isinstance(base_model, (list, tuple)) else [base_model or ""]
    releases = [find_release(name) for name in models]
    if models and all(releases):
        return releases[0].license if len({r.license for r in releases}) == 1 else "other"
    names = " ".join(models).lower()
    if "llama-3" in names or "llama3" in names:
        return "llama3"
    if "vicuna" in names or "llama-2" in names or "llama2" in names:
        return "llama2"
    return "other"


def license_link_for(license: str | None, license_name: str | None = None) -> str | None:
    """The URL of a licence's text (`license_link` metadata): the licence id's (`llama3`, `llama2`, `apache-2.0`,
    ...), or for `other` the named licence's (the research-only SliME terms: the authors' repository); else `None`."""
    key = license_name if license == "other" else license
    return LICENSE_LINKS.get((key or "").lower())


_PLAIN_YAML = re.compile(r"^[A-Za-z][A-Za-z0-9_.:/+-]*$")


def _yaml_value(value: Any) -> str:
    # Plain ids stay unquoted; anything YAML could read otherwise (numbers, booleans, punctuation) is a JSON string.
    reserved = ("true", "false", "null", "yes", "no", "on", "off")
    if isinstance(value, str) and _PLAIN_YAML.match(value) and value.lower() not in reserved:
        return value
    return json.dumps(value, ensure_ascii=False)


def _yaml(metadata: dict[str, Any]) -> str:
    lines = []
    for key, value in metadata.items():
        if value is None or value == [] or value == ():
            continue
        if isinstance(value, (list, tuple)):
            lines.append(f"{key}:")
            lines.extend(f"- {_yaml_value(item)}" for item in value)
        else:
            lines.append(f"{key}: {_yaml_value(value)}")
    return "---\n" + "\n".join(lines) + "\n---\n"


def _results_table(release: SliMERelease | None, results: dict[str, Any] | None) -> str:
    if results is None and release is not None:
        results = release.results
    if results is None:
        if release is not None:
            return f"No benchmark results were published for {release.name}.\n"
        return ""
    name = release.name if release is not None else "this model"
    llm = f" ({release.llm})" if release is not None else ""
    columns = list(results)
    header = "| model | " + " | ".join(columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    row = f"| {name}{llm} | " + " | ".join(str(results[c]) for c in columns) + " |"
    if release is not None and results == release.results:
        return f"From the paper's main results (arXiv {PAPER_ARXIV_ID}):\n\n{header}\n{rule}\n{row}\n"
    return f"{header}\n{rule}\n{row}\n"


def make_model_card(
    base_model: str | list[str] | None = None,
    base_model_relation: str | None = "finetune",
    model_name: str | None = None,
    repo_id: str | None = None,
    release: str | SliMERelease | None = None,
    source: str | None = None,
    license: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
    datasets: list[str] | tuple[str, ...] | None = DEFAULT_DATASETS,
    tags: list[str] | tuple[str, ...] = (),
    language: list[str] | tuple[str, ...] = ("en",),
    chat_template: str | None = None,
    router_top_p: float = 0.95,
    results: dict[str, Any] | None = None,
    training: str | None = None,
    stage_checkpoint: bool = False,
    lora_checkpoint: bool = False,
    **metadata: Any,
) -> str:
    """
    Writes a Hub model card (`README.md` text) for a SliME model: YAML metadata, what SliME is, the slicing and the
    token budget, usage with the Auto classes and the pipeline, tips, the paper's results row of the release, the
    research-only licence note and the citation.

    Args:
        base_model (`str` or `list[str]`, *optional*):
            Hub id(s) of the model this one is built on (e.g. `"lmsys/vicuna-7b-v1.5"`, or a SliME repo for a
            fine-tune of a release). Defaults to the repo of `release` (the card of a converted release names the
            release it came from; the release's language model is named in the text).
        base_model_relation (`str`, *optional*, defaults to `"finetune"`):
            One of `"adapter"`, `"merge"`, `"quantized"`, `"finetune"` (Hub metadata).
        model_name (`str`, *optional*):
            Title of the card. Defaults to the last part of `repo_id`, then the release name, then `"SliME"`.
        repo_id (`str`, *optional*):
            The repo the card belongs to, used in the code snippets (a placeholder otherwise).
        release (`str` or [`SliMERelease`], *optional*):
            The authors' release this model is (or was converted from): a key of [`RELEASES`]. Picks the results
            row, the base model (the release's repo), the licence and the chat template.
        source (`str`, *optional*):
            What the repo was converted from (a Hub id or a description); adds a provenance line.
        license (`str`, *optional*):
            Hub licence id. Defaults to the base model's (`llama2`, `llama3`), else `"other"`.
        license_name (`str`, *optional*):
            Name of an `"other"` licence (defaults to `"slime-research-only"`).
        license_link (`str`, *optional*):
            URL (or repo file) of the licence text. Defaults to the licence's own (Llama 3 / Llama 2 community
            licences, Apache-2.0, ...; the authors' repository for the research-only terms), see [`LICENSE_LINKS`].
        datasets (`list[str]`, *optional*):
            Hub ids of the training data (defaults to SMR, LLaVA-Pretrain and ShareGPT4V).
        tags (`list[str]`, *optional*):
            Extra tags (`custom_code`, `slime`, `arxiv:2406.08487`, ... are always present).
        language (`list[str]`, *optional*, defaults to `("en",)`):
            Languages of the model.
        chat_template (`str`, *optional*):
            Name of the default chat template (`vicuna_v1`, `llama3`, `plain`), shown in the card.
        router_top_p (`float`, *optional*, defaults to 0.95):
            The config's router top-p, shown in the token-budget section.
        results (`dict[str, float | str]`, *optional*):
            Benchmark results to show instead of the release's row.
        training (`str`, *optional*):
            A Markdown paragraph on how this model was trained (stage, data, hyper-parameters).
        stage_checkpoint (`bool`, *optional*, defaults to `False`):
            The repo holds adapter weights of a training stage only (no language model): the usage section then
            explains how to continue training instead of how to generate.
        lora_checkpoint (`bool`, *optional*, defaults to `False`):
            The repo holds a LoRA of the language model and the adapter weights (a LoRA training run's output): the
            usage section explains how to merge it into a self-contained repo.
        metadata:
            Further YAML metadata fields (e.g. `pipeline_tag`, `model-index`).

    Returns:
        `str`: the card, YAML front matter included.
    """
    if base_model_relation is not None and base_model_relation not in BASE_MODEL_RELATIONS:
        raise ValueError(f"base_model_relation must be one of {BASE_MODEL_RELATIONS}, got {base_model_relation!r}")
    if isinstance(release, str):
        found = find_release(release)
        if found is None:
            raise ValueError(f"unknown SliME release {release!r}; known: {sorted(RELEASES)}")
        release = found
    if base_model is None and release is not None:
        base_model = release.repo_id
    license, license_name, license_link = _licence_fields(base_model, release, license, license_name, license_link)
    if chat_template is None and release is not None:
        chat_template = release.chat_template
    if model_name is None:
        model_name = repo_id.split("/")[-1] if repo_id else (release.repo_id.split("/")[1] if release else "SliME")
    repo = repo_id or "your-name/" + model_name

    all_tags = ["slime", "llava", "multimodal", "image-text-to-text", "custom_code", f"arxiv:{PAPER_ARXIV_ID}"]
    all_tags += [tag for tag in tags if tag not in all_tags]
    yaml_fields: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "license": license,
        "license_name": license_name if license == "other" else None,
        "license_link": license_link,
        "base_model": [base_model] if isinstance(base_model, str) else base_model,
        "base_model_relation": base_model_relation if base_model is not None else None,
        "datasets": list(datasets) if datasets else None,
        "language": list(language) if language else None,
        "tags": all_tags,
    }
    yaml_fields.update(metadata)

    parts = [_yaml(yaml_fields), f"# {model_name}\n", *_provenance(release, source, stage_checkpoint)]
    parts.append(_ABOUT.format(router_top_p=router_top_p))
    if training:
        parts.append("## Training\n\n" + training.strip() + "\n")
    parts.append(_usage(repo, chat_template, stage_checkpoint, lora_checkpoint))
    results_text = _results_table(release, results)
    if results_text:
        parts.append("## Results\n\n" + results_text)
    parts.append(_LICENCE)
    parts.append(f"## Citation\n\n```bibtex\n{CITATION}\n```\n")
    return "\n".join(parts)


def _licence_fields(
    base_model: str | list[str] | None,
    release: SliMERelease | None,
    license: str | None,
    license_name: str | None,
    license_link: str | None,
) -> tuple[str, str | None, str | None]:
    """The card's licence id, name and link: the release's own licence for a release, else the base model's."""
    if license is None:
        names = base_model if isinstance(base_model, (list, tuple)) else [base_model]
        is_release = release is not None and all(name in (release.repo_id, release.base_model) for name in names)
        license = release.license if is_release else license_for(base_model)
    if license == "other" and license_name is None:
        license_name = RESEARCH_LICENSE_NAME
    if license_link is None:
        license_link = license_link_for(license, license_name)
    return license, license_name, license_link


def _provenance(release: SliMERelease | None, source: str | None, stage_checkpoint: bool) -> list[str]:
    """The card's opening lines: which release the model is, and what it was converted from."""
    parts = []
    if release is not None:
        licence = LICENSE_TITLES.get(release.license, release.license)
        parts.append(
            f"{release.name} ({release.llm}) from the authors' release "
            f"[`{release.repo_id}`](https://huggingface.co/{release.repo_id}), as a self-contained transformers repo. "
            f"Its language model is [`{release.base_model}`](https://huggingface.co/{release.base_model}) "
            f"([{licence}]({LICENSE_LINKS.get(release.license, CODE_URL)})).\n"
        )
    if source:
        detail = (
            "the adapter weights, renamed to the package's names, with the full model config"
            if stage_checkpoint
            else "the weights renamed to the package's names, the CLIP tower included, with the config, code, "
            "processor, tokenizer and generation config"
        )
        parts.append(f"Converted from `{source}` with slime-hf (`conversion/convert_slime_to_hf.py`): {detail}.\n")
    return parts


def _usage(repo: str, chat_template: str | None, stage_checkpoint: bool, lora_checkpoint: bool) -> str:
    """The usage section: generation for a model, continued training for a stage checkpoint, merging for a LoRA."""
    if stage_checkpoint:
        return _STAGE_USAGE.format(repo=repo)
    if lora_checkpoint:
        return _LORA_USAGE.format(repo=repo)
    template_note = f" The default chat template is `{chat_template}`." if chat_template else ""
    return _USAGE.format(repo=repo, template_note=template_note)


def save_model_card(folder: str | os.PathLike, base_model: str | list[str] | None = None, **kwargs: Any) -> str:
    """
    Writes [`make_model_card`]'s card as `README.md` in `folder` (created if missing).

    Args:
        folder (`str` or `os.PathLike`): the repo folder.
        base_model (`str` or `list[str]`, *optional*): see [`make_model_card`].
        kwargs: any argument of [`make_model_card`].

    Returns:
        `str`: the path of the written `README.md`.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "README.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(make_model_card(base_model=base_model, **kwargs))
    return path


_ABOUT = (
    """## What SliME is

SliME ("{title}", [arXiv {arxiv}](https://arxiv.org/abs/{arxiv}), [code]({code})) is a high-resolution
multimodal LLM. Each image is **sliced** into a global view (the whole image resized to 336x336) plus a grid of
2 to 7 local 336x336 crops chosen from the image's area and aspect ratio. A CLIP ViT-L/14-336 encodes every view
into 576 patch tokens; then

- the **global view** goes through a gated mixture of an MLP expert and a 576-query attention expert (576 tokens);
- every **local crop** is compressed to 144 tokens by a resampler;
- a **text-guided router** scores each local token by its cosine similarity with the prompt and keeps the top-p
  (`router_top_p`, {router_top_p} in this config) of a softmax over those scores.

The language model sees `[global 576][separator][kept local tokens]` in place of each `<image>`.

### Token budget

Per image: `576 + 1 + kept` tokens out of `576 + 1 + 144 x local crops` (for a 3x2 grid, at most
`576 + 1 + 864 = 1441`). The forward output reports it per image (`outputs.image_token_budget`), and the router's
top-p can be set per call: `model(**inputs, router_top_p=0.7)`, `model.generate(**inputs, router_top_p=0.7)` (a
lower value keeps fewer local tokens: faster, less detail).
""".replace("{title}", PAPER_TITLE)
    .replace("{arxiv}", PAPER_ARXIV_ID)
    .replace("{code}", CODE_URL)
)

_USAGE = """## Usage

Loads with the Auto classes and `trust_remote_code=True` (the model code travels with the weights).{template_note}

```python
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

repo = "{repo}"
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
model = AutoModel.from_pretrained(repo, trust_remote_code=True, dtype=torch.bfloat16, device_map="auto").eval()

image = Image.open("photo.jpg")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is shown here?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image], text=prompt, return_tensors="pt").to(model.device)
out = model.generate(**inputs, do_sample=False, max_new_tokens=128)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```

`generate` returns the prompt ids followed by the new ids.

### Pipeline

```python
from transformers import pipeline

pipe = pipeline("image-text-to-text", model="{repo}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "url": "photo.jpg"}},
                                         {{"type": "text", "text": "What is shown here?"}}]}}]
print(pipe(text=messages, max_new_tokens=128, return_full_text=False))
```

### Tips

- **Greedy answers:** the release's `generation_config.json` samples; pass `do_sample=False` for deterministic
  output.
- **Padding:** batches are left-padded for generation (the processor's default); give images in placeholder
  order, one list per prompt (a prompt may hold no image or several).
- **dtype and devices:** `dtype=torch.bfloat16` (or `torch.float16`) on GPUs, `device_map="auto"` to spread a large
  model over several GPUs; the resamplers' position tables stay float16 whatever the dtype, as in the original.
- **Token budget:** `router_top_p` trades local detail for speed (see above); never pass a bare `top_p` for
  that, which is nucleus sampling in `generate`.
- **Exact preprocessing:** the default (PIL) image processor reproduces the original slicing bit for bit; the
  torch one (`backend="torch"`) is faster but not bit-exact, and the kept tokens depend on the pixels.
"""

_STAGE_USAGE = """## Usage

This repo holds the **adapter weights of a SliME training stage** (`slime_adapters.safetensors`: the MLP expert,
the global adapter and the local compressor, in the package's names) and the full model config; it holds no
language model or vision tower weights. It is the starting point of the next training stage:

```bash
python -m slime_hf.train --stage 3 --model_name_or_path BASE_LLM --vision_tower openai/clip-vit-large-patch14-336 \\
    --pretrained_adapters {repo} ...
```

```python
from slime_hf.checkpoints import load_adapter_weights

adapters = load_adapter_weights("path/to/this/repo")  # dict of tensors in package names
```
"""

_LORA_USAGE = """## Usage

This repo holds a **LoRA of the language model** (`adapter_model.safetensors`, `adapter_config.json`) and the SliME
adapter weights trained with it (`non_lora_trainables.safetensors`, package names), with the full model config. Merge
it into a self-contained repo (loads with the Auto classes and `trust_remote_code=True`, as the releases):

```bash
python conversion/convert_slime_to_hf.py --input {repo} --base BASE_MODEL --output merged-repo
```
"""

_LICENCE = """## Licence

Research use only. The SliME checkpoints and data follow the licence terms of LLaVA, LLaMA (Llama 2 / Llama 3
community licences), Vicuna and GPT-4; the SMR dataset is CC BY-NC 4.0, and models trained on it must not be used
outside research. The authors' code and slime-hf are Apache-2.0.
"""


__all__ = [
    "RELEASES",
    "SliMERelease",
    "find_release",
    "license_for",
    "license_link_for",
    "make_model_card",
    "match_release",
    "save_model_card",
]
