"""The plan: recipe + input headers -> one job per output tensor."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import build_llama, load_state
from safetensors.torch import save_file

from mergekit.config import parse_config
from mergekit.errors import MergeError
from mergekit.io.model import open_model
from mergekit.io.safetensors_file import SafetensorsReader
from mergekit.plan import MergePlan, TensorJob, TensorRef, build_plan, format_plan

EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
LAYER_SUFFIXES = (
    "input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "post_attention_layernorm.weight", "self_attn.k_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_proj.weight", "self_attn.v_proj.weight",
)


def layer(i: int, suffix: str = "self_attn.q_proj.weight") -> str:
    return f"model.layers.{i}.{suffix}"


@pytest.fixture(scope="module")
def extra_models(tmp_path_factory: pytest.TempPathFactory,
                 llama_models: list[Path]) -> dict[str, Path]:
    """Llama variants: bigger vocabulary, fewer layers, float16, tied head, renamed class."""
    root = tmp_path_factory.mktemp("plan_models")
    models = {
        "v72": build_llama(root / "v72", seed=7, vocab=72),
        "short": build_llama(root / "short", seed=8, layers=2),
        "half": build_llama(root / "half", seed=9, dtype=torch.float16),
        "tied": build_llama(root / "tied", seed=11, tied=True),
    }
    crime = root / "crime"
    shutil.copytree(llama_models[0], crime)
    config = json.loads((crime / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (crime / "config.json").write_text(json.dumps(config))
    models["crime"] = crime
    for name, origin in (("ints_a", llama_models[0]), ("ints_b", llama_models[1])):
        folder = root / name
        folder.mkdir()
        state = load_state(origin)
        state["model.position_ids"] = torch.arange(8)  # an integer buffer
        save_file(state, folder / "model.safetensors")
        shutil.copy(origin / "config.json", folder / "config.json")
        models[name] = folder
    return models


@pytest.fixture
def reader() -> Iterator[SafetensorsReader]:
    r = SafetensorsReader()
    yield r
    r.close()


@pytest.fixture
def plan_for(reader: SafetensorsReader):
    def make(recipe: dict, **kwargs: object) -> MergePlan:
        cfg = parse_config(recipe)
        sources = {str(ref): open_model(ref, reader, None) for ref in cfg.referenced_models()}
        return build_plan(cfg, sources, **kwargs)

    return make


def job(plan: MergePlan, name: str) -> TensorJob:
    (found,) = [j for j in plan.jobs if j.output_name == name]
    return found


def plan_error(plan_for, recipe: dict, **kwargs: object) -> str:
    with pytest.raises(MergeError) as info:
        plan_for(recipe, **kwargs)
    assert info.value.exit_code == 2
    return str(info.value)


def linear(*models: Path, **extra: object) -> dict:
    return {"merge_method": "linear", "parameters": {"weight": 1.0},
            "models": [{"model": str(m)} for m in models], **extra}


def passthrough_slices(*ranges: tuple[Path, int, int]) -> dict:
    return {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(m), "layer_range": [s, e]}]} for m, s, e in ranges]}


def float32_bytes(folder: Path) -> int:
    return sum(t.numel() * 4 for t in load_state(folder).values())


# -- layers and slices -------------------------------------------------------------------------

def test_whole_models_keep_every_tensor(plan_for, llama_models: list[Path]):
    a, b, _ = llama_models
    plan = plan_for(linear(a, b))
    names = set(load_state(a))
    assert {j.output_name for j in plan.jobs} == names
    assert len(plan.jobs) == len(names)
    assert plan.num_layers == 4
    assert plan.layer_origins == tuple((str(a), i) for i in range(4))
    for j in plan.jobs:
        assert j.inputs == (TensorRef(str(a), j.output_name), TensorRef(str(b), j.output_name))
        assert j.base is None and j.method == "linear" and j.compute


def test_slices_renumber_layers(plan_for, llama_models: list[Path]):
    a, b, c = llama_models
    plan = plan_for(passthrough_slices((a, 0, 2), (b, 1, 4), (c, 3, 4)))
    # output layer k <- (model, source layer)
    origins = [(a, 0), (a, 1), (b, 1), (b, 2), (b, 3), (c, 3)]
    assert plan.num_layers == 6
    assert plan.layer_origins == tuple((str(m), i) for m, i in origins)
    for k, (model, i) in enumerate(origins):
        for suffix in LAYER_SUFFIXES:
            j = job(plan, layer(k, suffix))
            assert j.inputs == (TensorRef(str(model), layer(i, suffix)),)
            assert j.layer == k
    assert len(plan.jobs) == 6 * len(LAYER_SUFFIXES) + 3
    assert not any(j.output_name.startswith("model.layers.6.") for j in plan.jobs)


def test_embeddings_from_the_first_slice_norm_and_head_from_the_last(
        plan_for, llama_models: list[Path]):
    a, b, c = llama_models
    plan = plan_for(passthrough_slices((b, 0, 2), (c, 2, 3), (a, 3, 4)))
    assert job(plan, EMBED).inputs == (TensorRef(str(b), EMBED),)
    assert job(plan, NORM).inputs == (TensorRef(str(a), NORM),)
    assert job(plan, HEAD).inputs == (TensorRef(str(a), HEAD),)
    assert job(plan, EMBED).layer is None and job(plan, HEAD).layer is None
    # embeddings first, then the layers in order, then the final norm and head
    names = [j.output_name for j in plan.jobs]
    assert names[0] == EMBED and set(names[-2:]) == {NORM, HEAD}
    layers = [j.layer for j in plan.jobs if j.layer is not None]
    assert layers == sorted(layers)
    assert plan.config_model == str(b)


def test_gpt2_slices_and_tied_head(plan_for, gpt2_models: list[Path]):
    g, h = gpt2_models
    plan = plan_for(passthrough_slices((g, 0, 2), (h, 1, 3)))
    assert plan.num_layers == 4
    assert job(plan, "transformer.h.3.attn.c_attn.weight").inputs == (
        TensorRef(str(h), "transformer.h.2.attn.c_attn.weight"),)
    assert job(plan, "transformer.wte.weight").inputs[0].model == str(g)
    assert job(plan, "transformer.ln_f.weight").inputs[0].model == str(h)
    assert not any("lm_head" in j.output_name for j in plan.jobs)


def test_untied_and_tied_heads_merge(plan_for, llama_models: list[Path],
                                     extra_models: dict[str, Path]):
    a, tied = llama_models[0], extra_models["tied"]
    plan = plan_for(linear(a, tied))
    # the tied model has no lm_head: its embedding stands in
    assert job(plan, HEAD).inputs == (TensorRef(str(a), HEAD), TensorRef(str(tied), EMBED))


@pytest.mark.parametrize(("gradient", "expected"), [
    # slice 1: 3 layers at t = 0, 1/2, 1; slice 2: one layer at t = 1; outside layers t = 0
    ([1.0, 3.0], {"embed": 1.0, "layers": [1.0, 2.0, 3.0, 3.0], "post": 1.0}),
    ([0.0, 1.0, 0.0], {"embed": 0.0, "layers": [0.0, 1.0, 0.0, 0.0], "post": 0.0}),
    ([2.0, 4.0, 10.0, 6.0], {"embed": 2.0, "layers": [2.0, 7.0, 6.0, 6.0], "post": 2.0}),
])
def test_gradient_positions_of_layers(plan_for, llama_models: list[Path], gradient: list,
                                      expected: dict):
    a, b, _ = llama_models
    recipe = passthrough_slices((a, 0, 3), (b, 0, 1))
    recipe["parameters"] = {"scale": gradient}
    plan = plan_for(recipe)
    for k, value in enumerate(expected["layers"]):
        for suffix in ("self_attn.q_proj.weight", "mlp.up_proj.weight"):
            assert job(plan, layer(k, suffix)).params["scale"] == pytest.approx((value,))
    assert job(plan, EMBED).params["scale"] == pytest.approx((expected["embed"],))
    assert job(plan, NORM).params["scale"] == pytest.approx((expected["post"],))
    assert job(plan, HEAD).params["scale"] == pytest.approx((expected["post"],))


def test_four_layer_slice_positions(plan_for, llama_models: list[Path]):
    a, b, _ = llama_models
    recipe = {"merge_method": "slerp", "base_model": str(a), "parameters": {"t": [0.0, 0.9]},
              "models": [{"model": str(a)}, {"model": str(b)}]}
    plan = plan_for(recipe)
    for k in range(4):
        j = job(plan, layer(k))
        assert j.params["t"] == pytest.approx(0.9 * k / 3)
        assert j.base == TensorRef(str(a), layer(k))
        assert j.inputs == (TensorRef(str(b), layer(k)),)


def test_base_model_not_listed_in_models(plan_for, llama_models: list[Path]):
    a, b, c = llama_models
    recipe = {"merge_method": "ties", "base_model": str(a), "parameters": {"weight": 1.0},
              "models": [{"model": str(b)}, {"model": str(c)}]}
    j = job(plan_for(recipe), layer(2))
    assert j.base == TensorRef(str(a), layer(2))
    assert [r.model for r in j.inputs] == [str(b), str(c)]
    assert j.params["weight"] == (1.0, 1.0)


# -- recipe errors found with the headers -------------------------------------------------------

def test_layer_range_past_the_model(plan_for, llama_models: list[Path]):
    a, b, _ = llama_models
    msg = plan_error(plan_for, passthrough_slices((a, 0, 2), (b, 2, 6)))
    assert msg.startswith("slices[1].sources[0].layer_range:")
    assert "[2, 6]" in msg and "4 layers" in msg and str(b) in msg


def test_missing_required_parameter_names_parameter_model_and_tensor(
        plan_for, llama_models: list[Path]):
    a, b, _ = llama_models
    recipe = {"merge_method": "linear",
              "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b)}]}
    msg = plan_error(plan_for, recipe)
    assert msg.startswith("models[1].parameters:")
    assert "'weight'" in msg and str(b) in msg and str(a) not in msg
    assert re.search(r"tensor (model\.|lm_head)\S+", msg)


def test_required_parameter_filtered_away_from_some_tensors(plan_for, llama_models: list[Path]):
    a, b, _ = llama_models
    recipe = {"merge_method": "slerp", "base_model": str(a),
              "models": [{"model": str(a)}, {"model": str(b)}],
              "parameters": {"t": [{"filter": "self_attn", "value": 0.5}]}}
    msg = plan_error(plan_for, recipe)
    assert "'t'" in msg
    tensor = re.search(r"tensor (\S+?)\)", msg).group(1)
    assert "self_attn" not in tensor and tensor in load_state(a)


def test_different_layer_counts_in_models_form(plan_for, llama_models: list[Path],
                                               extra_models: dict[str, Path]):
    a, short = llama_models[0], extra_models["short"]
    msg = plan_error(plan_for, linear(a, short))
    assert msg.startswith("models:") and "layer counts" in msg
    assert f"{a}: 4" in msg and f"{short}: 2" in msg


def test_base_model_with_a_different_layer_count(plan_for, llama_models: list[Path],
                                                 extra_models: dict[str, Path]):
    a, b, _ = llama_models
    recipe = {"merge_method": "ties", "base_model": str(extra_models["short"]),
              "parameters": {"weight": 1.0}, "models": [{"model": str(a)}, {"model": str(b)}]}
    assert "layer counts" in plan_error(plan_for, recipe)


def test_slices_reconcile_different_layer_counts(plan_for, llama_models: list[Path],
                                                 extra_models: dict[str, Path]):
    a, short = llama_models[0], extra_models["short"]
    recipe = {"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": [
        {"sources": [{"model": str(a), "layer_range": [2, 4]},
                     {"model": str(short), "layer_range": [0, 2]}]}]}
    plan = plan_for(recipe)
    assert plan.num_layers == 2
    assert job(plan, layer(1)).inputs == (TensorRef(str(a), layer(3)),
                                          TensorRef(str(short), layer(1)))


def test_different_architectures(plan_for, llama_models: list[Path],
                                 extra_models: dict[str, Path]):
    a, crime = llama_models[0], extra_models["crime"]
    msg = plan_error(plan_for, linear(a, crime))
    assert "architectures differ" in msg
    assert "LlamaForCausalLM" in msg and "MistralForCausalLM" in msg
    assert "--allow-crimes" in msg
    plan = plan_for(linear(a, crime), allow_crimes=True)
    assert len(plan.jobs) == len(load_state(a))


def test_tensor_names_that_do_not_match(plan_for, gpt2_models: list[Path],
                                        neox_models: list[Path]):
    g, n = gpt2_models[0], neox_models[0]
    msg = plan_error(plan_for, linear(g, n), allow_crimes=True)
    assert msg.startswith("models[1]:") and str(n) in msg and "transformer." in msg


# -- shards and dtypes ----------------------------------------------------------------------------

def test_one_shard_by_default(plan_for, llama_models: list[Path]):
    plan = plan_for(linear(*llama_models[:2]))
    assert plan.shard_files == ("model.safetensors",)
    assert {j.shard for j in plan.jobs} == {0}


def test_small_shards(plan_for, llama_models: list[Path]):
    shard_bytes = 6000
    plan = plan_for(linear(*llama_models[:2]), shard_bytes=shard_bytes)
    n = len(plan.shard_files)
    assert n > 2
    assert plan.shard_files == tuple(
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1))
    shards = [j.shard for j in plan.jobs]
    assert shards == sorted(shards) and set(shards) == set(range(n))
    sizes = [sum(j.nbytes for j in plan.jobs if j.shard == s) for s in range(n)]
    for s in range(n):
        members = [j for j in plan.jobs if j.shard == s]
        assert sizes[s] <= shard_bytes or len(members) == 1
        if s + 1 < n:  # a shard closes only when the next tensor does not fit
            first_of_next = next(j for j in plan.jobs if j.shard == s + 1)
            assert sizes[s] + first_of_next.nbytes > shard_bytes
    assert sum(sizes) == plan.write_bytes


def test_tensors_bigger_than_a_shard_get_one_each(plan_for, llama_models: list[Path]):
    plan = plan_for(linear(*llama_models[:2]), shard_bytes=1)
    assert len(plan.shard_files) == len(plan.jobs)
    assert [j.shard for j in plan.jobs] == list(range(len(plan.jobs)))


@pytest.mark.parametrize(("extra", "code", "size"), [
    ({}, "F32", 4),
    ({"dtype": "bfloat16"}, "BF16", 2),
    ({"dtype": "float16"}, "F16", 2),
    ({"out_dtype": "float16"}, "F16", 2),
    ({"dtype": "bfloat16", "out_dtype": "float32"}, "F32", 4),
])
def test_output_dtype(plan_for, llama_models: list[Path], extra: dict, code: str, size: int):
    plan = plan_for(linear(*llama_models[:2], **extra))
    assert {j.dtype for j in plan.jobs} == {code}
    j = job(plan, EMBED)
    assert j.nbytes == 64 * 16 * size
    assert plan.write_bytes == float32_bytes(llama_models[0]) // 4 * size


def test_input_dtype_is_kept_without_a_recipe_dtype(plan_for, extra_models: dict[str, Path]):
    half = extra_models["half"]
    plan = plan_for(linear(half))
    assert {j.dtype for j in plan.jobs} == {"F16"}
    assert plan_for(linear(half, dtype="float32")).jobs[0].dtype == "F32"


def test_integer_tensors_are_copied_in_their_dtype(plan_for, extra_models: dict[str, Path]):
    a, b = extra_models["ints_a"], extra_models["ints_b"]
    plan = plan_for(linear(a, b, dtype="bfloat16"))
    j = job(plan, "model.position_ids")
    assert not j.compute and j.params == {}
    assert j.dtype == "I64" and j.shape == (8,) and j.nbytes == 64
    assert j.inputs[0] == TensorRef(str(a), "model.position_ids")
    assert job(plan, EMBED).compute and job(plan, EMBED).dtype == "BF16"
    assert "copy" in next(line for line in format_plan(plan).splitlines()
                          if line.startswith("model.position_ids"))


# -- different vocabulary sizes ------------------------------------------------------------------

def test_vocab_mismatch_crops_to_the_smallest(plan_for, llama_models: list[Path],
                                              extra_models: dict[str, Path]):
    a, v72 = llama_models[0], extra_models["v72"]
    plan = plan_for(linear(v72, a))
    assert job(plan, EMBED).shape == (64, 16)
    assert job(plan, HEAD).shape == (64, 16)
    assert job(plan, layer(0)).shape == (16, 16)
    assert len(plan.warnings) == 2
    embed_warning = next(w for w in plan.warnings if EMBED in w)
    assert "[72, 16]" in embed_warning and "[64, 16]" in embed_warning
    assert any(HEAD in w for w in plan.warnings)


@pytest.mark.parametrize(("base", "expected_rows"), [("v72", 72), ("a", 64)])
def test_ties_takes_the_base_shape(plan_for, llama_models: list[Path],
                                   extra_models: dict[str, Path], base: str, expected_rows: int):
    models = {"a": llama_models[0], "v72": extra_models["v72"]}
    other = "a" if base == "v72" else "v72"
    recipe = {"merge_method": "ties", "base_model": str(models[base]),
              "parameters": {"weight": 1.0}, "models": [{"model": str(models[other])}]}
    plan = plan_for(recipe)
    assert job(plan, EMBED).shape == (expected_rows, 16)
    assert job(plan, HEAD).shape == (expected_rows, 16)
    assert len(plan.warnings) == 2


def test_same_vocab_no_warning(plan_for, llama_models: list[Path]):
    assert plan_for(linear(*llama_models)).warnings == ()


# -- the dry-run listing -----------------------------------------------------------------------

def test_read_and_write_bytes(plan_for, llama_models: list[Path]):
    a, b, _ = llama_models
    total = float32_bytes(a)
    plan = plan_for(linear(a, b, dtype="bfloat16"))
    assert plan.read_bytes == 2 * total
    assert plan.write_bytes == total // 2
    # the base listed in models is read once per tensor
    recipe = {"merge_method": "ties", "base_model": str(a), "parameters": {"weight": 1.0},
              "models": [{"model": str(a)}, {"model": str(b)}]}
    assert plan_for(recipe).read_bytes == 2 * total


def test_format_plan(plan_for, llama_models: list[Path]):
    a, b, _ = llama_models
    total = float32_bytes(a)
    n_tensors = len(load_state(a))
    text = format_plan(plan_for(linear(a, b, dtype="bfloat16")))
    lines = text.splitlines()
    summary = lines[-1]
    assert f"{n_tensors} tensors" in summary and "4 layers" in summary
    assert f"read {2 * total / 1000:.2f} kB" in summary
    assert f"write {total / 2 / 1000:.2f} kB" in summary
    embed_line = next(line for line in lines if line.startswith(EMBED))
    assert "[64, 16]" in embed_line and "BF16" in embed_line and "linear" in embed_line
    assert f"{a}:{EMBED}" in embed_line and f"{b}:{EMBED}" in embed_line
    assert sum(1 for line in lines if line.strip()) == n_tensors + 1


def test_format_plan_shows_the_recipe_parameters_and_the_fingerprint_gets_every_field(
        plan_for, llama_models: list[Path]):
    """--dry-run shows the resolved recipe parameters (defaults included), not what the
    engine sets itself (a prepare pass's fields, the per-tensor seed), and the shard only
    when there are several; ``full`` (the resume fingerprint) keeps all of them."""
    a, b, c = (str(m) for m in llama_models)
    recipe = {"merge_method": "dare_ties", "base_model": a, "models": [
        {"model": b, "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": c, "parameters": {"weight": 0.5, "density": 0.7}}]}
    plan = plan_for(recipe, random_seed=3)
    line = next(line for line in format_plan(plan).splitlines() if line.startswith(EMBED))
    assert line == (f"{EMBED} [64, 16] F32 dare_ties [{b}:{EMBED}, {c}:{EMBED}] "
                    f"base={a}:{EMBED} weight=[0.5,0.5] density=[0.5,0.7] normalize=False "
                    "rescale=True rescale_mode=l1 lambda=1 int8_mask=False consensus=sum")
    full = next(line for line in format_plan(plan, full=True).splitlines()
                if line.startswith(EMBED))
    assert " shard=1 dare_ties " in full and " seed=" in full and "l1_scale=None" in full
    assert f"seed={job(plan, EMBED).params['seed']}" in full

    sharded = plan_for(recipe, shard_bytes=20_000, random_seed=3)
    assert len(sharded.shard_files) == 3
    lines = format_plan(sharded).splitlines()
    assert f"{EMBED} [64, 16] F32 shard=1 dare_ties " in lines[0]
    assert any(" shard=3 dare_ties " in line for line in lines)
    assert not any(" seed=" in line or "=None" in line for line in lines)


def test_global_parameter_set_for_one_model_is_ignored_with_a_warning(llama_models):
    from mergekit.config import parse_config
    from mergekit.io.model import open_model
    from mergekit.io.safetensors_file import SafetensorsReader
    from mergekit.plan import build_plan

    a, b, c = (str(m) for m in llama_models)
    cfg = parse_config({"merge_method": "ties", "base_model": a, "models": [
        {"model": b, "parameters": {"weight": 1.0, "normalize": False}},
        {"model": c, "parameters": {"weight": 1.0}}]})
    reader = SafetensorsReader()
    sources = {str(r): open_model(r, reader, None) for r in cfg.referenced_models()}
    plan = build_plan(cfg, sources)
    reader.close()
    assert any(w.startswith("models[0].parameters.normalize: 'normalize' applies to the whole "
                            "merge") for w in plan.warnings)
    assert all(job.params["normalize"] is True for job in plan.jobs if job.compute)


def test_a_parameter_of_another_method_is_ignored_with_a_warning(llama_models):
    """As mergekit 0.1.x: a ``weight`` left on slerp's models (and ties' ``density`` at the
    top) is ignored with a warning naming where it is set; the jobs are those of the recipe
    without it. A name no method takes stays an error."""
    from mergekit.config import parse_config
    from mergekit.io.model import open_model
    from mergekit.io.safetensors_file import SafetensorsReader
    from mergekit.plan import build_plan

    a, b, _ = (str(m) for m in llama_models)
    clean = {"merge_method": "slerp", "base_model": a, "parameters": {"t": 0.3},
             "models": [{"model": a}, {"model": b}]}
    lenient = {"merge_method": "slerp", "base_model": a,
               "parameters": {"t": 0.3, "density": 0.5},
               "models": [{"model": a, "parameters": {"weight": 0.6}},
                          {"model": b, "parameters": {"weight": 0.4}}]}
    reader = SafetensorsReader()
    plans = []
    for recipe in (clean, lenient):
        cfg = parse_config(recipe)
        sources = {str(r): open_model(r, reader, None) for r in cfg.referenced_models()}
        plans.append(build_plan(cfg, sources))
    reader.close()
    assert [(j.output_name, j.params) for j in plans[0].jobs] == [
        (j.output_name, j.params) for j in plans[1].jobs]
    assert plans[0].warnings == ()
    assert sorted(w.split(":")[0] for w in plans[1].warnings) == [
        "models[0].parameters.weight", "models[1].parameters.weight", "parameters.density"]
    assert all("'slerp' takes no parameter" in w for w in plans[1].warnings)
    with pytest.raises(MergeError, match=r"models\[0\]\.parameters\.weigth: .*did you mean"):
        parse_config({**lenient, "models": [{"model": a, "parameters": {"weigth": 1}},
                                            {"model": b}]})
