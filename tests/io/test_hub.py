"""Hub references read from a hand-made Hugging Face cache in offline mode: the merge equals
merging the same local folders, missing repos are reported, only needed shards are fetched.

huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE at import time, so merges run the real
CLI in a subprocess with those variables set."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_state, run_cli, write_recipe
from safetensors.torch import save_file

# end to end through the command line: the whole suite runs them, -m "not slow" not
pytestmark = pytest.mark.slow

ALPHA_COMMIT = "a" * 8 + "0123456789abcdef0123456789abcdef"
BETA_COMMIT = "b" * 8 + "0123456789abcdef0123456789abcdef"
TOKENIZER = {
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}),
    "tokenizer_config.json": json.dumps({"model_max_length": 32, "from": "hub alpha"}),
    "special_tokens_map.json": json.dumps({"eos_token": "</s>"}),
}


def add_repo(cache: Path, repo_id: str, commit: str, files: dict[str, bytes],
             symlinks: bool) -> Path:
    """Lay out models--org--name like huggingface_hub does; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        target = snapshot / name
        if symlinks:
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            target.symlink_to(Path("../../blobs") / blob.name)
        else:
            target.write_bytes(data)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def shard_files(state: dict[str, torch.Tensor], tmp: Path, groups: list[list[str]]
                ) -> dict[str, bytes]:
    """``state`` as safetensors shards holding ``groups`` of names, plus the index."""
    files: dict[str, bytes] = {}
    weight_map: dict[str, str] = {}
    for i, names in enumerate(groups, 1):
        filename = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: state[n].contiguous() for n in names}, str(tmp / filename),
                  metadata={"format": "pt"})
        files[filename] = (tmp / filename).read_bytes()
        weight_map.update(dict.fromkeys(names, filename))
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}).encode()
    return files


def offline_env(cache: Path | None, home: Path) -> dict[str, str]:
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_CACHE": str(cache if cache is not None else home / "unused-cache")}
    return env


def assert_same_weights(out: Path, expected: Path) -> None:
    got, want = load_state(out), load_state(expected)
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


@pytest.fixture
def hub(tmp_path, llama_models) -> Path:
    """A cache with org/alpha (plain files, one safetensors) and org/beta (symlinks into
    blobs/, two shards)."""
    cache = tmp_path / "hub"
    a, b = llama_models[0], llama_models[1]
    alpha = {**folder_files(a), **{k: v.encode() for k, v in TOKENIZER.items()}}
    add_repo(cache, "org/alpha", ALPHA_COMMIT, alpha, symlinks=False)
    state = load_state(b)
    names = sorted(state)
    work = tmp_path / "shards"
    work.mkdir()
    beta = {"config.json": (b / "config.json").read_bytes(),
            **shard_files(state, work, [names[: len(names) // 2], names[len(names) // 2:]])}
    add_repo(cache, "org/beta", BETA_COMMIT, beta, symlinks=True)
    return cache


def linear(models: list[str]) -> dict:
    return {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": m, "parameters": {"weight": w}} for m, w in zip(models, [1.0, 2.0])]}


def test_hub_merge_equals_local_merge(hub, tmp_path, llama_models, merge):
    recipe = write_recipe(tmp_path / "r.yml", linear(["org/alpha", f"org/beta@{BETA_COMMIT}"]))
    out = tmp_path / "out"
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, out, "--quiet",
                   env=offline_env(hub, tmp_path / "home"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    local = merge(linear([str(llama_models[0]), str(llama_models[1])]))
    assert_same_weights(out, local)
    # the tokenizer came from the hub snapshot of the first model
    for name, text in TOKENIZER.items():
        assert (out / name).read_text() == text
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["base_model"] == ["org/alpha", "org/beta"]


def test_missing_repo_offline_is_a_usage_error(hub, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", linear(["org/alpha", "org/nothere"]))
    out = tmp_path / "out"
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, out,
                   env=offline_env(hub, tmp_path / "home"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and "org/nothere" in proc.stderr
    assert "offline" in proc.stderr.lower()
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_transformers_cache_option_is_the_cache(hub, tmp_path, llama_models, merge):
    moved = tmp_path / "elsewhere"
    shutil.move(hub, moved)
    recipe = write_recipe(tmp_path / "r.yml", linear(["org/alpha", f"org/beta@{BETA_COMMIT}"]))
    out = tmp_path / "out"
    # HF_HUB_CACHE points at an empty folder: only --transformers-cache can find the models
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, out, "--quiet",
                   "--transformers-cache", moved,
                   env=offline_env(None, tmp_path / "home"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(out, merge(linear([str(llama_models[0]), str(llama_models[1])])))


def test_unneeded_shard_need_not_be_in_the_cache(tmp_path, llama_models):
    """A passthrough of layer 0 needs the shard with the embeddings and layer 0 and the one
    with the head; the shard holding only layers 1-3 is absent from the cache."""
    state = load_state(llama_models[2])
    first = [n for n in state if n.startswith(("model.embed_tokens.", "model.layers.0."))]
    middle = [n for n in state if n.startswith("model.layers.") and n not in first]
    last = [n for n in state if n not in first and n not in middle]
    assert {"lm_head.weight", "model.norm.weight"} <= set(last)
    work = tmp_path / "shards"
    work.mkdir()
    files = {"config.json": (llama_models[2] / "config.json").read_bytes(),
             **shard_files(state, work, [first, middle, last])}
    del files["model-00002-of-00003.safetensors"]
    cache = tmp_path / "hub"
    add_repo(cache, "org/gamma", "c" * 40, files, symlinks=True)
    recipe = write_recipe(tmp_path / "r.yml", {
        "merge_method": "passthrough", "dtype": "float32",
        "slices": [{"sources": [{"model": "org/gamma", "layer_range": [0, 1]}]}]})
    out = tmp_path / "out"
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, out, "--quiet",
                   env=offline_env(cache, tmp_path / "home"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = load_state(out)
    assert set(got) == set(first) | set(last)
    for name in got:
        assert torch.equal(got[name], state[name]), name
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1


def test_unknown_revision_offline_is_a_usage_error(hub, tmp_path):
    other = "d" * 40
    recipe = write_recipe(tmp_path / "r.yml", linear(["org/alpha", f"org/beta@{other}"]))
    out = tmp_path / "out"
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, out,
                   env=offline_env(hub, tmp_path / "home"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"org/beta@{other}" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_needed_shard_missing_from_the_cache(hub, tmp_path):
    snapshot = hub / "models--org--beta" / "snapshots" / BETA_COMMIT
    (snapshot / "model-00002-of-00002.safetensors").unlink()
    recipe = write_recipe(tmp_path / "r.yml", linear(["org/alpha", "org/beta"]))
    out = tmp_path / "out"
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, out,
                   env=offline_env(hub, tmp_path / "home"), cwd=tmp_path)
    assert proc.returncode in (1, 2), proc.stderr
    assert "org/beta" in proc.stderr and "model-00002-of-00002.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_missing_repo_error_names_the_cache_given(tmp_path):
    cache = tmp_path / "my-cache"
    cache.mkdir()
    recipe = write_recipe(tmp_path / "r.yml", linear(["org/nothere", "org/nothere2"]))
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, tmp_path / "out",
                   "--transformers-cache", cache,
                   env=offline_env(None, tmp_path / "home"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "org/nothere" in proc.stderr and str(cache) in proc.stderr


def test_hash_inputs_hashes_the_blob_not_its_name(hub, tmp_path):
    """A hub cache file was recorded under its blob's name (the sha256 it had when
    downloaded) even with --hash-inputs; after the blob is damaged, the manifest must show
    the bytes actually read."""
    snapshot = hub / "models--org--beta" / "snapshots" / BETA_COMMIT
    shard = snapshot / "model-00001-of-00002.safetensors"
    blob = shard.resolve()
    header_len = int.from_bytes(blob.read_bytes()[:8], "little")
    data = bytearray(blob.read_bytes())
    data[8 + header_len] ^= 0x01  # a weight's lowest bit: still a valid file
    blob.write_bytes(bytes(data))
    recipe = write_recipe(tmp_path / "r.yml", linear(["org/alpha", "org/beta"]))
    out = tmp_path / "out"
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, out, "--quiet", "--hash-inputs",
                   env=offline_env(hub, tmp_path / "home"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "mergekit_manifest.json").read_text())
    files = {e["reference"]: e["files"] for e in manifest["inputs"]}
    recorded = files["org/beta"][shard.name]["sha256"]
    assert recorded == hashlib.sha256(bytes(data)).hexdigest() != blob.name


def test_hub_model_with_a_hub_adapter_at_a_revision(tmp_path, llama_models, merge):
    """org/alpha@COMMIT+org/adapter@COMMIT from an offline cache equals the same merge of
    the local folders."""
    from lora_models import make_adapter

    local_adapter = tmp_path / "adapter"
    make_adapter(llama_models[0], local_adapter, 5, r=2, lora_alpha=4,
                 target_modules=["q_proj"])
    cache = tmp_path / "cache"
    add_repo(cache, "org/alpha", ALPHA_COMMIT, folder_files(llama_models[0]), symlinks=True)
    add_repo(cache, "org/adapter", BETA_COMMIT, folder_files(local_adapter), symlinks=True)
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "passthrough", "models": [
        {"model": f"org/alpha@{ALPHA_COMMIT}+org/adapter@{BETA_COMMIT}"}]})
    out = tmp_path / "out"
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, out, "--quiet",
                   env=offline_env(cache, tmp_path / "home"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = merge({"merge_method": "passthrough", "models": [
        {"model": f"{llama_models[0]}+{local_adapter}"}]})
    assert_same_weights(out, expected)
    manifest = json.loads((out / "mergekit_manifest.json").read_text())
    adapter = manifest["inputs"][0]["adapter"]
    assert adapter["reference"] == f"org/adapter@{BETA_COMMIT}"
    assert adapter["revision"] == BETA_COMMIT
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter["files"])
