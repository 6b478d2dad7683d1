"""bakllama: file translation, file errors, and an end-to-end layer recombination whose
embedding, head and scaled projections come from where the file says."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_state, read_json, run_cli
from safetensors.torch import save_file

from mergekit.wrappers.bakllama import BakllamaConfig, bakllama_recipe

# end to end through the command line: the whole suite runs them, -m "not slow" not
pytestmark = pytest.mark.slow

BAKLLAMA = "mergekit.cli.bakllama_cmd"

# The scale filters a slice with `scale: S` gets, in order, then 1 for everything else.
SCALED = ["self_attn.o_proj", "mlp.down_proj", "attn.c_proj", "mlp.c_proj",
          "attention.dense", "mlp.dense_4h_to_h"]


def bakllama(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli(BAKLLAMA, *args)


def translate(data: dict, fp16: bool = False) -> dict:
    return bakllama_recipe(BakllamaConfig.model_validate(data), fp16)


# -- translation, field by field ---------------------------------------------------------


def test_defaults_take_embedding_and_head_from_the_slices():
    got = translate({"layer_slices": [{"model": "a", "start": 0, "end": 2},
                                      {"model": "b", "start": 1, "end": 4}]})
    assert got == {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                   {"sources": [{"model": "b", "layer_range": [1, 4]}]}],
    }


def test_embedding_and_head_sources_become_empty_end_slices():
    got = translate({"layer_slices": [{"model": "a", "start": 0, "end": 2},
                                      {"model": "b", "start": 2, "end": 4}],
                     "embedding_source": "c", "lm_head_source": "d"}, fp16=True)
    assert got == {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "c", "layer_range": [0, 0]}]},
                   {"sources": [{"model": "a", "layer_range": [0, 2]}]},
                   {"sources": [{"model": "b", "layer_range": [2, 4]}]},
                   {"sources": [{"model": "d", "layer_range": [0, 0]}]}],
        "dtype": "float16",
    }


def test_sources_equal_to_the_end_slices_add_nothing():
    got = translate({"layer_slices": [{"model": "a", "start": 0, "end": 1},
                                      {"model": "b", "start": 1, "end": 3}],
                     "embedding_source": "a", "lm_head_source": "b"})
    assert got["slices"] == [{"sources": [{"model": "a", "layer_range": [0, 1]}]},
                             {"sources": [{"model": "b", "layer_range": [1, 3]}]}]


def test_scale_filters_the_output_projections():
    got = translate({"layer_slices": [{"model": "a", "start": 0, "end": 3, "scale": 0.5}]})
    assert got == {
        "merge_method": "passthrough",
        "slices": [{"sources": [{
            "model": "a", "layer_range": [0, 3],
            "parameters": {"scale": [{"filter": f, "value": 0.5} for f in SCALED]
                           + [{"value": 1.0}]},
        }]}],
    }


# -- file errors (exit 2, nothing written) -------------------------------------------------

ERRORS = {
    "unknown key": ("layer_slices:\n- {model: a, start: 0, end: 2, scal: 1}\n",
                    "layer_slices[0].scal: Extra inputs are not permitted; fix the bakllama "
                    "file"),
    "unknown top-level key": ("layer_slices:\n- {model: a, start: 0, end: 2}\nembeding: a\n",
                              "embeding: Extra inputs are not permitted"),
    "missing field": ("layer_slices:\n- {model: a, start: 0}\n",
                      "layer_slices[0].end: Field required; fix the bakllama file"),
    "missing slices": ("embedding_source: a\n", "layer_slices: Field required"),
    "no slices": ("layer_slices: []\n", "layer_slices: List should have at least 1 item"),
    "end before start": ("layer_slices:\n- {model: a, start: 3, end: 1}\n",
                         "layer_slices[0]: end 1 is not after start 3 (end is exclusive); "
                         "fix the bakllama file"),
    # the wording inside the parentheses is libyaml's or PyYAML's, whichever parses
    "malformed YAML": ("layer_slices: [\n- x\n", ":2:1: malformed YAML ("),
    "not a mapping": ("- a\n- b\n",
                      "expected a mapping with layer_slices, found list; fix the bakllama "
                      "file"),
    "empty file": ("", "expected a mapping with layer_slices, found NoneType"),
    "scale past float32": ("layer_slices:\n- {model: a, start: 0, end: 2, scale: 1e39}\n",
                           "layer_slices[0].scale: 1e+39 does not fit in float32"),
    "scale not finite": ("layer_slices:\n- {model: a, start: 0, end: 2, scale: .nan}\n",
                         "layer_slices[0].scale: nan is not a finite number"),
    "quoted scale": ("layer_slices:\n- {model: a, start: 0, end: 2, scale: '0.5'}\n",
                     "layer_slices[0].scale: Input should be a valid number"),
    "boolean start": ("layer_slices:\n- {model: a, start: false, end: 2}\n",
                      "layer_slices[0].start: Input should be a valid integer"),
    "duplicate key": ("layer_slices:\n- {model: a, start: 0, end: 2}\nlayer_slices: []\n",
                      ":3:1: duplicate key 'layer_slices' (also on line 1); keep one of them"),
}


@pytest.mark.parametrize("text, message", ERRORS.values(), ids=ERRORS.keys())
def test_file_errors(tmp_path, text, message):
    config = tmp_path / "bake.yml"
    config.write_text(text)
    out = tmp_path / "out"
    proc = bakllama(config, out)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {config}")
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_missing_file(tmp_path):
    config = tmp_path / "nope.yml"
    proc = bakllama(config, tmp_path / "out")
    assert proc.returncode == 2
    assert f"error: {config}: cannot read the recipe (No such file or directory); check the path" \
        in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_layer_range_past_the_model(tmp_path, llama_models):
    config = tmp_path / "bake.yml"
    config.write_text(yaml.safe_dump(
        {"layer_slices": [{"model": str(llama_models[0]), "start": 2, "end": 9}]}))
    proc = bakllama(config, tmp_path / "out")
    assert proc.returncode == 2
    assert "[2, 9] is past the 4 layers of" in proc.stderr
    assert not (tmp_path / "out").exists()


# -- end to end ----------------------------------------------------------------------------


def with_random_norms(src: Path, dst: Path, seed: int) -> Path:
    """A copy of ``src`` whose norm weights (all ones in a fresh model) are random, so
    that the output's norms can only match when taken from this model."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_state(src)
    gen = torch.Generator().manual_seed(seed)
    for name, t in state.items():
        if name.endswith("norm.weight"):
            state[name] = torch.rand(t.shape, generator=gen) + 0.5
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def runs(llama_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bakllama")
    a = str(with_random_norms(llama_models[0], root / "a_norms", seed=7))
    b, c = str(llama_models[1]), str(llama_models[2])
    config = root / "bake.yml"
    # 5 layers: a's 0-1 (scaled), b's 1-3; embeddings from c, head and final norm from a
    config.write_text(yaml.safe_dump({
        "layer_slices": [{"model": a, "start": 0, "end": 2, "scale": 0.5},
                         {"model": b, "start": 1, "end": 4}],
        "embedding_source": c,
        "lm_head_source": a,
    }))
    bake_out = root / "bake" / "merged"
    baked = bakllama(config, bake_out, "--fp16", "--clone-tensors", "--quiet")
    printed = bakllama(config, "--fp16", "--print-yaml")
    recipe = root / "recipe.yml"
    recipe.write_text(printed.stdout)
    yaml_out = root / "yaml" / "merged"
    via_yaml = run_cli("mergekit.cli.yaml_cmd", recipe, yaml_out, "--quiet")
    return dict(models=(a, b, c), baked=baked, bake_out=bake_out, printed=printed,
                via_yaml=via_yaml, yaml_out=yaml_out)


@pytest.mark.slow
def test_layers_embedding_and_head_come_from_the_named_models(runs):
    assert runs["baked"].returncode == 0, runs["baked"].stderr
    a, b, c = (load_state(p) for p in runs["models"])
    got = load_state(runs["bake_out"])
    layer_names = sorted({n.split(".", 3)[3] for n in a if n.startswith("model.layers.0.")})
    assert set(got) == {n for n in a if ".layers." not in n} | {
        f"model.layers.{k}.{s}" for k in range(5) for s in layer_names}
    for t in got.values():
        assert t.dtype == torch.float16

    torch.testing.assert_close(got["model.embed_tokens.weight"],
                               c["model.embed_tokens.weight"].half(), atol=0, rtol=0)
    for name in ("lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(got[name], a[name].half(), atol=0, rtol=0)
    # the inputs differ where it matters, so the checks above can tell the sources apart
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    for other in (b, c):
        assert not torch.equal(a["lm_head.weight"], other["lm_head.weight"])
        assert not torch.equal(a["model.norm.weight"], other["model.norm.weight"])

    # (output layer, source model, source layer, scale of o_proj/down_proj)
    for k, src, j, scale in [(0, a, 0, 0.5), (1, a, 1, 0.5),
                             (2, b, 1, 1.0), (3, b, 2, 1.0), (4, b, 3, 1.0)]:
        for suffix in layer_names:
            expected = src[f"model.layers.{j}.{suffix}"]
            if "self_attn.o_proj" in suffix or "mlp.down_proj" in suffix:
                expected = expected * scale
            torch.testing.assert_close(got[f"model.layers.{k}.{suffix}"], expected.half(),
                                       atol=0, rtol=0, msg=f"layer {k} {suffix}")

    config = read_json(runs["bake_out"] / "config.json")
    assert config["num_hidden_layers"] == 5
    assert config["torch_dtype"] == "float16"


@pytest.mark.slow
def test_print_yaml_round_trip_is_byte_identical(runs):
    assert runs["printed"].returncode == 0, runs["printed"].stderr
    a, b, c = runs["models"]
    printed = yaml.safe_load(runs["printed"].stdout)
    assert [s["sources"][0]["model"] for s in printed["slices"]] == [c, a, b, a]
    assert printed["dtype"] == "float16"
    assert runs["via_yaml"].returncode == 0, runs["via_yaml"].stderr
    assert_same_folder(runs["bake_out"], runs["yaml_out"])


def test_default_sources_in_the_plan(tmp_path, llama_models):
    """Without embedding_source / lm_head_source, the first slice's model gives the
    embedding and the last slice's the final norm and head (read from --dry-run's plan)."""
    a, b, _ = (str(p) for p in llama_models)
    config = tmp_path / "bake.yml"
    config.write_text(yaml.safe_dump({"layer_slices": [
        {"model": a, "start": 0, "end": 1}, {"model": b, "start": 1, "end": 2}]}))
    proc = bakllama(config, tmp_path / "out", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out").exists()
    plan = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert f"[{a}:model.embed_tokens.weight]" in plan["model.embed_tokens.weight"]
    assert f"[{b}:lm_head.weight]" in plan["lm_head.weight"]
    assert f"[{b}:model.norm.weight]" in plan["model.norm.weight"]
    assert f"[{b}:model.layers.1.mlp.down_proj.weight]" in plan[
        "model.layers.1.mlp.down_proj.weight"]


def assert_same_folder(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert Path("model.safetensors") in files_a
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_shipped_bakllama_example_runs(tmp_path):
    """examples/wrappers/bakllama.yml (shown in the README) runs from the repository root."""
    from pathlib import Path

    from conftest import load_state, run_cli

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "stacked"
    proc = run_cli("mergekit.cli.bakllama_cmd", "examples/wrappers/bakllama.yml", out, "-q",
                   cwd=repo)
    assert proc.returncode == 0, proc.stderr
    models = repo / "examples" / "models"
    merged, base = load_state(out), load_state(models / "tiny-base")
    instruct = load_state(models / "tiny-instruct")
    assert merged["model.embed_tokens.weight"].equal(base["model.embed_tokens.weight"])
    assert merged["lm_head.weight"].equal(instruct["lm_head.weight"])
    assert len({k.split(".")[2] for k in merged if k.startswith("model.layers.")}) == 6


def test_bakllama_file_that_is_not_utf8_is_a_clean_error(tmp_path):
    from mergekit.errors import MergeError
    from mergekit.wrappers.bakllama import load_bakllama

    path = tmp_path / "bad.yml"
    path.write_bytes(b"layer_slices:\n  - model: \xff\xfe\n")
    try:
        load_bakllama(path, False)
    except MergeError as exc:
        assert exc.exit_code == 2 and "\n" not in str(exc) and str(path) in str(exc)
    else:
        raise AssertionError("no error")
