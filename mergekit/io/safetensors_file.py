"""Lazy safetensors reading: parse and check the header, read single tensors on demand."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit.errors import merge_failure
from mergekit.io.dtypes import ST_DTYPES, itemsize, numpy_dtype, torch_dtype

if TYPE_CHECKING:
    import numpy as np
    import torch

MAX_HEADER_BYTES = 100_000_000  # the format's limit (the official reader's)
# The largest real shards hold a few thousand tensors (a whole MoE model of 100k tensors
# spreads them over many shards); a header of a million tiny entries costs a GB to parse.
MAX_HEADER_TENSORS = 100_000
MAX_DIMS = 32  # numpy 1.x's limit (numpy 2 allows 64)
INT64_MAX = 2**63 - 1
PREFETCH_STEP = 4 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header by the format's rules (those of the official
    reader, plus no duplicate keys); every problem names the file."""
    where = str(path)
    n = 0
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise merge_failure(where, "truncated safetensors file (no header)",
                                    "download the file again")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise merge_failure(
                    where, f"header length {n} is over the format's limit of "
                    f"{MAX_HEADER_BYTES} bytes", "the file is damaged or not safetensors")
            if n > size - 8:
                raise merge_failure(
                    where, f"header length {n} is larger than the file ({size} bytes)",
                    "the file is truncated or not safetensors; download it again")
            raw = f.read(n)
        return _parse_header(where, raw, 8 + n, size)
    except OSError as exc:
        raise merge_failure(where, f"cannot read ({exc.strerror})", "check the file") from None
    except MemoryError:
        raise merge_failure(where, f"not enough memory to parse its {n}-byte header",
                            "free memory or raise the process's memory limit") from None


def shown(value: object) -> str:
    """``value`` for an error message: its repr (control characters escaped, so a hostile
    name cannot move the cursor or break the line), cut short past 200 characters."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


class _Refused(Exception):
    """Raised from inside ``json.loads`` to stop parsing a header early."""


def _parse_header(where: str, raw: bytes, data_start: int, size: int
                  ) -> dict[str, TensorInfo]:
    objects = 0
    too_many = f"more than {MAX_HEADER_TENSORS} tensors in the header"

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        # called for every JSON object as it is parsed: counting them stops a header of a
        # million entries early, before it costs seconds and a GB
        nonlocal objects
        objects += 1
        if objects > MAX_HEADER_TENSORS + 2:  # + the metadata and the header itself
            raise _Refused(too_many)
        obj = dict(items)
        if len(obj) != len(items):
            twice = next(k for k, c in Counter(k for k, _ in items).items() if c > 1)
            raise _Refused(f"the header names {shown(twice)} twice")
        return obj

    try:
        header = json.loads(raw, object_pairs_hook=pairs)
    except _Refused as exc:
        raise merge_failure(where, str(exc), "the file is damaged or hostile") from None
    # ValueError: also a number past json's limit on digits
    except (ValueError, RecursionError):
        raise merge_failure(where, "the safetensors header is not valid JSON",
                            "the file is damaged; download it again") from None
    if not isinstance(header, dict):
        raise merge_failure(where, "the safetensors header is not a JSON object",
                            "the file is damaged; download it again")
    metadata = header.pop("__metadata__", None)
    if len(header) > MAX_HEADER_TENSORS:
        raise merge_failure(where, too_many, "the file is damaged or hostile")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise merge_failure(where, "__metadata__ is not a map of strings to strings",
                            "the file is damaged; download it again")
    file = Path(where)  # one Path for all entries: making one costs more than the checks
    infos = {name: _check_entry(file, name, entry, data_start)
             for name, entry in header.items()}
    spans = sorted((i.start, i.end, i.name) for i in infos.values())
    pos = data_start
    for start, end, name in spans:
        if start < pos:
            raise merge_failure(where, f"tensor {shown(name)} overlaps the tensor before it",
                                "the file is damaged; download it again")
        if start > pos:
            raise merge_failure(where, f"a gap of {start - pos} bytes before tensor {shown(name)}",
                                "the file is damaged; download it again")
        pos = end
    if pos > size:
        raise merge_failure(where, f"tensor data runs past the end of the file ({pos} > {size} "
                            "bytes)", "the file is truncated; download it again")
    if pos < size:
        raise merge_failure(where, f"{size - pos} bytes after the last tensor's data",
                            "the file is damaged; download it again")
    return infos


def _check_entry(file: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    def bad(what: str) -> Exception:
        return merge_failure(str(file), f"tensor {shown(name)}: {what}",
                             "the file is damaged; download it again")

    if not isinstance(entry, dict):
        raise bad("header entry is not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise bad(f"unknown dtype {shown(dtype)}")
    shape = entry.get("shape")
    if isinstance(shape, list) and len(shape) > MAX_DIMS:
        raise bad(f"shape has {len(shape)} dimensions (at most {MAX_DIMS})")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad(f"bad shape {shown(shape)}")
    # numpy refuses a shape whose bytes, counting a zero dimension as one, pass int64; other
    # shapes that large fail the byte-range check below
    if 0 in shape and math.prod(d or 1 for d in shape) * itemsize(dtype) > INT64_MAX:
        raise bad(f"shape {shape} is too large for any array")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"bad data_offsets {shown(offsets)}")
    expected = math.prod(shape) * itemsize(dtype)
    if offsets[1] - offsets[0] != expected:
        raise bad(f"shape {shape} of {dtype} needs {expected} bytes but its byte range has "
                  f"{offsets[1] - offsets[0]}")
    return TensorInfo(name, dtype, tuple(shape), file, data_start + offsets[0],
                      data_start + offsets[1])


class SafetensorsReader:
    """Reads tensors by byte range from open files; one per run, closed at the end.

    Each read maps just its byte range of the file (a private, copy-on-write mapping): the
    tensor's bytes come straight from the page cache with no copy and no fresh memory to
    fault in, a consumer that writes to the tensor changes only its own pages, and the
    mapping goes away with the last tensor that uses it, so memory stays bounded by the
    tensors alive at once."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:  # prefetch runs on another thread
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def prefetch(self, info: TensorInfo) -> None:
        """Have the system read the tensor's bytes into the page cache, so a later
        ``read`` finds them there. Blocks while the disk queue is full: call it from a
        thread of its own. No-op where unsupported."""
        if not hasattr(os, "posix_fadvise"):
            return
        fd = self._fd(info.file)
        # the kernel reads at most its readahead size (a few MB) per hint
        for start in range(info.start, info.end, PREFETCH_STEP):
            try:
                os.posix_fadvise(fd, start, min(PREFETCH_STEP, info.end - start),
                                 os.POSIX_FADV_WILLNEED)
            except OSError:
                return  # only a hint: the read itself reports real problems

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only rows [start, end) of its first dimension."""
        import torch

        shape, view = self._map(info, rows)
        if view is None:
            return torch.empty(shape, dtype=torch_dtype(info.dtype))
        return torch.frombuffer(view, dtype=torch_dtype(info.dtype)).reshape(shape)

    def read_array(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> np.ndarray:
        """``read`` as a numpy array of the stored bytes (see ``numpy_dtype``), read into
        memory of its own: for numpy's row chunks, faster merges than mapping them (the numpy
        engine's passes then start from a buffer in the cache, not from page faults)."""
        import numpy as np

        shape, start, nbytes = _span(info, rows)
        out = np.empty(shape, numpy_dtype(info.dtype))
        if not hasattr(os, "preadv"):  # Windows: copied from a mapping
            mapped = self._map(info, rows)[1]
            if mapped is not None:
                out.reshape(-1).view(np.uint8)[:] = np.frombuffer(mapped, np.uint8)
            return out
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd = self._fd(info.file)
        done = 0
        while done < nbytes:  # a read returns at most about 2 GB
            try:
                got = os.preadv(fd, [view[done:]], start + done)
            except OSError as exc:
                raise merge_failure(str(info.file), f"cannot read {shown(info.name)} "
                                    f"({exc.strerror})", "check the file and the disk") from None
            if got == 0:
                raise merge_failure(str(info.file), f"file ended while reading {shown(info.name)}",
                                    "the file is truncated; download it again")
            done += got
        return out

    def _map(self, info: TensorInfo,
             rows: tuple[int, int] | None) -> tuple[tuple[int, ...], memoryview | None]:
        """The shape of the tensor or of its rows, and a view of their mapped bytes (None
        when there are none)."""
        fd = self._fd(info.file)
        shape, start, nbytes = _span(info, rows)
        if nbytes == 0:
            return shape, None
        # a file that shrank since its header was read would fault on access (SIGBUS);
        # checked as each tensor's reading begins, not for every row chunk
        if (rows is None or rows[0] == 0) and os.fstat(fd).st_size < info.end:
            raise merge_failure(str(info.file), f"file ended while reading {shown(info.name)}",
                                "the file is truncated; download it again")
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(fd, start + nbytes - aligned, access=mmap.ACCESS_COPY,
                           offset=aligned)
        return shape, memoryview(mapped)[start - aligned:]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _span(info: TensorInfo,
          rows: tuple[int, int] | None) -> tuple[tuple[int, ...], int, int]:
    """The shape, file offset and byte count of the tensor, or of its rows [start, end)."""
    shape, start, nbytes = info.shape, info.start, info.nbytes
    if rows is not None:
        row_bytes = nbytes // shape[0] if shape and shape[0] else 0
        shape = (rows[1] - rows[0], *shape[1:])
        start, nbytes = start + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
    return shape, start, nbytes
