"""Converts a released SliME checkpoint into a self-contained Hugging Face repo.

    python conversion/convert_slime_to_hf.py --input DIR_OR_REPO_ID --output DIR [--base DIR_OR_ID]
        [--vision-tower DIR_OR_ID] [--dtype bfloat16|float16|float32] [--max-shard-size 5GB]
        [--push-to-hub REPO_ID] [--private] [--no-verify]

What the input holds is read from its files and weight names (see `slime_hf.checkpoints.detect_checkpoint_kind`):

- a full checkpoint (the authors' `llava_llama` layout, CLIP inside): converted as is;
- a LoRA release (`adapter_config.json` + `adapter_model.*` + `non_lora_trainables.*`): merged into the base language
  model (`--base`, else the one its adapter config names) tensor by tensor, the vision tower from `--vision-tower`
  (else the config's `mm_vision_tower`);
- stage-1/2 adapter files (`mm_projector.bin`, `sampler.bin`): written as a stage checkpoint (config + adapter weights,
  the start of the next training stage); needs `--base` and `--vision-tower` for the config.

Weights are streamed: one input tensor at a time is read, renamed with the package's one name table, cast (the
resamplers' position tables stay float16) and appended to the output shard on disk, so the model is never held in
memory. Everything is written to a temporary folder beside the output and moved into place only after the
verification (the output reloaded through the Auto classes in a process where `slime_hf` cannot be imported and
compared with the package's own load of the input) passed. An interrupted run removes that folder (Ctrl-C, SIGTERM,
SIGHUP); one killed outright leaves it, and the next conversion to the same output removes it and says so.

Modules: `hub` (inputs from the Hub, upload), `configs` (the output config), `plan` (the checked tensor plan),
`inputs` (what a conversion reads: `prepare`), `writer` (streaming safetensors), `output` (the repo's files),
`verify` and `remote_check` (the verification), `staging` (the staging folder), `cli` (the command line).
"""

from .cli import convert, main, parse_args
from .errors import ConversionError, VerificationError
from .inputs import Conversion, prepare


__all__ = ["Conversion", "ConversionError", "VerificationError", "convert", "main", "parse_args", "prepare"]
