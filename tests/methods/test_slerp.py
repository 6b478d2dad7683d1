"""slerp: spherical interpolation from the base (t=0) to the other model (t=1)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_state, run_cli, write_recipe

from mergekit.methods.registry import get_method


def run_slerp(base: list | np.ndarray, other: list | np.ndarray, t: float) -> np.ndarray:
    method = get_method("slerp")
    b = torch.as_tensor(np.asarray(base, dtype=np.float32))
    o = torch.as_tensor(np.asarray(other, dtype=np.float32))
    out = method.fn([o], b, method.make_params({"t": t}))
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(b.shape)
    return out.numpy()


def slerp_ref(base: np.ndarray, other: np.ndarray, t: float) -> np.ndarray:
    """Spec slerp in float64 for nonzero inputs."""
    a = np.asarray(base, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    cos = float(a.ravel() @ b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def test_t0_gives_base_exactly():
    rng = np.random.default_rng(0)
    base, other = rng.normal(size=(2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(run_slerp(base, other, 0.0), base)


def test_t1_gives_other():
    rng = np.random.default_rng(1)
    base, other = rng.normal(size=(2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(run_slerp(base, other, 1.0), other, rtol=0, atol=1e-6)


def test_orthogonal_unit_vectors_half_way():
    s = math.sqrt(0.5)
    np.testing.assert_allclose(run_slerp([1.0, 0.0], [0.0, 1.0], 0.5), [s, s], rtol=0,
                               atol=1e-6)


def test_orthogonal_unit_vectors_third_of_the_way():
    # theta = 90 degrees; at t = 1/3 the result sits 30 degrees from the base
    out = run_slerp([1.0, 0.0], [0.0, 1.0], 1 / 3)
    np.testing.assert_allclose(out, [math.sqrt(3) / 2, 0.5], rtol=0, atol=1e-6)


def test_unnormalised_magnitudes_are_kept():
    # the angle comes from the normalised vectors; the coefficients apply to the raw ones:
    # sin(pi/4)/sin(pi/2) * [2, 0] + sin(pi/4)/sin(pi/2) * [0, 4]
    s = math.sqrt(0.5)
    np.testing.assert_allclose(run_slerp([2.0, 0.0], [0.0, 4.0], 0.5), [2 * s, 4 * s],
                               rtol=0, atol=1e-6)


def test_matrix_is_flattened_for_the_angle():
    # as 4-vectors: base = e1 + e4 direction, other = e2 + e3 direction: orthogonal
    base = [[1.0, 0.0], [0.0, 1.0]]
    other = [[0.0, 3.0], [3.0, 0.0]]
    s = math.sqrt(0.5)
    np.testing.assert_allclose(run_slerp(base, other, 0.5),
                               s * np.array(base) + s * np.array(other), rtol=0, atol=1e-6)


@pytest.mark.parametrize("other", [
    [2.0, 4.0, 6.0],  # same direction (cos = 1): the slerp formula would divide by 0
    [2.0, 4.0, 6.01],  # nearly the same direction (cos > 0.9995)
    [-1.0, -2.0, -3.0],  # opposite direction (cos = -1)
])
def test_colinear_inputs_are_lerped(other: list[float]):
    base = [1.0, 2.0, 3.0]
    t = 0.25
    expected = [(1 - t) * x + t * y for x, y in zip(base, other)]
    out = run_slerp(base, other, t)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_just_below_the_colinear_threshold_is_spherical():
    # cos(theta) = 0.999 < 0.9995: the spherical formula, which differs from lerp here
    theta = math.acos(0.999)
    base = np.array([1.0, 0.0])
    other = np.array([math.cos(theta), math.sin(theta)]) * 3.0
    t = 0.5
    out = run_slerp(base, other, t)
    expected = (math.sin(t * theta) * other + math.sin((1 - t) * theta) * base) / math.sin(theta)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)
    lerp = (1 - t) * base + t * other
    assert np.abs(out - lerp).max() > 4e-4  # about 5e-4 apart


def test_unit_vectors_120_degrees_apart_half_way():
    # cos = -0.5: negative, far from colinear; half-way is the unit vector at 60 degrees
    out = run_slerp([1.0, 0.0], [-0.5, math.sqrt(3) / 2], 0.5)
    np.testing.assert_allclose(out, [0.5, math.sqrt(3) / 2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.85])
def test_obtuse_angles_match_reference(t: float):
    """Negative cosines short of -0.9995 are interpolated along the sphere, not lerped."""
    theta = 2 * math.pi / 3
    base = np.array([2.0, 0.0, 0.0])
    other = 3.0 * np.array([math.cos(theta), math.sin(theta), 0.0])
    np.testing.assert_allclose(run_slerp(base, other, t), slerp_ref(base, other, t),
                               rtol=0, atol=1e-6)
    rng = np.random.default_rng(11)
    base = rng.normal(size=(6, 7)).astype(np.float32)
    other = (-0.8 * base + 0.5 * rng.normal(size=(6, 7))).astype(np.float32)
    cos = float(base.ravel() @ other.ravel()) / (np.linalg.norm(base) * np.linalg.norm(other))
    assert -0.99 < cos < -0.5
    np.testing.assert_allclose(run_slerp(base, other, t), slerp_ref(base, other, t),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_random_matches_reference(t: float):
    rng = np.random.default_rng(3)
    base, other = rng.normal(size=(2, 8, 5)).astype(np.float32)
    np.testing.assert_allclose(run_slerp(base, other, t), slerp_ref(base, other, t),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base, other", [
    ([0.0, 0.0, 0.0], [1.0, -2.0, 0.5]),
    ([1.0, -2.0, 0.5], [0.0, 0.0, 0.0]),
    ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),
])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_zero_norm_input_gives_no_nan(base: list[float], other: list[float], t: float):
    out = run_slerp(base, other, t)
    assert np.isfinite(out).all()
    if t == 0.0:
        np.testing.assert_allclose(out, base, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["base", "other"])
def test_nonfinite_input_gives_lerp_and_keeps_the_rest_finite(bad: float, where: str):
    """No angle exists: the other elements are interpolated linearly (no exception)."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal(6).astype(np.float32)
    other = rng.standard_normal(6).astype(np.float32)
    (base if where == "base" else other)[2] = bad
    out = run_slerp(base, other, 0.3)
    with np.errstate(invalid="ignore"):
        expected = base.astype(np.float64) + 0.3 * (other.astype(np.float64) - base)
    assert not np.isfinite(out[2])
    keep = np.arange(6) != 2
    np.testing.assert_allclose(out[keep], expected[keep], rtol=1e-6, atol=1e-6)


# -- end to end ----------------------------------------------------------------------------


def test_merge_gradient_t(llama_models, merge):
    a, b, _ = llama_models
    out = merge({
        "merge_method": "slerp",
        "base_model": str(a),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"t": [0.0, 1.0]},
    })
    A, B, M = load_state(a), load_state(b), load_state(out)
    for i in range(4):
        t = i / 3  # gradient [0, 1] over 4 layers
        for suffix in ("self_attn.q_proj.weight", "mlp.up_proj.weight",
                       "input_layernorm.weight"):
            name = f"model.layers.{i}.{suffix}"
            expected = slerp_ref(A[name].numpy(), B[name].numpy(), t)
            np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-6,
                                       err_msg=name)
    # layer 0 is t = 0 and layer 3 is t = 1
    name = "model.layers.0.mlp.down_proj.weight"
    np.testing.assert_array_equal(M[name].numpy(), A[name].numpy())
    name = "model.layers.3.mlp.down_proj.weight"
    np.testing.assert_allclose(M[name].numpy(), B[name].numpy(), rtol=0, atol=1e-6)
    # tensors outside the layers sit at t = 0: the base
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        np.testing.assert_array_equal(M[name].numpy(), A[name].numpy(), err_msg=name)


def test_merge_filtered_t(llama_models, merge):
    a, _, c = llama_models
    out = merge({
        "merge_method": "slerp",
        "base_model": str(c),
        "models": [{"model": str(a)}, {"model": str(c)}],
        "parameters": {"t": [
            {"filter": "self_attn", "value": 0.2},
            {"filter": "mlp", "value": [0.0, 0.9]},
            {"value": 0.6},
        ]},
    })
    A, C, M = load_state(a), load_state(c), load_state(out)

    def check(name: str, t: float) -> None:
        expected = slerp_ref(C[name].numpy(), A[name].numpy(), t)
        np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=name)

    for i in range(4):
        check(f"model.layers.{i}.self_attn.k_proj.weight", 0.2)
        check(f"model.layers.{i}.self_attn.o_proj.weight", 0.2)
        check(f"model.layers.{i}.mlp.gate_proj.weight", 0.9 * i / 3)
    check("model.embed_tokens.weight", 0.6)
    check("lm_head.weight", 0.6)


# -- t outside [0, 1] ------------------------------------------------------------------------

TINY = Path(__file__).resolve().parents[2] / "examples" / "models"
EXTRAPOLATES = "is outside [0, 1]: slerp extrapolates past the models"


def slerp_recipe(t: object) -> dict:
    base, other = str(TINY / "tiny-base"), str(TINY / "tiny-instruct")
    return {"merge_method": "slerp", "base_model": base,
            "models": [{"model": base}, {"model": other}], "parameters": {"t": t}}


@pytest.mark.parametrize("t, where", [
    (1.5, "parameters.t: 1.5"),
    ([0.0, 0.5, 1.25], "parameters.t[2]: 1.25"),  # a gradient's last anchor
    ([{"filter": "mlp", "value": -0.5}, {"value": 0.5}], "parameters.t[0].value: -0.5"),
])
def test_t_outside_0_1_warns_once_naming_where_it_is_set(tmp_path: Path, t: object,
                                                         where: str):
    """The value applies to many tensors, and the warning comes once, from the plan (so
    ``--dry-run`` shows it)."""
    recipe = write_recipe(tmp_path / "recipe.yml", slerp_recipe(t))
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, tmp_path / "out", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.3.mlp.up_proj.weight" in proc.stdout  # the plan
    assert proc.stderr.count(f"{where} {EXTRAPOLATES}") == 1, proc.stderr
    assert proc.stderr.count(EXTRAPOLATES) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_t_inside_0_1_gives_no_warning(tmp_path: Path):
    recipe = write_recipe(tmp_path / "recipe.yml", slerp_recipe(
        [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 1.0},
         {"value": 0.0}]))
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, tmp_path / "out", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "extrapolates" not in proc.stderr, proc.stderr


def test_t_outside_0_1_is_named_in_slices_and_not_where_it_is_ignored():
    """Each place is named by its path; t set for one model is ignored there (that warning
    says so) and is not said to extrapolate."""
    from mergekit.config import parse_config
    from mergekit.parameters import misplaced_globals, unusual_values

    base, other = str(TINY / "tiny-base"), str(TINY / "tiny-instruct")
    sources = [{"model": base, "layer_range": [0, 2]},
               {"model": other, "layer_range": [0, 2], "parameters": {"t": 3.0}}]
    config = parse_config({
        "merge_method": "slerp", "base_model": base,
        "slices": [{"sources": sources, "parameters": {"t": 1.0}},
                   {"sources": [{**s, "layer_range": [2, 4]} for s in sources],
                    "parameters": {"t": [{"filter": "mlp", "value": [0.5, -1.0]},
                                         {"value": -0.1}]}}],
        "parameters": {"t": 1.0000001},
    })
    method = get_method("slerp")
    assert [w.split(" is outside")[0] for w in unusual_values(method, config)] == [
        "parameters.t: 1.0000001",
        "slices[1].parameters.t[0].value[1]: -1.0",
        "slices[1].parameters.t[1].value: -0.1",
    ]
    assert [w.split(":")[0] for w in misplaced_globals(method, config)] == [
        "slices[0].sources[1].parameters.t", "slices[1].sources[1].parameters.t"]
