"""mergekit_manifest.json records how the output was made and every file it holds (checked
by mergekit-verify: tests/test_verify.py)."""

import hashlib
import json

import yaml


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


def test_hash_inputs_records_local_file_sha256(llama_models, merge):
    a, b, _ = llama_models
    out = merge({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}},
        {"model": str(b), "parameters": {"weight": 1.0}}]}, hash_inputs=True)
    data = json.loads((out / "mergekit_manifest.json").read_text())
    files = {e["reference"]: e["files"] for e in data["inputs"]}
    assert files[str(b)]["model.safetensors"]["sha256"] == sha256(b / "model.safetensors")
    assert files[str(a)]["config.json"]["sha256"] == sha256(a / "config.json")
    assert "mtime_ns" not in files[str(a)]["model.safetensors"]


def lay_out_local_download(folder, commit):
    """What `hf download --local-dir` leaves beside the files: commit, etag, time."""
    meta = folder / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    stamp = folder.joinpath("model.safetensors").stat().st_mtime + 0.5
    (meta / "model.safetensors.metadata").write_text(
        f"{commit}\n{sha256(folder / 'model.safetensors')}\n{stamp}\n")
    (meta / "config.json.metadata").write_text(f"{commit}\n{'e' * 40}\n{stamp}\n")


def test_local_download_folder_records_commit_and_sha256_without_hashing(
        llama_models, merge, tmp_path):
    import shutil

    a = tmp_path / "downloaded"
    shutil.copytree(llama_models[0], a)
    commit = "0123456789abcdef0123456789abcdef01234567"
    lay_out_local_download(a, commit)
    out = merge({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}},
        {"model": str(llama_models[1]), "parameters": {"weight": 1.0}}]})
    data = json.loads((out / "mergekit_manifest.json").read_text())
    inputs = {e["reference"]: e for e in data["inputs"]}
    assert inputs[str(a)]["revision"] == commit
    files = inputs[str(a)]["files"]
    assert files["model.safetensors"]["sha256"] == sha256(a / "model.safetensors")
    # config.json's etag is a git hash, not a sha256: identified by its time instead
    assert "sha256" not in files["config.json"] and "mtime_ns" in files["config.json"]
    # the other input is a plain folder: no revision, files by size and time
    other = inputs[str(llama_models[1])]
    assert "revision" not in other and "mtime_ns" in other["files"]["model.safetensors"]


def test_local_download_record_is_ignored_once_the_file_changed(llama_models, tmp_path):
    import os
    import shutil

    from mergekit.io.manifest import local_download

    a = tmp_path / "downloaded"
    shutil.copytree(llama_models[0], a)
    lay_out_local_download(a, "a" * 40)
    assert local_download(a, "model.safetensors") == ("a" * 40, sha256(a / "model.safetensors"))
    later = (a / "model.safetensors").stat().st_mtime + 5
    os.utime(a / "model.safetensors", (later, later))  # edited after the download
    assert local_download(a, "model.safetensors") is None
    assert local_download(a, "missing.safetensors") is None


def test_manifest_lists_every_other_file_with_its_sha256(llama_models, merge):
    a, b, _ = (str(m) for m in llama_models)
    out = merge({"merge_method": "linear", "models": [
        {"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}]},
        out_shard_size="20k")
    data = json.loads((out / "mergekit_manifest.json").read_text())
    on_disk = {p.name for p in out.iterdir()} - {"mergekit_manifest.json"}
    assert set(data["files"]) | set(data["shards"]) == on_disk
    assert not set(data["files"]) & set(data["shards"])
    assert {"config.json", "mergekit_config.yml", "README.md",
            "model.safetensors.index.json"} <= set(data["files"])
    for name, entry in data["files"].items():
        assert entry == {"size": (out / name).stat().st_size, "sha256": sha256(out / name)}


def test_plain_file_is_recorded_by_time_in_ns_and_sampled_sha256(llama_models, merge):
    a, b, _ = llama_models
    out = merge({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}},
        {"model": str(b), "parameters": {"weight": 1.0}}]})
    data = json.loads((out / "mergekit_manifest.json").read_text())
    files = {e["reference"]: e["files"] for e in data["inputs"]}
    weights = b / "model.safetensors"
    raw = weights.read_bytes()
    assert len(raw) < 2**20  # the sample is the whole file
    assert files[str(b)]["model.safetensors"] == {
        "size": len(raw), "mtime_ns": weights.stat().st_mtime_ns,
        "sampled_sha256": hashlib.sha256(len(raw).to_bytes(8, "little") + raw).hexdigest()}


def test_sampled_sha256_sees_a_change_at_either_end(tmp_path):
    from mergekit.io.manifest import sampled_sha256

    mib = 2**20
    path = tmp_path / "f"
    data = bytes(range(256)) * (3 * mib // 256)
    path.write_bytes(data)
    before = sampled_sha256(path, len(data))
    for offset, seen in [(0, True), (mib - 1, True), (mib, False), (2 * mib - 1, False),
                         (2 * mib, True), (3 * mib - 1, True)]:
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        path.write_bytes(changed)
        assert (sampled_sha256(path, len(data)) != before) == seen, offset
    path.write_bytes(data + b"\0")
    assert sampled_sha256(path, len(data) + 1) != before


def test_hash_inputs_hashes_the_bytes_even_with_a_download_record(llama_models, merge,
                                                                  tmp_path):
    """A file changed after `hf download` with its time set back keeps a record naming the old
    sha256; --hash-inputs records what is read now."""
    import os
    import shutil

    a = tmp_path / "downloaded"
    shutil.copytree(llama_models[0], a)
    lay_out_local_download(a, "c" * 40)
    weights = a / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    out = merge({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}},
        {"model": str(llama_models[1]), "parameters": {"weight": 1.0}}]}, hash_inputs=True)
    data = json.loads((out / "mergekit_manifest.json").read_text())
    files = {e["reference"]: e["files"] for e in data["inputs"]}
    assert files[str(a)]["model.safetensors"]["sha256"] == sha256(weights)
