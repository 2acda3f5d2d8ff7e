"""Command-line arguments of `python -m slime_hf.train` (parsed with `HfArgumentParser`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .stages import STAGES


DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class SliMEModelArguments:
    """
    Where the model comes from.

    Args:
        model_name_or_path (`str`):
            A text LLM (stages 1a-2, and stage 3 when starting from adapters) with `vision_tower`; or a full SliME
            checkpoint (a release in the authors' layout, a converted folder, a stage-3 output).
        vision_tower (`str`, *optional*):
            CLIP vision tower (local folder or Hub id) for a model built from a text LLM.
        pretrained_adapters (`str`, *optional*):
            An earlier stage's output folder (or the authors' `mm_projector.bin` / `sampler.bin` folder): its adapter
            weights are loaded on top of the model.
        router_top_p (`float`, *optional*):
            Router top-p of the stage (default: 1.0 in stages 1-2, 0.95 in stage 3, the release value); saved in the
            output config.
        router_reads_answers (`bool`, *optional*, defaults to `True`):
            In training, route against the whole conversation (answers included), as the releases were trained.
        gate_noise_uses_noise_weight (`bool`, *optional*, defaults to `False`):
            Opt-in fix of the gate noise scale (the releases computed it from the gate weight).
        dtype (`str`, *optional*, defaults to `"float32"`):
            Dtype the weights are loaded in (`bfloat16` for a one-GPU LoRA fine-tune of a 7B release).
        attn_implementation (`str`, *optional*):
            Attention implementation of the language model (`sdpa`, `flash_attention_2`, `eager`).
    """

    model_name_or_path: str = field(metadata={"help": "text LLM (with --vision_tower) or a full SliME checkpoint"})
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP vision tower (folder or Hub id)"})
    pretrained_adapters: str | None = field(
        default=None, metadata={"help": "an earlier stage's output folder, whose adapter weights are loaded"}
    )
    router_top_p: float | None = field(default=None, metadata={"help": "router top-p (stage default if unset)"})
    router_reads_answers: bool = field(
        default=True, metadata={"help": "route against the whole conversation in training, as the releases"}
    )
    gate_noise_uses_noise_weight: bool = field(
        default=False, metadata={"help": "opt-in fix: gate noise scale from the noise weight"}
    )
    dtype: str = field(default="float32", metadata={"help": "weights dtype", "choices": list(DTYPES)})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, flash_attention_2 or eager"})


@dataclass
class SliMEDataArguments:
    """
    The training data.

    Args:
        data_path (`list[str]`):
            LLaVA JSON / JSONL file(s), or one Hugging Face dataset (a Hub id or a `save_to_disk` folder).
        image_folder (`str`, *optional*):
            Folder the samples' `image` paths are relative to.
        template (`str`, *optional*):
            `plain`, `vicuna_v1` or `llama3`; default: `plain` in stages 1-2, the checkpoint's chat template in 3.
        data_split (`str`, *optional*, defaults to `"train"`):
            Split of a Hugging Face dataset.
        skip_bad_samples (`bool`, *optional*, defaults to `False`):
            Skip and count unusable samples (missing or corrupt image, cut through an image, an image outside
            `image_folder`) instead of stopping.
        allow_images_outside_folder (`bool`, *optional*, defaults to `False`):
            Read sample images that leave `image_folder` (an absolute path, `../`); by default such a sample is
            refused, so a data file cannot make training read arbitrary files.
    """

    data_path: list[str] = field(default=None, metadata={"help": "LLaVA JSON/JSONL file(s) or a HF dataset"})
    image_folder: str | None = field(default=None, metadata={"help": "folder of the samples' images"})
    template: str | None = field(default=None, metadata={"help": "plain, vicuna_v1 or llama3 (default per stage)"})
    data_split: str = field(default="train", metadata={"help": "split of a Hugging Face dataset"})
    skip_bad_samples: bool = field(default=False, metadata={"help": "skip and count unusable samples"})
    allow_images_outside_folder: bool = field(
        default=False, metadata={"help": "read sample images outside --image_folder (absolute paths, '../')"}
    )

    def __post_init__(self):
        if not self.data_path:
            raise ValueError("--data_path is required")
        if isinstance(self.data_path, str):
            self.data_path = [self.data_path]


@dataclass
class SliMETrainingArguments(TrainingArguments):
    """
    [`~transformers.TrainingArguments`] plus the SliME stage, learning rate of the adapters, maximum length, LoRA
    and the opt-in modality-grouped sampler.

    Args:
        stage (`str`, *optional*, defaults to `"3"`):
            `1a` (global MLP expert), `1b` (global attention expert), `2` (local compressor) or `3` (full fine-tune).
        adapter_lr (`float`, *optional*):
            Learning rate of the vision adapters (the original's `mm_projector_lr`); default `learning_rate`.
        model_max_length (`int`, *optional*, defaults to 2048):
            Longest assembled training sequence (text + image tokens after routing): longer ones are cut at the end
            by the model (`config.training_max_length`), never inside an image (see [`SliMEDataset`]).
        group_by_modality_length (`bool`, *optional*, defaults to `False`):
            Upstream LLaVA's modality-grouped length sampler (the releases used a plain random sampler).
        lora_enable (`bool`, *optional*, defaults to `False`):
            Stage 3 with LoRA on the language model (the adapters train fully).
        lora_r (`int`, *optional*, defaults to 128), lora_alpha (`int`, *optional*, defaults to 256),
        lora_dropout (`float`, *optional*, defaults to 0.05):
            LoRA hyper-parameters (the authors' Llama-3 LoRA recipe).
        lora_target_modules (`str`, *optional*):
            Comma-separated module names of the language model (e.g. `q_proj,v_proj`); default every linear layer of
            the language model (q/k/v/o/gate/up/down for Llama), never the head.
    """

    stage: str = field(default="3", metadata={"help": "training stage", "choices": list(STAGES)})
    adapter_lr: float | None = field(default=None, metadata={"help": "learning rate of the vision adapters"})
    model_max_length: int = field(default=2048, metadata={"help": "longest assembled training sequence"})
    group_by_modality_length: bool = field(
        default=False, metadata={"help": "modality-grouped length sampler (a no-op in the original)"}
    )
    lora_enable: bool = field(default=False, metadata={"help": "LoRA on the language model (stage 3)"})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str | None = field(
        default=None, metadata={"help": "comma-separated LLM module names (default: every linear layer)"}
    )
    # Batches carry pixel_values / image_sizes and unusable samples as None: never filter columns.
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep every batch key (SliME needs them)"})

    def __post_init__(self):
        super().__post_init__()
        self.stage = str(self.stage)
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {sorted(STAGES)}, got {self.stage!r}")
        if self.lora_enable and self.stage != "3":
            raise ValueError("LoRA trains the language model, which only stage 3 trains: use --stage 3")
        if self.model_max_length <= 0:
            raise ValueError(f"--model_max_length must be positive, got {self.model_max_length}")

    @property
    def lora_target_module_names(self) -> list[str] | None:
        """`lora_target_modules` as a list (`None`: every linear layer of the language model)."""
        if not self.lora_target_modules:
            return None
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]


__all__ = ["SliMEDataArguments", "SliMEModelArguments", "SliMETrainingArguments"]
