"""Train SliME: `python -m slime_hf.train --stage {1a,1b,2,3} --model_name_or_path ... --data_path ...` plus any
`TrainingArguments` flag.

Stage 1a builds the model from a text LLM and CLIP (`--model_name_or_path BASE_LLM --vision_tower CLIP`); stages 1b,
2 and 3 take the same plus `--pretrained_adapters PREVIOUS_OUTPUT_DIR`, or a full SliME checkpoint (a release, a
converted folder, a stage-3 output) as `--model_name_or_path`. Every `TrainingArguments` flag works (DeepSpeed,
FSDP, bf16, gradient checkpointing, resuming, ...). Recipes: `examples/train/README.md`.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from transformers import HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .training.arguments import SliMEDataArguments, SliMEModelArguments, SliMETrainingArguments
from .training.build import build_model_and_processor
from .training.data import SliMEDataCollator, SliMEDataset, load_records
from .training.stages import get_stage
from .training.trainer import SliMETrainer


logger = logging.get_logger("slime_hf.train")


def configure_logging(level: int) -> None:
    """The run's log level for transformers and for this package (whose loggers get a stderr handler)."""
    logging.set_verbosity(level)
    package_logger = std_logging.getLogger("slime_hf")
    package_logger.setLevel(level)
    if not package_logger.handlers:
        handler = std_logging.StreamHandler()
        handler.setFormatter(std_logging.Formatter("[slime_hf] %(message)s"))
        package_logger.addHandler(handler)


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[SliMEModelArguments, SliMEDataArguments, SliMETrainingArguments]:
    """Parses the command line (or one `.json` / `.yaml` file of arguments) into the three argument dataclasses."""
    parser = HfArgumentParser((SliMEModelArguments, SliMEDataArguments, SliMETrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def load_training_data(data_args: SliMEDataArguments) -> Any:
    """LLaVA JSON / JSONL files, or one Hugging Face dataset (a `save_to_disk` folder or a Hub id)."""
    paths = data_args.data_path
    if len(paths) == 1 and not os.path.isfile(paths[0]):
        import datasets

        if os.path.isdir(paths[0]):
            loaded = datasets.load_from_disk(paths[0])
            return loaded[data_args.data_split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(paths[0], split=data_args.data_split)
    return load_records(paths)


def _resume_target(training_args: SliMETrainingArguments) -> str | bool | None:
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("true", "last"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no checkpoint in {training_args.output_dir}")
        return last
    return value


def main(argv: Sequence[str] | None = None, callbacks: list | None = None) -> SliMETrainer:
    """
    Runs one training stage end to end and saves its output in `--output_dir`.

    Args:
        argv (`Sequence[str]`, *optional*): the command line (default `sys.argv[1:]`).
        callbacks (`list[TrainerCallback]`, *optional*): extra Trainer callbacks.

    Returns:
        [`SliMETrainer`]: the trainer after training (its `state.log_history` holds the losses).
    """
    model_args, data_args, training_args = parse_args(argv)
    configure_logging(training_args.get_process_log_level())
    if training_args.deepspeed and training_args.world_size > 1:
        import deepspeed

        # accelerate initialises deepspeed.comm only off the CPU; ZeRO-3's partitioned model construction (below,
        # before the Trainer) reads its world size from there.
        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed()
    # Seeded before the model is built, so that freshly initialised adapters are reproducible.
    set_seed(training_args.seed)
    model, processor = build_model_and_processor(model_args, training_args)
    stage = get_stage(training_args.stage)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dataset = SliMEDataset(
        load_training_data(data_args),
        data_args.image_folder,
        processor,
        template=data_args.template or stage.default_template,
        model_max_length=training_args.model_max_length,
        model_config=base.config,
        skip_bad_samples=data_args.skip_bad_samples,
    )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    logger.info(
        f"stage {stage.name} ({stage.description}): {sum(p.numel() for p in model.parameters() if p.requires_grad)} "
        f"trainable parameters in {len(trainable)} tensors; template {dataset.template}; {len(dataset)} samples"
    )
    trainer = SliMETrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=SliMEDataCollator(processor),
        processing_class=processor,
        callbacks=callbacks,
        base_model=model_args.model_name_or_path,
    )
    engine = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]
    if trainer.is_deepspeed_enabled:
        engine += f" ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    logger.info(f"distributed setup: {engine} over {training_args.world_size} process(es)")
    trainer.train(resume_from_checkpoint=_resume_target(training_args))
    trainer.save_model()
    trainer.save_state()
    if dataset.num_truncated or dataset.num_skipped or dataset.num_label_fixes:
        logger.warning(
            f"data (main process): {dataset.num_truncated} samples truncated, {dataset.num_skipped} skipped, "
            f"{dataset.num_label_fixes} with labels that differ from the original's arithmetic"
        )
    return trainer


if __name__ == "__main__":
    main()
