"""The converter (`slime_hf.conversion`, `conversion/convert_slime_to_hf.py`) and `slime_hf.checkpoints`
on the fixtures' checkpoints in the released layouts."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import golden_utils as gu
from conftest import FIXTURES, PROJECT_ROOT
from helpers import make_base_llm, run_hidden, run_python
from slime_hf import SliMEConfig, SliMEForConditionalGeneration
from slime_hf.checkpoints import (
    ADAPTER_PREFIXES,
    ADAPTER_WEIGHTS_NAME,
    adapter_parts,
    detect_checkpoint_kind,
    load_adapter_weights,
    load_non_lora_trainables,
    rename_original_state_dict,
    save_adapter_weights,
)
from slime_hf.conversion.staging import STAGING_MARKER


SCRIPT = PROJECT_ROOT / "conversion" / "convert_slime_to_hf.py"
TESTS_DIR = Path(__file__).resolve().parent
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BF16_LOGITS_TOL = 0.05  # times max(1, max |logit|); measured 0.027 and 0.063 for logits up to 3.5


@pytest.fixture(scope="module")
def converter():
    import slime_hf.conversion

    return slime_hf.conversion


def _original_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in the authors' names."""
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def _saved_names_and_dtypes(folder: Path) -> dict[str, str]:
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            out.update({k: handle.get_slice(k).get_dtype() for k in handle.keys()})
    return out


def _no_leftovers(parent: Path, name: str) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")]


def build_base_llm(variant: str, folder: Path) -> Path:
    """The fixture checkpoint's language model alone, as a plain `LlamaForCausalLM` folder with the tokenizer and the
    release's generation config."""
    return make_base_llm(variant, folder, generation_config=True)


def _case_inputs(variant: str, name: str, image_token_id: int) -> dict:
    golden = gu.case(variant, name)
    pixel_values, image_sizes = gu.pixel_inputs(golden["images"])
    return {
        "input_ids": gu.golden_ids(golden["input_ids"], image_token_id),
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
        "router_top_p": float(gu._json(golden["top_p"])),
    }


# -------------------------------------------------------------------------------------------------------------
# Full checkpoints: every golden case through the Auto classes, without slime_hf
# -------------------------------------------------------------------------------------------------------------
GOLDEN_SCRIPT = """
import json
import torch
sys.path.insert(0, sys.argv[2])
import golden_utils as gu
from transformers import AutoModel

results = {}
for variant, folder in json.loads(sys.argv[1]).items():
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    for case in gu.cases(variant)["cases"]:
        ids = gu.golden_ids(case["input_ids"], model.config.image_token_id)
        mask = gu._json(case["attention_mask"])
        pixel_values, image_sizes = gu.pixel_inputs(case["images"])
        inputs = dict(input_ids=ids, attention_mask=None if mask is None else torch.tensor(mask),
                      pixel_values=pixel_values, image_sizes=image_sizes, router_top_p=float(gu._json(case["top_p"])))
        with torch.no_grad():
            out = model(**inputs)
        reference = gu.tensor(variant, case["logits_last_ref"])
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=24)
        results[variant + "/" + case["name"]] = {
            "logits_max_abs_diff": (out.logits[:, -1] - reference).abs().max().item(),
            "selected_equal": [t.tolist() for t in out.selected_indices or []]
            == [gu.selected(image) for image in case["images"]],
            "kept": [len(t) for t in out.selected_indices or []],
            "new_ids_equal": generated[:, ids.shape[1]:].tolist() == gu._json(case["generated_new_ids"]),
        }
print(json.dumps(results))
"""


@pytest.mark.slow
def test_converted_releases_reproduce_every_golden_case(converter, tmp_path):
    outputs = {"V": tmp_path / "SliME-V-hf", "L": tmp_path / "SliME-L-hf"}
    # V in one shard and verified by the converter (the default); L in several shards with an index.
    report = converter.convert(
        converter.parse_args(["--input", str(gu.checkpoint_dir("V")), "--output", str(outputs["V"])])
    )
    assert report["kind"] == "full" and report["logits_max_abs_diff"] <= 1e-4
    assert (
        converter.main(
            [
                "--input",
                str(gu.checkpoint_dir("L")),
                "--output",
                str(outputs["L"]),
                "--max-shard-size",
                "1MB",
                "--no-verify",
            ]
        )
        == 0
    )

    for variant, folder in outputs.items():
        checkpoint = gu.checkpoint_dir(variant)
        files = {p.name for p in folder.iterdir()}
        assert {
            "config.json",
            "generation_config.json",
            "processor_config.json",
            "tokenizer_config.json",
            "README.md",
            "configuration_slime.py",
            "modeling_slime.py",
            "processing_slime.py",
            "tokenization_slime.py",
            "image_processing_slime.py",
        } <= files
        assert ("model.safetensors.index.json" in files) == (variant == "L")
        if variant == "V":
            assert (folder / "tokenizer.model").read_bytes() == (checkpoint / "tokenizer.model").read_bytes()
        release_generation = json.loads((checkpoint / "generation_config.json").read_text())
        assert json.loads((folder / "generation_config.json").read_text()) == {
            k: v for k, v in release_generation.items() if k != "max_length"
        }
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "slime" and config["position_table_dtype"] == "float16"
        assert config["auto_map"]["AutoModel"] == "modeling_slime.SliMEForConditionalGeneration"
        names = _saved_names_and_dtypes(folder)
        expected = rename_original_state_dict(_original_tensors(checkpoint))
        assert set(names) == set(expected)  # package names only, nothing dropped but mean/std
        assert not any(word in n for n in names for word in ("mm_projector", "sampler", "vision_tower.vision_tower"))
        assert names["model.local_compressor.position_table"] == "F16"
        assert names["model.global_adapter.attention_expert.position_table"] == "F16"
        assert "pipeline_tag: image-text-to-text" in (folder / "README.md").read_text()
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    results = run_hidden(
        GOLDEN_SCRIPT, json.dumps({v: str(f) for v, f in outputs.items()}), str(TESTS_DIR), cwd=tmp_path
    )
    assert len(results) == 2 * len(gu.cases("V")["cases"])
    print(json.dumps(results, indent=1))
    for name, result in results.items():
        assert result["selected_equal"], name
        assert result["logits_max_abs_diff"] <= 1e-4, (name, result)
        assert result["new_ids_equal"], name


@pytest.fixture(scope="module")
def converted_v(converter, tmp_path_factory) -> Path:
    """The V fixture release converted (without the verification run, which the slow test covers)."""
    folder = tmp_path_factory.mktemp("converted") / "SliME-V-hf"
    assert converter.main(["--input", str(gu.checkpoint_dir("V")), "--output", str(folder), "--no-verify"]) == 0
    return folder


class _TransformersWarnings(logging.Handler):
    """Collects the warnings transformers logs (its loggers do not propagate to the root logger)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self)


def test_converted_and_saved_folders_generate_with_max_new_tokens_without_a_length_warning(converted_v, tmp_path):
    """The release's generation config pins max_length=4096 (its LLM's context); transformers 5 then warns "Both
    `max_new_tokens` and `max_length` seem to have been set" on every generate. The converted folder keeps every
    other field of it, and a save_pretrained of the converted model pins no max_length either."""
    release = json.loads((gu.checkpoint_dir("V") / "generation_config.json").read_text())
    assert release["max_length"] == 4096
    written = json.loads((converted_v / "generation_config.json").read_text())
    assert written == {k: v for k, v in release.items() if k != "max_length"}

    model = SliMEForConditionalGeneration.from_pretrained(converted_v, dtype=torch.float32).eval()
    assert model.generation_config.max_length is None and model.generation_config.temperature == release["temperature"]
    inputs = _case_inputs("V", "single_3crop", model.config.image_token_id)
    with _TransformersWarnings() as warnings:
        out = model.generate(**inputs, do_sample=False, max_new_tokens=3)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert not [m for m in warnings.messages if "seem to have been set" in m], warnings.messages

    model.save_pretrained(tmp_path / "saved")
    assert "max_length" not in json.loads((tmp_path / "saved" / "generation_config.json").read_text())

    # The check is real: a pinned max_length makes transformers warn.
    model.generation_config.max_length = release["max_length"]
    with _TransformersWarnings() as warnings:
        model.generate(**inputs, do_sample=False, max_new_tokens=3)
    assert [m for m in warnings.messages if "Both `max_new_tokens` (=3) and `max_length`(=4096)" in m]


def test_a_converted_release_card_names_the_release_and_links_its_licence(converter, tmp_path, monkeypatch):
    """The fixtures' tiny LLMs match no release: stand the V checkpoint in for SliME-vicuna-7B, as a downloaded
    release is recognised by its LLM's shape."""
    from slime_hf.model_card import RELEASES

    release = RELEASES["yifanzhang114/SliME-vicuna-7B"]
    monkeypatch.setattr("slime_hf.conversion.inputs.match_release", lambda *shape: release)
    output = tmp_path / "SliME-vicuna-7B-hf"
    assert converter.main(["--input", str(gu.checkpoint_dir("V")), "--output", str(output), "--no-verify"]) == 0
    card = (output / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["base_model"] == [release.repo_id] and "base_model_relation" not in metadata
    assert (metadata["license"], metadata["license_link"]) == ("llama2", "https://www.llama.com/llama2/license/")
    assert f"from the authors' release [`{release.repo_id}`]" in card and "`lmsys/vicuna-7b-v1.5`" in card


# -------------------------------------------------------------------------------------------------------------
# Adapter files and stage checkpoints
# -------------------------------------------------------------------------------------------------------------
def _renamed_bin(path: Path) -> dict[str, torch.Tensor]:
    return rename_original_state_dict(torch.load(path, map_location="cpu", weights_only=True))


@pytest.mark.parametrize("variant", ["V", "L"])
def test_adapter_files_are_recognised_for_what_they_hold(variant):
    adapters = FIXTURES / variant / "adapters"
    trainer_checkpoint = FIXTURES / variant / "adapters_trainer_checkpoint" / "checkpoint-1"
    assert detect_checkpoint_kind(adapters) == "adapters"
    assert detect_checkpoint_kind(trainer_checkpoint) == "adapters"
    assert detect_checkpoint_kind(gu.checkpoint_dir(variant)) == "full"

    weights = load_adapter_weights(adapters)
    assert adapter_parts(weights) == list(ADAPTER_PREFIXES)
    expected = {**_renamed_bin(adapters / "mm_projector.bin"), **_renamed_bin(adapters / "sampler.bin")}
    assert set(weights) == set(expected)
    for name, tensor in expected.items():
        assert weights[name].dtype == tensor.dtype and torch.equal(weights[name], tensor), name
    assert weights["model.global_adapter.gate_weight"].dtype == torch.bfloat16
    assert weights["model.local_compressor.position_table"].dtype == torch.float16

    # The trainer's checkpoint-N/mm_projector.bin holds the sampler: local-compressor weights, nothing else.
    sampler_only = load_adapter_weights(trainer_checkpoint)
    assert adapter_parts(sampler_only) == ["model.local_compressor."]
    assert set(sampler_only) == {k for k in expected if k.startswith("model.local_compressor.")}
    assert set(load_adapter_weights(trainer_checkpoint / "mm_projector.bin")) == set(sampler_only)
    assert set(load_adapter_weights(adapters / "sampler.bin")) == set(sampler_only)


def test_adapter_readers_are_strict(tmp_path):
    tensors = torch.load(FIXTURES / "V" / "adapters" / "mm_projector.bin", weights_only=True)
    torch.save(
        {**tensors, "model.layers.0.mlp.up_proj.weight": torch.zeros(2), "model.mystery": torch.zeros(1)},
        tmp_path / "mm_projector.bin",
    )
    with pytest.raises(ValueError, match=r"not SliME adapter weights.*model\.layers\.0\.mlp\.up_proj\.weight.*mystery"):
        load_adapter_weights(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no adapter weights"):
        load_adapter_weights(empty)
    with pytest.raises(ValueError, match="not a SliME checkpoint"):
        detect_checkpoint_kind(empty)


def test_save_adapter_weights_writes_a_stage_checkpoint(tmp_path):
    model = SliMEForConditionalGeneration.from_pretrained(gu.checkpoint_dir("V"), dtype=torch.float32)
    model.to(torch.bfloat16)  # the tables are stored float16 whatever the model runs in
    save_adapter_weights(model.state_dict(), tmp_path, model.config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", ADAPTER_WEIGHTS_NAME]
    assert detect_checkpoint_kind(tmp_path) == "stage"
    saved = load_adapter_weights(tmp_path)
    assert set(saved) == {k for k in model.state_dict() if k.startswith(ADAPTER_PREFIXES)}
    assert saved["model.local_compressor.position_table"].dtype == torch.float16
    assert saved["model.projector.linear_1.weight"].dtype == torch.bfloat16
    assert SliMEConfig.from_pretrained(tmp_path).separator_token_id == model.config.separator_token_id
    with pytest.raises(ValueError, match="no adapter weights"):
        save_adapter_weights({"lm_head.weight": torch.zeros(1)}, tmp_path / "x", model.config)


@pytest.mark.parametrize("variant", ["V", "L"])
def test_adapter_files_convert_to_a_stage_checkpoint(converter, variant, tmp_path, capsys):
    base = build_base_llm(variant, tmp_path / "base")
    clip = FIXTURES / variant / "clip"
    adapters = FIXTURES / variant / "adapters"
    output = tmp_path / "stage"
    assert (
        converter.main(
            ["--input", str(adapters), "--output", str(output), "--base", str(base), "--vision-tower", str(clip)]
        )
        == 0
    )
    assert detect_checkpoint_kind(output) == "stage"
    assert {"config.json", ADAPTER_WEIGHTS_NAME, "README.md"} <= {p.name for p in output.iterdir()}
    saved = load_adapter_weights(output)
    expected = {**_renamed_bin(adapters / "mm_projector.bin"), **_renamed_bin(adapters / "sampler.bin")}
    assert set(saved) == set(expected)
    for name, tensor in expected.items():
        assert saved[name].dtype == tensor.dtype and torch.equal(saved[name], tensor), name
    config = SliMEConfig.from_pretrained(output)
    original = json.loads((adapters / "config.json").read_text())
    assert config.text_config.hidden_size == original["hidden_size"]
    assert config.vision_config.hidden_size == original["mm_hidden_size"]
    assert config.separator_token_id == original["seperator"]
    assert config.use_local_only and config.router_top_p == 1.0  # stage 2's flags
    assert config.image_token_id == original["vocab_size"]
    card = (output / "README.md").read_text()
    assert "adapter weights of a SliME training stage" in card and "--pretrained_adapters" in card

    # checkpoint-1 holds only the sampler: the global adapter has no source, and the error says how to give one.
    trainer_checkpoint = FIXTURES / variant / "adapters_trainer_checkpoint" / "checkpoint-1"
    failed = tmp_path / "failed"
    capsys.readouterr()
    argv = ["--input", str(trainer_checkpoint), "--base", str(base), "--vision-tower", str(clip)]
    assert converter.main([*argv, "--output", str(failed)]) == 2
    message = capsys.readouterr().err
    assert "global adapter" in message and "mm_projector" in message and "--mm-projector" in message
    assert not failed.exists() and _no_leftovers(tmp_path, "failed")

    combined = tmp_path / "combined"
    assert converter.main([*argv, "--output", str(combined), "--mm-projector", str(adapters / "mm_projector.bin")]) == 0
    saved = load_adapter_weights(combined)
    sampler = load_adapter_weights(trainer_checkpoint)
    assert set(saved) == set(expected)
    for name, tensor in saved.items():
        source = sampler if name.startswith("model.local_compressor.") else expected
        assert torch.equal(tensor, source[name]), name


# -------------------------------------------------------------------------------------------------------------
# LoRA releases
# -------------------------------------------------------------------------------------------------------------
def build_lora_release(variant: str, folder: Path, base: Path) -> tuple[dict, torch.Tensor, list]:
    """A LoRA release saved as the original trainer saves it, plus the logits and greedy ids of base + adapter run
    unmerged by peft (single_3crop)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    checkpoint = gu.checkpoint_dir(variant)
    model = SliMEForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(model.model.language_model, lora_config)  # LoRA layers injected in place
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data.mul_(0.05)  # a fine-tune-sized update
    inputs = _case_inputs(variant, "single_3crop", model.config.image_token_id)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    new_ids = model.generate(**inputs, do_sample=False, max_new_tokens=8)[0, inputs["input_ids"].shape[1] :].tolist()
    release_logits = gu.tensor(variant, gu.case(variant, "single_3crop")["logits_last_ref"])[0]
    assert (logits - release_logits).abs().max().item() > 1e-2  # the LoRA changes the answer

    folder.mkdir()
    # peft around the original LlavaLlamaForCausalLM: base_model.model.model.layers.* (the LLM is `model.`).
    adapter = {
        k.replace("base_model.model.", "base_model.model.model.", 1): v.contiguous()
        for k, v in get_peft_model_state_dict(peft_model).items()
    }
    save_file(adapter, str(folder / "adapter_model.safetensors"))
    lora_config.base_model_name_or_path = str(base)
    lora_config.task_type = "CAUSAL_LM"  # as the original trainer's config
    lora_config.save_pretrained(str(folder))
    original = _original_tensors(checkpoint)
    non_lora = {
        "base_model.model." + k: v
        for k, v in original.items()
        if k.startswith(("model.mm_projector.", "model.sampler.")) and not k.endswith(("pos_embed", ".mean", ".std"))
    }
    torch.save(non_lora, folder / "non_lora_trainables.bin")
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(mm_vision_tower="openai/clip-vit-large-patch14-336", mm_projector_lr=2e-5)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return inputs, logits, new_ids


@pytest.mark.slow
def test_lora_release_merges_to_the_logits_of_base_plus_adapter(converter, tmp_path):
    variant = "L"  # grouped-query attention: k/v LoRA shapes differ from q/o
    base = build_base_llm(variant, tmp_path / "base")
    release = tmp_path / "lora"
    inputs, peft_logits, peft_new_ids = build_lora_release(variant, release, base)
    assert detect_checkpoint_kind(release) == "lora"
    non_lora = load_non_lora_trainables(release)
    assert adapter_parts(non_lora) == list(ADAPTER_PREFIXES)
    assert not any(k.endswith("position_table") for k in non_lora)

    output = tmp_path / "merged"
    # Base from adapter_config.json; CLIP given explicitly (the config names the Hub id); verification on.
    report = converter.convert(
        converter.parse_args(
            ["--input", str(release), "--output", str(output), "--vision-tower", str(FIXTURES / variant / "clip")]
        )
    )
    assert report["kind"] == "lora" and report["logits_max_abs_diff"] <= 1e-4
    merged = SliMEForConditionalGeneration.from_pretrained(output, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = merged(**inputs).logits[0, -1]
    assert (logits - peft_logits).abs().max().item() <= 1e-4
    new_ids = merged.generate(**inputs, do_sample=False, max_new_tokens=8)[0, inputs["input_ids"].shape[1] :].tolist()
    assert new_ids == peft_new_ids
    # The position tables (not in non_lora_trainables.bin) are regenerated exactly as the original builds them.
    original = _original_tensors(gu.checkpoint_dir(variant))
    saved = load_file(str(output / "model.safetensors"))
    assert torch.equal(saved["model.local_compressor.position_table"], original["model.sampler.post_qformer.pos_embed"])
    assert saved["model.global_adapter.attention_expert.position_table"].dtype == torch.float16


def test_lora_in_the_package_layout_merges_into_a_release(converter, tmp_path):
    """A LoRA fine-tune of a release made with the package (peft around SliMEForConditionalGeneration,
    `non_lora_trainables.safetensors` in package names, a SliMEConfig) merges into that release."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    release = gu.checkpoint_dir("V")
    model = SliMEForConditionalGeneration.from_pretrained(release, dtype=torch.float32).eval()
    targets = r"^model\.language_model\..*\.(q_proj|v_proj|down_proj)$"  # as slime_hf.training builds them
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, lora_config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.05)
        model.model.projector.linear_2.weight.add_(0.01)  # a trained adapter weight beside the LoRA
    inputs = _case_inputs("V", "single_7crop", model.config.image_token_id)
    with torch.no_grad():
        reference = model(**inputs).logits[0, -1]
    release_logits = gu.tensor("V", gu.case("V", "single_7crop")["logits_last_ref"])[0]
    assert (reference - release_logits).abs().max().item() > 1e-2  # the fine-tune changes the answer

    folder = tmp_path / "lora"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()},
        str(folder / "adapter_model.safetensors"),
    )
    lora_config.base_model_name_or_path = str(release)
    lora_config.save_pretrained(str(folder))
    non_lora = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("model.projector.")}
    save_file(non_lora, str(folder / "non_lora_trainables.safetensors"))
    model.config.save_pretrained(folder)
    assert detect_checkpoint_kind(folder) == "lora"
    assert set(load_non_lora_trainables(folder)) == set(non_lora)

    output = tmp_path / "merged"
    assert converter.main(["--input", str(folder), "--output", str(output), "--no-verify"]) == 0
    merged = SliMEForConditionalGeneration.from_pretrained(output, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = merged(**inputs).logits[0, -1]
    assert (logits - reference).abs().max().item() <= 1e-4


def test_non_lora_trainables_in_both_layouts(tmp_path):
    original = _original_tensors(gu.checkpoint_dir("V"))
    mm = {
        k: v
        for k, v in original.items()
        if k.startswith(("model.mm_projector.", "model.sampler.")) and not k.endswith(("pos_embed", ".mean", ".std"))
    }
    torch.save({"base_model.model." + k: v for k, v in mm.items()}, tmp_path / "non_lora_trainables.bin")
    from_pickle = load_non_lora_trainables(tmp_path)
    assert set(from_pickle) == set(rename_original_state_dict(mm))
    package = tmp_path / "package"
    package.mkdir()
    save_file({k: v.contiguous() for k, v in from_pickle.items()}, str(package / "non_lora_trainables.safetensors"))
    from_safetensors = load_non_lora_trainables(package / "non_lora_trainables.safetensors")
    assert set(from_safetensors) == set(from_pickle)
    assert all(torch.equal(from_safetensors[k], v) for k, v in from_pickle.items())
    torch.save({"base_model.model.model.unknown_module.weight": torch.zeros(1)}, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="unknown_module"):
        load_non_lora_trainables(tmp_path / "bad.bin")


# -------------------------------------------------------------------------------------------------------------
# dtype
# -------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bfloat16_output(converter, tmp_path):
    output = tmp_path / "bf16"
    assert (
        converter.main(
            ["--input", str(gu.checkpoint_dir("V")), "--output", str(output), "--dtype", "bfloat16", "--no-verify"]
        )
        == 0
    )
    dtypes = _saved_names_and_dtypes(output)
    tables = {"model.local_compressor.position_table", "model.global_adapter.attention_expert.position_table"}
    assert {dtypes[t] for t in tables} == {"F16"}
    assert {d for n, d in dtypes.items() if n not in tables} == {"BF16"}
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    saved = load_file(str(output / "model.safetensors"))
    original = _original_tensors(gu.checkpoint_dir("V"))
    assert torch.equal(saved["model.local_compressor.position_table"], original["model.sampler.post_qformer.pos_embed"])

    model = SliMEForConditionalGeneration.from_pretrained(output, dtype="auto").eval()
    assert model.lm_head.weight.dtype == torch.bfloat16
    for name in ("single_3crop", "single_7crop"):
        inputs = _case_inputs("V", name, model.config.image_token_id)
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].float()
        reference = gu.tensor("V", gu.case("V", name)["logits_last_ref"])[0]
        diff = (logits - reference).abs().max().item()
        print(f"bf16 {name}: max |logits - float32 golden| = {diff:.4f} (max |logit| {reference.abs().max():.2f})")
        assert diff <= BF16_LOGITS_TOL * max(1.0, reference.abs().max().item())


# -------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written, nothing overwritten
# -------------------------------------------------------------------------------------------------------------
def _copy_checkpoint(tmp_path: Path) -> Path:
    copy = tmp_path / "release"
    shutil.copytree(gu.checkpoint_dir("V"), copy)
    shutil.copytree(FIXTURES / "V" / "clip", tmp_path / "clip")  # the config's mm_vision_tower is "../clip"
    return copy


def _missing_shard(tmp_path: Path) -> Path:
    copy = _copy_checkpoint(tmp_path)
    (copy / "model-00002-of-00003.safetensors").unlink()
    return copy


def _truncated_shard(tmp_path: Path) -> Path:
    copy = _copy_checkpoint(tmp_path)
    shard = copy / "model-00002-of-00003.safetensors"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    return copy


def _other_model_type(tmp_path: Path) -> Path:
    copy = _copy_checkpoint(tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("mm_")}
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    "make_input, message",
    [
        (_missing_shard, r"model-00002-of-00003\.safetensors.*missing"),
        (_truncated_shard, r"model-00002-of-00003\.safetensors \(truncated or corrupt\?\)"),
        (_other_model_type, r"model_type 'mistral', not a SliME checkpoint"),
    ],
    ids=["missing_shard", "truncated_safetensors", "other_model_type"],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(converter, tmp_path, capsys, make_input, message):
    source = make_input(tmp_path)
    output = tmp_path / "out"
    assert converter.main(["--input", str(source), "--output", str(output), "--no-verify"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not output.exists() and _no_leftovers(tmp_path, "out")


def test_existing_output_is_never_overwritten(converter, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert converter.main(["--input", str(gu.checkpoint_dir("V")), "--output", str(output), "--no-verify"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["keep.txt"] and (output / "keep.txt").read_text() == "mine"
    assert _no_leftovers(tmp_path, "out")


def test_a_plain_language_model_is_not_a_release(converter, tmp_path, capsys):
    base = build_base_llm("V", tmp_path / "base")
    assert converter.main(["--input", str(base), "--output", str(tmp_path / "out")]) == 2
    assert "model_type 'llama', not a SliME checkpoint (expected" in capsys.readouterr().err


KILL_AFTER_WRITING = """
import os, signal, sys
from slime_hf.conversion import cli
write_output = cli.write_output

def killed(conversion, staging, args):
    write_output(conversion, staging, args)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))  # the staging folder is full, nothing is moved into place

cli.write_output = killed
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_killed_conversion_leaves_a_staging_folder_that_the_next_run_removes(converter, tmp_path, caplog):
    argv = ["--input", str(gu.checkpoint_dir("V")), "--no-verify"]

    def run_killed(signal_name: str, output: Path) -> subprocess.CompletedProcess:
        command = ["-c", KILL_AFTER_WRITING, signal_name, *argv, "--output", str(output)]
        return run_python(*command, cwd=tmp_path, timeout=300, check=False)

    # SIGTERM unwinds: the staging folder is removed at once.
    terminated = run_killed("SIGTERM", tmp_path / "term")
    assert terminated.returncode == 130 and "interrupted" in terminated.stderr, terminated.stderr[-2000:]
    assert not (tmp_path / "term").exists() and _no_leftovers(tmp_path, "term")

    # SIGKILL cannot be caught: the staging folder stays, and the next conversion to that output removes it.
    output = tmp_path / "out"
    killed = run_killed("SIGKILL", output)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1 and any(stale[0].glob("*.safetensors"))
    foreign = tmp_path / ".out.tmp-not-ours"  # same name pattern, no marker of this converter: never deleted
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with caplog.at_level(logging.WARNING):
        assert converter.main([*argv, "--output", str(output)]) == 0
    assert f"removed {stale[0]} (" in caplog.text and "left by an interrupted conversion" in caplog.text
    assert f"{foreign} looks like a conversion's staging folder" in caplog.text
    assert not stale[0].exists() and (foreign / "keep.txt").read_text() == "mine"
    assert output.is_dir() and not (output / STAGING_MARKER).exists()


@pytest.mark.slow
def test_failed_verification_exits_non_zero_and_leaves_nothing(converter, tmp_path, monkeypatch, capsys):
    prepare = converter.prepare

    def tampered(args):
        conversion = prepare(args)
        planned = conversion.plan.tensors["lm_head.weight"]
        load = planned.load
        planned.load = lambda: load() + 0.05  # what a wrong rename or cast would do
        return conversion

    monkeypatch.setattr("slime_hf.conversion.cli.prepare", tampered)
    output = tmp_path / "out"
    assert converter.main(["--input", str(gu.checkpoint_dir("V")), "--output", str(output)]) == 1
    assert "last-position logits differ by" in capsys.readouterr().err
    assert not output.exists() and _no_leftovers(tmp_path, "out")


# -------------------------------------------------------------------------------------------------------------
# The Hub: downloads of only the needed files, upload (local stand-ins, never the network)
# -------------------------------------------------------------------------------------------------------------
def test_hub_input_downloads_only_the_files_it_needs(converter, tmp_path, monkeypatch):
    import huggingface_hub

    checkpoint = gu.checkpoint_dir("V")
    junk = [
        "README.md",
        "training_args.bin",
        "trainer_state.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model.bin.index.json",
        "global_step100/mp_rank_00_model_states.pt",
        "checkpoint-1/mm_projector.bin",
    ]
    listing = sorted(p.name for p in checkpoint.iterdir()) + junk
    calls = []

    def list_repo_files(self, repo_id, **kwargs):
        assert repo_id == "yifanzhang114/SliME-vicuna-7B"
        return listing

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, sorted(allow_patterns)))
        snapshot = tmp_path / "snapshot"
        snapshot.mkdir()
        for name in allow_patterns:
            shutil.copyfile(checkpoint / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    shutil.copytree(FIXTURES / "V" / "clip", tmp_path / "clip")  # the tiny config's mm_vision_tower is "../clip"
    output = tmp_path / "out"
    assert converter.main(["--input", "yifanzhang114/SliME-vicuna-7B", "--output", str(output), "--no-verify"]) == 0
    assert calls == [("yifanzhang114/SliME-vicuna-7B", sorted(p.name for p in checkpoint.iterdir()))]
    card = (output / "README.md").read_text()
    # The release is recognised: the card's base model is the release it came from (its LLM named in the text),
    # the LLM's licence and the paper's results row of SliME-7B.
    assert "base_model:\n- yifanzhang114/SliME-vicuna-7B\n" in card and "`lmsys/vicuna-7b-v1.5`" in card
    assert "license: llama2" in card and "license_link: https://www.llama.com/llama2/license/" in card
    assert "Converted from `yifanzhang114/SliME-vicuna-7B`" in card
    assert "| SliME-7B (Vicuna-7B) | 64.39 | 63.13 | 80.32 |" in card


def test_push_to_hub_uploads_the_output(converter, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_repo",
        lambda self, repo_id, **kwargs: calls.append(("create_repo", repo_id, kwargs)),
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "upload_folder",
        lambda self, **kwargs: calls.append(("upload_folder", kwargs["repo_id"], kwargs)),
    )
    output = tmp_path / "out"
    assert (
        converter.main(
            [
                "--input",
                str(gu.checkpoint_dir("L")),
                "--output",
                str(output),
                "--no-verify",
                "--push-to-hub",
                "me/SliME-L-hf",
                "--private",
            ]
        )
        == 0
    )
    assert [c[:2] for c in calls] == [("create_repo", "me/SliME-L-hf"), ("upload_folder", "me/SliME-L-hf")]
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert calls[1][2]["folder_path"] == str(output)
    assert 'repo = "me/SliME-L-hf"' in (output / "README.md").read_text()


# -------------------------------------------------------------------------------------------------------------
# Streaming: a conversion never holds the model in memory
# -------------------------------------------------------------------------------------------------------------
MEMORY_SCRIPT = """
import runpy, sys
sys.argv = sys.argv[1:]  # [script, --input, ...]

def status_mb(field):
    # VmHWM (peak RSS) belongs to this program's address space; ru_maxrss would include the parent before exec.
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024

import torch, transformers, slime_hf.checkpoints  # imports are not the conversion's memory
before = status_mb("VmRSS")
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    assert exit.code == 0, exit.code
print(before, status_mb("VmHWM"))
"""


def build_big_checkpoint(folder: Path, hidden: int = 1024, layers: int = 8) -> int:
    """The V checkpoint with a bigger language model (random weights, 64 MB shards). Returns its size in bytes."""
    checkpoint = gu.checkpoint_dir("V")
    folder.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    vocab = config["vocab_size"]  # the tokenizer's
    config.update(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copytree(FIXTURES / "V" / "clip", folder.parent / "clip")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copyfile(checkpoint / name, folder / name)
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        for proj in ("q", "k", "v", "o"):
            shapes[f"model.layers.{i}.self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[f"model.layers.{i}.mlp.gate_proj.weight"] = (2 * hidden, hidden)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (2 * hidden, hidden)
        shapes[f"model.layers.{i}.mlp.down_proj.weight"] = (hidden, 2 * hidden)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
    mm = {
        k: v
        for k, v in _original_tensors(checkpoint).items()
        if not k.startswith(("model.layers.", "model.embed", "model.norm", "lm_head"))
    }
    mm["model.mm_projector.projection.0.weight"] = torch.randn(hidden, 128, generator=generator) * 0.02
    mm["model.mm_projector.projection.0.bias"] = torch.zeros(hidden)
    mm["model.mm_projector.projection.2.weight"] = torch.randn(hidden, hidden, generator=generator) * 0.02
    mm["model.mm_projector.projection.2.bias"] = torch.zeros(hidden)
    tensors = {name: torch.randn(*shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    tensors.update(mm)
    shards, current, size, weight_map = [], {}, 0, {}
    for name, tensor in tensors.items():
        if current and size + tensor.numel() * tensor.element_size() > 64 * 2**20:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += tensor.numel() * tensor.element_size()
    shards.append(current)
    total = 0
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


@pytest.mark.slow
def test_streaming_conversion_peak_memory(tmp_path):
    size = build_big_checkpoint(tmp_path / "big")
    arguments = ["--input", str(tmp_path / "big"), "--output", str(tmp_path / "out"), "--no-verify"]
    result = run_python("-c", MEMORY_SCRIPT, str(SCRIPT), *arguments, "--max-shard-size", "100MB", cwd=tmp_path)
    before, peak = map(float, result.stdout.split()[-2:])
    size_mb = size / 2**20
    print(
        f"checkpoint {size_mb:.0f} MB: RSS after imports {before:.0f} MB, peak {peak:.0f} MB, "
        f"+{peak - before:.0f} MB for the conversion"
    )
    # At most one input shard mapped plus one tensor in flight: far below the model's size.
    assert peak - before < 0.5 * size_mb
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= 4
