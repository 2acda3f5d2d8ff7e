"""Verification: the written repo, loaded through the Auto classes where `slime_hf` cannot be imported, against the
package's own load of the input."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..checkpoints import LoraAdapter, load_adapter_weights
from ..configuration_slime import SliMEConfig
from ..modeling_slime import SliMEForConditionalGeneration
from ..processing_slime import SliMEProcessor
from . import remote_check
from .errors import VerificationError
from .inputs import Conversion
from .output import dtype_name


logger = logging.getLogger("slime_hf.conversion")

# Verification bound on the last-position logits, times max(1, max |reference logit|): both sides run in the output
# dtype, so only the order of operations differs (float32), or also half-precision rounding of merged weights.
LOGITS_BOUNDS = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


VERIFY_PROMPT = "Describe this image in detail."


VERIFY_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "demo_image.png"


VERIFY_NEW_TOKENS = 12


def run_without_package(args: list[str], workdir: str) -> subprocess.CompletedProcess:
    """Runs `remote_check.py` in a fresh process where `slime_hf` cannot be imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=os.path.join(workdir, "hf_modules"), TRANSFORMERS_VERBOSITY="error")
    command = [sys.executable, remote_check.__file__, *args]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)


def lora_hooks(model: torch.nn.Module, lora: LoraAdapter) -> None:
    """Applies the LoRA unmerged, as peft runs it: y = W x + scale * B (A x)."""
    import torch.nn.functional as F

    for name, target in lora.targets.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        dtype = module.weight.dtype
        lora_a = lora.weights.get(target.lora_a).to(dtype)
        lora_b = lora.weights.get(target.lora_b).to(dtype)

        def hook(module, inputs, output, a=lora_a, b=lora_b, scale=target.scale):
            return output + scale * F.linear(F.linear(inputs[0], a), b)

        module.register_forward_hook(hook)


def reference_model(conversion: Conversion, device: str) -> SliMEForConditionalGeneration:
    """The package's own load of the input: `from_pretrained` of the checkpoint where it can read it directly,
    else the planned input tensors (LoRA applied unmerged, through forward hooks)."""
    plan = conversion.plan
    if conversion.reference_dir is not None:
        model = SliMEForConditionalGeneration.from_pretrained(conversion.reference_dir, dtype=plan.dtype)
    else:
        lora = plan.lora
        hooked = lora is not None and not any(t.transpose for t in lora.targets.values())
        state_dict = {}
        for name, planned in plan.tensors.items():
            state_dict[name] = planned.load_unmerged() if hooked and planned.load_unmerged else planned.load()
        plan.files.close()
        model = SliMEForConditionalGeneration.from_pretrained(
            None, config=conversion.config, state_dict=state_dict, dtype=plan.dtype
        )
        del state_dict
        if hooked:
            lora_hooks(model, lora)
        if conversion.generation_config:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(
                os.path.dirname(conversion.generation_config), "generation_config.json"
            )
    return model.to(device).eval()


def verify(conversion: Conversion, folder: str, args: argparse.Namespace) -> dict:
    """
    Compares the written repo, loaded through the Auto classes in a process without `slime_hf`, with the package's
    load of the input: token ids of a test prompt, pixel values, last-position logits (within a bound fit for the
    dtype) and greedy ids.

    Returns:
        `dict`: the measured differences.

    Raises:
        `VerificationError`: any mismatch.
    """
    dtype = conversion.plan.dtype
    processor = SliMEProcessor.from_pretrained(conversion.tokenizer_dir, chat_template_name=args.chat_template)
    model = reference_model(conversion, args.verify_device)
    reference = remote_check.verification_outputs(
        model, processor, str(VERIFY_IMAGE), VERIFY_PROMPT, VERIFY_NEW_TOKENS, args.verify_device
    )
    del model
    with tempfile.TemporaryDirectory(prefix="slime-verify-") as workdir:
        out_path = os.path.join(workdir, "converted.pt")
        result = run_without_package(
            [folder, str(VERIFY_IMAGE), VERIFY_PROMPT, str(VERIFY_NEW_TOKENS), args.verify_device, out_path],
            workdir,
        )
        if result.returncode != 0:
            raise VerificationError(
                "the converted repo does not load or run through the Auto classes without "
                f"slime_hf:\n{result.stderr[-3000:]}"
            )
        converted = torch.load(out_path, weights_only=True)
    problems = []
    if not torch.equal(converted["input_ids"], reference["input_ids"]):
        problems.append(f"token ids differ: {converted['input_ids'].tolist()} vs {reference['input_ids'].tolist()}")
    if not torch.equal(converted["pixel_values"], reference["pixel_values"]):
        problems.append("pixel values differ")
    diff = (converted["logits_last"] - reference["logits_last"]).abs().max().item()
    bound = LOGITS_BOUNDS[dtype] * max(1.0, reference["logits_last"].abs().max().item())
    if not diff <= bound:
        problems.append(f"last-position logits differ by {diff:.3g} (bound {bound:.3g} for {dtype_name(dtype)})")
    if not torch.equal(converted["new_ids"], reference["new_ids"]):
        problems.append(f"greedy ids differ: {converted['new_ids'].tolist()} vs {reference['new_ids'].tolist()}")
    report = {
        "input_ids": reference["input_ids"].shape[1],
        "logits_max_abs_diff": diff,
        "logits_bound": bound,
        "greedy_ids": reference["new_ids"][0].tolist(),
    }
    logger.info(
        f"verification: {report['input_ids']} prompt ids, pixel values "
        f"{tuple(reference['pixel_values'].shape)}, "
        f"last-position logits max |diff| = {diff:.3g} (bound {bound:.3g}, {dtype_name(dtype)}), "
        f"{VERIFY_NEW_TOKENS} greedy ids {'equal' if not problems else 'checked'}"
    )
    if problems:
        raise VerificationError("the converted repo does not reproduce the input:\n  " + "\n  ".join(problems))
    return report


def verify_stage_checkpoint(conversion: Conversion, folder: str) -> None:
    """A stage checkpoint holds exactly the planned adapter tensors and a config that loads."""
    saved = load_adapter_weights(folder)
    planned = {name: t.load() for name, t in conversion.plan.tensors.items()}
    if set(saved) != set(planned):
        raise VerificationError(f"the stage checkpoint holds {sorted(set(saved) ^ set(planned))[:8]} unexpectedly")
    for name, tensor in planned.items():
        if not torch.equal(saved[name], tensor.to(saved[name].dtype)):
            raise VerificationError(f"{name} differs after saving")
    SliMEConfig.from_pretrained(folder)
    logger.info(f"verification: {len(saved)} adapter tensors equal after reloading, config reloads")
