"""The merge flags every wrapper command shares with mergekit-yaml (merge_command.py)."""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points

import pytest
import yaml
from conftest import run_cli

WRAPPERS = ["mergekit.cli.legacy_cmd", "mergekit.cli.bakllama_cmd",
            "mergekit.cli.layershuffle_cmd"]
MERGE_FLAGS = ["--cuda", "--device", "--out-shard-size", "--copy-tokenizer",
               "--no-copy-tokenizer", "--allow-crimes", "--lazy-unpickle", "--random-seed",
               "--clone-tensors", "--trust-remote-code", "--transformers-cache",
               "--write-model-card", "--no-write-model-card", "--verbose", "--quiet",
               "--dry-run", "--no-resume", "--strict-finite", "--allow-nonfinite",
               "--hash-inputs", "--overwrite"]
WIDE = {"COLUMNS": "200"}  # rich would cut long option names on a narrow terminal


def help_flags(module: str) -> set[str]:
    proc = run_cli(module, "--help", env=WIDE)
    assert proc.returncode == 0, proc.stderr
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", proc.stdout))


@pytest.fixture(scope="module")
def yaml_flags() -> set[str]:
    return help_flags("mergekit.cli.yaml_cmd")


@pytest.mark.parametrize("module", WRAPPERS)
def test_help_lists_every_merge_flag_of_mergekit_yaml(module, yaml_flags):
    flags = help_flags(module)
    assert {"--cuda", "--out-shard-size", "--dry-run"} <= flags
    assert set(MERGE_FLAGS) <= flags
    assert yaml_flags - {"--help"} <= flags


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, llama_models):
    base, m1, _ = (str(p) for p in llama_models)
    out = tmp_path / "out"
    proc = run_cli("mergekit.cli.legacy_cmd", out, "--method", "linear", "--merge", base,
                   "--merge", m1, "--weight", "1", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("model.layers.3.mlp.down_proj.weight ") for line in lines)
    assert "linear" in proc.stdout
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_flags_reach_the_engine(tmp_path, llama_models):
    """--no-copy-tokenizer / --no-write-model-card / --out-shard-size through a wrapper."""
    a = str(llama_models[0])
    config = tmp_path / "bake.yml"
    config.write_text(yaml.safe_dump({"layer_slices": [{"model": a, "start": 0, "end": 4}]}))
    out = tmp_path / "out"
    proc = run_cli("mergekit.cli.bakllama_cmd", config, out, "--no-write-model-card",
                   "--out-shard-size", "10k", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "README.md").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("module, args", [
    ("mergekit.cli.legacy_cmd", ["--base-model", "b", "--merge", "m", "--weight", "1"]),
    ("mergekit.cli.layershuffle_cmd", ["--model", "a", "--weight", "1"]),
])
def test_bad_shard_size_is_a_usage_error(tmp_path, module, args):
    proc = run_cli(module, tmp_path / "out", *args, "--out-shard-size", "lots")
    assert proc.returncode == 2
    assert "error: --out-shard-size: 'lots' is not a size" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_console_scripts_point_at_the_commands():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    expected = {"mergekit-legacy": "mergekit.cli.legacy_cmd:main",
                "bakllama": "mergekit.cli.bakllama_cmd:main",
                "mergekit-layershuffle": "mergekit.cli.layershuffle_cmd:main"}
    for name, target in expected.items():
        assert scripts.get(name) == target
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))
