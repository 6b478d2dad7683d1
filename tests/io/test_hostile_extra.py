"""Hostile inputs the recipe properties do not reach: random safetensors headers, and
config.json values of the wrong type. Every outcome is a result or a MergeError.

Each case was a crash found by fuzzing; all are fixed and must stay clean errors.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mergekit.config import parse_config
from mergekit.errors import MergeError
from mergekit.io.model import open_model
from mergekit.io.safetensors_file import SafetensorsReader, read_header
from mergekit.plan import build_plan
from mergekit.refs import parse_model_reference

ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1, "F8_E4M3": 1}
SETTINGS = settings(derandomize=True, deadline=None, max_examples=300, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=8,
)
# hashable values only: an unhashable dtype is the known crash below
hashable_json = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(
    max_size=6)


@st.composite
def safetensors_files(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """(header, data): consistent entries, then maybe one hostile edit and a wrong data size."""
    header: dict[str, Any] = {}
    pos = 0
    for name in draw(st.lists(st.text(max_size=6), max_size=3, unique=True)):
        dtype = draw(st.sampled_from(sorted(ITEM_BYTES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = math.prod(shape) * ITEM_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    if header and draw(st.booleans()):
        entry = header[draw(st.sampled_from(sorted(header)))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        entry[field] = draw(hashable_json if field == "dtype" else json_like)
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_like)
    size = max(0, pos + draw(st.integers(-3, 3)))
    return header, draw(st.binary(min_size=size, max_size=size))


def write_file(path: Path, header: dict[str, Any], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@SETTINGS
@given(file=safetensors_files())
def test_random_header_is_read_or_refused_by_name(file: tuple[dict, bytes], tmp_path: Path):
    header, data = file
    path = write_file(tmp_path / "x.safetensors", header, data)
    try:
        infos = read_header(path)
    except MergeError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc), str(exc)
        event("refused")
        return
    event("read")
    reader = SafetensorsReader()
    try:
        for name, info in infos.items():
            start, end = header[name]["data_offsets"]
            tensor = reader.read(info)
            assert list(tensor.shape) == header[name]["shape"]
            raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert raw == data[start:end]
    finally:
        reader.close()


@pytest.mark.parametrize("dtype", [[], {"a": 1}])
def test_unhashable_dtype_is_refused(tmp_path: Path, dtype: Any):
    header = {"a": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}
    path = write_file(tmp_path / "x.safetensors", header, b"\0" * 4)
    with pytest.raises(MergeError, match="unknown dtype"):
        read_header(path)


# -- config.json values of the wrong type ---------------------------------------------------

def with_config(folder: Path, tmp_path: Path, **changes: Any) -> Path:
    copy = tmp_path / "changed"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def plan_outcome(recipe: dict[str, Any]) -> None:
    config = parse_config(recipe)
    reader = SafetensorsReader()
    try:
        sources = {str(r): open_model(r, reader, None) for r in config.referenced_models()}
        build_plan(config, sources)
    except MergeError as exc:
        assert exc.exit_code == 2 and "\n" not in str(exc), str(exc)
    finally:
        reader.close()


def crash(value: Any, why: str) -> Any:
    return pytest.param(value, id=why)  # fixed: malformed values count as unknown


@pytest.mark.parametrize("architectures", [
    None, [], "LlamaForCausalLM", ["OtherForCausalLM"], {"LlamaForCausalLM": 1},
    crash(5, "tuple(5) raises"), crash([None], "'/'.join([None]) raises"),
    crash([["LlamaForCausalLM"]], "set() of a tuple holding a list raises"),
])
def test_odd_architectures_plan_or_fail_cleanly(llama_models: list[Path], tmp_path: Path,
                                                architectures: Any):
    changed = with_config(llama_models[1], tmp_path, architectures=architectures)
    plan_outcome({"merge_method": "linear", "parameters": {"weight": 1.0},
                  "models": [{"model": str(llama_models[0])}, {"model": str(changed)}]})


@pytest.mark.parametrize("changes", [
    {"num_hidden_layers": "4"}, {"num_hidden_layers": -1}, {"num_hidden_layers": None},
    {"tie_word_embeddings": "no"}, {"text_config": [1]}, {"vocab_size": 1.5},
])
def test_odd_config_values_plan_or_fail_cleanly(llama_models: list[Path], tmp_path: Path,
                                                changes: dict[str, Any]):
    changed = with_config(llama_models[1], tmp_path, **changes)
    plan_outcome({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(llama_models[0]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(changed), "layer_range": [2, 4]}]}]})


def test_empty_layer_types_in_config_json(llama_models: list[Path], tmp_path: Path):
    from mergekit.output_artifacts import merged_config

    changed = with_config(llama_models[0], tmp_path, layer_types=[])
    config = parse_config({"merge_method": "linear", "parameters": {"weight": 1.0},
                           "models": [{"model": str(changed)}, {"model": str(llama_models[1])}]})
    reader = SafetensorsReader()
    try:
        sources = {str(r): open_model(r, reader, None) for r in config.referenced_models()}
        out = merged_config(build_plan(config, sources), sources)
    finally:
        reader.close()
    assert out["layer_types"] == []


# -- JSON nested past Python's recursion limit ------------------------------------------------

DEEP_JSON = "[" * 100_000 + "]" * 100_000


def deep(file: str) -> Any:
    return lambda test: test  # fixed in {file}: RecursionError is caught


@deep("io/model.py ModelSource._load_config")
def test_deeply_nested_config_json(llama_models: list[Path], tmp_path: Path):
    folder = tmp_path / "m"
    shutil.copytree(llama_models[0], folder)
    (folder / "config.json").write_text(DEEP_JSON)
    with pytest.raises(MergeError, match="config.json"):
        open_model(parse_model_reference(str(folder)), SafetensorsReader(), None)


@deep("io/model.py ModelSource._read_index")
def test_deeply_nested_shard_index(llama_models: list[Path], tmp_path: Path):
    folder = tmp_path / "m"
    shutil.copytree(llama_models[0], folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ' + DEEP_JSON + "}")
    with pytest.raises(MergeError, match="index"):
        open_model(parse_model_reference(str(folder)), SafetensorsReader(), None)


@deep("io/safetensors_file.py read_header")
def test_deeply_nested_safetensors_header(tmp_path: Path):
    raw = DEEP_JSON.encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(MergeError, match="deep.safetensors"):
        read_header(path)
