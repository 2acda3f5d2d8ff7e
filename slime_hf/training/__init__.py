"""Training SliME with the Hugging Face `Trainer`: datasets, collator, stage presets, trainer and arguments.

```python
from slime_hf.training import SliMEDataset, SliMEDataCollator, SliMETrainer, SliMETrainingArguments
```

The command line entry point is `python -m slime_hf.train` (see `examples/train/README.md`).
"""

from .arguments import SliMEDataArguments, SliMEModelArguments, SliMETrainingArguments
from .build import build_model_and_processor
from .data import SliMEDataCollator, SliMEDataset
from .sampler import ModalityLengthGroupedSampler
from .stages import STAGES, StagePreset, apply_stage_config, freeze_for_stage, get_stage, prepare_model_for_stage
from .trainer import SliMETrainer


__all__ = [
    "STAGES",
    "ModalityLengthGroupedSampler",
    "SliMEDataArguments",
    "SliMEDataCollator",
    "SliMEDataset",
    "SliMEModelArguments",
    "SliMETrainer",
    "SliMETrainingArguments",
    "StagePreset",
    "apply_stage_config",
    "build_model_and_processor",
    "freeze_for_stage",
    "get_stage",
    "prepare_model_for_stage",
]
