"""Broken or hostile input files, through the real command: a clear error naming the file,
exit code 1 or 2, nothing at OUT, no partial folder, and no code run."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_recipe
from hostile import assert_nothing_partial, tree_digest

# end to end through the command line: the whole suite runs them, -m "not slow" not
pytestmark = pytest.mark.slow


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _first_two(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"),
                   key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def truncated(header: dict, data: bytes) -> bytes:
    return _join(header, data)[:-100]


def header_too_long(header: dict, data: bytes) -> bytes:
    raw = _join(header, data)
    return struct.pack("<Q", len(raw) * 2) + raw[8:]


def header_not_json(header: dict, data: bytes) -> bytes:
    text = b"{not json" + b" " * 20
    return struct.pack("<Q", len(text)) + text + data


def overlapping(header: dict, data: bytes) -> bytes:
    a, b = _first_two(header)
    start, end = header[b]["data_offsets"]
    header[b]["data_offsets"] = [start - 4, end - 4]
    return _join(header, data)


def hole(header: dict, data: bytes) -> bytes:
    for entry in (v for k, v in header.items() if k != "__metadata__"):
        entry["data_offsets"] = [o + 8 for o in entry["data_offsets"]]
    return _join(header, b"\0" * 8 + data)


def past_end(header: dict, data: bytes) -> bytes:
    return _join(header, data[:-8])


def unknown_dtype(header: dict, data: bytes) -> bytes:
    a, _ = _first_two(header)
    header[a]["dtype"] = "Q7"
    return _join(header, data)


def shape_mismatch(header: dict, data: bytes) -> bytes:
    a, _ = _first_two(header)
    header[a]["shape"] = [header[a]["shape"][0] + 1, *header[a]["shape"][1:]]
    return _join(header, data)


def duplicate_name(header: dict, data: bytes) -> bytes:
    a, _ = _first_two(header)
    text = json.dumps(header)[:-1] + f", {json.dumps(a)}: {json.dumps(header[a])}}}"
    return struct.pack("<Q", len(text)) + text.encode() + data


def trailing_bytes(header: dict, data: bytes) -> bytes:
    return _join(header, data + b"\0" * 8)


def metadata_not_strings(header: dict, data: bytes) -> bytes:
    header["__metadata__"] = {"format": ["pt"]}
    return _join(header, data)


def empty_with_huge_dimension(header: dict, data: bytes) -> bytes:
    header["model.layers.0.extra"] = {"dtype": "F32", "shape": [0, 2**62],
                                      "data_offsets": [0, 0]}
    return _join(header, data)


CASES = [truncated, header_too_long, header_not_json, overlapping, hole, past_end,
         unknown_dtype, shape_mismatch, duplicate_name, trailing_bytes, metadata_not_strings,
         empty_with_huge_dimension]


def run_merge_with(tmp_path: Path, good: Path, bad: Path):
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(good), "parameters": {"weight": 1.0}},
        {"model": str(bad), "parameters": {"weight": 1.0}}]})
    out = tmp_path / "out"
    before = [tree_digest(tmp_path), tree_digest(good)]
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, out, "-q")
    assert proc.returncode in (1, 2), proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "\x1b" not in proc.stderr
    assert [tree_digest(tmp_path), tree_digest(good)] == before
    assert_nothing_partial(out)
    return proc


@pytest.mark.parametrize("mangle", CASES, ids=[c.__name__ for c in CASES])
def test_broken_safetensors(mangle, tmp_path, llama_models):
    bad = tmp_path / "bad"
    shutil.copytree(llama_models[1], bad)
    target = bad / "model.safetensors"
    target.write_bytes(mangle(*_split(target)))
    proc = run_merge_with(tmp_path, llama_models[0], bad)
    assert str(target) in proc.stderr


@pytest.mark.parametrize("where", ["../../outside.safetensors", "/etc/passwd"])
def test_index_pointing_outside_the_model(where, tmp_path, llama_models):
    bad = tmp_path / "bad"
    shutil.copytree(llama_models[1], bad)
    header, _ = _split(bad / "model.safetensors")
    weight_map = {k: "model.safetensors" for k in header if k != "__metadata__"}
    weight_map[next(iter(weight_map))] = where
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    proc = run_merge_with(tmp_path, llama_models[0], bad)
    assert "model.safetensors.index.json" in proc.stderr and "outside" in proc.stderr


def test_index_naming_a_missing_shard(tmp_path, llama_models):
    bad = tmp_path / "bad"
    shutil.copytree(llama_models[1], bad)
    header, _ = _split(bad / "model.safetensors")
    weight_map = {k: "model.safetensors" for k in header if k != "__metadata__"}
    weight_map[next(iter(weight_map))] = "model-00002-of-00002.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    proc = run_merge_with(tmp_path, llama_models[0], bad)
    assert "model-00002-of-00002.safetensors" in proc.stderr and "missing" in proc.stderr


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_pickle_that_runs_code_is_refused(tmp_path, llama_models):
    bad = tmp_path / "bad"
    shutil.copytree(llama_models[1], bad)
    (bad / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    state = {"model.embed_tokens.weight": torch.zeros(2), "evil": _RunsCode(str(marker))}
    torch.save(state, bad / "pytorch_model.bin")
    proc = run_merge_with(tmp_path, llama_models[0], bad)
    assert "pytorch_model.bin" in proc.stderr and "refused to unpickle" in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_no_command_takes_a_token_on_the_command_line():
    for module in ("yaml_cmd", "legacy_cmd", "bakllama_cmd", "layershuffle_cmd"):
        proc = run_cli(f"mergekit.cli.{module}", "--help", env={"COLUMNS": "200"})
        assert proc.returncode == 0
        assert "--token" not in proc.stdout and "--hf-token" not in proc.stdout
        assert "--trust-remote-code" not in proc.stdout or "no effect" in proc.stdout


@pytest.mark.parametrize("name,target", [("tokenizer.json", None),
                                         ("generation_config.json", "/etc/passwd")])
def test_link_out_of_the_model_folder_is_not_copied(name, target, tmp_path, llama_models):
    """A git clone may carry links; the file they lead to must not end up in OUT (which
    users upload), nor pass mergekit-verify."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"api_key": "do-not-upload"}')
    target = Path(target) if target else secret
    if not target.is_file():
        pytest.skip(f"no {target} here")
    bad = tmp_path / "bad"
    shutil.copytree(llama_models[0], bad)
    (bad / name).unlink(missing_ok=True)
    (bad / name).symlink_to(target)
    proc = run_merge_with(tmp_path, llama_models[1], bad)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {bad / name}: leads outside the model folder {bad} "
                                  f"(to '{target.resolve()}')")


def test_model_folder_that_is_a_link_merges(tmp_path, llama_models):
    real = tmp_path / "data" / "a"
    shutil.copytree(llama_models[0], real)
    (real / "tokenizer.json").write_text('{"from": "a"}')
    link = tmp_path / "models" / "a"
    link.parent.mkdir()
    link.symlink_to(real)
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(link), "parameters": {"weight": 1.0}},
        {"model": str(llama_models[1]), "parameters": {"weight": 1.0}}]})
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"from": "a"}'
