"""The journal of finished shards in the temporary folder, so a rerun after a crash, a
``kill -9`` or Ctrl-C keeps them and merges only the rest.

``mergekit_journal.jsonl``: the first line ``{"journal": 1, "fingerprint": "<sha256>"}``
names the shards being made (recipe, options that change them, inputs, plan); each
further line ``{"shard": "<file>", "sha256": "<hex>"}`` is appended, and synced, once that
shard is complete on disk. A last line torn by a crash is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from mergekit.errors import merge_failure
from mergekit.io.manifest import file_sha256
from mergekit.io.output_folder import JOURNAL, LOCK, FolderLock, discard
from mergekit.io.writer import sync_folder

log = logging.getLogger("mergekit")
FORMAT = 1


def fingerprint(provenance: dict[str, Any], plan_text: str) -> str:
    """sha256 of what decides the shards' bytes: ``provenance`` (tool version, the recipe
    less what decides only the files beside the weights, options that change the shards,
    inputs' revisions and files: sizes with sha256s, or with modification times and
    sampled sha256s) and the plan. The tokenizer, chat template and model card are left
    out: changing them keeps the finished shards."""
    data = {"provenance": provenance, "plan": plan_text}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class Journal:
    """The finished shards (``done``: file name -> sha256) of the merge in ``folder``."""

    def __init__(self, folder: Path, done: dict[str, str], file: TextIO) -> None:
        self.folder = folder
        self.done = done
        self._file = file

    @classmethod
    def open(cls, folder: Path, fp: str, shard_files: Sequence[str], resume: bool) -> Journal:
        """Keep the shards an earlier run of the same merge finished (checking each one's
        sha256), start a journal listing them, and delete everything else in ``folder``
        but the lock."""
        old_fp, entries = _read(folder / JOURNAL)
        done: dict[str, str] = {}
        if entries and not resume:
            log.warning("%s: --no-resume: discarding %d finished shard(s) of an earlier run",
                        folder, len(entries))
        elif entries and old_fp != fp:
            log.warning("%s: the recipe, options or inputs changed since the interrupted run; "
                        "discarding its %d finished shard(s) and starting over", folder,
                        len(entries))
        elif entries:
            for name, sha in entries.items():
                path = folder / name
                if name in shard_files and path.is_file() and file_sha256(path) == sha:
                    done[name] = sha
                else:
                    log.warning("%s: %s is missing or damaged; merging it again", folder, name)
            if done:
                log.info("resuming: %d of %d shard(s) already merged in %s", len(done),
                         len(shard_files), folder)
        lines = [{"journal": FORMAT, "fingerprint": fp}]
        lines += [{"shard": name, "sha256": sha} for name, sha in done.items()]
        path = folder / JOURNAL
        fresh = path.with_name(path.name + ".part")
        try:
            with open(fresh, "w") as f:
                f.writelines(json.dumps(line) + "\n" for line in lines)
                f.flush()
                os.fsync(f.fileno())
            os.replace(fresh, path)
            sync_folder(folder)
            file = open(path, "a")  # noqa: SIM115 - closed in remove()/close()
        except OSError as exc:
            raise merge_failure(str(path), f"cannot write ({exc.strerror})",
                                "free disk space or choose another output folder") from None
        for entry in folder.iterdir():  # after the journal: a stop here loses no shard
            if entry.name not in done and entry.name not in (LOCK, JOURNAL):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        return cls(folder, done, file)

    def add(self, shard: str, sha256: str) -> None:
        """Record a shard that is complete on disk under its final name."""
        try:
            self._file.write(json.dumps({"shard": shard, "sha256": sha256}) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise merge_failure(str(self.folder / JOURNAL), f"cannot write ({exc.strerror})",
                                "free disk space or choose another output folder") from None
        self.done[shard] = sha256

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass


def keep_partial_work(exc: BaseException, tmp: Path, lock: FolderLock,
                      journal: Journal | None, total: int) -> None:
    """After a failure or an interruption: keep the temporary folder when it holds finished
    shards, adding a note to ``exc`` that says how to resume; else delete it."""
    if journal is not None:
        journal.close()
        kept = len(journal.done)
    else:  # stopped while opening the journal: the earlier run's one is still there
        kept = len(_read(tmp / JOURNAL)[1])
    if not kept:
        discard(tmp)
        lock.release(None)
        return
    lock.release(tmp)
    note = (f"{kept} of {total} shard(s) are finished and kept in {tmp}; rerun the same "
            "command to resume")
    exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # add_note, also on Python 3.10


def _read(path: Path) -> tuple[str | None, dict[str, str]]:
    """(fingerprint, {shard: sha256}) of a journal; (None, {}) when there is none."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None, {}
    fp = None
    entries: dict[str, str] = {}
    for n, line in enumerate(text.splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            break  # torn by a crash: what follows cannot be trusted either
        if not isinstance(record, dict):
            break
        if n == 0:
            if record.get("journal") != FORMAT:
                return None, {}
            fp = record.get("fingerprint")
        elif isinstance(record.get("shard"), str) and isinstance(record.get("sha256"), str):
            entries[record["shard"]] = record["sha256"]
    return fp, entries
