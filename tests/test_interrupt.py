"""Ctrl-C (SIGINT) and SIGTERM stop a merge cleanly: exit 130 or 143, a line saying how to
resume, nothing at OUT, the finished shards kept; the rerun gives the uninterrupted bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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

# end to end through the command line: the whole suite runs them, -m "not slow" not
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")]


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


# from the moment mergekit.cli is imported: the imports of the command's module, typer's
# parsing, the recipe and the headers, the merge; the last ones reach the stop point
EARLY_DELAYS_S = (0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.17, 0.25, 0.32, 0.4)


def start_console_script(recipe: Path, out: Path) -> subprocess.Popen:
    """Start mergekit-yaml as its console script does (``from mergekit.cli.yaml_cmd import
    main; main()``), returning once ``mergekit.cli`` is imported: the signals are covered
    from there on (the interpreter's own start-up before it is not; see cli/interrupts.py)."""
    ready, ready_w = os.pipe()
    code = ("import os, sys\n"
            "import mergekit.cli\n"
            f"os.write({ready_w}, b'.'); os.close({ready_w})\n"
            "from mergekit.cli.yaml_cmd import main\n"
            "sys.exit(main())\n")
    env = {**os.environ, "MERGEKIT_FAILPOINT": "before-move"}  # never finishes by itself
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(recipe), str(out), "-q", "--no-copy-tokenizer"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        pass_fds=(ready_w,), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(ready_w)
    try:
        assert os.read(ready, 1) == b".", proc.communicate()
    finally:
        os.close(ready)
    return proc


@pytest.mark.parametrize(("sig", "code", "what"), [
    (signal.SIGINT, 130, "interrupted"),
    (signal.SIGTERM, 143, "stopped by SIGTERM"),
])
def test_a_signal_at_any_moment_ends_with_its_code_and_one_line(tmp_path, recipe_file, sig,
                                                                code, what):
    """Before the merge starts (imports, typer's parsing) as well as during it: the exit
    code and the error line, never a traceback, an "Exception ignored" report or a silent
    exit."""
    for n, delay_s in enumerate(EARLY_DELAYS_S):
        out = tmp_path / f"out{n}"
        proc = start_console_script(recipe_file, out)
        time.sleep(delay_s)
        proc.send_signal(sig)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGCONT)  # when it reached the stop point, before or after
            time.sleep(0.02)
        returncode, err = finish(proc)
        context = f"signal after {delay_s} s: exit {returncode}, stderr {err!r}"
        lines = err.splitlines()
        assert returncode == code, context
        assert "Traceback" not in err and "Exception ignored" not in err, context
        assert lines[0].startswith(f"error: {what}; nothing was written to the output "
                                   "folder"), context
        assert lines[1:] in ([], [f"1 of 1 shard(s) are finished and kept in {partial(out)}; "
                                  "rerun the same command to resume"]), context
        assert not out.exists(), context


# a signal that arrives where Python cannot raise its exception as usual, simulated there
IN_A_FINALIZER = """
class Finalized:
    def __del__(self):
        signal.raise_signal(SIG)  # the signal arrives while a finalizer runs
        for _ in range(1000):
            pass

def work():
    Finalized()
    time.sleep(10)
    print("not interrupted")
"""
IN_SET_NAME = """
class Hook:
    def __set_name__(self, owner, name):
        signal.raise_signal(SIG)  # while a class is built (pydantic models: on import)

def work():
    class Model:
        field = Hook()
    time.sleep(10)
    print("not interrupted")
"""


@pytest.mark.parametrize("where", [IN_A_FINALIZER, IN_SET_NAME], ids=["finalizer", "set_name"])
@pytest.mark.parametrize(("sig", "code", "what"), [
    (signal.SIGINT, 130, "interrupted"),
    (signal.SIGTERM, 143, "stopped by SIGTERM"),
])
def test_a_signal_during_a_finalizer_or_class_hook_still_stops_the_command(where, sig, code,
                                                                           what):
    """Python drops an exception raised in a finalizer ("Exception ignored") and wraps one
    raised in ``__set_name__`` (3.11) in a RuntimeError: the command still stops."""
    script = ("import signal, time, typer\n"
              "from mergekit.cli.edge import guarded, run_app\n"
              f"SIG = signal.{sig.name}\n" + where +
              "app = typer.Typer()\n"
              "@app.command()\n"
              "def cmd() -> None:\n"
              "    guarded(work, False)\n"
              "run_app(app)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout) == (code, ""), proc.stderr
    assert proc.stderr == (f"error: {what}; nothing was written to the output folder; rerun "
                           "the same command to start again\n")
