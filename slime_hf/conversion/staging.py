"""The staging folder beside the output: marked as this converter's, and removed when a killed run left it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket


logger = logging.getLogger("slime_hf.conversion")

# Marks a staging folder as this converter's: who writes it, for which output. A run killed before its `finally`
# (SIGKILL, power loss) leaves the folder behind; the next conversion to the same output removes it.
STAGING_MARKER = ".slime-conversion-staging.json"


def staging_prefix(output: str) -> str:
    """The name prefix of `output`'s staging folders (`.OUTPUT.tmp-`), beside it in the same parent folder."""
    return f".{os.path.basename(output)}.tmp-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a pid this platform cannot check: treat as alive
    return True


def _folder_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def remove_stale_staging(output: str) -> None:
    """Removes the staging folders beside `output` that an interrupted conversion to it left, and says so. Only
    folders carrying this converter's marker, written on this host by a process that no longer runs, are removed
    (and empty ones: killed before the marker); any other leftover is named and left alone."""
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        return
    host = socket.gethostname()
    for entry in sorted(os.listdir(parent)):
        folder = os.path.join(parent, entry)
        if not entry.startswith(staging_prefix(output)) or not os.path.isdir(folder) or os.path.islink(folder):
            continue
        try:
            with open(os.path.join(folder, STAGING_MARKER), encoding="utf-8") as handle:
                owner = json.load(handle)
        except (OSError, ValueError):
            owner = None
        if owner is None and not os.listdir(folder):
            os.rmdir(folder)
            logger.warning(f"removed {folder}, an empty staging folder left by an interrupted conversion")
        elif not isinstance(owner, dict) or owner.get("output") != output:
            logger.warning(
                f"{folder} looks like a conversion's staging folder but carries no marker of this "
                "converter for this output: left in place (remove it yourself if it is a leftover)"
            )
        elif owner.get("host") != host:
            logger.warning(
                f"{folder} is the staging folder of a conversion on host {owner.get('host')!r} "
                f"(pid {owner.get('pid')}): left in place"
            )
        elif _process_alive(int(owner.get("pid", -1))):
            logger.warning(f"{folder} is being written by a running conversion (pid {owner['pid']}): left in place")
        else:
            size = _folder_size(folder)
            shutil.rmtree(folder)
            logger.warning(
                f"removed {folder} ({size / 2**20:.1f} MB), the staging folder left by an interrupted "
                f"conversion (pid {owner['pid']})"
            )
