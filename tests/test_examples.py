"""The shipped tiny models and example recipes: each example merges and the result loads."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_state, read_json, run_cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
MODELS = EXAMPLES / "models"
NAMES = ("tiny-base", "tiny-instruct", "tiny-code")
RECIPES = sorted(p.name for p in EXAMPLES.glob("*.yml"))
TEXT = "Merging models: the quick brown fox! ünïcode"


def state_of(name: str) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_state(MODELS / name).items()}


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every example recipe merged through the Python API, from the repository root
    (the recipes name the shipped models by paths relative to it)."""
    import os

    from mergekit import MergeOptions, run_merge
    from mergekit.config import load_config

    root = tmp_path_factory.mktemp("examples")
    outs = {}
    cwd = Path.cwd()
    os.chdir(REPO)
    try:
        for recipe in RECIPES:
            out = root / recipe.removesuffix(".yml")
            run_merge(load_config(EXAMPLES / recipe), out, MergeOptions(quiet=True))
            outs[recipe] = out
    finally:
        os.chdir(cwd)
    return outs


def test_expected_examples_exist():
    assert {"quickstart.yml", "linear.yml", "passthrough.yml", "gradient-slerp.yml",
            "ties.yml"} <= set(RECIPES)


def test_shipped_models_are_small_and_complete():
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert total < 2 * 1024 * 1024
    for name in NAMES:
        files = {p.name for p in (MODELS / name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json"} <= files, name
        config = read_json(MODELS / name / "config.json")
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 4


@pytest.mark.parametrize("name", NAMES)
def test_shipped_tokenizer_loads_and_round_trips(name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODELS / name)
    ids = tok(TEXT)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert max(ids) < read_json(MODELS / name / "config.json")["vocab_size"]
    assert len(tok) <= read_json(MODELS / name / "config.json")["vocab_size"]


def test_generator_reproduces_the_shipped_weights(tmp_path):
    spec = importlib.util.spec_from_file_location("make_tiny_models",
                                                  EXAMPLES / "make_tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for name in NAMES:
        fresh, shipped = load_state(tmp_path / name), load_state(MODELS / name)
        assert set(fresh) == set(shipped)
        for tensor in shipped:
            assert fresh[tensor].dtype == shipped[tensor].dtype == torch.bfloat16
            assert torch.equal(fresh[tensor], shipped[tensor]), (name, tensor)


def test_fine_tunes_differ_from_base_by_a_small_delta():
    base, instruct = state_of("tiny-base"), state_of("tiny-instruct")
    name = "model.layers.0.mlp.up_proj.weight"
    delta = instruct[name] - base[name]
    assert 0.005 < delta.std() < 0.02  # DELTA_STD = 0.01 on top of std 0.02 weights
    assert torch.equal(instruct["model.norm.weight"], base["model.norm.weight"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_example_output_loads_with_its_tokenizer(merged, recipe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merged[recipe]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).float().eval()
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 320)
    assert torch.isfinite(logits).all()
    config = yaml.safe_load((EXAMPLES / recipe).read_text())
    assert read_json(out / "config.json")["torch_dtype"] == config["dtype"]
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == config


def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = float(torch.dot(a64 / a64.norm(), b64 / b64.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t) * a64 + t * b64).reshape(a.shape).float()
    theta = math.acos(cos)
    out = (math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)
    return out.reshape(a.shape).float()


def close_in_bf16(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got.float(), expected, atol=1e-3, rtol=1.6e-2)


def test_quickstart_is_halfway_slerp(merged):
    base, instruct = state_of("tiny-base"), state_of("tiny-instruct")
    out = load_state(merged["quickstart.yml"])
    for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.o_proj.weight"):
        close_in_bf16(out[name], slerp_reference(base[name], instruct[name], 0.5))


def test_linear_example_is_weighted_average(merged):
    base, instruct, code = (state_of(n) for n in NAMES)
    out = load_state(merged["linear.yml"])
    assert {t.dtype for t in out.values()} == {torch.float16}
    for name in base:
        expected = (1.0 * base[name] + 0.5 * instruct[name] + 0.5 * code[name]) / 2.0
        torch.testing.assert_close(out[name].float(), expected, atol=1e-4, rtol=1e-3)


def test_passthrough_example_stacks_layers(merged):
    base, instruct = load_state(MODELS / "tiny-base"), load_state(MODELS / "tiny-instruct")
    out_dir = merged["passthrough.yml"]
    out = load_state(out_dir)
    origin = [(base, 0), (base, 1), (base, 2), (instruct, 1), (instruct, 2), (instruct, 3)]
    for k, (src, layer) in enumerate(origin):
        for suffix in ("self_attn.k_proj.weight", "mlp.gate_proj.weight",
                       "post_attention_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{k}.{suffix}"],
                               src[f"model.layers.{layer}.{suffix}"])
    assert torch.equal(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], instruct["lm_head.weight"])
    assert read_json(out_dir / "config.json")["num_hidden_layers"] == 6


def test_gradient_slerp_example_follows_the_gradients(merged):
    base, instruct = state_of("tiny-base"), state_of("tiny-instruct")
    out = load_state(merged["gradient-slerp.yml"])
    attn = [0, 0.5, 0.3, 0.7, 1]  # anchors at 0, 1/4, 2/4, 3/4, 1 of the 4 layers (t = i/3)
    mlp = [1, 0.5, 0.7, 0.3, 0]

    def at(gradient: list[float], layer: int) -> float:
        pos = layer / 3 * (len(gradient) - 1)
        i = min(int(pos), len(gradient) - 2)
        return gradient[i] + (gradient[i + 1] - gradient[i]) * (pos - i)

    assert at(attn, 1) == pytest.approx(0.5 + (0.3 - 0.5) / 3)  # the hand-worked value
    for layer in range(4):
        for part, gradient in (("self_attn.q_proj", attn), ("mlp.up_proj", mlp)):
            name = f"model.layers.{layer}.{part}.weight"
            t = at(gradient, layer)
            close_in_bf16(out[name], slerp_reference(base[name], instruct[name], t))
    name = "model.layers.0.self_attn.q_proj.weight"  # t = 0: the base, exactly
    assert torch.equal(out[name], load_state(MODELS / "tiny-base")[name])
    name = "lm_head.weight"  # no filter matches: the default 0.5
    close_in_bf16(out[name], slerp_reference(base[name], instruct[name], 0.5))


def test_ties_example_mostly_matches_a_reference(merged):
    """TIES at density 0.5; ties among equal bf16 magnitudes may pick different entries at
    the cut-off, so 99.9% of the entries must match."""
    base, instruct, code = (state_of(n) for n in NAMES)
    out = load_state(merged["ties.yml"])
    for name, code_weight in (("model.layers.0.mlp.down_proj.weight", 0.2),
                              ("model.layers.3.mlp.down_proj.weight", 0.8),
                              ("model.embed_tokens.weight", 0.2)):
        deltas, weights = [], [0.5, code_weight]
        for model, w in ((instruct, weights[0]), (code, weights[1])):
            d = (model[name] - base[name]).flatten()
            k = int(0.5 * d.numel())
            keep = torch.zeros_like(d, dtype=torch.bool)
            keep[d.abs().topk(k).indices] = True
            deltas.append(torch.where(keep, d, 0.0) * w)
        stacked = torch.stack(deltas)
        sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        w = torch.tensor(weights).view(2, 1)
        divisor = torch.where(agree, w, 0.0).sum(0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
        mixed = torch.where(agree, stacked, 0.0).sum(0) / divisor
        expected = base[name] + mixed.reshape(base[name].shape)
        got = out[name].float()
        ok = (got - expected).abs() <= 1e-3 + 1.6e-2 * expected.abs()
        assert ok.float().mean() > 0.999, (name, ok.float().mean())
    # norms have no delta in the shipped fine-tunes: TIES leaves them at the base
    assert torch.equal(out["model.norm.weight"], load_state(MODELS / "tiny-base")[
        "model.norm.weight"])


def test_quickstart_through_the_installed_command(tmp_path):
    """The README's command, run from the repository root."""
    script = Path(sys.executable).parent / "mergekit-yaml"
    out = tmp_path / "merged"
    if script.is_file():
        import subprocess

        proc = subprocess.run([str(script), "examples/quickstart.yml", str(out)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    else:  # an interpreter without the console script: the same entry point
        proc = run_cli("mergekit.cli.yaml_cmd", "examples/quickstart.yml", out, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()


# -- the README ------------------------------------------------------------------


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def quick_start_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", readme_section("Quick start"),
                        re.S)
    return [line.strip() for b in blocks for line in b.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_readme_quick_start_has_two_commands_and_ci_runs_them():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert "examples/quickstart.yml" in commands[0]
    assert "pytest" in commands[1]
    ci = (REPO / ".ci" / "run").read_text()
    ci_lines = [line.strip() for line in ci.splitlines()]
    for command in commands:
        for part in command.split("&&"):
            assert part.strip() in ci_lines, part


def test_readme_recipe_examples_parse(monkeypatch):
    from mergekit.config import parse_config

    monkeypatch.chdir(REPO)  # recipes name examples/models/... relative to the root

    blocks = re.findall(r"```yaml\n(.*?)```", readme_section("Recipe format"), re.S)
    assert len(blocks) >= 4
    for block in blocks:
        data = yaml.safe_load(block)
        if isinstance(data, dict) and "merge_method" in data:
            parse_config(data)
