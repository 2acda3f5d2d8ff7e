"""`SliMETrainer`: the Hugging Face `Trainer` with SliME's optimizer groups, sampler and stage-aware saving."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

from .build import load_adapter_weights_into
from .sampler import ModalityLengthGroupedSampler
from .stages import ADAPTER_MODULES, get_stage, is_adapter_parameter, package_parameter_name


logger = logging.get_logger(__name__)

NON_LORA_TRAINABLES_NAME = "non_lora_trainables.safetensors"
TRAINING_ARGS_NAME = "training_args.bin"
# Written last into a `checkpoint-N` folder, once every file of its save is on disk: a folder without it was cut short
# (a kill during the save) and is never resumed from by `--resume_from_checkpoint true`.
CHECKPOINT_COMPLETE_NAME = "checkpoint_complete.json"
_CHECKPOINT_FOLDER = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether a `checkpoint-N` folder's save finished (it holds [`CHECKPOINT_COMPLETE_NAME`])."""
    return os.path.isfile(os.path.join(folder, CHECKPOINT_COMPLETE_NAME))


def last_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[str | None, list[tuple[str, str]]]:
    """
    The newest complete `checkpoint-N` of a run's output folder, and the newer ones passed over.

    Args:
        output_dir (`str` or `os.PathLike`): the run's `--output_dir`.

    Returns:
        `tuple`: the checkpoint's path (`None` if there is no complete one) and, newest first, `(path, reason)` for
        every newer `checkpoint-N` that was skipped.
    """
    output_dir = os.fspath(output_dir)
    steps = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_FOLDER.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.append((int(match.group(1)), os.path.join(output_dir, name)))
    skipped = []
    for _, path in sorted(steps, reverse=True):
        if is_complete_checkpoint(path):
            return path, skipped
        skipped.append(
            (path, f"its save did not finish (no {CHECKPOINT_COMPLETE_NAME}: the run was stopped while saving it)")
        )
    return None, skipped


def _unwrap_peft(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SliMETrainer(Trainer):
    """
    [`~transformers.Trainer`] for SliME stages (see [`SliMETrainingArguments`]).

    - Optimizer: only parameters that train; the vision adapters get `adapter_lr` (else `learning_rate`), the
      language model `learning_rate`; norms and biases get no weight decay.
    - Loss: the model's causal-LM loss over the assembled sequence, normalised by `num_items_in_batch` (the targets
      of the whole accumulated batch, across devices), so gradient accumulation gives the same update as one big
      batch. The router's and gate's training noise follow `model.train()` / `model.eval()`.
    - Length limit: the model cuts assembled rows longer than `model_max_length` at the end after routing (as the
      original); each cut is logged and the running count, summed over processes, is logged as
      `truncated_samples`. `num_items_in_batch` is counted before the forward, so targets cut after routing stay
      in the denominator of their accumulated batch (they add nothing to the sum).
    - Sampler: the default `RandomSampler` (what the releases were trained with), or the modality-grouped length
      sampler with `group_by_modality_length`.
    - Saving: stages 1-2 write only the adapter weights (all of them, trained in this stage or carried over) as
      `slime_adapters.safetensors` + `config.json`, at every checkpoint and at the end (gathered under ZeRO-3 / FSDP
      full state dicts); stage 3 writes a full `save_pretrained` folder with the processor and a model card; with
      LoRA, `adapter_model.safetensors` + `non_lora_trainables.safetensors` (package names) + config and processor.
      `resume_from_checkpoint` restores weights, optimizer, scheduler, RNG and data position. A `checkpoint-N`
      folder gets `checkpoint_complete.json` once all of it is written (before older ones are rotated away);
      `python -m slime_hf.train --resume_from_checkpoint true` resumes from the newest such folder.
    - DeepSpeed ZeRO-3: every rank calls the same modules in the same order on every step (a batch without images
      runs the model's dummy image where an image batch runs its vision path, and the token embedding is looked up
      once per forward), so the collective parameter gathers match across ranks. The adapters are not declared ZeRO-3
      leaf modules: their inputs come from the frozen vision tower without autograd, so a leaf module's backward
      hook would fire before its weight gradients exist, and the projector runs more than once per forward.

    Every save (the final one and each `checkpoint-N`) also writes the model card `README.md`
    ([`~slime_hf.model_card.make_model_card`]): what training started from, the stage, the data and the
    hyper-parameters; `push_to_hub` keeps that card (see [`SliMETrainer.create_model_card`]).

    Args:
        base_model (`str`, *optional*): what training started from (a Hub id or a folder), for the model card.
        data_path (`str` or `list[str]`, *optional*): the training data (`--data_path`), for the model card.
        *args, **kwargs: as [`~transformers.Trainer`].
    """

    def __init__(
        self, *args: Any, base_model: str | None = None, data_path: str | list[str] | None = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.base_model = base_model
        self.data_path = data_path
        self.num_truncated_samples = 0  # training rows the model cut at the end after routing, in this process
        self.stage = get_stage(getattr(self.args, "stage", "3"))

    # -- optimizer --------------------------------------------------------------------------------------------------
    def parameter_groups(self, model: torch.nn.Module) -> list[dict]:
        """Optimizer groups: (adapters | language model) x (decay | no decay), trainable parameters only."""
        decay = set(self.get_decay_parameter_names(model))
        adapter_lr = getattr(self.args, "adapter_lr", None)
        groups: dict[tuple[bool, bool], list] = {}
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            key = (is_adapter_parameter(name), name in decay)
            groups.setdefault(key, []).append(parameter)
        out = []
        for (is_adapter, decays), parameters in sorted(groups.items()):
            group = {"params": parameters, "weight_decay": self.args.weight_decay if decays else 0.0}
            if is_adapter and adapter_lr is not None:
                group["lr"] = adapter_lr
            out.append(group)
        return out

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
                self.args, opt_model
            )
            self.optimizer = optimizer_cls(self.parameter_groups(opt_model), **optimizer_kwargs)
        return self.optimizer

    # -- loss and the assembled-length limit -------------------------------------------------------------------
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        truncated = outputs.get("truncated_positions") if isinstance(outputs, dict) else None
        if truncated is not None and model.training and bool(truncated.any()):
            rows = int((truncated > 0).sum())
            self.num_truncated_samples += rows
            logger.warning(
                f"step {self.state.global_step}: {rows} sample(s) of this batch cut at the end after routing to "
                f"model_max_length ({truncated.tolist()} positions per row; {self.num_truncated_samples} so far in "
                "this process)"
            )
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # training logs, reached by every rank
            count = torch.tensor(self.num_truncated_samples, device=self.args.device)
            if self.args.world_size > 1:
                count = self.accelerator.reduce(count, reduction="sum")
            logs["truncated_samples"] = int(count)
        super().log(logs, *args, **kwargs)

    # -- sampler ----------------------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(self.args, "group_by_modality_length", False) and hasattr(dataset, "modality_lengths"):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return ModalityLengthGroupedSampler(
                dataset.modality_lengths,
                batch_size=self.args.train_batch_size,
                # As upstream LLaVA: one chunk per rank and accumulation step of each mega-batch.
                world_size=self.args.world_size * self.args.gradient_accumulation_steps,
                seed=seed,
            )
        return super()._get_train_sampler(train_dataset)

    # -- saving -----------------------------------------------------------------------------------------------------
    def _trainable_package_names(self) -> set[str]:
        return {
            package_parameter_name(name)
            for name, p in self.model.named_parameters()
            if p.requires_grad and "lora_" not in name
        }

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        is_lora = hasattr(unwrapped, "get_base_model")
        base = _unwrap_peft(unwrapped)
        if self.stage.saves_full_model and not is_lora:
            base.config.text_config.use_cache = True
            super()._save(output_dir, state_dict=state_dict)
            if self.args.should_save:
                self._write_model_card(output_dir, base.config)
            return
        if state_dict is None:
            state_dict = unwrapped.state_dict()
        if is_lora:
            super()._save(output_dir, state_dict=state_dict)
            if self.args.should_save:
                self._save_non_lora_trainables(output_dir, state_dict, base)
                self._write_model_card(output_dir, base.config)
            return
        if not self.args.should_save:
            return
        from ..checkpoints import save_adapter_weights

        prefixes = tuple(f"model.{m}." for m in ADAPTER_MODULES)
        adapters = {}
        for key, tensor in state_dict.items():
            name = package_parameter_name(key)
            if name.startswith(prefixes):
                adapters[name] = tensor.detach().cpu().contiguous()
        os.makedirs(output_dir, exist_ok=True)
        save_adapter_weights(adapters, output_dir, base.config)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        self._write_model_card(output_dir, base.config)

    def _save_non_lora_trainables(self, output_dir: str, state_dict: dict, base: Any) -> None:
        from safetensors.torch import save_file

        trainable = self._trainable_package_names()
        tensors = {}
        for key, tensor in state_dict.items():
            name = package_parameter_name(key)
            if "lora_" not in key and name in trainable:
                tensors[name] = tensor.detach().cpu().contiguous()
        save_file(tensors, os.path.join(output_dir, NON_LORA_TRAINABLES_NAME), metadata={"format": "pt"})
        base.config.save_pretrained(output_dir)

    def _write_model_card(self, output_dir: str, config: Any, **overrides: Any) -> None:
        """Writes the run's model card (`README.md`) into `output_dir`: the base model it was trained from, the stage,
        the data and the hyper-parameters. `overrides`: arguments of [`~slime_hf.model_card.make_model_card`]."""
        from ..model_card import save_model_card

        args = self.args
        is_lora = hasattr(self.accelerator.unwrap_model(self.model), "get_base_model")
        source = self.base_model or "a SliME checkpoint"
        rates = f"learning rate {args.learning_rate}"
        if getattr(args, "adapter_lr", None) is not None:
            rates += f" (adapters {args.adapter_lr})"
        data = self.data_path if self.data_path else None
        if isinstance(data, (list, tuple)):
            data = ", ".join(f"`{path}`" for path in data)
        elif data is not None:
            data = f"`{data}`"
        training = (
            f"Stage {self.stage.name} of the SliME recipe ({self.stage.description}){' with LoRA' if is_lora else ''}, "
            f"trained from `{source}`{f' on {data}' if data else ''} with slime-hf's `SliMETrainer`: {rates}, "
            f"{args.lr_scheduler_type} schedule, {args.num_train_epochs} epoch(s), "
            f"{args.per_device_train_batch_size} samples per device x {args.gradient_accumulation_steps} "
            f"accumulation steps x {args.world_size} device(s), router top-p {config.router_top_p}."
        )
        hub_base = self.base_model if self.base_model and not os.path.exists(self.base_model) else None
        adapters_only = not self.stage.saves_full_model and not is_lora
        card = dict(
            # Hub metadata takes Hub ids only; a local starting point is named in the training paragraph.
            base_model=hub_base,
            base_model_relation="adapter" if (is_lora or adapters_only) else "finetune",
            router_top_p=config.router_top_p,
            chat_template=getattr(self.train_dataset, "template", None),
            training=training,
            stage_checkpoint=adapters_only,
            lora_checkpoint=is_lora,
        )
        if is_lora:
            card["library_name"] = "peft"  # adapter_model.safetensors + adapter_config.json
        card.update({key: value for key, value in overrides.items() if value is not None})
        save_model_card(output_dir, **card)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """The SliME model card of this run in `output_dir` (what `push_to_hub` uploads), instead of the generic
        [`~transformers.Trainer`] summary; the arguments that the SliME card has are honoured."""
        if not self.is_world_process_zero():
            return
        base = _unwrap_peft(self.accelerator.unwrap_model(self.model))

        def as_list(value: str | list[str] | None) -> list[str] | None:
            return [value] if isinstance(value, str) else value

        self._write_model_card(
            self.args.output_dir,
            base.config,
            language=as_list(language),
            license=license,
            tags=as_list(tags) or None,
            model_name=model_name,
            base_model=finetuned_from,
            datasets=as_list(dataset_tags or dataset),
            repo_id=self.args.hub_model_id,
        )

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        # The parent deletes old checkpoints (`save_total_limit`) at its end: that waits until this one is marked
        # complete, so a kill in between never leaves the run without a complete checkpoint.
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.accelerator.wait_for_everyone()  # every process's shards, optimizer and RNG states are written
        if self.args.should_save:
            with open(os.path.join(folder, CHECKPOINT_COMPLETE_NAME), "w", encoding="utf-8") as handle:
                json.dump({"global_step": self.state.global_step}, handle)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    # -- resuming ---------------------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        target = model if model is not None else self.model
        unwrapped = self.accelerator.unwrap_model(target)
        is_lora = hasattr(unwrapped, "get_base_model")
        if self.stage.saves_full_model or is_lora:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            if is_lora:
                from ..checkpoints import load_non_lora_trainables

                weights = load_non_lora_trainables(resume_from_checkpoint)
                self._load_weights(_unwrap_peft(unwrapped), weights, resume_from_checkpoint)
            return
        from ..checkpoints import load_adapter_weights

        weights = load_adapter_weights(resume_from_checkpoint)
        self._load_weights(_unwrap_peft(unwrapped), weights, resume_from_checkpoint)

    def _load_weights(self, model: torch.nn.Module, weights: dict, source: str) -> None:
        if self.is_fsdp_enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(
                self.model_wrapped, weights, options=StateDictOptions(full_state_dict=True, strict=False)
            )
        else:
            load_adapter_weights_into(model, weights, source)


__all__ = [
    "CHECKPOINT_COMPLETE_NAME",
    "SliMETrainer",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
]
