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
from transformers.utils import logging

from .command_line import run_reporting_errors
from .training.arguments import SliMEDataArguments, SliMEModelArguments, SliMETrainingArguments
from .training.build import build_model_and_processor
from .training.data import SliMEDataCollator, SliMEDataset, load_records
from .training.stages import get_stage
from .training.trainer import CHECKPOINT_COMPLETE_NAME, SliMETrainer, is_complete_checkpoint, last_complete_checkpoint


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


def _looks_like_a_file(path: str) -> bool:
    # What cannot be a Hub dataset id: a JSON / JSONL name, or an explicitly local path.
    return path.endswith((".json", ".jsonl")) or path.startswith((".", "~", os.sep)) or os.path.isabs(path)


def load_training_data(data_args: SliMEDataArguments) -> Any:
    """LLaVA JSON / JSONL files, or one Hugging Face dataset (a `save_to_disk` folder or a Hub id)."""
    paths = data_args.data_path
    for path in paths:
        if not os.path.exists(path) and _looks_like_a_file(path):
            # Before `datasets` would take it for a Hub id and report the Hub unreachable.
            raise ValueError(f"training data file not found: {path} (looked in {os.path.abspath(path)})")
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
    output_dir = training_args.output_dir
    if str(value).lower() in ("true", "last"):
        last, skipped = last_complete_checkpoint(output_dir) if os.path.isdir(output_dir) else (None, [])
        for path, reason in skipped:
            logger.warning(f"--resume_from_checkpoint {value}: skipping {path}: {reason}")
        if last is None:
            hint = " (pass a checkpoint's path to --resume_from_checkpoint to resume from it anyway)" if skipped else ""
            raise ValueError(f"--resume_from_checkpoint {value}: no complete checkpoint in {output_dir}{hint}")
        logger.warning(f"--resume_from_checkpoint {value}: resuming from {last}")
        return last
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    if not is_complete_checkpoint(value):
        logger.warning(
            f"--resume_from_checkpoint {value}: it has no {CHECKPOINT_COMPLETE_NAME}, so its save may not "
            "have finished (or an older slime_hf wrote it)"
        )
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
    # Before the model is built: a bad data file or resume target fails fast.
    resume_from_checkpoint = _resume_target(training_args)
    records = load_training_data(data_args)
    # Seeded before the model is built, so that freshly initialised adapters are reproducible.
    set_seed(training_args.seed)
    model, processor = build_model_and_processor(model_args, training_args)
    stage = get_stage(training_args.stage)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dataset = SliMEDataset(
        records,
        data_args.image_folder,
        processor,
        template=data_args.template or stage.default_template,
        model_max_length=training_args.model_max_length,
        model_config=base.config,
        skip_bad_samples=data_args.skip_bad_samples,
        allow_images_outside_folder=data_args.allow_images_outside_folder,
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
        data_path=data_args.data_path,
    )
    engine = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]
    if trainer.is_deepspeed_enabled:
        engine += f" ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    logger.info(f"distributed setup: {engine} over {training_args.world_size} process(es)")
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()
    _leave_process_group(trainer)
    if dataset.num_truncated or dataset.num_skipped or dataset.num_label_fixes:
        logger.warning(
            f"data (main process): {dataset.num_truncated} samples truncated, {dataset.num_skipped} skipped, "
            f"{dataset.num_label_fixes} with labels that differ from the original's arithmetic"
        )
    return trainer


# How long the process group's teardown may take once every process has passed the final barrier.
TEARDOWN_DEADLINE_S = 60.0


def _leave_process_group(trainer) -> None:
    """Ends a multi-process run cleanly: every process waits until the main one has written the final model, then the
    process group is destroyed (a process that exits with gloo's worker threads still alive can abort at shutdown).
    The teardown gets `TEARDOWN_DEADLINE_S` seconds: it can hang on its own (pytorch/pytorch#75097), and by then
    everything is saved, so a hang is reported and left behind instead of holding the job."""
    import threading

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    trainer.accelerator.wait_for_everyone()
    finished = threading.Event()

    def teardown() -> None:
        dist.destroy_process_group()
        finished.set()

    threading.Thread(target=teardown, name="process-group-teardown", daemon=True).start()
    if not finished.wait(TEARDOWN_DEADLINE_S):
        logger.warning(
            f"the process group's teardown did not finish within {TEARDOWN_DEADLINE_S:g} s; everything is saved, "
            "so the run ends without it"
        )


def _is_multi_process_run() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def cli(argv: Sequence[str] | None = None) -> int:
    """`python -m slime_hf.train`: bad input (arguments, paths, data, a sample) ends with a one-line `error: ...` on
    stderr and exit status 2, without a traceback (`--log_level debug` logs it).

    A process of a multi-process run that succeeded runs its exit handlers (loggers, experiment trackers) and ends
    without the interpreter's final teardown: everything is saved and every process has passed the final barrier,
    and the teardown of the collective backends' threads can hang or abort, which would turn a finished run into a
    stuck or failed job."""
    status = run_reporting_errors(main, argv)
    if status == 0 and _is_multi_process_run():
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return status


if __name__ == "__main__":
    sys.exit(cli())
