"""The converter's command line: prepare, write into a staging folder, verify, move into place, push."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading

from .configs import DTYPES
from .errors import ConversionError, VerificationError
from .hub import push_to_hub
from .inputs import prepare
from .output import write_output
from .staging import STAGING_MARKER, remove_stale_staging, staging_prefix
from .verify import verify, verify_stage_checkpoint
from .writer import parse_size


logger = logging.getLogger("slime_hf.conversion")


def convert(args: argparse.Namespace) -> dict:
    """Runs a conversion: prepare, write into a temporary folder beside the output, verify, move into place, push."""
    output = os.path.abspath(args.output)
    remove_stale_staging(output)
    if os.path.exists(output):
        raise ConversionError(f"the output {output} already exists; nothing was written (choose a new folder)")
    parse_size(args.max_shard_size)
    conversion = prepare(args)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=staging_prefix(output), dir=parent)
    report: dict = {"kind": conversion.kind}
    try:
        with open(os.path.join(staging, STAGING_MARKER), "w", encoding="utf-8") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "output": output}, handle)
        write_output(conversion, staging, args)
        if not args.no_verify:
            if conversion.kind in ("adapters", "stage"):
                verify_stage_checkpoint(conversion, staging)
            else:
                report.update(verify(conversion, staging, args))
        if os.path.exists(output):
            raise ConversionError(f"the output {output} appeared during the conversion; nothing was overwritten")
        os.remove(os.path.join(staging, STAGING_MARKER))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp creates the folder private
        os.rename(staging, output)
    finally:
        conversion.plan.close()
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"wrote {output}")
    if args.push_to_hub:
        push_to_hub(output, args.push_to_hub, args.private)
    return report


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The converter's options (`--help` lists them)."""
    parser = argparse.ArgumentParser(
        description="Converts a released SliME checkpoint into a self-contained Hugging Face repo.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="local folder (or adapter file) or Hub repo id of the release")
    parser.add_argument("--output", required=True, help="output folder (must not exist)")
    parser.add_argument("--base", help="base language model of a LoRA release or of adapter files (folder or id)")
    parser.add_argument("--vision-tower", help="CLIP checkpoint (folder or id) when the input does not hold it")
    parser.add_argument(
        "--mm-projector",
        help="an mm_projector.bin (or its folder) for inputs without the global "
        "adapter, e.g. an original trainer's checkpoint-N/",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="weight dtype (default: the checkpoint's torch_dtype); position tables stay float16",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    parser.add_argument(
        "--chat-template", help="default chat template (vicuna_v1, llama3, ...; default: from the tokenizer)"
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the verified output to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--no-verify", action="store_true", help="skip the verification")
    parser.add_argument("--verify-device", default="cpu", help="device of the verification runs (default cpu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 verification failed, 2 bad input, 130
    interrupted)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    # SIGTERM / SIGHUP (a scheduler's stop, a closed terminal) unwind like Ctrl-C, so the staging folder is removed.
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # the only thread that may set signal handlers
        for number in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if number is not None:
                handlers[number] = signal.signal(number, _raise_interrupt)
    try:
        convert(args)
    except VerificationError as error:
        print(f"verification failed: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # ConversionError and the readers' ValueErrors: bad input
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return 0
