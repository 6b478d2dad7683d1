"""The output folder appears only when complete: work in a temporary folder beside it
(``.OUT.partial``, kept after an interruption so a rerun can resume), locked against a
second run, then move it into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from mergekit.errors import merge_failure, usage_error

try:
    import fcntl
except ImportError:  # no advisory locks (Windows): runs are not kept apart
    fcntl = None  # type: ignore[assignment]

MARKER = "mergekit_config.yml"
LOCK = "mergekit.lock"
JOURNAL = "mergekit_journal.jsonl"


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


def temp_path(out: Path) -> Path:
    """Where the merge into ``out`` works: the same place for every run, so a rerun finds
    the work of an interrupted one."""
    out = out.resolve()
    return out.parent / f".{out.name}.partial"


def make_temp(out: Path) -> Path:
    """Create (or find) the temporary folder; refuse one holding files we did not write."""
    tmp = temp_path(out)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise usage_error(str(tmp), "exists and is not a folder",
                          "remove it or choose another output folder") from None
    except OSError as exc:
        raise merge_failure(str(tmp.parent), f"cannot create the output folder "
                            f"({exc.strerror})", "check the path and its permissions") from None
    names = {p.name for p in tmp.iterdir()}
    if names and not names & {LOCK, JOURNAL, MARKER}:
        raise usage_error(str(tmp), "holds files that mergekit did not write",
                          "remove the folder or choose another output folder")
    return tmp


class FolderLock:
    """An exclusive lock on the temporary folder: ``mergekit.lock`` holds the owner's pid and
    is locked with flock, so the lock of a process that died (even by ``kill -9``) is free
    again and the next run takes it over."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def release(self, folder: Path | None) -> None:
        """Delete the lock file in ``folder`` (where the temporary folder is now; None when it
        is gone) and unlock."""
        if folder is not None:
            with contextlib.suppress(OSError):
                (folder / LOCK).unlink()
        with contextlib.suppress(OSError):
            os.close(self._fd)


def lock(tmp: Path, out: Path) -> FolderLock:
    """Lock ``tmp`` for this process, or refuse when another merge into ``out`` holds it."""
    path = tmp / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise merge_failure(str(path), f"cannot create ({exc.strerror})",
                                "check the output folder's permissions") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                pid = _read_pid(path)
                who = f"another merge (pid {pid})" if pid else "another merge"
                raise usage_error(str(out), f"{who} is writing this output right now",
                                  "wait for it to finish or stop it; its work is in "
                                  f"{tmp}") from None
            except OSError:  # a file system without flock: go on unlocked
                pass
        try:  # the holder we waited on may have deleted the file: lock the one there now
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
        tmp.mkdir(parents=True, exist_ok=True)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return FolderLock(fd)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


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
