"""``model+adapter`` inputs: every adapted weight against peft's merge_and_unload() of the
same adapter (random A and B, not peft's zero B), over the peft fields that change the
arithmetic; errors before any weight is read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import peft  # the test extra installs it
import pytest
import torch
from conftest import build_gpt2, build_llama
from lora_models import make_adapter, merged
from safetensors.torch import load_file, save_file
from stopped_merges import merge_in_process

from mergekit import run
from mergekit.config import parse_config
from mergekit.refs import ModelReference, parse_model_reference


def assert_equal_to_peft(out: dict, expected: dict) -> None:
    for name, t in out.items():
        want = expected[name]
        assert torch.allclose(t, want, rtol=1e-5, atol=1e-6), (
            name, float((t - want).abs().max()))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("lora") / "base", 1, layers=2)


CASES = {
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head",
                                                        "embed_tokens"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
                     modules_to_save=["model.norm"]),
    "rslora": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["o_proj", "up_proj"]),
    "regex": dict(r=3, lora_alpha=5, target_modules=r".*layers\.1\.mlp\.(gate|down)_proj"),
}


@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_passthrough_equals_peft_merge_and_unload(tmp_path, llama, monkeypatch, case, engine):
    monkeypatch.setattr(run, "NUMPY_ENGINE", engine == "numpy")
    expected = make_adapter(llama, tmp_path / "ad", 7, **CASES[case])
    out = tmp_path / "out"
    merge_in_process({"merge_method": "passthrough",
                      "models": [{"model": f"{llama}+{tmp_path / 'ad'}"}]}, out)
    result = merged(out)
    assert result.keys() == expected.keys()
    assert_equal_to_peft(result, expected)
    changed = [n for n in result if not torch.equal(result[n], load_file(
        llama / "model.safetensors")[n])]
    assert changed  # the adapter did something


def test_fan_in_fan_out_gpt2(tmp_path):
    """GPT-2's Conv1D weights hold (in, out): the product is transposed."""
    base = build_gpt2(tmp_path / "gpt2", 3, layers=2)
    expected = make_adapter(base, tmp_path / "ad", 1, r=4, lora_alpha=8,
                            target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    out = tmp_path / "out"
    merge_in_process({"merge_method": "passthrough",
                      "models": [{"model": f"{base}+{tmp_path / 'ad'}"}]}, out)
    result = merged(out)
    assert_equal_to_peft({k: v for k, v in result.items() if k in expected}, expected)


def test_bin_adapter_and_mapping_form(tmp_path, llama):
    """adapter_model.bin, and the reference written as {model: {path}, lora: {path}}."""
    expected = make_adapter(llama, tmp_path / "ad", 2, r=2, lora_alpha=4,
                            target_modules=["k_proj"])
    state = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    torch.save(state, tmp_path / "ad" / "adapter_model.bin")
    (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    out = tmp_path / "out"
    merge_in_process({"merge_method": "passthrough", "models": [
        {"model": {"model": {"path": str(llama)}, "lora": {"path": str(tmp_path / "ad")}}}]},
        out)
    assert_equal_to_peft(merged(out), expected)


def test_adapted_base_in_a_ties_merge(tmp_path, llama):
    """An adapted model as the base of ties with a full fine-tune: the same bytes as the
    same merge of the adapter merged by peft and saved as a folder."""
    from transformers import AutoModelForCausalLM

    expected = make_adapter(llama, tmp_path / "ad", 3, r=4, lora_alpha=8,
                            target_modules=["q_proj", "down_proj"])
    full = tmp_path / "peft_merged"
    model = AutoModelForCausalLM.from_pretrained(llama)
    model.load_state_dict(expected)
    model.save_pretrained(full)
    tune = build_llama(tmp_path / "tune", 5, layers=2)

    def ties(base: str) -> dict:
        return {"merge_method": "ties", "base_model": base, "models": [
            {"model": str(tune), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": base, "parameters": {"weight": 0.4, "density": 0.5}}]}

    merge_in_process(ties(f"{llama}+{tmp_path / 'ad'}"), tmp_path / "a")
    merge_in_process(ties(str(full)), tmp_path / "b")
    a, b = merged(tmp_path / "a"), merged(tmp_path / "b")
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name


def test_dry_run_marks_adapted_tensors(tmp_path, llama):
    make_adapter(llama, tmp_path / "ad", 4, r=2, lora_alpha=2, target_modules=["v_proj"])
    recipe = tmp_path / "r.yml"
    ref = f"{llama}+{tmp_path / 'ad'}"
    recipe.write_text(json.dumps({"merge_method": "linear", "models": [
        {"model": ref, "parameters": {"weight": 1.0}},
        {"model": str(llama), "parameters": {"weight": 1.0}}]}))
    proc = subprocess.run([sys.executable, "-m", "mergekit.cli.yaml_cmd", str(recipe),
                           str(tmp_path / "out"), "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    v = [line for line in lines if "v_proj" in line]
    q = [line for line in lines if "q_proj" in line]
    assert v and all(f"{ref}:" in line and "(lora)" in line for line in v)
    assert q and not any("(lora)" in line for line in q)


@pytest.mark.parametrize(("change", "message"), [
    ({"peft_type": "IA3"}, "is a IA3 adapter (peft_type)"),
    ({"use_dora": True}, "is a DoRA adapter"),
    ({"r": 5}, "has rank 2, the config says 5"),
])
def test_adapters_that_cannot_be_merged(tmp_path, llama, change, message):
    """Exit 2, one line naming the adapter, before any weight is read."""
    make_adapter(llama, tmp_path / "ad", 4, r=2, lora_alpha=2, target_modules=["v_proj"])
    config_path = tmp_path / "ad" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    recipe = tmp_path / "r.yml"
    recipe.write_text(json.dumps({"merge_method": "passthrough", "models": [
        {"model": f"{llama}+{tmp_path / 'ad'}"}]}))
    proc = subprocess.run([sys.executable, "-m", "mergekit.cli.yaml_cmd", str(recipe),
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "adapter '" in lines[0] and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_adapter_of_another_model(tmp_path, llama):
    make_adapter(llama, tmp_path / "ad", 4, r=2, lora_alpha=2, target_modules=["v_proj"])
    state = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    renamed = {k.replace("layers.1.", "layers.9."): v for k, v in state.items()}
    save_file(renamed, tmp_path / "ad" / "adapter_model.safetensors")
    with pytest.raises(Exception, match=r"adapts 'model\.layers\.9\..*which model"):
        merge_in_process({"merge_method": "passthrough", "models": [
            {"model": f"{llama}+{tmp_path / 'ad'}"}]}, tmp_path / "out")


def test_references():
    ref = parse_model_reference("org/base@main+someone/adapter@v2")
    assert ref == ModelReference("org/base", "main", ModelReference("someone/adapter", "v2"))
    assert str(ref) == "org/base@main+someone/adapter@v2"
    with pytest.raises(ValueError, match="one adapter per model"):
        parse_model_reference("org/a+org/b+org/c")
    cfg = parse_config({"merge_method": "passthrough", "models": [{"model": {
        "model": {"path": "org/base", "revision": "r1"}, "lora": "org/ad"}}]})
    assert str(cfg.models[0].model) == "org/base@r1+org/ad"


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_lora_out_of_a_linear_merge_of_two_adapters(tmp_path, llama, monkeypatch, engine):
    """--lora-out at a rank at least the sum of the adapters' ranks: peft's merge of the
    written adapter equals the full merge (within 1e-4 relative); unchanged weights are not
    in the adapter, and the changed norm is saved whole."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(run, "NUMPY_ENGINE", engine == "numpy")
    make_adapter(llama, tmp_path / "a1", 11, r=2, lora_alpha=4,
                 target_modules=["q_proj", "v_proj"], modules_to_save=["model.norm"])
    make_adapter(llama, tmp_path / "a2", 12, r=3, lora_alpha=3, target_modules=["v_proj",
                                                                                "down_proj"])
    recipe = {"merge_method": "linear", "base_model": str(llama), "dtype": "float32",
              "models": [{"model": f"{llama}+{tmp_path / 'a1'}", "parameters": {"weight": 0.3}},
                         {"model": f"{llama}+{tmp_path / 'a2'}", "parameters": {"weight": 0.7}}]}
    merge_in_process(recipe, tmp_path / "full")
    merge_in_process(recipe, tmp_path / "adapter", lora_out=5)
    from mergekit.io.verify import verify

    assert verify(tmp_path / "adapter").problems == []
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["model.norm"]
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert not any("k_proj" in k or "o_proj" in k for k in keys)
    model = AutoModelForCausalLM.from_pretrained(llama)
    merged_model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload()
    got, want = merged_model.state_dict(), merged(tmp_path / "full")
    for name, t in want.items():
        scale = max(float(t.abs().max()), 1e-6)
        assert float((got[name] - t).abs().max()) <= 1e-4 * scale, name


def test_lora_out_needs_a_plain_base_model(tmp_path, llama):
    with pytest.raises(Exception, match="--lora-out: the output is an adapter of the "
                       "recipe's base_model"):
        merge_in_process({"merge_method": "linear", "models": [
            {"model": str(llama), "parameters": {"weight": 1.0}}]}, tmp_path / "o", lora_out=4)


def test_verify_reports_a_missing_adapter_file(tmp_path, llama):
    from mergekit.io.verify import verify

    make_adapter(llama, tmp_path / "a1", 11, r=2, lora_alpha=4, target_modules=["q_proj"])
    out = tmp_path / "adapter"
    merge_in_process({"merge_method": "passthrough", "base_model": str(llama), "models": [
        {"model": f"{llama}+{tmp_path / 'a1'}"}]}, out, lora_out=2)
    (out / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors: missing" in verify(out).problems


def test_output_block_lora_rank_is_lora_out(tmp_path, llama):
    """output: {lora_rank: R} writes the same adapter as --lora-out R."""
    make_adapter(llama, tmp_path / "a1", 11, r=2, lora_alpha=4, target_modules=["q_proj"])
    recipe = {"merge_method": "passthrough", "base_model": str(llama), "models": [
        {"model": f"{llama}+{tmp_path / 'a1'}"}]}
    merge_in_process({**recipe, "output": {"lora_rank": 2}}, tmp_path / "block")
    merge_in_process(recipe, tmp_path / "flag", lora_out=2)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "block" / name).read_bytes() == (tmp_path / "flag" / name).read_bytes()
    with pytest.raises(Exception, match=r"output\.lora_rank: 0 is not a rank"):
        parse_config({**recipe, "output": {"lora_rank": 0}})


PROBE = r"""
import sys
from mergekit.cli.yaml_cmd import app
sys.argv = ["mergekit-yaml", *sys.argv[1:], "--quiet"]
try:
    app()
except SystemExit as exc:
    print(exc.code, *(m in sys.modules for m in ("torch", "peft", "transformers")))
"""


def test_reading_an_adapter_imports_no_torch_peft_or_transformers(tmp_path, llama):
    """A CPU linear merge of an adapted float32 model stays on numpy: the adapter is read
    without torch, peft or transformers."""
    make_adapter(llama, tmp_path / "a1", 11, r=2, lora_alpha=4, target_modules=["q_proj"])
    recipe = tmp_path / "r.yml"
    recipe.write_text(json.dumps({"merge_method": "linear", "models": [
        {"model": f"{llama}+{tmp_path / 'a1'}", "parameters": {"weight": 0.5}},
        {"model": str(llama), "parameters": {"weight": 0.5}}]}))
    out = subprocess.run([sys.executable, "-c", PROBE, str(recipe), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["0", "False", "False", "False"], out.stdout + out.stderr
