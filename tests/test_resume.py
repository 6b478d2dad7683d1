"""A merge killed at any point (kill -9, a failure, a full disk) resumes from its finished
shards to the bytes of an uninterrupted run; changed inputs or --no-resume start over; two
runs into one OUT are kept apart by the lock."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import env_without_coverage
from stopped_merges import (
    SHARD,
    files,
    finish,
    identity,
    journal_shards,
    linear_recipe,
    merge_in_process,
    partial,
    shard_names,
    start,
    wait_stopped,
)

from mergekit.errors import MergeError


def shard_tensor_counts(baseline: dict[str, bytes]) -> list[int]:
    weight_map = json.loads(baseline["model.safetensors.index.json"])["weight_map"]
    names = sorted(set(weight_map.values()))
    return [list(weight_map.values()).count(n) for n in names]


def test_baseline_has_several_shards(baseline):
    assert len(shard_tensor_counts(baseline)) == 3


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_killed_run_resumes_to_the_same_bytes(tmp_path, recipe_file, baseline,
                                              llama_models):
    counts = shard_tensor_counts(baseline)
    in_last_shard = sum(counts[:-1]) + 2  # two tensors into the last shard
    # stop point -> shards finished when it is reached
    points = {"shard-start:1": 0, "shard-done:1": 1, f"tensor:{in_last_shard}": 2,
              "shard-done:2": 2}
    no_resume = "shard-done:2"  # this one's rerun starts over
    outs = {p: tmp_path / f"k{i}" / "out" for i, p in enumerate(points)}
    procs = {}
    for point, out in outs.items():  # all at once: two cores
        out.parent.mkdir()
        procs[point] = start(recipe_file, out, point)
    kept_ids = {}
    for point, proc in procs.items():
        wait_stopped(proc)
        proc.kill()
        proc.wait()
        out = outs[point]
        assert not out.exists(), point
        work = partial(out)
        assert journal_shards(work) == shard_names(work)[:points[point]], point
        assert len(shard_names(work)) == points[point], point
        if point.startswith("tensor:"):  # the shard being written is only a .part file
            assert len(list(work.glob("*.part"))) == 1
        kept_ids[point] = {n: identity(work / n) for n in shard_names(work)}
    # the rerun: in this process (the same call as the command; quicker), and once through
    # the command line with --no-resume
    rerun = start(recipe_file, outs[no_resume], None, "--no-resume")
    for point, out in outs.items():
        if point != no_resume:
            merge_in_process(linear_recipe(llama_models), out, out_shard_size=SHARD)
            ids = {n: identity(out / n) for n in kept_ids[point]}
            assert ids == kept_ids[point], point  # kept, not merged again
    code, err = finish(rerun)
    assert code == 0, err
    assert "--no-resume: discarding 2 finished shard(s)" in err
    for point, out in outs.items():
        assert files(out) == baseline, point
        assert not partial(out).exists(), point
        assert list(out.parent.iterdir()) == [out], point


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_second_run_into_the_same_out_is_refused_until_the_first_dies(
        tmp_path, recipe_file, baseline):
    out = tmp_path / "out"
    first = start(recipe_file, out, "shard-done:1")
    wait_stopped(first)
    try:
        second = start(recipe_file, out)
        code, err = finish(second)
        assert code == 2, err
        assert f"another merge (pid {first.pid}) is writing this output" in err
        assert journal_shards(partial(out)) == shard_names(partial(out))[:1]  # untouched
    finally:
        first.kill()
        first.wait()
    # the dead run's lock (its pid) is taken over, and its finished shard kept
    assert (partial(out) / "mergekit.lock").read_text().strip() == str(first.pid)
    kept = partial(out) / "model-00001-of-00003.safetensors"
    kept_id = identity(kept)
    code, err = finish(start(recipe_file, out))
    assert code == 0, err
    assert files(out) == baseline
    assert identity(out / kept.name) == kept_id


FSIZE_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of dying
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from mergekit.cli.yaml_cmd import main
sys.argv = ["mergekit-yaml", *sys.argv[1:]]
main()
"""


def test_full_disk_keeps_the_finished_shards_and_says_so(tmp_path, llama_models,
                                                           recipe_file):
    small = tmp_path / "small" / "out"
    merge_in_process(linear_recipe(llama_models), small, out_shard_size="5k")
    expected = files(small)
    sizes = [len(expected[n]) for n in shard_names(small)]
    # the first shard that is larger than every one before it fails under a limit of their max
    fails = next(i for i in range(1, len(sizes)) if sizes[i] > max(sizes[:i]))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", FSIZE_LIMITED, str(max(sizes[:fails])), str(recipe_file),
         str(out), "-q", "--out-shard-size", "5k"], capture_output=True, text=True, timeout=120,
        env=env_without_coverage())  # coverage's data file would be cut short too
    assert proc.returncode == 1, proc.stderr
    assert "cannot write" in proc.stderr
    assert f"{fails} of {len(sizes)} shard(s) are finished and kept in {partial(out)}" \
        in proc.stderr
    assert "rerun the same command to resume" in proc.stderr
    assert not out.exists()
    assert shard_names(partial(out)) == shard_names(small)[:fails]
    assert not list(partial(out).glob("*.part"))
    kept = {n: identity(partial(out) / n) for n in shard_names(partial(out))}
    merge_in_process(linear_recipe(llama_models), out, out_shard_size="5k")
    assert files(out) == expected
    assert {n: identity(out / n) for n in kept} == kept


# --- in process: a failure while merging stands for the crash ---


@pytest.fixture
def logs(caplog):
    """caplog, also when an earlier test made the mergekit logger stop propagating."""
    logger = logging.getLogger("mergekit")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = True
    yield caplog
    logger.setLevel(level)
    logger.propagate = propagate


class Boom(Exception):
    pass


def fail_in_shard(monkeypatch, shard: int) -> None:
    """Make the merge fail at the first tensor of shard index ``shard`` (0-based)."""
    import mergekit.run as run

    def failing(real):
        def execute(job, *args, **kwargs):
            if job.shard == shard:
                raise Boom("simulated crash")
            return real(job, *args, **kwargs)
        return execute

    monkeypatch.setattr(run, "execute_job", failing(run.execute_job))


@pytest.fixture
def interrupted(tmp_path, llama_models, monkeypatch) -> Path:
    """OUT of a merge that failed in its second shard (the first one is finished)."""
    out = tmp_path / "out"
    fail_in_shard(monkeypatch, 1)
    with pytest.raises(Boom) as err:
        merge_in_process(linear_recipe(llama_models), out, out_shard_size=SHARD)
    monkeypatch.undo()
    assert err.value.__notes__ == [f"1 of 3 shard(s) are finished and kept in {partial(out)}; "
                                   "rerun the same command to resume"]
    assert not out.exists()
    assert sorted(p.name for p in partial(out).iterdir()) == [
        "mergekit_journal.jsonl", "model-00001-of-00003.safetensors"]  # no lock, no .part
    return out


def test_failure_keeps_work_and_rerun_resumes(interrupted, llama_models, baseline, logs):
    merge_in_process(linear_recipe(llama_models), interrupted, out_shard_size=SHARD)
    assert "resuming: 1 of 3" in logs.text
    assert files(interrupted) == baseline


def test_damaged_shard_is_merged_again(interrupted, llama_models, baseline, logs):
    shard = partial(interrupted) / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    merge_in_process(linear_recipe(llama_models), interrupted, out_shard_size=SHARD)
    assert "model-00001-of-00003.safetensors is missing or damaged" in logs.text
    assert files(interrupted) == baseline


def forge_first_shard(out: Path) -> bytes:
    """Replace the kept shard by other bytes and record them in the journal, so a resumed
    run would visibly reuse it."""
    from safetensors.torch import load_file, save_file

    shard = partial(out) / "model-00001-of-00003.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(shard).items()}, shard)
    journal = partial(out) / "mergekit_journal.jsonl"
    lines = journal.read_text().splitlines()
    import hashlib

    entry = {"shard": shard.name, "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}
    journal.write_text("\n".join([lines[0], json.dumps(entry)]) + "\n")
    return shard.read_bytes()


def test_resume_trusts_the_journal_and_no_resume_starts_over(tmp_path, interrupted,
                                                             llama_models, baseline, logs):
    forged = forge_first_shard(interrupted)
    copy = tmp_path / "copy" / ".out.partial"
    shutil.copytree(partial(interrupted), copy)
    merge_in_process(linear_recipe(llama_models), copy.parent / "out", out_shard_size=SHARD)
    assert (copy.parent / "out" / "model-00001-of-00003.safetensors").read_bytes() == forged

    merge_in_process(linear_recipe(llama_models), interrupted, out_shard_size=SHARD,
                     resume=False)
    assert "--no-resume: discarding 1 finished shard(s)" in logs.text
    assert files(interrupted) == baseline


def test_changed_recipe_starts_over(tmp_path, interrupted, llama_models, logs):
    forge_first_shard(interrupted)
    changed = linear_recipe(llama_models, weight_b=0.5)
    merge_in_process(changed, interrupted, out_shard_size=SHARD)
    assert logs.text.count("the recipe, options or inputs changed") == 1
    fresh = tmp_path / "fresh" / "out"
    merge_in_process(changed, fresh, out_shard_size=SHARD)
    assert files(interrupted) == files(fresh)


def test_changed_output_option_starts_over(tmp_path, interrupted, llama_models, logs):
    merge_in_process(linear_recipe(llama_models), interrupted, out_shard_size="30k")
    assert "the recipe, options or inputs changed" in logs.text
    fresh = tmp_path / "fresh" / "out"
    merge_in_process(linear_recipe(llama_models), fresh, out_shard_size="30k")
    assert files(interrupted) == files(fresh)


def test_seed_does_not_matter_to_a_method_without_randomness(interrupted, llama_models,
                                                             baseline, logs):
    merge_in_process(linear_recipe(llama_models), interrupted, out_shard_size=SHARD,
                     random_seed=7)
    assert "resuming: 1 of 3" in logs.text
    assert files(interrupted) == baseline


def _stopped_after_shard_1(tmp_path, llama_models, monkeypatch) -> tuple[list[Path], Path]:
    """Copies of two models, and the output of a merge of them that failed in shard 2."""
    models = [shutil.copytree(m, tmp_path / m.name) for m in llama_models[:2]]
    out = tmp_path / "out"
    fail_in_shard(monkeypatch, 1)
    with pytest.raises(Boom):
        merge_in_process(linear_recipe(models), out, out_shard_size=SHARD)
    monkeypatch.undo()
    return models, out


def test_changed_input_starts_over(tmp_path, llama_models, monkeypatch, logs):
    models, out = _stopped_after_shard_1(tmp_path, llama_models, monkeypatch)
    weights = models[1] / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**10))  # 10 s later
    merge_in_process(linear_recipe(models), out, out_shard_size=SHARD)
    assert "the recipe, options or inputs changed" in logs.text


def test_input_rewritten_with_same_size_and_time_starts_over(tmp_path, llama_models,
                                                             monkeypatch, logs):
    """The fingerprint held the size and the time in whole seconds: an input rewritten in
    place, its time set back, resumed with shards of the old bytes in the output."""
    from safetensors import safe_open

    from mergekit.io.safetensors_file import read_header

    models, out = _stopped_after_shard_1(tmp_path, llama_models, monkeypatch)
    kept = partial(out) / "model-00001-of-00003.safetensors"
    with safe_open(kept, "pt") as f:
        name = next(iter(f.keys()))  # a tensor of the finished shard
    weights = models[1] / "model.safetensors"
    info = read_header(weights)[name]
    assert info.end <= 2**20 and info.dtype == "F32"  # within the first MiB
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(info.start)
        values = torch.frombuffer(bytearray(f.read(info.nbytes)), dtype=torch.float32)
        f.seek(info.start)
        f.write((values * -2 + 1).numpy().tobytes())
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size,
                                                                    stat.st_mtime_ns)
    merge_in_process(linear_recipe(models), out, out_shard_size=SHARD)
    assert "the recipe, options or inputs changed" in logs.text
    assert "resuming" not in logs.text
    fresh = tmp_path / "fresh" / "out"
    merge_in_process(linear_recipe(models), fresh, out_shard_size=SHARD)
    assert files(out) == files(fresh)


def test_torn_journal_line_is_ignored(interrupted, llama_models, baseline, logs):
    journal = partial(interrupted) / "mergekit_journal.jsonl"
    with open(journal, "a") as f:
        f.write('{"shard": "model-00002-of-00003.safetensors", "sha2')  # cut by a crash
    merge_in_process(linear_recipe(llama_models), interrupted, out_shard_size=SHARD)
    assert "resuming: 1 of 3" in logs.text
    assert files(interrupted) == baseline


def test_failure_before_any_shard_leaves_nothing(tmp_path, llama_models, monkeypatch):
    fail_in_shard(monkeypatch, 0)
    with pytest.raises(Boom) as err:
        merge_in_process(linear_recipe(llama_models), tmp_path / "out", out_shard_size=SHARD)
    assert not getattr(err.value, "__notes__", [])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_usage_error_while_starting_leaves_nothing(tmp_path, llama_models):
    with pytest.raises(MergeError, match="--cuda"):
        merge_in_process(linear_recipe(llama_models), tmp_path / "out", cuda=True)
    assert list(tmp_path.iterdir()) == []


def test_foreign_partial_folder_is_refused(tmp_path, llama_models):
    mine = tmp_path / ".out.partial" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("keep me")
    with pytest.raises(MergeError, match="mergekit did not write") as err:
        merge_in_process(linear_recipe(llama_models), tmp_path / "out")
    assert err.value.exit_code == 2
    assert mine.read_text() == "keep me"
    assert not (tmp_path / "out").exists()


# --- the files beside the weights: not part of the fingerprint, written after the weights ---


def tokenizer(folder: Path, marker: str, size: int = 0) -> Path:
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps({"marker": marker, "pad": "x" * size}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"marker": marker}))
    return folder


def shard_ids(folder: Path) -> dict[str, tuple[int, int]]:
    return {n: identity(folder / n) for n in shard_names(folder)}


@pytest.mark.parametrize("change", ["tokenizer_source", "chat_template", "no_copy_tokenizer",
                                    "no_model_card"])
def test_changed_tokenizer_template_or_card_keeps_the_finished_shards(
        change, tmp_path, llama_models, monkeypatch, logs):
    recipe = {**linear_recipe(llama_models), "chat_template": "chatml",
              "tokenizer_source": str(tokenizer(tmp_path / "tok_a", "a"))}
    out = tmp_path / "out"
    fail_in_shard(monkeypatch, 1)
    with pytest.raises(Boom):
        merge_in_process(recipe, out, out_shard_size=SHARD)
    monkeypatch.undo()
    kept = shard_ids(partial(out))
    assert len(kept) == 1
    options = {}
    if change == "tokenizer_source":
        recipe["tokenizer_source"] = str(tokenizer(tmp_path / "tok_b", "b"))
    elif change == "chat_template":
        recipe["chat_template"] = "llama3"
    elif change == "no_copy_tokenizer":
        options["copy_tokenizer"] = False
    else:
        options["write_model_card"] = False
    merge_in_process(recipe, out, out_shard_size=SHARD, **options)
    assert "resuming: 1 of 3" in logs.text
    assert {n: identity(out / n) for n in kept} == kept
    fresh = tmp_path / "fresh" / "out"
    merge_in_process(recipe, fresh, out_shard_size=SHARD, **options)
    assert files(out) == files(fresh)


@pytest.fixture
def tokenized_recipe(tmp_path, llama_models) -> dict:
    return {**linear_recipe(llama_models), "tokenizer_source": str(tokenizer(tmp_path / "tok",
                                                                             "t", 200_000))}


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json",
                                  "README.md", "mergekit_config.yml",
                                  "model.safetensors.index.json", "mergekit_manifest.json"])
def test_failed_write_beside_the_weights_keeps_the_shards(name, tmp_path, tokenized_recipe,
                                                          monkeypatch):
    from mergekit.io.journal import Journal

    real = Journal.open.__func__

    def open_and_obstruct(cls, folder, *args):
        journal = real(cls, folder, *args)
        (folder / name).mkdir()  # in the way of the file's write, after the weights
        return journal

    out = tmp_path / "out"
    monkeypatch.setattr(Journal, "open", classmethod(open_and_obstruct))
    with pytest.raises(MergeError) as err:
        merge_in_process(tokenized_recipe, out, out_shard_size=SHARD)
    monkeypatch.undo()
    assert err.value.exit_code == 1
    assert str(err.value) == (f"{partial(out) / name}: cannot write (Is a directory); free "
                              "disk space or choose another output folder")
    assert err.value.__notes__ == [f"3 of 3 shard(s) are finished and kept in {partial(out)}; "
                                   "rerun the same command to resume"]
    assert not out.exists()
    kept = shard_ids(partial(out))
    (partial(out) / name).rmdir()  # the cause, removed
    merge_in_process(tokenized_recipe, out, out_shard_size=SHARD)
    assert {n: identity(out / n) for n in kept} == kept
    fresh = tmp_path / "fresh" / "out"
    merge_in_process(tokenized_recipe, fresh, out_shard_size=SHARD)
    assert files(out) == files(fresh)


def test_full_disk_while_copying_the_tokenizer(tmp_path, tokenized_recipe):
    """Every shard fits under the file size limit; the 200 kB tokenizer.json does not."""
    from conftest import write_recipe

    recipe = write_recipe(tmp_path / "r.yml", tokenized_recipe)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", FSIZE_LIMITED, "100000", str(recipe), str(out), "-q",
         "--out-shard-size", SHARD], capture_output=True, text=True, timeout=120,
        env=env_without_coverage())  # coverage's data file would be cut short too
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-2:] == [
        f"error: {partial(out) / 'tokenizer.json'}: cannot write (File too large); free disk "
        "space or choose another output folder",
        f"3 of 3 shard(s) are finished and kept in {partial(out)}; rerun the same command to "
        "resume"]
    assert not out.exists()
    kept = shard_ids(partial(out))
    merge_in_process(tokenized_recipe, out, out_shard_size=SHARD)
    assert {n: identity(out / n) for n in kept} == kept


def test_partial_folder_of_an_earlier_run_with_other_shards_is_ours(interrupted, llama_models,
                                                                     baseline, logs):
    """What a run killed at any point may leave: a shard of another shard count being
    written, files besides the weights. The rerun takes the folder and starts over."""
    (partial(interrupted) / "model-00002-of-00005.safetensors.part").write_bytes(b"\0" * 64)
    (partial(interrupted) / "config.json").write_text("{}")
    (partial(interrupted) / "mergekit_journal.jsonl.part").write_text("")
    merge_in_process(linear_recipe(llama_models), interrupted, out_shard_size=SHARD)
    assert "resuming: 1 of 3" in logs.text
    assert files(interrupted) == baseline
