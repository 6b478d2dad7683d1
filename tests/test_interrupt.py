"""Ctrl-C (SIGINT) and SIGTERM stop a merge cleanly: exit 130 or 143, a line saying how to
resume, nothing at OUT, the finished shards kept; the rerun gives the uninterrupted bytes."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from stopped_merges import (
    SHARD,
    files,
    finish,
    linear_recipe,
    merge_in_process,
    partial,
    shard_names,
    start,
    wait_stopped,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def interrupt(recipe: Path, out: Path, point: str, sig: int) -> tuple[int, str]:
    proc = start(recipe, out, point)
    wait_stopped(proc)
    proc.send_signal(sig)  # delivered when the process continues
    proc.send_signal(signal.SIGCONT)
    return finish(proc)


@pytest.mark.parametrize(("sig", "code", "what", "point", "kept"), [
    (signal.SIGINT, 130, "interrupted", "shard-done:1", 1),
    (signal.SIGTERM, 143, "stopped by SIGTERM", "before-move", 3),
])
def test_signal_stops_cleanly_and_rerun_resumes(tmp_path, recipe_file, baseline, llama_models,
                                                sig, code, what, point, kept):
    out = tmp_path / "out"
    returncode, err = interrupt(recipe_file, out, point, sig)
    assert returncode == code, err
    lines = err.strip().splitlines()
    assert lines[-2] == f"error: {what}; nothing was written to the output folder"
    assert lines[-1] == (f"{kept} of 3 shard(s) are finished and kept in {partial(out)}; "
                         "rerun the same command to resume")
    assert not out.exists()
    work = partial(out)
    assert len(shard_names(work)) == kept
    assert not (work / "mergekit.lock").exists()
    assert not list(work.glob("*.part"))

    merge_in_process(linear_recipe(llama_models), out, out_shard_size=SHARD)  # the rerun
    assert files(out) == baseline
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupt_before_any_shard_leaves_nothing(tmp_path, recipe_file):
    out = tmp_path / "out"
    returncode, err = interrupt(recipe_file, out, "tensor:1", signal.SIGINT)
    assert returncode == 130, err
    assert err.strip().splitlines()[-1] == ("error: interrupted; nothing was written to the "
                                            "output folder; rerun the same command to start "
                                            "again")
    assert list(tmp_path.iterdir()) == []
