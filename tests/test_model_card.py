"""slime_hf.model_card: Hub model cards for converted releases, stage checkpoints and training runs."""

from __future__ import annotations

import re

import pytest
import yaml
from huggingface_hub import ModelCard

from conftest import FIXTURES, PROJECT_ROOT
from slime_hf.model_card import (
    CODE_URL,
    LICENSE_LINKS,
    RELEASES,
    RESULT_COLUMNS,
    find_release,
    license_for,
    license_link_for,
    make_model_card,
    match_release,
    save_model_card,
)


SHARED_RELEASES = PROJECT_ROOT.parent / "shared" / "docs" / "RELEASES.md"


def _metadata(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, flags=re.DOTALL)
    assert match, card[:200]
    return yaml.safe_load(match[1])


def test_a_training_run_needs_only_the_folder_and_the_base_model(tmp_path):
    path = save_model_card(tmp_path / "run", base_model="yifanzhang114/SliME-vicuna-7B", base_model_relation="finetune")
    card = (tmp_path / "run" / "README.md").read_text()
    assert path == str(tmp_path / "run" / "README.md")
    metadata = _metadata(card)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-text-to-text"
    assert metadata["base_model"] == ["yifanzhang114/SliME-vicuna-7B"]
    assert metadata["base_model_relation"] == "finetune"
    assert {"custom_code", "slime", "arxiv:2406.08487"} <= set(metadata["tags"])
    assert "yifanzhang114/SMR" in metadata["datasets"]
    assert metadata["license"] == "llama2"  # the Vicuna release's LLM: Llama 2 community licence
    # The Hub's own parser accepts the metadata.
    assert ModelCard.load(path).data.to_dict()["pipeline_tag"] == "image-text-to-text"
    assert save_model_card(tmp_path / "bare") and "# SliME" in (tmp_path / "bare" / "README.md").read_text()
    other = _metadata(make_model_card(base_model="someone/custom-llm"))
    assert other["license"] == "other" and other["license_name"] == "slime-research-only"


def test_card_sections():
    card = make_model_card(
        release="yifanzhang114/SliME-Llama3-8B",
        repo_id="me/SliME-Llama3-8B-hf",
        source="yifanzhang114/SliME-Llama3-8B",
        router_top_p=0.95,
    )
    metadata = _metadata(card)
    # A converted release's base model is the release it came from; its language model is named in the text.
    assert metadata["base_model"] == ["yifanzhang114/SliME-Llama3-8B"] and metadata["license"] == "llama3"
    assert "Its language model is [`meta-llama/Meta-Llama-3-8B-Instruct`]" in card
    for heading in (
        "## What SliME is",
        "### Token budget",
        "## Usage",
        "### Pipeline",
        "### Tips",
        "## Results",
        "## Licence",
        "## Citation",
    ):
        assert heading in card, heading
    # What SliME is: slicing and token budget.
    assert "global view" in card and "336x336" in card and "576 + 1 + kept" in card and "144 x local crops" in card
    # Usage: AutoProcessor + apply_chat_template + greedy generate, on the card's repo.
    assert "AutoProcessor.from_pretrained(repo, trust_remote_code=True)" in card
    assert "processor.apply_chat_template(messages, add_generation_prompt=True)" in card
    assert "generate(**inputs, do_sample=False" in card and 'repo = "me/SliME-Llama3-8B-hf"' in card
    assert 'pipeline("image-text-to-text", model="me/SliME-Llama3-8B-hf", trust_remote_code=True)' in card
    for tip in ("left-padded", "dtype=torch.bfloat16", 'device_map="auto"', "router_top_p"):
        assert tip in card, tip
    assert "The default chat template is `llama3`." in card
    assert "Research use only" in card and "CC BY-NC 4.0" in card
    assert "@misc{zhang2024llavahd," in card and "eprint={2406.08487}" in card
    assert "Converted from `yifanzhang114/SliME-Llama3-8B`" in card


def test_results_rows_are_the_papers():
    card = make_model_card(release="SliME-vicuna-13B")
    assert (
        "| SliME-13B (Vicuna-13B) | 66.11 | 63.60 | 80.43 | 71.13 | 65.20 | 38.00 | 73.10 | 1606 | 293 | 41.20 |"
        in card
    )
    assert "| model | " + " | ".join(RESULT_COLUMNS) + " |" in card
    assert "No benchmark results were published for SliME-70B" in make_model_card(release="SliME-llama3-70B")


@pytest.mark.skipif(not SHARED_RELEASES.is_file(), reason="the shared docs are not beside this checkout")
def test_results_match_releases_md():
    text = SHARED_RELEASES.read_text()
    rows = re.findall(r"^\| (SliME-\d+B) \(([^)]+)\) \| (.+) \|$", text, flags=re.MULTILINE)
    assert len(rows) == 3
    for name, llm, values in rows:
        release = next(r for r in RELEASES.values() if r.name == name)
        assert release.llm == llm
        assert list(release.results.values()) == [v.strip() for v in values.split("|")]
    for release in RELEASES.values():
        assert f"`{release.repo_id}`" in text and f"`{release.base_model}`" in text


def test_release_lookup_and_licences():
    assert find_release("yifanzhang114/SliME-vicuna-7B").name == "SliME-7B"
    assert find_release("sliME-LLAMA3-8b").name == "SliME-8B"
    assert find_release("someone/else") is None
    assert match_release(5120, 40, 32000).name == "SliME-13B"
    assert match_release(8192, 80, 128256).lora
    assert match_release(64, 2, 1000) is None
    assert license_for("lmsys/vicuna-7b-v1.5") == "llama2"
    assert license_for(["meta-llama/Meta-Llama-3-70B-Instruct"]) == "llama3"
    assert license_for(None) == "other"


def test_stage_checkpoint_card_and_bad_arguments():
    card = make_model_card(
        base_model="lmsys/vicuna-7b-v1.5",
        base_model_relation="adapter",
        stage_checkpoint=True,
        training="Stage 2: local compressor on LLaVA-558k captions.",
    )
    assert _metadata(card)["base_model_relation"] == "adapter"
    assert "slime_adapters.safetensors" in card and "--pretrained_adapters" in card
    assert "## Training\n\nStage 2: local compressor" in card
    assert "AutoModel.from_pretrained" not in card
    with pytest.raises(ValueError, match="base_model_relation"):
        make_model_card(base_model="x/y", base_model_relation="derived")
    with pytest.raises(ValueError, match="unknown SliME release"):
        make_model_card(release="SliME-1B")
    extra = _metadata(make_model_card(base_model="x/y", tags=["lora", "slime"], model_index_note="kept"))
    assert extra["tags"].count("slime") == 1 and "lora" in extra["tags"] and extra["model_index_note"] == "kept"


def test_cards_link_their_licence():
    """`license_link` in every card: the base model's community licence for the releases (Llama 3 for the Llama-3
    releases, Llama 2 for the Vicuna ones), the authors' research-only terms otherwise, any licence id's own link."""
    expected = {"llama3": "https://www.llama.com/llama3/license/", "llama2": "https://www.llama.com/llama2/license/"}
    for release in RELEASES.values():
        for card in (
            make_model_card(release=release),
            make_model_card(base_model=release.repo_id),
            make_model_card(base_model=release.base_model),
        ):
            metadata = _metadata(card)
            assert metadata["license"] == release.license
            assert metadata["license_link"] == expected[release.license], release.repo_id
    assert {r.license for r in RELEASES.values()} == {"llama2", "llama3"}
    other = _metadata(make_model_card(base_model="someone/custom-llm"))
    assert (other["license"], other["license_name"], other["license_link"]) == (
        "other",
        "slime-research-only",
        CODE_URL,
    )
    apache = _metadata(make_model_card(base_model="someone/custom-llm", license="apache-2.0"))
    assert apache["license_link"] == "https://www.apache.org/licenses/LICENSE-2.0" and "license_name" not in apache
    own = _metadata(make_model_card(base_model="x/y", license="other", license_name="mine", license_link="LICENSE"))
    assert (own["license_name"], own["license_link"]) == ("mine", "LICENSE")
    assert license_link_for("unknown-licence") is None and LICENSE_LINKS["llama3"] == expected["llama3"]
    assert "license_link" not in _metadata(make_model_card(base_model="x/y", license="unknown-licence"))


def test_a_converted_release_names_the_release_it_came_from(tmp_path):
    for release in RELEASES.values():
        path = save_model_card(
            tmp_path / release.name,
            release=release,
            source=release.repo_id,
            base_model_relation=None,
            repo_id=f"me/{release.repo_id.split('/')[1]}-hf",
        )
        card = (tmp_path / release.name / "README.md").read_text()
        metadata = _metadata(card)
        assert metadata["base_model"] == [release.repo_id] and "base_model_relation" not in metadata
        assert f"from the authors' release [`{release.repo_id}`](https://huggingface.co/{release.repo_id})" in card
        assert f"Converted from `{release.repo_id}`" in card
        assert ModelCard.load(path).data.to_dict()["license_link"] == metadata["license_link"]


# -------------------------------------------------------------------------------------------------------------
# The training run's card: SliMETrainer writes one at every save
# -------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_model():
    import torch

    from slime_hf import SliMEForConditionalGeneration

    return SliMEForConditionalGeneration.from_pretrained(FIXTURES / "V" / "checkpoint", dtype=torch.float32)


def _trainer(model, tmp_path, stage: str):
    from slime_hf.training import SliMETrainer, SliMETrainingArguments

    args = SliMETrainingArguments(
        output_dir=str(tmp_path / "run"), stage=stage, learning_rate=2e-5, use_cpu=True, report_to="none"
    )
    return SliMETrainer(
        model=model,
        args=args,
        base_model="yifanzhang114/SliME-vicuna-7B",
        data_path=["data/sft.json", "data/more.json"],
    )


@pytest.mark.parametrize("stage", ["3", "2", "lora"])
def test_a_trainer_save_writes_the_model_card(fixture_model, tmp_path, stage):
    model = fixture_model
    if stage == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    trainer = _trainer(model, tmp_path, "3" if stage == "lora" else stage)
    try:
        folder = tmp_path / "saved"
        trainer.save_model(str(folder))
    finally:
        if stage == "lora":
            model.unload()  # the module-scoped model without the LoRA layers again
    card = (folder / "README.md").read_text()
    metadata = _metadata(card)
    assert metadata["base_model"] == ["yifanzhang114/SliME-vicuna-7B"]
    assert metadata["license"] == "llama2" and metadata["license_link"] == "https://www.llama.com/llama2/license/"
    training = card.split("## Training\n\n", 1)[1]
    assert training.startswith(f"Stage {'3' if stage == 'lora' else stage} of the SliME recipe")
    assert "trained from `yifanzhang114/SliME-vicuna-7B` on `data/sft.json`, `data/more.json`" in training
    if stage == "3":
        assert metadata["base_model_relation"] == "finetune" and "AutoModel.from_pretrained" in card
        assert (folder / "model.safetensors").is_file()
    elif stage == "2":
        assert metadata["base_model_relation"] == "adapter" and "slime_adapters.safetensors" in card
    else:
        assert metadata["base_model_relation"] == "adapter" and metadata["library_name"] == "peft"
        assert "with LoRA" in training and "convert_slime_to_hf.py --input" in card
        assert (folder / "adapter_model.safetensors").is_file()

    # push_to_hub's card is the SliME card too (not the generic Trainer summary), with what the caller adds.
    if stage == "3":
        trainer.create_model_card(model_name="my-slime", dataset_tags="me/my-data", tags="extra")
        pushed = (tmp_path / "run" / "README.md").read_text()
        assert pushed.startswith("---\n") and "# my-slime" in pushed and "## Training" in pushed
        assert _metadata(pushed)["datasets"] == ["me/my-data"] and "extra" in _metadata(pushed)["tags"]


def test_save_pretrained_writes_a_card_and_keeps_an_existing_one(tmp_path):
    import torch

    import golden_utils as gu
    from slime_hf import SliMEForConditionalGeneration

    model = SliMEForConditionalGeneration.from_pretrained(gu.checkpoint_dir("V"), dtype=torch.float32)
    model.save_pretrained(tmp_path / "fresh")
    card = (tmp_path / "fresh" / "README.md").read_text()
    assert card.startswith("---\n") and "license_link:" in card and "# SliME" in card
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "README.md").write_text("my own card\n")
    model.save_pretrained(tmp_path / "kept")
    assert (tmp_path / "kept" / "README.md").read_text() == "my own card\n"
