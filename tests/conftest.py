"""Shared builders of tiny random transformers models (session-scoped, built in-process).

The tests' own process runs merges with the command line's thread settings
(``process_tuning.tune_threads``, applied here before anything loads torch): torch's idle
OpenMP workers otherwise spin between operations, and on a busy 2-core machine spinning
workers made chunked merges 20-30 times slower."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from stopped_merges import SHARD, files, linear_recipe, merge_in_process

from mergekit.process_tuning import tune_threads

if TYPE_CHECKING:
    import numpy as np
    import torch

if "torch" in sys.modules:
    warnings.warn("torch was loaded before the tests' thread settings: merges may be slow",
                  stacklevel=1)
tune_threads()

TINY = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2)


def build_llama(path: Path, seed: int, layers: int = 4, vocab: int = 64, tied: bool = False,
                dtype: torch.dtype | None = None, safe: bool = True) -> Path:
    """A random Llama saved in ``path``; float32 unless ``dtype`` says otherwise."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, tie_word_embeddings=tied,
                      **TINY)
    model = LlamaForCausalLM(cfg).to(dtype or torch.float32)
    model.save_pretrained(path)
    if not safe:  # transformers 5 always writes safetensors: convert to a pickled checkpoint
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    return path


def build_gpt2(path: Path, seed: int, layers: int = 3, vocab: int = 64) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=layers, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def build_neox(path: Path, seed: int, layers: int = 3, vocab: int = 64) -> Path:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                        num_hidden_layers=layers, num_attention_heads=2,
                        max_position_embeddings=32)
    GPTNeoXForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three tiny Llama models (4 layers, vocab 64, untied head), float32."""
    root = tmp_path_factory.mktemp("llama")
    return [build_llama(root / name, seed) for seed, name in enumerate("abc")]


@pytest.fixture(scope="session")
def gpt2_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny GPT-2 models (3 layers, tied head)."""
    root = tmp_path_factory.mktemp("gpt2")
    return [build_gpt2(root / name, 10 + seed) for seed, name in enumerate("ab")]


@pytest.fixture(scope="session")
def neox_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny GPT-NeoX models (3 layers, untied embed_out)."""
    root = tmp_path_factory.mktemp("neox")
    return [build_neox(root / name, 20 + seed) for seed, name in enumerate("ab")]


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (safetensors or .bin), read with the reference libraries."""
    import torch
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(f))
    for f in sorted(Path(folder).glob("*.bin")):
        state.update(torch.load(f, weights_only=True))
    return state


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def env_without_coverage() -> dict[str, str]:
    """This process's environment less coverage's request to measure Python subprocesses
    (``[tool.coverage.run] patch``), for subprocesses that coverage would disturb."""
    return {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}


def run_cli(*args: str | Path, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mergekit.cli.<cmd>``-style entry points in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", *[str(a) for a in args]], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=300)


@pytest.fixture
def merge(tmp_path: Path) -> Callable[..., Path]:
    """merge(recipe_dict, **options) -> output folder, through the Python API."""
    from mergekit import MergeOptions, run_merge
    from mergekit.config import parse_config

    counter = iter(range(1000))

    def do(recipe: dict, **options: object) -> Path:
        out = tmp_path / f"out{next(counter)}"
        run_merge(parse_config(recipe), out, MergeOptions(quiet=True, **options))
        return out

    return do


@pytest.fixture
def on_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merges run on torch, never on numpy (CPU merges of linear, slerp and passthrough do:
    see ``run.NUMPY_ENGINE``)."""
    import mergekit.run as run

    monkeypatch.setattr(run, "NUMPY_ENGINE", False)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """small_chunks(n): both backends read elementwise merges' inputs in row chunks of about
    n elements (whole rows), so tiny tensors span several chunks."""
    import mergekit.backends as backends
    import mergekit.execute as execute

    def set_size(elements: int) -> None:
        monkeypatch.setattr(execute, "CHUNK_ELEMENTS", elements)
        monkeypatch.setattr(backends.TorchBackend, "chunk_scale", 1)

    return set_size


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def run_method(name: str, tensors: list, base: object, **params: object) -> np.ndarray:
    """Run the registered method ``name`` on float32 copies of array-likes (``base`` may be
    None); list-valued parameters become per-model tuples. Checks dtype and shape."""
    import numpy as np
    import torch

    from mergekit.methods.registry import get_method

    method = get_method(name)
    b = None if base is None else torch.as_tensor(np.asarray(base, dtype=np.float32))
    xs = [torch.as_tensor(np.asarray(x, dtype=np.float32)) for x in tensors]
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    out = method.fn(xs, b, method.make_params(values))
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(xs[0].shape)
    return out.numpy()


# sharded runs shared by test_resume and test_interrupt


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, llama_models) -> Path:
    return write_recipe(tmp_path_factory.mktemp("recipe") / "r.yml", linear_recipe(llama_models))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, llama_models) -> dict[str, bytes]:
    """Every file of an uninterrupted run, into a folder also named ``out``."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    merge_in_process(linear_recipe(llama_models), out, out_shard_size=SHARD)
    return files(out)
