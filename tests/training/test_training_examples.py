"""The training examples (scripts, DeepSpeed and accelerate configs) and small pieces of the training set-up."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import torch
import yaml
from transformers import HfArgumentParser

from conftest import FIXTURES, PROJECT_ROOT
from slime_hf import SliMEForConditionalGeneration
from slime_hf.training import SliMEDataArguments, SliMEModelArguments, SliMETrainingArguments
from slime_hf.training.build import _whole_tensors, load_adapter_weights_into, lora_target_modules


TRAIN_EXAMPLES = PROJECT_ROOT / "examples" / "train"
STAGE_SCRIPTS = sorted(p.name for p in TRAIN_EXAMPLES.glob("stage*.sh"))


def script_arguments(script: str, **env: str) -> list[str]:
    """What a script passes to `slime_hf.train` (the launcher replaced by `echo`)."""
    environment = dict(os.environ, LAUNCHER="echo", **env)
    result = subprocess.run(
        ["bash", str(TRAIN_EXAMPLES / script), "--max_steps", "1"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    words = result.stdout.split()
    return words[words.index("slime_hf.train") + 1 :]


@pytest.mark.parametrize(
    "script, env",
    [(name, {"FAMILY": family}) for name in STAGE_SCRIPTS for family in ("vicuna", "llama3")]
    + [
        ("stage3_finetune.sh", {"FAMILY": "llama3", "LORA": "1", "DEEPSPEED": "none"}),
        ("finetune_release_lora_1gpu.sh", {"RELEASE": "r", "DATA_JSON": "d.json", "IMAGE_FOLDER": "i"}),
    ],
)
def test_example_scripts_pass_only_known_flags(script, env):
    args = script_arguments(script, **env)
    parser = HfArgumentParser((SliMEModelArguments, SliMEDataArguments, SliMETrainingArguments))
    namespace, unknown = parser.parse_known_args(args)
    assert not unknown, unknown
    assert namespace.max_steps == 1  # extra arguments reach the trainer
    stage = namespace.stage
    if stage in ("1a", "1b", "2"):
        assert namespace.deepspeed.endswith("zero2.json")
        assert namespace.save_steps == 24000
    if script.startswith("stage") and stage != "1a":
        assert namespace.pretrained_adapters
    assert "group_by_modality_length" not in " ".join(args)
    expected_lr = {("vicuna", "1a"): 1e-3, ("llama3", "2"): 5e-4, ("vicuna", "3"): 2e-5, ("llama3", "3"): 1e-5}
    if (env.get("FAMILY"), stage) in expected_lr and not env.get("LORA"):
        assert namespace.learning_rate == expected_lr[(env["FAMILY"], stage)]


def test_deepspeed_and_accelerate_configs():
    zero2 = json.loads((TRAIN_EXAMPLES / "zero2.json").read_text())
    zero3 = json.loads((TRAIN_EXAMPLES / "zero3.json").read_text())
    assert zero2["zero_optimization"]["stage"] == 2 and zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "optimizer" not in zero2 and "optimizer" not in zero3  # the Trainer builds the per-module groups
    for name in ("accelerate_zero2.yaml", "accelerate_zero3.yaml"):
        config = yaml.safe_load((TRAIN_EXAMPLES / name).read_text())
        assert (PROJECT_ROOT / config["deepspeed_config"]["deepspeed_config_file"]).is_file()
    fsdp = yaml.safe_load((TRAIN_EXAMPLES / "accelerate_fsdp.yaml").read_text())["fsdp_config"]
    model = SliMEForConditionalGeneration.from_pretrained(FIXTURES / "V" / "checkpoint")
    classes = {type(m).__name__ for m in model.modules()}
    wrapped = set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))
    assert wrapped <= classes and wrapped <= set(model._no_split_modules)
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_zero3_parts_are_loaded_whole_and_the_config_restored():
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    class FakeZero3Config:
        def is_zero3(self) -> bool:
            return True

    config = FakeZero3Config()
    set_hf_deepspeed_config(config)
    try:
        assert is_deepspeed_zero3_enabled()
        with _whole_tensors(config):
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()


def test_adapter_loading_is_strict_about_names_and_shapes():
    model = SliMEForConditionalGeneration.from_pretrained(FIXTURES / "V" / "checkpoint")
    weight = model.model.projector.linear_1.weight
    with pytest.raises(ValueError, match="does not have"):
        load_adapter_weights_into(model, {"model.projector.linear_9.weight": weight}, "x")
    with pytest.raises(ValueError, match="other shapes"):
        load_adapter_weights_into(model, {"model.projector.linear_1.weight": weight[:3]}, "x")
    load_adapter_weights_into(model, {"model.projector.linear_1.weight": torch.zeros_like(weight)}, "x")
    assert not model.model.projector.linear_1.weight.any()


def test_lora_targets_only_the_language_model():
    model = SliMEForConditionalGeneration.from_pretrained(FIXTURES / "L" / "checkpoint")
    names = [name for name, _ in model.named_modules()]
    matched = [name for name in names if re.fullmatch(lora_target_modules(model), name)]
    assert matched and all(name.startswith("model.language_model.layers.") for name in matched)
    assert {name.rsplit(".", 1)[1] for name in matched} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    chosen = [name for name in names if re.fullmatch(lora_target_modules(model, ["q_proj", "v_proj"]), name)]
    assert len(chosen) == 2 * model.config.text_config.num_hidden_layers
