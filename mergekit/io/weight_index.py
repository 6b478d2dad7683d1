"""The shards' safetensors headers against the index: every tensor is where the index says,
in one shard only, and the index's total size is the tensors' bytes. Loaders trust the
index to find each tensor, so an index that points elsewhere loads the wrong weights."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from mergekit.errors import MergeError
from mergekit.io.safetensors_file import TensorInfo, read_header

INDEX = "model.safetensors.index.json"

# {shard file name: its tensors, or None when the header could not be read}
Headers = Mapping[str, Mapping[str, TensorInfo] | None]


def shard_header(folder: Path, name: str) -> tuple[dict[str, TensorInfo] | None, str | None]:
    """The tensors of shard ``name`` (parsed and checked by ``read_header``, which reads
    only the header), or None and the problem as ``<name>: <what>``."""
    path = folder / name
    try:
        return read_header(path), None
    except MergeError as exc:
        return None, f"{name}: {str(exc).removeprefix(f'{path}: ')}"


def duplicate_problems(headers: Headers) -> tuple[dict[str, str], list[str]]:
    """{tensor: the first shard holding it} and a problem for each tensor held twice."""
    holders: dict[str, str] = {}
    problems = []
    for shard, tensors in headers.items():
        for tensor in tensors or ():
            if tensor in holders:
                problems.append(f"{shard}: tensor {tensor!r} is also in {holders[tensor]}")
            else:
                holders[tensor] = shard
    return holders, problems


def index_problems(raw: bytes | None, headers: Headers) -> list[str]:
    """Problems (``<file>: <what>``) of the index with content ``raw`` (None: there is no
    index; only tensors held twice are looked for) against the shards' headers; headers
    that could not be read are reported elsewhere and skipped here."""
    holders, problems = duplicate_problems(headers)
    if raw is None:
        return problems
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return [*problems, f"{INDEX}: not valid JSON"]
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return [*problems, f"{INDEX}: has no weight_map object"]
    elsewhere: Counter[str] = Counter()
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            problems.append(f"{INDEX}: tensor {tensor!r} is mapped to a value that is not "
                            "a file name")
            continue
        if shard not in headers:
            elsewhere[shard] += 1
            continue
        tensors = headers[shard]
        if tensors is not None and tensor not in tensors:
            actual = holders.get(tensor)
            where = f"{actual} holds it" if actual else "no shard holds it"
            problems.append(f"{INDEX}: tensor {tensor!r} is mapped to {shard}, but {where}")
    for shard, count in sorted(elsewhere.items()):
        problems.append(f"{INDEX}: maps {count} tensor{'s' * (count != 1)} to {shard!r}, "
                        "which is not a shard in the manifest")
    for tensor, shard in holders.items():
        if tensor not in weight_map:
            problems.append(f"{INDEX}: tensor {tensor!r} of {shard} is not in weight_map")
    metadata = index.get("metadata")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if total is not None and all(t is not None for t in headers.values()):
        nbytes = sum(i.nbytes for tensors in headers.values() for i in (tensors or {}).values())
        if isinstance(total, bool) or not isinstance(total, int):
            problems.append(f"{INDEX}: metadata.total_size is not a whole number")
        elif total != nbytes:
            problems.append(f"{INDEX}: metadata.total_size is {total} bytes, but the shards' "
                            f"tensors take {nbytes}")
    return problems
