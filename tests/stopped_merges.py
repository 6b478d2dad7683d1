"""Helpers for the tests of stopped merges (test_resume, test_interrupt): a sharded linear
recipe, in-process and subprocess runs, and the stop-point hook."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergekit import MergeOptions, run_merge
from mergekit.config import parse_config

SHARD = "20k"  # three shards for the tiny Llama


def linear_recipe(models: list[Path], weight_b: float = 1.0) -> dict:
    return {"merge_method": "linear", "models": [
        {"model": str(models[0]), "parameters": {"weight": 1.0}},
        {"model": str(models[1]), "parameters": {"weight": weight_b}}]}


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def partial(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def journal_shards(folder: Path) -> list[str]:
    lines = (folder / "mergekit_journal.jsonl").read_text().splitlines()
    return [json.loads(line)["shard"] for line in lines[1:]]


def shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def identity(path: Path) -> tuple[int, int]:
    """Inode and mtime: unchanged when a file was kept (renamed), not written again."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def merge_in_process(recipe: dict, out: Path, **options: object) -> None:
    run_merge(parse_config(recipe), out, MergeOptions(quiet=True, **options))


# --- subprocess runs, stopped at a named fault-injection point (mergekit/failpoints.py) ---


def start(recipe: Path, out: Path, stop: str | None = None, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MERGEKIT_FAILPOINT"}
    if stop:
        env["MERGEKIT_FAILPOINT"] = stop
    return subprocess.Popen(
        [sys.executable, "-m", "mergekit.cli.yaml_cmd", str(recipe), str(out), "-q",
         "--out-shard-size", SHARD, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # a shell may start us with SIGINT ignored; Python then keeps ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_stopped(proc: subprocess.Popen, timeout_s: float = 90) -> None:
    """Wait until the process has stopped itself (state T in /proc/<pid>/stat)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before stopping: {proc.communicate()[1]}")
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the merge never reached its stop point")


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err
