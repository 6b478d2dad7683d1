"""The CLI's process settings: freed chunk-sized blocks are reused without new page faults,
and torch's idle worker threads sleep."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import write_recipe

PROBE = r"""
import ctypes, resource, sys
from mergekit.process_tuning import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tuned" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 8 * 1024 * 1024
faults = []
for _ in range(4):  # a chunk's inputs, temporaries and output: allocate, touch, free
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(6)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, min(faults[1:]))
"""


def probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_freed_blocks_are_reused_without_page_faults():
    pages = 6 * 8 * 1024 * 1024 // 4096
    tuned, tuned_faults = probe("tuned")
    assert tuned == "True"
    assert tuned_faults < pages // 10
    # the default settings give the block back and fault it in again: the setting matters
    _, default_faults = probe("default")
    assert default_faults > pages // 2


# Records the thread settings at the moment the merge first imports numpy or torch (OpenMP
# and OpenBLAS read them then; a small linear merge runs on numpy alone).
WAIT_POLICY_PROBE = r"""
import os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name in ("numpy", "torch") and not seen:
            seen.append((os.environ.get("OMP_WAIT_POLICY"),
                         os.environ.get("OPENBLAS_NUM_THREADS")))
        return None
sys.meta_path.insert(0, Spy())
from mergekit.cli.yaml_cmd import app
sys.argv = ["mergekit-yaml", *sys.argv[1:], "--quiet"]
try:
    app()
except SystemExit as exc:
    print(exc.code, seen)
"""


@pytest.mark.parametrize("preset, expected", [
    ({}, ("PASSIVE", "1")),
    ({"OMP_WAIT_POLICY": "ACTIVE", "OPENBLAS_NUM_THREADS": "4"}, ("ACTIVE", "4")),
])
def test_merge_sets_thread_settings_before_torch_loads(tmp_path, llama_models, preset,
                                                      expected):
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(m), "parameters": {"weight": 1.0}} for m in llama_models[:2]]})
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")}
    env.update(preset)  # the user's choice wins
    out = subprocess.run([sys.executable, "-c", WAIT_POLICY_PROBE, str(recipe),
                          str(tmp_path / "out")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.stdout.strip() == f"0 [{expected!r}]", out.stdout + out.stderr


GC_PROBE = r"""
import gc, sys
from mergekit.cli.yaml_cmd import app
sys.argv = ["mergekit-yaml", *sys.argv[1:], "--quiet"]
try:
    app()
except SystemExit as exc:
    print(exc.code, gc.isenabled())
"""


def test_merge_runs_without_cyclic_garbage_collection(tmp_path, llama_models):
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(m), "parameters": {"weight": 1.0}} for m in llama_models[:2]]})
    out = subprocess.run([sys.executable, "-c", GC_PROBE, str(recipe), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["0", "False"], out.stdout + out.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
