"""The output folder appears only when complete: work in a temporary folder beside it,
then move it into place."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from mergekit.errors import merge_failure, usage_error

MARKER = "mergekit_config.yml"


def check_output(out: Path, input_folders: Iterable[Path]) -> None:
    """Refuse an OUT that is an input, or an existing folder we did not write."""
    target = out.resolve()
    for folder in input_folders:
        f = folder.resolve()
        if target == f or f.is_relative_to(target) or target.is_relative_to(f):
            raise usage_error(str(out), f"the output folder overlaps the input model {folder}",
                              "choose another output folder")
    if out.exists() and not out.is_dir():
        raise usage_error(str(out), "exists and is not a folder", "choose another output path")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise usage_error(str(out), "exists, is not empty and is not a mergekit output",
                          "choose another output folder or remove it")


def make_temp(out: Path) -> Path:
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise merge_failure(str(parent), f"cannot create the output folder ({exc.strerror})",
                            "check the path and its permissions") from None
    return tmp


def move_into_place(tmp: Path, out: Path) -> None:
    """Replace OUT (empty, or an earlier mergekit output) with the finished folder."""
    out = out.resolve()
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
