"""mergekit-yaml end to end through the real entry point, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_llama, load_state, read_json, run_cli, write_recipe
from safetensors import safe_open

# end to end through the command line: the whole suite runs them, -m "not slow" not
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "models"
BASE, INSTRUCT, CODE = (str(TINY / n) for n in ("tiny-base", "tiny-instruct", "tiny-code"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Two slices of a linear merge: layers [0, 3) then [2, 4) of both models -> 5 layers.
SLICED_LINEAR = {
    "merge_method": "linear",
    "slices": [
        {"sources": [{"model": BASE, "layer_range": [0, 3]},
                     {"model": CODE, "layer_range": [0, 3]}]},
        {"sources": [{"model": BASE, "layer_range": [2, 4]},
                     {"model": CODE, "layer_range": [2, 4]}]},
    ],
    "parameters": {"weight": [{"filter": "mlp", "value": 0.75}, {"value": 0.5}]},
    "input_model_parameters": {CODE: {"weight": 0.25}},
    "out_dtype": "float16",
}


def yaml_cmd(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("mergekit.cli.yaml_cmd", *args, cwd=cwd)


def linear_recipe(*models: str, **extra: object) -> dict:
    return {"merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models], **extra}


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("cli")
    recipe = write_recipe(root / "recipe.yml", SLICED_LINEAR)
    out = root / "merged"
    return out, yaml_cmd(recipe, out, "--quiet")


def test_success_exit_code_and_weights(merged):
    out, proc = merged
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    # no temporary folder left beside OUT
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged", "recipe.yml"]

    base, code, got = load_state(BASE), load_state(CODE), load_state(out)
    # output layer k <- source layer k for k < 3, then source layers 2, 3 as layers 3, 4
    sources = [0, 1, 2, 2, 3]
    expected_names = {n for n in base if ".layers." not in n} | {
        n.replace(".layers.0.", f".layers.{k}.") for k in range(5)
        for n in base if ".layers.0." in n}
    assert set(got) == expected_names
    for k, src in enumerate(sources):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
            w_base = 0.75 if "mlp" in suffix else 0.5  # top-level filter; code: 0.25 overall
            a = base[f"model.layers.{src}.{suffix}"].float()
            b = code[f"model.layers.{src}.{suffix}"].float()
            expected = (w_base * a + 0.25 * b) / (w_base + 0.25)
            out_t = got[f"model.layers.{k}.{suffix}"]
            assert out_t.dtype == torch.float16
            torch.testing.assert_close(out_t.float(), expected, atol=1e-3, rtol=1e-2)


def test_success_config_and_tokenizer(merged):
    out, proc = merged
    assert proc.returncode == 0, proc.stderr
    config = read_json(out / "config.json")
    assert config["num_hidden_layers"] == 5
    assert config["torch_dtype"] == "float16"
    assert config["architectures"] == ["LlamaForCausalLM"]
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (TINY / "tiny-base" / name).read_bytes(), name
    assert (out / "generation_config.json").is_file()


def test_success_model_card_and_recipe_copy(merged):
    out, proc = merged
    assert proc.returncode == 0, proc.stderr
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert {"merge", "mergekit"} <= set(front["tags"])
    assert front["library_name"] == "transformers"
    assert "base_model" not in front  # local folders are not hub ids
    assert "linear" in card
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == SLICED_LINEAR


def test_dry_run_prints_plan_and_writes_nothing(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yml", SLICED_LINEAR)
    out = tmp_path / "merged"
    proc = yaml_cmd(recipe, out, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.4.mlp.down_proj.weight" in proc.stdout
    assert "5 layers" in proc.stdout
    # one output file: no shard numbers; nothing the engine sets itself
    assert " shard=" not in proc.stdout and "=None" not in proc.stdout
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yml"]


def test_out_shard_size_writes_shards_and_index(tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path / "recipe.yml",
                          linear_recipe(BASE, INSTRUCT, out_dtype="float32"))
    out = tmp_path / "merged"
    proc = yaml_cmd(recipe, out, "--out-shard-size", "20k", "-q")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "model.safetensors").exists()
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 5  # about 230 kB of float32 tensors, 20 kB per shard
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    in_files = {}
    total = 0
    for shard in shards:
        shard_bytes = []
        with safe_open(out / shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                assert name not in in_files
                in_files[name] = shard
                t = f.get_tensor(name)
                shard_bytes.append(t.numel() * t.element_size())
        # a shard stays under the limit unless one tensor alone is larger
        assert sum(shard_bytes) <= 20_000 or len(shard_bytes) == 1, (shard, shard_bytes)
        total += sum(shard_bytes)
    assert index["weight_map"] == in_files
    assert set(in_files) == set(load_state(BASE))
    assert index["metadata"]["total_size"] == total
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4


def test_no_copy_tokenizer_and_no_model_card(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yml", linear_recipe(BASE, CODE))
    out = tmp_path / "merged"
    proc = yaml_cmd(recipe, out, "--no-copy-tokenizer", "--no-write-model-card", "-q")
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "mergekit_config.yml"} <= names
    assert not names & {*TOKENIZER_FILES, "README.md"}


CHATML_RENDERED = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
LITERAL = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _render(folder: Path) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)


def test_chat_template_builtin_name(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yml",
                          linear_recipe(BASE, CODE, chat_template="chatml"))
    out = tmp_path / "merged"
    proc = yaml_cmd(recipe, out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert "<|im_start|>" in read_json(out / "tokenizer_config.json")["chat_template"]
    assert _render(out) == CHATML_RENDERED


def test_chat_template_literal_jinja(merge):
    """Through the Python API (the CLI path is the same once the recipe is parsed)."""
    out = merge(linear_recipe(BASE, CODE, chat_template=LITERAL))
    assert read_json(out / "tokenizer_config.json")["chat_template"] == LITERAL
    assert _render(out) == "[user] hi\n"


# -- errors -------------------------------------------------------------------------


def _hidden32_llama(root: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, num_hidden_layers=4, hidden_size=32, intermediate_size=32,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(root / "hidden32")
    return str(root / "hidden32")


def _case(name: str, tmp_path: Path, llama_models: list[Path],
          request: pytest.FixtureRequest) -> tuple[str | dict, list[str]]:
    """(recipe text or dict, extra CLI args) for one bad input."""
    a, b = (str(m) for m in llama_models[:2])
    if name == "different_architectures":
        return linear_recipe(a, str(request.getfixturevalue("gpt2_models")[0])), []
    missing = str(tmp_path / "no-such-model")
    return {
        "malformed_yaml": ("merge_method: linear\nmodels: [\n  - model: x\n", []),
        "not_a_mapping": ("- linear\n", []),
        "unknown_method": ({"merge_method": "tie", "models": [{"model": a}]}, []),
        "unknown_key": ({**linear_recipe(a, b), "merge_methd": "linear"}, []),
        "missing_model_folder": (linear_recipe(a, missing), []),
        "shape_mismatch": (linear_recipe(a, _hidden32_llama(tmp_path)), []),
        "layer_range_out_of_bounds": ({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [2, 9]}]}]}, []),
        "missing_required_parameter": ({"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": 1.0}}, {"model": b}]}, []),
        "slerp_without_t": ({"merge_method": "slerp", "base_model": a, "models": [
            {"model": a}, {"model": b}]}, []),
        "bad_shard_size": (linear_recipe(a, b), ["--out-shard-size", "banana"]),
    }[name]


# name -> (exit code, substrings the message must contain)
ERRORS = {
    "malformed_yaml": (2, ["recipe.yml:", "malformed YAML"]),
    "not_a_mapping": (2, ["recipe.yml: the recipe must be a YAML mapping"]),
    "unknown_method": (2, ["merge_method: unknown method 'tie'", "did you mean 'ties'?",
                           "known: ", "linear"]),
    "unknown_key": (2, ["merge_methd: unknown key"]),
    "missing_model_folder": (2, ["no-such-model", "neither an existing folder nor a hub id"]),
    "different_architectures": (2, ["models: the architectures differ", "LlamaForCausalLM",
                                    "GPT2LMHeadModel", "--allow-crimes"]),
    "shape_mismatch": (2, ["model.embed_tokens.weight: the input shapes differ", "[64, 16]",
                           "[64, 32]"]),
    "layer_range_out_of_bounds": (2, ["slices[0].sources[0].layer_range: [2, 9] is past the "
                                      "4 layers of", "use an end of at most 4"]),
    "missing_required_parameter": (2, ["models[1].parameters:", "'linear' needs 'weight'",
                                       "set weight"]),
    "slerp_without_t": (2, ["parameters:", "'slerp' needs 't'"]),
    "bad_shard_size": (2, ["--out-shard-size: 'banana' is not a size"]),
}


def run_with_importtime(
    *args: str | Path, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run mergekit-yaml with -X importtime; returns the process and the imported modules."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mergekit.cli.yaml_cmd", *map(str, args)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    modules, lines = set(), []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:"):
            modules.add(line.rsplit("|", 1)[-1].strip())
        else:
            lines.append(line)
    proc.stderr = "\n".join(lines)
    return proc, modules


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input(tmp_path, llama_models, request, name):
    recipe_data, extra = _case(name, tmp_path, llama_models, request)
    recipe = tmp_path / "recipe.yml"
    if isinstance(recipe_data, str):
        recipe.write_text(recipe_data)
    else:
        write_recipe(recipe, recipe_data)
    out = tmp_path / "merged"
    proc, modules = run_with_importtime(recipe, out, *extra)
    code, parts = ERRORS[name]
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    for part in parts:
        assert part in proc.stderr, (part, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".merged*"))  # no temporary folder either
    # recipe and header problems are found before torch is imported
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}, name


def test_hub_model_missing_offline(tmp_path):
    """A hub id that is not in the (empty) cache, offline: a recipe-level error."""
    recipe = write_recipe(tmp_path / "recipe.yml", linear_recipe("no-such-org/no-such-model", BASE))
    out = tmp_path / "merged"
    proc, modules = run_with_importtime(
        recipe, out, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2, proc.stderr
    assert "error: model 'no-such-org/no-such-model': not a local folder and not in the hub " \
        "cache" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert "torch" not in modules


def test_output_path_is_a_file(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yml", linear_recipe(BASE, CODE))
    out = tmp_path / "merged"
    out.write_text("not a folder")
    proc = yaml_cmd(recipe, out)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {out}: exists and is not a folder" in proc.stderr
    assert out.read_text() == "not a folder"


def test_recipe_error_does_not_import_torch_in_process(tmp_path):
    """The same check through sys.modules, calling the CLI function in a fresh interpreter."""
    recipe = write_recipe(tmp_path / "recipe.yml",
                          {"merge_method": "nope", "models": [{"model": str(tmp_path)}]})
    code = (
        "import sys\n"
        "from mergekit.cli.yaml_cmd import app\n"
        f"sys.argv = ['mergekit-yaml', {str(recipe)!r}, {str(tmp_path / 'out')!r}]\n"
        "try:\n"
        "    app()\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "exit 2 False False", proc.stdout + proc.stderr
    assert "merge_method: unknown method 'nope'" in proc.stderr


def test_verbose_shows_traceback(tmp_path, llama_models):
    recipe = write_recipe(tmp_path / "recipe.yml",
                          {"merge_method": "tie", "models": [{"model": str(llama_models[0])}]})
    proc = yaml_cmd(recipe, tmp_path / "merged", "-v")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert "error: " in proc.stderr and "unknown method 'tie'" in proc.stderr


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_output_equal_to_input_is_refused(tmp_path):
    a = build_llama(tmp_path / "a", seed=1)
    b = build_llama(tmp_path / "b", seed=2)
    before = _snapshot(a)
    recipe = write_recipe(tmp_path / "recipe.yml", linear_recipe(str(a), str(b)))
    proc = yaml_cmd(recipe, a)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {a}: the output folder overlaps the input model" in proc.stderr
    assert "choose another output folder" in proc.stderr
    assert _snapshot(a) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "recipe.yml"]


def test_output_inside_input_is_refused(tmp_path, llama_models):
    a, b = (str(m) for m in llama_models[:2])
    recipe = write_recipe(tmp_path / "recipe.yml", linear_recipe(a, b))
    out = Path(a) / "merged"
    proc = yaml_cmd(recipe, out)
    assert proc.returncode == 2, proc.stderr
    assert "overlaps the input model" in proc.stderr
    assert not out.exists()


def test_output_with_foreign_files_is_refused(tmp_path, llama_models):
    a, b = (str(m) for m in llama_models[:2])
    recipe = write_recipe(tmp_path / "recipe.yml", linear_recipe(a, b))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = yaml_cmd(recipe, out)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.endswith(f"error: {out}: exists and holds notes.txt but no valid "
                                "mergekit_manifest.json, so it is not a mergekit output; "
                                "choose another output folder\n")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_rerun_replaces_an_earlier_output(tmp_path, llama_models, merge):
    """A folder holding an earlier merge (its manifest lists all it holds) is replaced; one
    of a different recipe with --overwrite."""
    a, b, c = (str(m) for m in llama_models)
    out = merge(linear_recipe(a, b))
    assert (out / "mergekit_config.yml").is_file()
    second = write_recipe(tmp_path / "second.yml", linear_recipe(a, c))
    proc = yaml_cmd(second, out, "-q", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = (load_state(a)[name] + load_state(c)[name]) / 2
    torch.testing.assert_close(load_state(out)[name], expected)
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["models"][1]["model"] == c


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("flags", [["--cuda"], ["--device", "cuda:1"], ["--cuda", "--dry-run"]])
def test_cuda_without_a_gpu_is_refused_before_any_work(tmp_path, llama_models, flags):
    from hostile import tree_digest

    a, b = (str(m) for m in llama_models[:2])
    recipe = write_recipe(tmp_path / "recipe.yml", linear_recipe(a, b))
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    proc = yaml_cmd(recipe, out, "--no-copy-tokenizer", *flags)  # progress bars on
    assert proc.returncode == 2, proc.stderr
    flag = " ".join(flags[:2]) if flags[0] == "--device" else "--cuda"
    assert proc.stderr == (f"error: {flag}: no CUDA device is available; run without "
                           f"{flags[0]}\n")
    assert proc.stdout == ""
    assert tree_digest(tmp_path) == before


def test_help_lists_options():
    proc = run_cli("mergekit.cli.yaml_cmd", "--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0
    for option in ("--out-shard-size", "--dry-run", "--no-copy-tokenizer",
                   "--no-write-model-card", "--allow-crimes", "--verbose"):
        assert option in proc.stdout, option


@pytest.mark.parametrize("command", ["yaml_cmd", "methods_cmd", "verify_cmd", "legacy_cmd",
                                     "bakllama_cmd", "layershuffle_cmd"])
def test_help_reads_well_at_80_columns(command):
    """Descriptions wrap beside the flags in lines of whole words: no table squeezing them
    into a narrow column, no flag cut short."""
    proc = run_cli(f"mergekit.cli.{command}", "--help", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
    assert not set("│╭╰…") & set(proc.stdout), proc.stdout
    text = " ".join(proc.stdout.split())  # the words in order, line breaks aside
    assert "-h, --help Show this message and exit." in text
    if command not in ("methods_cmd", "verify_cmd"):
        assert "--write-model-card / --no-write-model-card Write a README.md model card." in text
        assert ("--trust-remote-code Accepted for compatibility; no effect: the merge never "
                "runs model code.") in text


def test_missing_arguments_is_a_usage_error():
    proc = yaml_cmd()
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "CONFIG" in proc.stderr


def test_recipe_file_not_found(tmp_path):
    proc = yaml_cmd(tmp_path / "nope.yml", tmp_path / "out")
    assert proc.returncode == 2
    assert f"error: {tmp_path / 'nope.yml'}: cannot read the recipe" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_console_scripts_flush_output_and_keep_the_exit_code(tmp_path):
    """run_app ends the process without interpreter teardown; what the command printed
    (more than a pipe buffer, to stdout and stderr) must still arrive, with its exit code."""
    code = (
        "import sys, typer\n"
        "from mergekit.cli.edge import run_app\n"
        "app = typer.Typer()\n"
        "@app.command()\n"
        "def cmd() -> None:\n"
        "    for i in range(20000):\n"
        "        print(f'line {i}')\n"
        "    print('last words', file=sys.stderr, end='')\n"
        "    raise typer.Exit(3)\n"
        "run_app(app)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3
    lines = proc.stdout.splitlines()
    assert len(lines) == 20000 and lines[-1] == "line 19999"
    assert proc.stderr == "last words"


# -- hostile recipes: refused before any weight is read, one line, exit 2 ---------------------

def _alias_bomb(models: list[str]) -> str:
    """About 250 KB: one 30000-anchor gradient, aliased by 1000 model entries (30 million
    values once expanded: gigabytes, and as large a recipe copy, card and manifest)."""
    gradient = ", ".join(f"{(i % 97) / 97:.3f}" for i in range(30_000))
    entries = "".join(f"  - {{model: {models[i % 2]}, parameters: {{weight: *g}}}}\n"
                      for i in range(1000))
    return f"merge_method: linear\ngradient: &g [{gradient}]\nmodels:\n{entries}"


HOSTILE_RECIPES = {
    # name -> (recipe text, the error line after "error: {recipe}")
    "weight past float32": (
        "merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 1}}}}\n"
        "  - {{model: {b}, parameters: {{weight: 1e39}}}}\n",
        ": models[1].parameters.weight: 1e+39 does not fit in float32 (largest magnitude "
        "3.403e+38); give a smaller number"),
    "nan gradient anchor": (
        "merge_method: linear\nmodels:\n  - {{model: {a}}}\n  - {{model: {b}}}\n"
        "parameters:\n  weight: [0.5, .nan]\n",
        ": parameters.weight: nan is not a finite number; give a number"),
    "duplicate key": (
        "merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 1}}}}\n"
        "merge_method: passthrough\n",
        ":4:1: duplicate key 'merge_method' (also on line 1); keep one of them"),
    "alias bomb": (  # three aliases stay within 100000 values, the fourth (line 7) does not
        None, ":7:{col}: aliases expand the recipe past 100000 values; reuse smaller blocks, "
        "or fewer times"),
    "deep nesting": (
        # past our limit (100), within libyaml's (1000), which some versions check first
        "merge_method: " + "[" * 500 + "]" * 500 + "\n",
        ":1:114: malformed YAML (nested too deeply); flatten the recipe"),
    "endless karcher": (
        "merge_method: karcher\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
        "parameters: {{max_iter: 1000000000, tol: 0}}\n",
        ": parameters.max_iter: 1000000000 is out of range: input should be less than or "
        "equal to 1000"),
    "quoted number": (
        "merge_method: slerp\nbase_model: {a}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
        "parameters: {{t: '0.5'}}\n",
        ": parameters.t: '0.5' is a string; give a number, without quotes"),
    "boolean layer range": (
        "merge_method: passthrough\nslices:\n"
        "  - sources: [{{model: {a}, layer_range: [false, true]}}]\n",
        ": slices[0].sources[0].layer_range[0]: Input should be a valid integer; "
        "slices[0].sources[0].layer_range[1]: Input should be a valid integer"),
}


@pytest.mark.parametrize("name", list(HOSTILE_RECIPES))
def test_hostile_recipe(tmp_path, llama_models, name):
    from hostile import assert_nothing_partial, tree_digest

    text, error = HOSTILE_RECIPES[name]
    a, b = (str(m) for m in llama_models[:2])
    recipe = tmp_path / "recipe.yml"
    text = _alias_bomb([a, b]) if text is None else text.format(a=a, b=b)
    recipe.write_text(text)
    if "{col}" in error:
        error = error.format(col=text.splitlines()[6].find("*g") + 1)
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    started = time.monotonic()
    proc = yaml_cmd(recipe, out)
    # the bomb took 130 s and 2.4 GB; nesting crashed libyaml's own composer
    assert time.monotonic() - started < 60
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: {recipe}{error}\n"
    assert tree_digest(tmp_path) == before
    assert_nothing_partial(out)


def test_no_tokenizer_warning_comes_before_the_merge(tmp_path, llama_models):
    """A missing tokenizer is said up front, not after the progress bar."""
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(m), "parameters": {"weight": 0.5}} for m in llama_models[:2]]})
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    warning = proc.stderr.index(f"no tokenizer files found in {llama_models[0]}")
    assert "merging" in proc.stderr and warning < proc.stderr.index("merging"), proc.stderr
