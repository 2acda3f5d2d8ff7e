"""`python -m slime_hf.evaluation.launch [lmms-eval arguments]`: lmms-eval's evaluation with several task folders.

lmms-eval's own command line takes one `--include_path` and logs a failed evaluation while exiting with status 0; this
entry point takes `--include_path` any number of times (the package's task variants plus the caller's) and lets a
failure end the process with a non-zero status. Everything else is lmms-eval's (`cli_evaluate_single`); it runs under
torchrun or `accelerate launch` as lmms-eval does.
"""

from __future__ import annotations

import datetime
import sys


def split_include_paths(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates every `--include_path PATH` (or `--include_path=PATH`) from the other arguments."""
    include_paths, rest = [], []
    arguments = iter(argv)
    for argument in arguments:
        if argument == "--include_path":
            value = next(arguments, None)
            if value is None:
                raise SystemExit("--include_path needs a folder")
            include_paths.append(value)
        elif argument.startswith("--include_path="):
            include_paths.append(argument.split("=", 1)[1])
        else:
            rest.append(argument)
    return include_paths, rest


def main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from lmms_eval.__main__ import cli_evaluate_single, parse_eval_args
    from loguru import logger

    include_paths, rest = split_include_paths(list(sys.argv[1:] if argv is None else argv))
    sys.argv = [sys.argv[0], *rest]
    _, args = parse_eval_args()
    args.include_path = include_paths or None
    logger.remove()
    logger.add(sys.stdout, level=args.verbosity)
    # as lmms-eval's command line: the process group (under accelerate launch) exists before the model is built
    Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(hours=16))])
    cli_evaluate_single(args)


if __name__ == "__main__":
    main()
