"""read_header and SafetensorsReader: files from the safetensors library read back bit for bit,
one tensor costs only its own bytes, and damaged or hostile files are refused by name."""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit.errors import MergeError
from mergekit.io.safetensors_file import (
    MAX_HEADER_BYTES,
    MAX_HEADER_TENSORS,
    PREFETCH_STEP,
    SafetensorsReader,
    read_header,
)

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, shape, generator=g,
                         dtype=torch.int64).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.contiguous().reshape(-1).view(torch.uint8).numpy())


@pytest.fixture
def library_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(DTYPE_CODES):
        tensors[f"t.{DTYPE_CODES[dtype].lower()}"] = sample(dtype, (3, 5), i)
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    tensors["empty"] = torch.zeros((0, 4), dtype=torch.float32)
    tensors["vector"] = sample(torch.float32, (7,), 99)
    path = tmp_path / "lib.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def test_header_matches_library_file(library_file):
    path, tensors = library_file
    infos = read_header(path)
    assert set(infos) == set(tensors)
    size = path.stat().st_size
    for name, t in tensors.items():
        info = infos[name]
        assert info.dtype == DTYPE_CODES[t.dtype]
        assert info.shape == tuple(t.shape)
        assert info.nbytes == t.numel() * t.element_size()
        assert 8 <= info.start <= info.end <= size
        assert info.file == path


def test_reader_returns_equal_tensors_for_every_dtype(library_file):
    path, tensors = library_file
    infos = read_header(path)
    reader = SafetensorsReader()
    try:
        for name, t in tensors.items():
            got = reader.read(infos[name])
            assert same_bits(got, t), name
    finally:
        reader.close()


def test_zero_dim_and_empty_tensors(library_file):
    path, tensors = library_file
    infos = read_header(path)
    reader = SafetensorsReader()
    try:
        scalar = reader.read(infos["scalar"])
        assert scalar.shape == () and scalar.dtype == torch.bfloat16 and scalar.item() == 2.5
        empty = reader.read(infos["empty"])
        assert empty.shape == (0, 4) and empty.dtype == torch.float32
    finally:
        reader.close()


def test_reading_one_tensor_maps_only_its_bytes(tmp_path, monkeypatch):
    big = {f"w{i}": torch.full((256, 256), float(i)) for i in range(4)}  # 256 KiB each
    path = tmp_path / "big.safetensors"
    save_file(big, str(path))
    infos = read_header(path)
    calls: list[tuple[int, int]] = []
    real_mmap = mmap.mmap

    def recording_mmap(fd: int, length: int, **kwargs):
        calls.append((length, kwargs.get("offset", 0)))
        return real_mmap(fd, length, **kwargs)

    monkeypatch.setattr(mmap, "mmap", recording_mmap)
    reader = SafetensorsReader()
    try:
        got = reader.read(infos["w2"])
        rows = reader.read(infos["w1"], (10, 20))
    finally:
        reader.close()
    assert torch.equal(got, big["w2"]) and torch.equal(rows, big["w1"][10:20])
    # compute the byte ranges independently from the raw header
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    row_bytes = 256 * 4
    wanted = [(8 + n + header["w2"]["data_offsets"][0], 8 + n + header["w2"]["data_offsets"][1]),
              (8 + n + header["w1"]["data_offsets"][0] + 10 * row_bytes,
               8 + n + header["w1"]["data_offsets"][0] + 20 * row_bytes)]
    assert len(calls) == 2, "the reader did not map each read once"
    page = mmap.ALLOCATIONGRANULARITY
    for (length, offset), (begin, end) in zip(calls, wanted):
        # the mapping starts at the page holding the first byte and ends at the last byte
        assert offset == begin - begin % page and offset + length == end


def test_written_tensor_does_not_change_the_file_or_later_reads(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(16.0)}, str(path))
    before = path.read_bytes()
    infos = read_header(path)
    reader = SafetensorsReader()
    try:
        first = reader.read(infos["w"])
        first.mul_(0)
        again = reader.read(infos["w"])
    finally:
        reader.close()
    assert torch.equal(again, torch.arange(16.0))
    assert path.read_bytes() == before


def shrunk_file(tmp_path: Path) -> dict:
    """The header of a file cut 100 bytes into its tensor "b" (8 x 8 float32 ones) after
    the header was read."""
    path = tmp_path / "shrinks.safetensors"
    save_file({"a": torch.ones(64), "b": torch.ones(8, 8)}, str(path))
    infos = read_header(path)
    with open(path, "r+b") as f:
        f.truncate(infos["b"].start + 100)
    return infos


@pytest.mark.parametrize("rows", [None, (0, 2)])
def test_reader_reports_file_shrunk_after_header(tmp_path, rows):
    """Checked as a tensor's reading begins (whole, or its first row chunk), even when
    the rows asked for are still in the file."""
    infos = shrunk_file(tmp_path)
    reader = SafetensorsReader()
    try:
        with pytest.raises(MergeError, match="shrinks.safetensors"):
            reader.read(infos["b"], rows)
    finally:
        reader.close()


# ---- hostile and damaged files ----------------------------------------------------------


def write_raw(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


HOSTILE = {
    "overlap": ({"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 8, 24)}, 24),
    "hole": ({"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 20, 36)}, 36),
    "past_end": ({"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 16, 32)}, 20),
    "unknown_dtype": ({"a": entry("X99", [4], 0, 16)}, 16),
    "shape_vs_range": ({"a": entry("F32", [5], 0, 16)}, 16),
    "negative_offsets": ({"a": entry("F32", [0], 16, 0)}, 16),
    "bad_shape": ({"a": entry("F32", [-4], 0, 16)}, 16),
    "entry_not_object": ({"a": [1, 2]}, 16),
    "not_an_object": ([1, 2, 3], 0),
    "trailing_bytes": ({"a": entry("F32", [4], 0, 16)}, 20),
    "metadata_not_strings": ({"__metadata__": {"format": 1}, "a": entry("F32", [1], 0, 4)}, 4),
    "metadata_not_a_map": ({"__metadata__": ["pt"], "a": entry("F32", [1], 0, 4)}, 4),
    "too_many_dims": ({"a": entry("F32", [1] * 33, 0, 4)}, 4),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_is_refused_naming_the_file(tmp_path, case):
    header, data_len = HOSTILE[case]
    raw = json.dumps(header).encode()
    path = write_raw(tmp_path / f"{case}.safetensors", raw, b"\0" * data_len)
    with pytest.raises(MergeError) as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_number_past_jsons_digit_limit_is_refused_naming_the_file(tmp_path):
    """json raises a plain ValueError (not a JSONDecodeError) for such a number."""
    raw = b'{"a": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 4]}}'
    path = write_raw(tmp_path / "digits.safetensors", raw, b"\0" * 4)
    with pytest.raises(MergeError, match="digits.safetensors: the safetensors header is not "
                       "valid JSON"):
        read_header(path)


def raw_entry(name: str, begin: int, end: int) -> str:
    return f'"{name}": {{"dtype": "F32", "shape": [{(end - begin) // 4}], ' \
           f'"data_offsets": [{begin}, {end}]}}'


@pytest.mark.parametrize("second", [(0, 4), (4, 8)])
def test_duplicate_tensor_name_is_refused(tmp_path, second):
    """JSON lets the last entry of a name win; the official reader takes that silently when
    both entries have the same bytes. Refused either way."""
    raw = "{" + raw_entry("a", 0, 4) + ", " + raw_entry("a", *second) + "}"
    path = write_raw(tmp_path / "dup.safetensors", raw.encode(), b"\0" * second[1])
    with pytest.raises(MergeError) as err:
        read_header(path)
    assert str(path) in str(err.value) and "'a' twice" in str(err.value)


def test_duplicate_field_in_an_entry_is_refused(tmp_path):
    raw = b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}'
    path = write_raw(tmp_path / "dupfield.safetensors", raw, b"\0" * 4)
    with pytest.raises(MergeError, match="dupfield.safetensors.*'dtype' twice"):
        read_header(path)


def test_null_metadata_is_no_metadata(tmp_path):
    """As the official reader has it."""
    path = write_raw(tmp_path / "m.safetensors",
                     {"__metadata__": None, "a": entry("F32", [1], 0, 4)}, b"\0" * 4)
    assert list(read_header(path)) == ["a"]


@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_empty_tensor_with_a_huge_dimension_is_refused(tmp_path, dtype):
    """[0, 2**62] has no bytes, so its byte range checks out, but numpy cannot make it."""
    path = write_raw(tmp_path / "huge_dim.safetensors",
                     {"ok": entry(dtype, [0, 2**40], 0, 0),
                      "evil\x1b[2J": entry(dtype, [0, 2**62, 4], 0, 0)}, b"")
    with pytest.raises(MergeError) as err:
        read_header(path)
    message = str(err.value)
    assert str(path) in message and "'evil\\x1b[2J'" in message and "too large" in message
    assert "\x1b" not in message
    # the one it allows can be made, as numpy and torch read it
    path = write_raw(tmp_path / "ok.safetensors", {"ok": entry(dtype, [0, 2**40], 0, 0)}, b"")
    info = read_header(path)["ok"]
    reader = SafetensorsReader()
    try:
        assert reader.read(info).shape == (0, 2**40)
        assert reader.read_array(info).shape == (0, 2**40)
    finally:
        reader.close()


def test_too_many_entries_are_refused(tmp_path):
    """A million empty tensors took a GB and 25 s to read; one past the limit is refused,
    naming the file."""
    entries = ", ".join(raw_entry(f"t{i}", 0, 0) for i in range(MAX_HEADER_TENSORS + 1))
    path = write_raw(tmp_path / "many.safetensors", ("{" + entries + "}").encode(), b"")
    with pytest.raises(MergeError) as err:
        read_header(path)
    assert str(path) in str(err.value)
    assert f"more than {MAX_HEADER_TENSORS} tensors" in str(err.value)


def test_header_over_the_format_limit_is_refused_by_that_limit(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{")
        f.truncate(MAX_HEADER_BYTES + 64)  # sparse: takes no disk space
    with pytest.raises(MergeError) as err:
        read_header(path)
    assert str(path) in str(err.value) and "over the format's limit" in str(err.value)


OUT_OF_MEMORY = """
import resource, sys
from mergekit.errors import MergeError
from mergekit.io.safetensors_file import read_header
extra = int(sys.argv[2])
vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
          if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + extra, resource.RLIM_INFINITY))
try:
    read_header(__import__("pathlib").Path(sys.argv[1]))
except MergeError as exc:
    print(exc)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_header_too_large_for_memory_is_refused_naming_the_file(tmp_path):
    """Under a memory limit, a large header's parse ran out of memory with a bare
    'MemoryError:'."""
    import subprocess
    import sys

    size = 24 * 2**20
    text = b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": "' \
        + b"y" * size + b'"}}'
    path = write_raw(tmp_path / "fat.safetensors", text, b"")
    proc = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY, str(path), str(size * 2)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{path}: not enough memory to parse its {len(text)}-byte"
                                  " header;"), proc.stdout


def test_long_hostile_name_is_cut_short_in_messages(tmp_path):
    name = "n\x07" * 100_000
    path = write_raw(tmp_path / "long.safetensors", {name: entry("X9", [1], 0, 4)}, b"\0" * 4)
    with pytest.raises(MergeError) as err:
        read_header(path)
    assert len(str(err.value)) < 400 and "\x07" not in str(err.value)


def test_unknown_dtype_is_named(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"a": entry("X99", [4], 0, 16)}, b"\0" * 16)
    with pytest.raises(MergeError, match="X99"):
        read_header(path)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    with pytest.raises(MergeError, match="short.safetensors"):
        read_header(path)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(MergeError, match="empty.safetensors"):
        read_header(path)


def test_library_file_cut_short_is_refused(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.ones(100), "b": torch.ones(100)}, str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[:-50])
    with pytest.raises(MergeError, match="cut.safetensors"):
        read_header(path)


def test_header_length_larger_than_file(tmp_path):
    path = write_raw(tmp_path / "long.safetensors", {"a": entry("F32", [1], 0, 4)}, b"\0" * 4,
                     length=10_000)
    with pytest.raises(MergeError, match="long.safetensors"):
        read_header(path)


def test_huge_header_length_is_refused_without_allocating(tmp_path):
    path = write_raw(tmp_path / "huge.safetensors", b"{}", b"", length=2**63)
    with pytest.raises(MergeError, match="huge.safetensors"):
        read_header(path)


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00\x01", b"   "])
def test_header_not_json(tmp_path, raw):
    path = write_raw(tmp_path / "garbage.safetensors", raw, b"")
    with pytest.raises(MergeError, match="garbage.safetensors"):
        read_header(path)


def test_metadata_is_not_a_tensor(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "a": entry("F32", [2], 0, 8)}
    path = write_raw(tmp_path / "meta.safetensors", header, struct.pack("<2f", 1.5, -2.0))
    infos = read_header(path)
    assert list(infos) == ["a"]
    reader = SafetensorsReader()
    try:
        assert reader.read(infos["a"]).tolist() == [1.5, -2.0]
    finally:
        reader.close()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_prefetch_hints_the_whole_tensor_in_steps(tmp_path, monkeypatch):
    """One hint over a long range makes the kernel read only its readahead size: the reader
    gives the range in PREFETCH_STEP pieces, covering every byte of the tensor once."""
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4), "big": torch.zeros(3 * 1024 * 1024 + 5)}, str(path))
    info = read_header(path)["big"]
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append(
        (off, n, advice)))
    reader = SafetensorsReader()
    try:
        reader.prefetch(info)
    finally:
        reader.close()
    assert all(advice == os.POSIX_FADV_WILLNEED for *_, advice in calls)
    assert all(n <= PREFETCH_STEP for _, n, _ in calls) and len(calls) > 1
    covered = [(off, off + n) for off, n, _ in calls]
    assert covered[0][0] == info.start and covered[-1][1] == info.end
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # contiguous, no overlap


# ---- numpy reads (read_array) ---------------------------------------------------------

NUMPY_READ = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("mapped", [False, True], ids=["preadv", "mapping"])
@pytest.mark.parametrize("rows", [None, (1, 3), (0, 0)])
def test_read_array_gives_the_stored_bytes(library_file, rows, mapped, monkeypatch):
    """Read into memory of its own (preadv, or a copy from a mapping where the system
    lacks it): the library's bytes, whole or rows, as a numpy array of the tensor's
    shape."""
    if mapped:
        monkeypatch.delattr(os, "preadv")
    path, tensors = library_file
    infos = read_header(path)
    reader = SafetensorsReader()
    try:
        for dtype in NUMPY_READ:
            name = f"t.{DTYPE_CODES[dtype].lower()}"
            expected = tensors[name] if rows is None else tensors[name][rows[0]:rows[1]]
            got = reader.read_array(infos[name], rows)
            assert got.shape == tuple(expected.shape) and got.flags.writeable
            assert got.tobytes() == expected.contiguous().view(torch.uint8).numpy().tobytes()
        assert reader.read_array(infos["empty"]).shape == (0, 4)
    finally:
        reader.close()


def test_read_array_reports_a_file_that_ends_early(tmp_path):
    infos = shrunk_file(tmp_path)
    reader = SafetensorsReader()
    try:
        assert reader.read_array(infos["b"], (0, 3)).sum() == 24  # 96 bytes: in the file
        with pytest.raises(MergeError, match="shrinks.safetensors: file ended while reading"):
            reader.read_array(infos["b"], (2, 8))
    finally:
        reader.close()
