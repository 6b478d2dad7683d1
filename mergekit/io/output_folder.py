"""The output folder appears only when complete: work in a temporary folder beside it
(``.OUT.partial``, kept after an interruption so a rerun can resume), locked against a
second run, then move it into place.

An existing OUT is replaced only when it is provably a complete output of this tool: its
``mergekit_manifest.json`` lists everything it holds. Only what that manifest lists is
ever deleted. An output of a different recipe (or options that change the result) is
replaced only when asked (``overwrite``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mergekit.errors import merge_failure, usage_error
from mergekit.io.manifest import MANIFEST

try:
    import fcntl
except ImportError:  # no advisory locks (Windows): runs are not kept apart
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("mergekit")

LOCK = "mergekit.lock"
JOURNAL = "mergekit_journal.jsonl"
# the shard names plan.py gives, in any shard count (an interrupted run's may differ)
_SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def check_output(out: Path, input_folders: Iterable[Path],
                 made_by: Mapping[str, Any] | None = None, overwrite: bool = False) -> None:
    """Refuse an OUT that is an input, the current folder or one above it, or an existing
    folder that is not a complete earlier output of mergekit, or (unless ``overwrite``)
    one made by other ``made_by`` records (the manifest's ``recipe`` and ``options``)."""
    target = out.resolve()
    with contextlib.suppress(OSError):  # the current folder may be gone
        here = Path.cwd().resolve()
        if here == target or here.is_relative_to(target):
            what = "is the current folder" if here == target else "holds the current folder"
            raise usage_error(str(out), f"{what}, and the merge would replace it",
                              "write into a new folder, e.g. merged")
    for folder in input_folders:
        f = folder.resolve()
        if target == f or f.is_relative_to(target) or target.is_relative_to(f):
            raise usage_error(str(out), f"the output folder overlaps the input model {folder}",
                              "choose another output folder")
    if out.exists() and not out.is_dir():
        raise usage_error(str(out), "exists and is not a folder", "choose another output path")
    if out.is_dir() and (problem := _not_replaceable(out)):
        raise usage_error(str(out), problem, "choose another output folder")
    if out.is_dir() and not overwrite and (problem := _made_otherwise(out, made_by)):
        raise usage_error(str(out), problem, OVERWRITE_FIX)


OVERWRITE_FIX = "pass --overwrite to replace it, or choose another output folder"


def _made_otherwise(out: Path, made_by: Mapping[str, Any] | None) -> str | None:
    """How the complete earlier output in ``out`` was made otherwise than ``made_by`` says
    (its ``recipe`` and ``options`` records, as the manifest holds them); None when it is
    empty or made the same way, so that a rerun replaces it as before."""
    if made_by is None or not any(out.iterdir()):
        return None
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        data = {}
    now = json.loads(json.dumps(made_by))  # tuples as lists, as they were written
    if not isinstance(data, dict) or data.get("recipe") != now["recipe"]:
        return "holds the output of a different recipe"
    then = data["options"] if isinstance(data.get("options"), dict) else {}
    changed = sorted(k for k in {*then, *now["options"]} if then.get(k) != now["options"].get(k))
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        return f"holds the output of this recipe made with a different {flags}"
    return None


def _not_replaceable(out: Path) -> str | None:
    """Why the existing folder ``out`` may not be replaced; None when it is empty or a
    complete mergekit output."""
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return None
    listed = _listed(out)
    if listed is None:
        return (f"exists and holds {_few(out, names)} but no valid {MANIFEST}, so it is not "
                "a mergekit output")
    unexpected = [n for n in names if n not in listed or not _is_file(out / n)]
    if unexpected:
        return (f"holds files its {MANIFEST} does not list: {_few(out, unexpected)}, so it is "
                "not only a mergekit output")
    return None


def _listed(folder: Path) -> set[str] | None:
    """The names the manifest in ``folder`` accounts for (its shards, its other files and
    itself); None when there is no manifest written by mergekit."""
    path = folder / MANIFEST
    if not _is_file(path):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "mergekit":
        return None
    shards, files = data.get("shards"), data.get("files", {})
    if not isinstance(shards, dict) or not isinstance(files, dict):
        return None
    return {*shards, *files, MANIFEST}


def _is_file(path: Path) -> bool:
    """A regular file, not a link or a folder."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _few(folder: Path, names: list[str], shown: int = 5) -> str:
    """A few of ``names`` (folders with a trailing /), then how many more."""
    def show(name: str) -> str:
        text = name if name.isprintable() else ascii(name)
        return text + "/" if (folder / name).is_dir() and not (folder / name).is_symlink() \
            else text

    text = ", ".join(show(n) for n in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def temp_path(out: Path) -> Path:
    """Where the merge into ``out`` works: the same place for every run, so a rerun finds
    the work of an interrupted one."""
    out = out.resolve()
    return out.parent / f".{out.name}.partial"


def make_temp(out: Path, output_names: Collection[str]) -> Path:
    """Create (or find) the temporary folder; refuse one holding anything mergekit does
    not write there: the lock, the journal, shards and ``output_names`` (the files
    besides the weights), each possibly as ``.part``."""
    tmp = temp_path(out)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise usage_error(str(tmp), "exists and is not a folder",
                          "remove it or choose another output folder") from None
    except OSError as exc:
        raise merge_failure(str(tmp.parent), f"cannot create the output folder "
                            f"({exc.strerror})", "check the path and its permissions") from None
    names = sorted(p.name for p in tmp.iterdir())
    known = {LOCK, JOURNAL, *output_names}

    def ours(name: str) -> bool:
        base = name.removesuffix(".part")
        return _is_file(tmp / name) and (base in known or bool(_SHARD.fullmatch(base)))

    # a folder we worked in holds our lock (made first) or our journal
    foreign = [n for n in names if not ours(n)] if {LOCK, JOURNAL} & set(names) else names
    if foreign:
        raise usage_error(str(tmp), f"holds files that mergekit did not write: "
                          f"{_few(tmp, foreign)}",
                          "remove the folder or choose another output folder")
    return tmp


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Report a failed write of ``path`` in the temporary folder (a full disk, a folder in
    the way) as one line; the finished shards stay for a rerun."""
    try:
        yield
    except OSError as exc:
        raise merge_failure(str(path), f"cannot write ({exc.strerror or exc})",
                            "free disk space or choose another output folder") from None


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


def move_into_place(tmp: Path, out: Path, made_by: Mapping[str, Any] | None = None,
                    overwrite: bool = False) -> None:
    """Replace OUT (absent, empty, or a complete earlier output, checked again as
    ``check_output`` did: files or another merge's output may have appeared in it during the
    merge) with the finished folder, less its lock and journal. Of the old OUT only what its
    manifest lists is deleted."""
    out = out.resolve()
    if out.is_dir() and (problem := _not_replaceable(out)):
        raise merge_failure(str(out), f"changed during the merge: it {problem}",
                            "move those files away and rerun the same command")
    if out.is_dir() and not overwrite and (problem := _made_otherwise(out, made_by)):
        raise merge_failure(str(out), f"changed during the merge: it {problem}",
                            OVERWRITE_FIX)
    tag = uuid.uuid4().hex[:8]
    done = out.parent / f".{out.name}.done-{tag}"
    old = out.parent / f".{out.name}.old-{tag}"
    try:
        # once renamed, no second run can take the lock in tmp, so the lock file can go
        # before the folder becomes OUT: a stop at any point leaves no lock in OUT
        os.replace(tmp, done)
        try:
            if out.exists():
                os.replace(out, old)
            (done / LOCK).unlink(missing_ok=True)
            (done / JOURNAL).unlink(missing_ok=True)
            os.replace(done, out)
        except OSError:
            with contextlib.suppress(OSError):
                if old.exists():
                    os.replace(old, out)
                os.replace(done, tmp)
            raise
    except OSError as exc:
        raise merge_failure(str(out), f"cannot move the finished merge into place "
                            f"({exc.strerror or exc})", "check the folder's permissions") from None
    if old.exists():
        _remove_listed(old)


def _remove_listed(old: Path) -> None:
    """Delete the replaced output: the files its manifest lists, then the folder if that
    left it empty."""
    for name in _listed(old) or ():
        if Path(name).name == name and _is_file(old / name):
            with contextlib.suppress(OSError):  # what stays keeps the folder, with a warning
                (old / name).unlink()
    try:
        old.rmdir()
    except OSError:
        log.warning("%s: the replaced output is kept: it holds files its %s does not list",
                    old, MANIFEST)


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
