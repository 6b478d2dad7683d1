"""ShardWriter streams tensors into a file the safetensors library reads back unchanged;
write_index writes the standard index; misuse and a full disk are reported."""

from __future__ import annotations

import errno
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergekit.errors import MergeError
from mergekit.io.writer import ShardEntry, ShardWriter, write_index

CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
         torch.int64: "I64"}


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "model.half": torch.randn(7, generator=g).to(torch.float16),  # 14 bytes: odd alignment
        "model.layers.0.w": torch.randn(2, 3, 4, generator=g),
        "model.ids": torch.randint(-10**12, 10**12, (3,), generator=g),
        "scalar": torch.tensor(-1.25),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
    }


def write_shard(path: Path, ts: dict[str, torch.Tensor]) -> None:
    entries = [ShardEntry(n, CODES[t.dtype], tuple(t.shape)) for n, t in ts.items()]
    writer = ShardWriter(path, entries)
    for name, t in ts.items():
        writer.add(name, t)
    writer.finish()


def test_output_reads_back_with_safe_open(tmp_path):
    ts = tensors()
    path = tmp_path / "model.safetensors"
    write_shard(path, ts)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(ts)
        assert f.metadata() == {"format": "pt"}
        for name, t in ts.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape, name
            assert torch.equal(got, t), name


def test_header_is_8_byte_aligned_and_offsets_contiguous(tmp_path):
    ts = tensors()
    path = tmp_path / "model.safetensors"
    write_shard(path, ts)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    pos = 0
    for name, t in ts.items():  # written in the order given
        assert header[name]["data_offsets"] == [pos, pos + t.numel() * t.element_size()]
        pos += t.numel() * t.element_size()
    assert len(raw) == 8 + n + pos


def test_non_contiguous_tensor_is_written_in_logical_order(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # a transposed view
    path = tmp_path / "t.safetensors"
    write_shard(path, {"t": t})
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("t"), t)


def test_shard_gets_its_name_only_when_finished(tmp_path):
    path = tmp_path / "m.safetensors"
    part = tmp_path / "m.safetensors.part"
    writer = ShardWriter(path, [ShardEntry("a", "F32", (2,)), ShardEntry("b", "F32", (2,))])
    writer.add("a", torch.ones(2))
    assert not path.exists() and part.exists()
    writer.add("b", torch.zeros(2))
    writer.finish()
    assert path.exists() and not part.exists()
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.ones(2))

    other = ShardWriter(tmp_path / "n.safetensors", [ShardEntry("a", "F32", (2,))])
    other.abort()  # an unfinished shard leaves no file behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_out_of_order_tensor_raises(tmp_path):
    ts = tensors()
    entries = [ShardEntry(n, CODES[t.dtype], tuple(t.shape)) for n, t in ts.items()]
    writer = ShardWriter(tmp_path / "m.safetensors", entries)
    try:
        with pytest.raises(Exception, match="model.embed.weight"):
            writer.add("model.half", ts["model.half"])
    finally:
        writer.abort()


def test_wrong_dtype_or_shape_raises(tmp_path):
    entries = [ShardEntry("a", "F32", (2, 2))]
    writer = ShardWriter(tmp_path / "m.safetensors", entries)
    try:
        with pytest.raises(Exception, match="expected a"):
            writer.add("a", torch.zeros(2, 2, dtype=torch.float16))
        with pytest.raises(Exception, match="expected a"):
            writer.add("a", torch.zeros(4))
    finally:
        writer.abort()


def test_finish_before_all_tensors_raises(tmp_path):
    writer = ShardWriter(tmp_path / "m.safetensors",
                         [ShardEntry("a", "F32", (1,)), ShardEntry("b", "F32", (1,))])
    writer.add("a", torch.zeros(1))
    try:
        with pytest.raises(Exception, match="1 of 2"):
            writer.finish()
    finally:
        writer.abort()


class FullDisk:
    """A file object whose writes fail as on a full disk."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self.closed = True


def test_disk_full_on_write_becomes_merge_error(tmp_path):
    path = tmp_path / "m.safetensors"
    writer = ShardWriter(path, [ShardEntry("a", "F32", (1024,))])
    writer._file.close()
    full = FullDisk()
    writer._file = full  # type: ignore[assignment]
    with pytest.raises(MergeError) as err:  # tensor bytes are written in the background:
        writer.add("a", torch.zeros(1024))  # the error surfaces at the next add or at finish
        writer.finish()
    assert "m.safetensors" in str(err.value)
    assert "No space left on device" in str(err.value)
    assert err.value.exit_code == 1
    assert full.closed


def test_disk_full_on_header_becomes_merge_error(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    def open_full(file, mode="r", *args, **kwargs):
        if Path(file).name.startswith("m.safetensors") and "w" in mode:  # or its .part
            return FullDisk()
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_full)
    with pytest.raises(MergeError, match="m.safetensors"):
        ShardWriter(tmp_path / "m.safetensors", [ShardEntry("a", "F32", (1,))])


def test_write_index(tmp_path):
    weight_map = {"a": "model-00001-of-00002.safetensors",
                  "b": "model-00002-of-00002.safetensors"}
    write_index(tmp_path, weight_map, 1234)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": 1234}, "weight_map": weight_map}


FSIZE_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of dying
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
from mergekit.cli.yaml_cmd import main
sys.argv = ["mergekit-yaml", *sys.argv[1:]]
main()
"""


def test_real_write_failure_fails_the_merge_cleanly(tmp_path, llama_models):
    import subprocess
    import sys

    from conftest import env_without_coverage, write_recipe

    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(m), "parameters": {"weight": 1.0}} for m in llama_models[:2]]})
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", FSIZE_LIMITED, str(recipe), str(out)],
                          capture_output=True, text=True, timeout=120,
                          env=env_without_coverage())  # the limit would cut coverage's file
    assert proc.returncode == 1, proc.stderr
    assert "error:" in proc.stderr and "safetensors" in proc.stderr
    assert "cannot write" in proc.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [recipe]  # the temporary folder is gone too


def test_cannot_create_shard_becomes_merge_error(tmp_path):
    missing = tmp_path / "no" / "such" / "folder" / "m.safetensors"
    with pytest.raises(MergeError, match="m.safetensors"):
        ShardWriter(missing, [ShardEntry("a", "F32", (1,))])


def test_writer_starts_writeback_of_each_written_range_in_file_order(tmp_path, monkeypatch):
    from mergekit.io import writer as writer_module

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 100)
    monkeypatch.setattr(writer_module, "start_writeback",
                        lambda fd, offset, nbytes: calls.append((offset, nbytes)))
    path = tmp_path / "m.safetensors"
    ts = {f"t{i}": torch.full((30,), float(i)) for i in range(10)}  # 120 bytes each
    write_shard(path, ts)
    data_start = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    # one range per tensor (each passes the threshold), the first with the header
    assert calls == [(0, data_start + 120)] + [(data_start + 120 * i, 120) for i in range(1, 10)]
    with safe_open(str(path), "pt") as f:  # what was handed on is the file's data
        assert all(torch.equal(f.get_tensor(n), t) for n, t in ts.items())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux")
def test_start_writeback_calls_the_system_on_a_real_file(tmp_path):
    from mergekit.io.writer import _SYNC_FILE_RANGE, start_writeback

    assert _SYNC_FILE_RANGE is not None
    path = tmp_path / "f.bin"
    with open(path, "wb") as f:
        f.write(b"x" * 65536)
        f.flush()
        start_writeback(f.fileno(), 0, 65536)
        assert _SYNC_FILE_RANGE(-1, 0, 1, 2) == -1  # a bad fd is reported, not ignored
    assert path.read_bytes() == b"x" * 65536


def test_finish_returns_the_sha256_of_the_file_bytes(tmp_path):
    """The hash runs on its own thread, chunk by chunk: it must still be the whole file's."""
    import hashlib

    g = torch.Generator().manual_seed(1)
    big = torch.randn(300, 1000, generator=g)  # written in several row chunks
    small = torch.randn(7, generator=g).to(torch.float16)
    path = tmp_path / "model.safetensors"
    writer = ShardWriter(path, [ShardEntry("big", "F32", (300, 1000)),
                                ShardEntry("small", "F16", (7,))])
    for start in range(0, 300, 32):
        writer.add("big", big[start:start + 32])
    writer.add("small", small)
    digest = writer.finish()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("big"), big)
