#!/usr/bin/env python
"""Converts a released SliME checkpoint into a self-contained Hugging Face repo.

    python conversion/convert_slime_to_hf.py --input DIR_OR_REPO_ID --output DIR [--base DIR_OR_ID]
        [--vision-tower DIR_OR_ID] [--dtype bfloat16|float16|float32] [--max-shard-size 5GB]
        [--push-to-hub REPO_ID] [--private] [--no-verify]

The command line of `slime_hf.conversion` (see its documentation and `conversion/README.md`); `--help` lists every
option.
"""

from __future__ import annotations

import sys
from pathlib import Path


try:
    from slime_hf.conversion import main
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from slime_hf.conversion import main


if __name__ == "__main__":
    sys.exit(main())
