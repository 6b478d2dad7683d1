"""mergekit_manifest.json records how the output was made; mergekit-verify checks shards."""

import hashlib
import json

import yaml
from conftest import run_cli


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_contents(llama_models, merge):
    a, b, _ = (str(m) for m in llama_models)
    recipe = {"merge_method": "dare_ties", "base_model": a, "models": [
        {"model": b, "parameters": {"weight": 1.0, "density": 0.5}}]}
    out = merge(recipe, random_seed=7, out_shard_size="20k")
    data = json.loads((out / "mergekit_manifest.json").read_text())
    assert data["tool"] == "mergekit" and data["version"]
    assert data["recipe"] == yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert data["options"]["random_seed"] == 7
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(data["shards"]) == shards
    for name, digest in data["shards"].items():
        assert digest == sha256(out / name)  # computed independently here
    inputs = {entry["reference"]: entry for entry in data["inputs"]}
    assert set(inputs) == {a, b}
    files = inputs[b]["files"]
    assert files["model.safetensors"]["size"] == (llama_models[1] / "model.safetensors"
                                                  ).stat().st_size
    assert "config.json" in files


def test_verify_passes_then_reports_a_changed_shard(llama_models, merge, tmp_path):
    a, b, _ = (str(m) for m in llama_models)
    out = merge({"merge_method": "linear", "models": [
        {"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}]},
        out_shard_size="20k")
    ok = run_cli("mergekit.cli.verify_cmd", out)
    assert ok.returncode == 0, ok.stderr
    assert "every shard matches" in ok.stdout
    shard = sorted(out.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run_cli("mergekit.cli.verify_cmd", out)
    assert bad.returncode == 1
    assert f"{shard.name}: sha256" in bad.stderr and "differs from the manifest" in bad.stderr
    shard.unlink()
    gone = run_cli("mergekit.cli.verify_cmd", out)
    assert gone.returncode == 1 and f"{shard.name}: missing" in gone.stderr


def test_verify_without_manifest_is_a_usage_error(tmp_path):
    proc = run_cli("mergekit.cli.verify_cmd", tmp_path)
    assert proc.returncode == 2
    assert "no mergekit_manifest.json here" in proc.stderr


def test_hash_inputs_records_local_file_sha256(llama_models, merge):
    a, b, _ = llama_models
    out = merge({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}},
        {"model": str(b), "parameters": {"weight": 1.0}}]}, hash_inputs=True)
    data = json.loads((out / "mergekit_manifest.json").read_text())
    files = {e["reference"]: e["files"] for e in data["inputs"]}
    assert files[str(b)]["model.safetensors"]["sha256"] == sha256(b / "model.safetensors")
    assert files[str(a)]["config.json"]["sha256"] == sha256(a / "config.json")
    assert "mtime" not in files[str(a)]["model.safetensors"]
