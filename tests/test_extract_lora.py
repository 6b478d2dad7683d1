"""mergekit-extract-lora on tiny Llamas built here: reconstructions compared with deltas and
optimal errors computed in the test with numpy's SVD, and the adapter loaded with peft."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import build_llama, run_cli

from mergekit.surgery.extract_lora import Options, compile_regex
from mergekit.surgery.extract_lora_run import Request, extract_lora

CMD = "mergekit.cli.extract_lora_cmd"
PREFIX = "base_model.model."
RANK = 3
ADAPTED = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
           "model.layers.0.self_attn.v_proj", "lm_head"]


def read(folder: Path, file: str = "model.safetensors") -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(folder / file).items()}


def fine_tune(base: Path, out: Path, deltas: dict[str, np.ndarray],
              replaced: dict[str, np.ndarray] | None = None) -> Path:
    from safetensors.numpy import save_file

    shutil.copytree(base, out)
    weights = read(base)
    for name, d in deltas.items():
        weights[name] = weights[name] + d
    weights.update(replaced or {})
    save_file({k: v.astype(np.float32) for k, v in weights.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    return out


def options(max_rank: int = RANK, embed_lora: bool = False, skip: bool = False,
            include: str | None = None, exclude: str | None = None) -> Options:
    return Options(max_rank, embed_lora, skip, compile_regex("-i", include),
                   compile_regex("-e", exclude), ())


def extract(model: Path, base: Path, out: Path, opts: Options, **kw) -> Path:
    extract_lora(Request(str(model), str(base), out, opts, **kw), quiet=True)
    return out


def low_rank(rng: np.random.Generator, shape: tuple[int, int], r: int) -> np.ndarray:
    return 0.1 * rng.standard_normal((shape[0], r)) @ rng.standard_normal((r, shape[1]))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = build_llama(root / "base", seed=0, layers=2)
    weights = read(base)
    rng = np.random.default_rng(0)
    exact = {m + ".weight": low_rank(rng, weights[m + ".weight"].shape, RANK) for m in ADAPTED}
    norm = {"model.norm.weight": weights["model.norm.weight"] + 0.5}
    dense = {n: 0.05 * rng.standard_normal(w.shape) for n, w in weights.items()
             if w.ndim == 2 and n != "model.embed_tokens.weight"}
    embed = {"model.embed_tokens.weight": low_rank(rng, weights["model.embed_tokens.weight"]
                                                   .shape, 2)}
    return {"base": base, "exact": fine_tune(base, root / "exact", exact, norm),
            "dense": fine_tune(base, root / "dense", dense), "embed": fine_tune(
                base, root / "embed", embed), "root": root}


@pytest.fixture(scope="module")
def exact_adapter(models) -> Path:
    return extract(models["exact"], models["base"], models["root"] / "exact_out", options())


def reconstructed(base: dict[str, np.ndarray], adapter: Path) -> dict[str, np.ndarray]:
    """The base's weights with the adapter applied, computed from its files."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = read(adapter, "adapter_model.safetensors")
    out = dict(base)
    for module in config["target_modules"]:
        key = PREFIX + module
        if key + ".lora_A.weight" in tensors:
            out[module + ".weight"] = base[module + ".weight"] + (
                tensors[key + ".lora_B.weight"] @ tensors[key + ".lora_A.weight"])
        else:
            out[module + ".weight"] = base[module + ".weight"] + (
                tensors[key + ".lora_embedding_B"] @ tensors[key + ".lora_embedding_A"]).T
    for module in config["modules_to_save"] or ():
        for key, value in tensors.items():
            if key.startswith(PREFIX + module + "."):
                out[key.removeprefix(PREFIX)] = value
    return out


def relative(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def test_exact_rank_fine_tune_is_reconstructed(models, exact_adapter):
    base, tuned = read(models["base"]), read(models["exact"])
    config = json.loads((exact_adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(ADAPTED)
    assert config["r"] == config["lora_alpha"] == RANK and config["rank_pattern"] == {}
    assert config["modules_to_save"] == ["model.norm"]
    keys = set(read(exact_adapter, "adapter_model.safetensors"))
    assert keys == {f"{PREFIX}{m}.lora_{s}.weight" for m in ADAPTED for s in "AB"} | {
        f"{PREFIX}model.norm.weight"}  # unchanged weights are absent
    got = reconstructed(base, exact_adapter)
    for name in tuned:
        assert relative(got[name], tuned[name]) < 1e-4, name
    card = (exact_adapter / "README.md").read_text()
    assert str(models["base"]) in card and "mergekit-extract-lora" in card
    assert (exact_adapter / "mergekit_manifest.json").is_file()


@pytest.mark.parametrize("k", [1, 4])
def test_dense_fine_tune_error_is_the_optimal_rank_k_error(models, tmp_path, k):
    base, tuned = read(models["base"]), read(models["dense"])
    got = reconstructed(base, extract(models["dense"], models["base"], tmp_path / "o",
                                      options(k)))
    for name in tuned:
        if base[name].ndim != 2 or name == "model.embed_tokens.weight":
            assert np.array_equal(got[name], base[name])
            continue
        s = np.linalg.svd(tuned[name] - base[name], compute_uv=False)
        optimal = np.sqrt(np.sum(s[k:] ** 2))
        assert np.linalg.norm(got[name] - tuned[name]) == pytest.approx(optimal, rel=1e-4)


def test_adapter_loads_with_peft_and_merges_to_base_plus_deltas(models, exact_adapter):
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, exact_adapter)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert torch.isfinite(logits).all()
    merged = {k: v.double().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    expected = reconstructed(read(models["base"]), exact_adapter)
    tuned = read(models["exact"])
    assert merged.keys() == expected.keys()
    for name, want in expected.items():
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
        assert relative(merged[name], tuned[name]) < 1e-4, name


def test_embed_lora(models, tmp_path):
    base, tuned = read(models["base"]), read(models["embed"])
    out = extract(models["embed"], models["base"], tmp_path / "o", options(2, embed_lora=True))
    keys = set(read(out, "adapter_model.safetensors"))
    assert keys == {f"{PREFIX}model.embed_tokens.lora_embedding_{s}" for s in "AB"}
    got = reconstructed(base, out)["model.embed_tokens.weight"]
    assert relative(got, tuned["model.embed_tokens.weight"]) < 1e-4
    # without --embed-lora the embedding is saved whole
    out = extract(models["embed"], models["base"], tmp_path / "p", options(2))
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == [
        "model.embed_tokens"]
    np.testing.assert_array_equal(
        read(out, "adapter_model.safetensors")[PREFIX + "model.embed_tokens.weight"],
        tuned["model.embed_tokens.weight"])


def test_skip_undecomposable_and_regexes(models, tmp_path):
    out = extract(models["exact"], models["base"], tmp_path / "skip", options(skip=True))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and sorted(config["target_modules"]) == sorted(
        ADAPTED)
    out = extract(models["exact"], models["base"], tmp_path / "inc",
                  options(include=r"q_proj$"))
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    out = extract(models["exact"], models["base"], tmp_path / "exc",
                  options(exclude=r"layers\.0\.|norm"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["lm_head", "model.layers.1.self_attn.q_proj"]
    assert config["modules_to_save"] is None


def test_no_distribute_scale_gives_orthonormal_rows_of_a(models, tmp_path):
    out = extract(models["exact"], models["base"], tmp_path / "o", options(),
                  distribute_scale=False)
    tensors = read(out, "adapter_model.safetensors")
    for m in ADAPTED:
        a = tensors[f"{PREFIX}{m}.lora_A.weight"]
        np.testing.assert_allclose(a @ a.T, np.eye(RANK), atol=1e-5)
    got = reconstructed(read(models["base"]), out)
    tuned = read(models["exact"])
    assert all(relative(got[n], tuned[n]) < 1e-4 for n in tuned)


def test_vocabulary_change_saves_embedding_and_head_whole(models, tmp_path):
    base = read(models["base"])
    rng = np.random.default_rng(3)
    grown = {n: np.concatenate([base[n], rng.standard_normal((2, base[n].shape[1]))])
             for n in ("model.embed_tokens.weight", "lm_head.weight")}
    tuned = fine_tune(models["base"], tmp_path / "grown", {}, grown)
    out = extract(tuned, models["base"], tmp_path / "o", options())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    assert read(out, "adapter_model.safetensors")[PREFIX + "lm_head.weight"].shape == (66, 16)


def test_tied_base_compares_the_head_with_the_embedding(tmp_path):
    base = build_llama(tmp_path / "tied", seed=1, layers=1, tied=True)
    weights = read(base)
    assert "lm_head.weight" not in weights
    head = weights["model.embed_tokens.weight"] + low_rank(np.random.default_rng(4),
                                                            (64, 16), 2)
    tuned = fine_tune(base, tmp_path / "untied", {}, {"lm_head.weight": head})
    out = extract(tuned, base, tmp_path / "o", options(2))
    tensors = read(out, "adapter_model.safetensors")
    got = tensors[PREFIX + "lm_head.lora_B.weight"] @ tensors[PREFIX + "lm_head.lora_A.weight"]
    assert relative(weights["model.embed_tokens.weight"] + got, head) < 1e-4


def test_dry_run_prints_the_plan_and_writes_nothing(models, tmp_path):
    proc = run_cli(CMD, "--model", models["exact"], "--base-model", models["base"],
                   "--out-path", tmp_path / "o", "--max-rank", "3", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert "lora (rank <= 3)" in lines["model.layers.0.self_attn.q_proj.weight"]
    assert "lora (rank <= 3)" in lines["lm_head.weight"]
    assert "modules_to_save" in lines["model.norm.weight"]
    assert "unchanged" in lines["model.layers.0.self_attn.k_proj.weight"]
    assert "unchanged" in lines["model.embed_tokens.weight"]
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_cli_writes_the_adapter(models, tmp_path):
    proc = run_cli(CMD, "--model", models["exact"], "--base-model", models["base"],
                   "--out-path", tmp_path / "o", "--max-rank", "3", "--quiet",
                   "--no-distribute-scale", "--cuda", "--random-seed", "5")
    assert proc.returncode == 0, proc.stderr
    got = reconstructed(read(models["base"]), tmp_path / "o")
    tuned = read(models["exact"])
    assert all(relative(got[n], tuned[n]) < 1e-4 for n in tuned)


def test_usage_errors_exit_2_with_one_line(models, tmp_path):
    shrunk = fine_tune(models["base"], tmp_path / "shrunk", {}, {
        "model.layers.0.mlp.up_proj.weight": np.zeros((30, 16))})
    cases = [
        (["--model", tmp_path / "missing", "--base-model", models["base"]], "no such folder"),
        (["--model", shrunk, "--base-model", models["base"]],
         "model.layers.0.mlp.up_proj.weight: shape [30, 16] in the model but [32, 16]"),
        (["--model", models["exact"], "--base-model", models["base"], "--max-rank", "0"],
         "--max-rank: 0 is below 1"),
        (["--model", models["exact"], "--base-model", models["base"], "-e", "("],
         "--exclude-regex: '(' is not a regular expression"),
    ]
    for args, message in cases:
        proc = run_cli(CMD, *args, "--out-path", tmp_path / "o")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
        assert not (tmp_path / "o").exists()
