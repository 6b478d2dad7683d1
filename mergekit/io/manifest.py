"""mergekit_manifest.json: what made this output (tool version, recipe, options that change
the result, the inputs' revisions and files) and each shard's sha256, for checking later."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from mergekit.io.model import ModelSource

MANIFEST = "mergekit_manifest.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
SAMPLE_BYTES = 1 << 20  # read at each end of an input file by sampled_sha256


def input_record(source: ModelSource, files: set[str], hash_files: bool = False
                 ) -> dict[str, Any]:
    """Revision and the files read, each with its size and:

    - with ``hash_files``, its sha256, read from the bytes there now (every file is read
      once more, a large part of a merge's time);
    - else its sha256 where known without reading it: the hub cache names each large file
      by its sha256, and a folder made by ``hf download --local-dir`` keeps each file's
      commit and sha256 beside it;
    - else ``mtime_ns`` and ``sampled_sha256`` (see ``sampled_sha256``), so that a file
      rewritten in place with the same size and time still changes the record, and a
      resumed merge starts over instead of mixing shards of the old file into the output."""
    record = _files_record(str(source.ref), source.folder, files | {"config.json"},
                           hash_files)
    adapter = getattr(source, "adapter", None)  # a model read through a LoRA adapter
    if adapter is not None:
        record["adapter"] = _files_record(str(adapter.ref), adapter.folder, set(adapter.files),
                                          hash_files)
    return record


def _files_record(reference: str, folder: Path, files: set[str], hash_files: bool
                  ) -> dict[str, Any]:
    record: dict[str, Any] = {"reference": reference}
    snapshot = folder
    if snapshot.parent.name == "snapshots":
        record["revision"] = snapshot.name
    entries = {}
    commits = set()
    for name in sorted(files):
        path = folder / name
        if not path.exists():
            continue
        stat = path.stat()
        entry: dict[str, Any] = {"size": stat.st_size}
        download = local_download(folder, name)
        if download is not None:
            commits.add(download[0])
        blob = path.resolve().name
        if hash_files:
            entry["sha256"] = file_sha256(path)
        elif _SHA256.match(blob):
            entry["sha256"] = blob
        elif download is not None and _SHA256.match(download[1]):
            entry["sha256"] = download[1]
        else:
            entry["mtime_ns"] = stat.st_mtime_ns
            entry["sampled_sha256"] = sampled_sha256(path, stat.st_size)
        entries[name] = entry
    if "revision" not in record and len(commits) == 1:
        record["revision"] = commits.pop()
    record["files"] = entries
    return record


def local_download(folder: Path, name: str) -> tuple[str, str] | None:
    """(commit, etag) that ``hf download --local-dir`` recorded for ``folder/name``, when
    the file has not changed since; for a large (LFS) file the etag is its sha256.

    The record is ``.cache/huggingface/download/<name>.metadata``: three lines, the commit,
    the etag and the time it was written (a file modified later is not trusted)."""
    meta = folder / ".cache" / "huggingface" / "download" / (name + ".metadata")
    try:
        commit, etag, stamp = meta.read_text().splitlines()[:3]
        modified = (folder / name).stat().st_mtime
        written = float(stamp)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    # the file's mtime may be up to a second past the stamp (coarse clocks)
    if modified - 1 > written or not re.fullmatch(r"[0-9a-f]{40}", commit.strip()):
        return None
    return commit.strip(), etag.strip().strip('"')


def manifest(
    version: str,
    recipe: dict[str, Any],
    options: dict[str, Any],
    sources: Mapping[str, ModelSource],
    read_files: Mapping[str, set[str]],
    shard_sha256: Mapping[str, str],
    hash_inputs: bool = False,
) -> dict[str, Any]:
    return {
        "tool": "mergekit",
        "version": version,
        "recipe": recipe,
        "options": options,
        "inputs": [input_record(sources[k], read_files.get(k, set()), hash_inputs)
                   for k in sources],
        "shards": dict(shard_sha256),
    }


def write_manifest(folder: Path, data: dict[str, Any], skip: Collection[str] = ()) -> None:
    """Write the manifest into ``folder``, adding ``files``: the size and sha256 of every
    file there but the shards, the manifest and ``skip`` (the journal and the lock), so
    that the manifest lists everything the output holds."""
    shards = data.get("shards", {})
    files = {
        p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in shards and p.name != MANIFEST and p.name not in skip
    }
    (folder / MANIFEST).write_text(json.dumps({**data, "files": files}, indent=2) + "\n")


def sampled_sha256(path: Path, size: int) -> str:
    """sha256 of the file's size (8 bytes, little-endian), its first MiB and its last MiB
    (the whole file once when it is smaller than 2 MiB): a cheap check of its content that
    reads 2 MiB at most. A change only between the two is not seen; ``--hash-inputs`` is."""
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()

