"""mergekit-verify's checks of an output folder against its mergekit_manifest.json: every
file listed is there with its size and sha256 (each read once), the shards' headers are
well-formed and agree with the index, and the folder holds nothing the merge did not write.

Files that the hub and git keep beside a repository's own (``BOOKKEEPING``) are left alone,
so that a download or a clone of an uploaded output verifies too."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit.errors import usage_error
from mergekit.io.artifacts import RECIPE
from mergekit.io.manifest import MANIFEST, file_sha256
from mergekit.io.weight_index import INDEX, index_problems, shard_header

# what loaders (transformers, llama.cpp, vLLM) may pick up as weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
# a model cannot be loaded, or its output not be told apart from another folder, without
REQUIRED = ("config.json", RECIPE)
# the same for a LoRA adapter (mergekit-extract-lora, --lora-out): what peft loads
ADAPTER_REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
# relative paths: the hub's attributes file, a git clone's repository and the record
# that ``hf download --local-dir`` keeps
BOOKKEEPING = frozenset({".gitattributes", ".git", ".cache/huggingface"})
# hashing releases the GIL: a few files at once keep a fast disk busy
HASH_THREADS = 4
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)  # "<file>: <what>"
    notes: list[str] = field(default_factory=list)
    shards: int = 0
    files: int = 0
    indexed: bool = False  # the index was checked against the shards' headers
    # False for a manifest from before the manifest listed the other files: only the
    # weights were checked
    files_recorded: bool = True


def verify(folder: Path) -> Verdict:
    """Every difference between ``folder`` and its manifest (no problems when all match)."""
    data = load_manifest(folder)
    files = data.get("files")
    verdict = Verdict(files_recorded=files is not None)
    if files is None:
        verdict.notes.append(
            f"{MANIFEST}: written before mergekit recorded the other files' sizes and sha256; "
            "config.json, the tokenizer, the recipe and the card were not checked")
    problems = verdict.problems
    shards = _listed(data["shards"], problems)
    others = _listed(files or {}, problems, set(shards))
    verdict.shards, verdict.files = len(shards), len(others)
    present = {name for name in {**shards, **others} if _present(folder, name, problems)}

    expected = {}  # name: sha256, for the files whose size (where recorded) matches
    for name, entry in shards.items():
        if name in present and (digest := _digest(name, entry, problems)):
            expected[name] = digest
    for name, entry in others.items():
        if name in present and (sized := _sized_digest(folder, name, entry, problems)):
            expected[name] = sized
    problems.extend(_hash_problems(folder, expected))

    headers = {}
    for name in shards:
        headers[name], problem = shard_header(folder, name) if name in present else (None, None)
        if problem:
            problems.append(problem)
    index = folder / INDEX
    verdict.indexed = index.is_file()
    if verdict.indexed:
        problems.extend(index_problems(_read(index, problems), headers))
    else:
        problems.extend(index_problems(None, headers))
        if len(shards) > 1 and INDEX not in others:
            problems.append(f"{INDEX}: missing; loaders need it to find the tensors of "
                            f"{len(shards)} shards")
    required = ADAPTER_REQUIRED if "adapter_config.json" in others else REQUIRED
    for name in required:  # a listed one is reported above
        if name not in others and name not in shards and not (folder / name).is_file():
            problems.append(f"{name}: missing")
    listed = set(shards) | set(others) | ({INDEX} if files is None else set())
    problems.extend(_unlisted(folder, listed, weights_only=files is None))
    return verdict


def load_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of ``folder``, with ``shards`` an object and ``files`` one or absent;
    anything else is a usage error naming the file."""
    where = printable(str(folder))
    if not folder.exists():
        raise usage_error(where, "no such folder", "give the folder that mergekit-yaml wrote")
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.is_file() else "not a folder"
        raise usage_error(where, what, "give the folder that holds mergekit_manifest.json")
    path = folder / MANIFEST
    where = printable(str(path))
    if not path.exists():
        raise usage_error(printable(str(folder)), f"no {MANIFEST} here",
                          "verify a folder written by mergekit-yaml")
    if not path.is_file():
        raise usage_error(where, "not a regular file", "the folder is damaged")
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise usage_error(where, f"cannot read ({exc.strerror})", "check its permissions"
                          ) from None
    except RecursionError:
        raise usage_error(where, "nested too deeply to be a manifest",
                          "the file is damaged; merge again") from None
    except ValueError:  # also UnicodeDecodeError
        raise usage_error(where, "not valid JSON", "the file is damaged; merge again") from None
    if not isinstance(data, dict):
        raise usage_error(where, "not a JSON object", "the file is damaged; merge again")
    if not isinstance(data.get("shards"), dict):
        raise usage_error(where, "has no 'shards' object", "the file is damaged; merge again")
    if "files" in data and not isinstance(data["files"], dict):
        raise usage_error(where, "'files' is not an object", "the file is damaged; merge again")
    return data


def printable(text: str) -> str:
    """``text`` with control, format and unpaired surrogate characters as escapes, so that a
    hostile name can neither split a line of the report nor rewrite the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _listed(entries: dict[str, Any], problems: list[str],
            taken: set[str] | None = None) -> dict[str, Any]:
    """The entries whose names are plain file names in the folder; a problem for each other."""
    out = {}
    for name, entry in sorted(entries.items()):
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            problems.append(f"{name}: the manifest lists a name that is not a file name")
        elif name == MANIFEST:
            problems.append(f"{name}: the manifest lists itself")
        elif taken and name in taken:
            problems.append(f"{name}: the manifest lists it both as a shard and as a file")
        else:
            out[name] = entry
    return out


def _present(folder: Path, name: str, problems: list[str]) -> bool:
    path = folder / name
    if path.is_file():
        return True
    exists = path.exists() or path.is_symlink()
    problems.append(f"{name}: not a regular file" if exists else f"{name}: missing")
    return False


def _digest(name: str, value: object, problems: list[str]) -> str | None:
    if isinstance(value, str) and _SHA256.fullmatch(value.lower()):
        return value.lower()
    problems.append(f"{name}: the manifest's sha256 for it is not a sha256 digest")
    return None


def _sized_digest(folder: Path, name: str, entry: object, problems: list[str]) -> str | None:
    """The sha256 to compare when the file's size is the manifest's; else None (a changed
    size is reported without reading the file)."""
    size = entry.get("size") if isinstance(entry, dict) else None
    if not isinstance(entry, dict) or isinstance(size, bool) or not isinstance(size, int):
        problems.append(f"{name}: the manifest's entry for it is not {{size, sha256}}")
        return None
    digest = _digest(name, entry.get("sha256"), problems)
    actual = (folder / name).stat().st_size
    if actual != size:
        problems.append(f"{name}: {actual} bytes, but the manifest says {size}")
        return None
    return digest


def _hash_problems(folder: Path, expected: dict[str, str]) -> list[str]:
    def check(name: str) -> str | None:
        try:
            actual = file_sha256(folder / name)
        except OSError as exc:
            return f"{name}: cannot read ({exc.strerror})"
        if actual != expected[name]:
            return f"{name}: sha256 {actual} differs from the manifest's {expected[name]}"
        return None

    with ThreadPoolExecutor(max(1, min(HASH_THREADS, len(expected)))) as pool:
        return [p for p in pool.map(check, sorted(expected)) if p]


def _read(path: Path, problems: list[str]) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        problems.append(f"{path.name}: cannot read ({exc.strerror})")
        return b""


def _unlisted(folder: Path, listed: set[str], weights_only: bool) -> list[str]:
    """A problem for each file or link below ``folder`` that the manifest does not list
    (with ``weights_only``, for each such weight file). A loop, not os.walk: a hostile
    tree deeper than Python's recursion limit must not crash the check."""
    problems = []
    stack = [""]  # relative folders still to list, each "" or ending in "/"
    while stack:
        at = stack.pop()
        try:
            with os.scandir(folder / at) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            problems.append(f"{at or '.'}: cannot list ({exc.strerror})")
            continue
        below = []
        for entry in entries:
            path = at + entry.name
            if path in BOOKKEEPING or not at and (path in listed or path == MANIFEST):
                continue
            if entry.is_dir(follow_symlinks=False):
                below.append(path + "/")
            elif entry.name.endswith(WEIGHT_SUFFIXES):
                problems.append(f"{path}: a weight file not in the manifest; remove it, a "
                                "loader may read it instead of the merged weights")
            elif not weights_only:
                problems.append(f"{path}: not in the manifest; remove it, the merge did not "
                                "write it")
        stack.extend(reversed(below))
    return problems
