"""Which existing OUT a merge may replace: only a complete earlier output, whose manifest
lists everything it holds; never the current folder or one above it; and of the old
output only what its manifest lists is deleted. The temporary folder is held to the same
rule."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, write_recipe
from hostile import tree_digest
from stopped_merges import (
    SHARD,
    finish,
    identity,
    linear_recipe,
    merge_in_process,
    partial,
    shard_names,
    start,
    wait_stopped,
)

from mergekit.errors import MergeError

# end to end through the command line: the whole suite runs them, -m "not slow" not
pytestmark = pytest.mark.slow

MANIFEST = "mergekit_manifest.json"


def yaml_cmd(recipe: Path, out: Path | str, cwd: Path):
    return run_cli("mergekit.cli.yaml_cmd", recipe, out, "-q", cwd=cwd)


def last_line(stderr: str) -> str:
    return stderr.rstrip("\n").splitlines()[-1]


def listed(out: Path) -> set[str]:
    data = json.loads((out / MANIFEST).read_text())
    return {*data["shards"], *data["files"], MANIFEST}


def a_few(names: list[str]) -> str:
    """The first five names, then how many more."""
    names = sorted(names)
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


@pytest.fixture
def project(tmp_path: Path, llama_models) -> Path:
    """A folder of someone's own files that holds a recipe named like mergekit's copy."""
    folder = tmp_path / "myproject"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "ideas.md").write_text("merge a and b\n")
    (folder / "train.py").write_text("print('training')\n")
    write_recipe(folder / "mergekit_config.yml", linear_recipe(llama_models))
    return folder


@pytest.fixture
def earlier(tmp_path: Path, llama_models) -> Path:
    """A complete earlier output."""
    out = tmp_path / "merged"
    merge_in_process(linear_recipe(llama_models), out)
    return out


def test_merge_into_the_current_folder_is_refused(tmp_path, project):
    before = tree_digest(tmp_path)
    proc = yaml_cmd(Path("mergekit_config.yml"), ".", cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert last_line(proc.stderr) == ("error: .: is the current folder, and the merge would "
                                      "replace it; write into a new folder, e.g. merged")
    assert tree_digest(tmp_path) == before


def test_a_folder_of_other_files_is_refused_naming_them(tmp_path, project):
    before = tree_digest(tmp_path)
    proc = yaml_cmd(project / "mergekit_config.yml", project, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert last_line(proc.stderr) == (
        f"error: {project}: exists and holds mergekit_config.yml, notes/, train.py but no "
        f"valid {MANIFEST}, so it is not a mergekit output; choose another output folder")
    assert tree_digest(tmp_path) == before


def test_many_unexpected_files_are_named_a_few_then_counted(tmp_path, llama_models):
    out = tmp_path / "data"
    out.mkdir()
    names = [f"part{i}.csv" for i in range(8)]
    for name in names:
        (out / name).write_text(name)
    with pytest.raises(MergeError) as err:
        merge_in_process(linear_recipe(llama_models), out)
    assert err.value.exit_code == 2
    assert f"holds {a_few(names)} but no valid" in str(err.value)
    assert "part0.csv, part1.csv, part2.csv, part3.csv, part4.csv and 3 more" in str(err.value)


def test_an_ancestor_of_the_current_folder_is_refused(tmp_path, project):
    before = tree_digest(tmp_path)
    proc = yaml_cmd(project / "mergekit_config.yml", "..", cwd=project / "notes")
    assert proc.returncode == 2, proc.stderr
    assert last_line(proc.stderr) == ("error: ..: holds the current folder, and the merge "
                                      "would replace it; write into a new folder, e.g. merged")
    assert tree_digest(tmp_path) == before


def test_the_current_folder_is_refused_even_as_an_earlier_output(tmp_path, earlier,
                                                                  llama_models):
    recipe = write_recipe(tmp_path / "r.yml", linear_recipe(llama_models))
    before = tree_digest(tmp_path)
    proc = yaml_cmd(recipe, ".", cwd=earlier)
    assert proc.returncode == 2, proc.stderr
    assert "error: .: is the current folder" in proc.stderr
    assert tree_digest(tmp_path) == before


def add_notes(out: Path) -> str:
    (out / "notes.txt").write_text("mine")
    return "notes.txt"


def add_folder(out: Path) -> str:
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step1.pt").write_bytes(b"\0" * 10)
    return "checkpoints/"


def listed_file_is_a_folder(out: Path) -> str:
    (out / "config.json").unlink()
    (out / "config.json").mkdir()
    (out / "config.json" / "mine.txt").write_text("mine")
    return "config.json/"


def listed_file_is_a_link(out: Path) -> str:
    (out / "config.json").unlink()
    (out / "config.json").symlink_to(out.parent / "elsewhere.txt")
    return "config.json"


def other_tool(out: Path) -> None:
    data = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**data, "tool": "othertool"}))


def damaged_manifest(out: Path) -> None:
    (out / MANIFEST).write_text('{"tool": "mergekit", "shards": ')


def no_manifest(out: Path) -> None:
    (out / MANIFEST).unlink()


@pytest.mark.parametrize("change", [add_notes, add_folder, listed_file_is_a_folder,
                                    listed_file_is_a_link, other_tool, damaged_manifest,
                                    no_manifest])
def test_an_earlier_output_with_anything_unlisted_is_refused(change, tmp_path, earlier,
                                                               llama_models):
    (tmp_path / "elsewhere.txt").write_text("not mergekit's")
    unexpected = change(earlier)
    before = tree_digest(tmp_path)
    with pytest.raises(MergeError) as err:
        merge_in_process(linear_recipe(llama_models[1:]), earlier)
    assert err.value.exit_code == 2
    if unexpected:
        assert str(err.value) == (f"{earlier}: holds files its {MANIFEST} does not list: "
                                  f"{unexpected}, so it is not only a mergekit output; "
                                  "choose another output folder")
    else:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in earlier.iterdir())
        assert str(err.value) == (f"{earlier}: exists and holds {a_few(names)} but no valid "
                                  f"{MANIFEST}, so it is not a mergekit output; choose another "
                                  "output folder")
    assert tree_digest(tmp_path) == before
    assert not partial(earlier).exists()


def test_an_empty_folder_and_an_earlier_output_are_replaced(tmp_path, earlier, llama_models):
    empty = tmp_path / "empty"
    empty.mkdir()
    merge_in_process(linear_recipe(llama_models), empty)
    merge_in_process(linear_recipe(llama_models[1:]), earlier, out_shard_size=SHARD,
                     overwrite=True)
    for out in (empty, earlier):
        # the manifest and exactly the files it lists: no lock, no journal
        assert {p.name for p in out.iterdir()} == listed(out)
    assert len(shard_names(earlier)) == 3
    # nothing is left beside them: no temporary, replaced or half-moved folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "merged"]


@pytest.mark.parametrize(("models", "flags", "problem"), [
    ((1, 2), [], "holds the output of a different recipe"),
    ((0, 1), ["--out-shard-size", SHARD],
     "holds the output of this recipe made with a different --out-shard-size"),
])
def test_an_output_of_another_recipe_is_replaced_only_with_overwrite(
        tmp_path, earlier, llama_models, models, flags, problem):
    # a rerun of the same recipe (its file written otherwise) replaces the output as before
    same = linear_recipe(llama_models)
    same = write_recipe(tmp_path / "same.yml", {"models": same["models"],
                                                "merge_method": "linear"})
    shards = {n: identity(earlier / n) for n in shard_names(earlier)}
    proc = run_cli("mergekit.cli.yaml_cmd", same, earlier, "-q")
    assert proc.returncode == 0, proc.stderr
    assert {n: identity(earlier / n) for n in shard_names(earlier)} != shards  # written anew
    same.unlink()

    recipe = write_recipe(tmp_path / "r.yml", linear_recipe([llama_models[i] for i in models]))
    before = tree_digest(tmp_path)
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, earlier, "-q", *flags)
    assert proc.returncode == 2, proc.stderr
    assert last_line(proc.stderr) == (f"error: {earlier}: {problem}; pass --overwrite to "
                                      "replace it, or choose another output folder")
    assert tree_digest(tmp_path) == before
    assert not partial(earlier).exists()

    proc = run_cli("mergekit.cli.yaml_cmd", recipe, earlier, "-q", *flags, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((earlier / MANIFEST).read_text())["recipe"] == yaml.safe_load(
        recipe.read_text())
    assert {p.name for p in earlier.iterdir()} == listed(earlier)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "r.yml"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_files_added_to_out_during_the_merge_are_never_deleted(tmp_path, earlier,
                                                                llama_models):
    recipe = write_recipe(tmp_path / "r.yml", linear_recipe(llama_models[1:]))
    proc = start(recipe, earlier, "before-move", "--overwrite")
    wait_stopped(proc)
    (earlier / "notes.txt").write_text("written while the merge ran")
    before = tree_digest(tmp_path, skip=[partial(earlier)])
    proc.send_signal(signal.SIGCONT)
    code, err = finish(proc)
    assert code == 1, err
    assert next(line for line in err.splitlines() if line.startswith("error:")) == (
        f"error: {earlier}: changed during the merge: it holds files its {MANIFEST} does not "
        "list: notes.txt, so it is not only a mergekit output; move those files away and "
        "rerun the same command")
    assert tree_digest(tmp_path, skip=[partial(earlier)]) == before
    # the finished merge is kept, and moved into place once the notes are gone
    kept = {n: identity(partial(earlier) / n) for n in shard_names(partial(earlier))}
    assert len(kept) == 3
    os.rename(earlier / "notes.txt", tmp_path / "notes.txt")
    merge_in_process(linear_recipe(llama_models[1:]), earlier, out_shard_size=SHARD,
                     overwrite=True)
    assert {n: identity(earlier / n) for n in kept} == kept
    assert {p.name for p in earlier.iterdir()} == listed(earlier)


@pytest.mark.parametrize(("contents", "foreign"), [
    ({"mergekit.lock": "", "notes.txt": "keep me"}, "notes.txt"),
    # without our lock or journal nothing in it is ours
    ({"mergekit_config.yml": "merge_method: linear\n", "notes.txt": "keep me"},
     "mergekit_config.yml, notes.txt"),
    ({"mergekit_journal.jsonl": '{"journal": 1, "fingerprint": "x"}\n', "data/": ""}, "data/"),
])
def test_a_partial_folder_with_foreign_files_is_refused(contents, foreign, tmp_path,
                                                        llama_models):
    out = tmp_path / "out"
    partial(out).mkdir()
    for name, text in contents.items():
        if name.endswith("/"):
            (partial(out) / name).mkdir()
            (partial(out) / name / "x.csv").write_text("1,2\n")
        else:
            (partial(out) / name).write_text(text)
    before = tree_digest(tmp_path)
    with pytest.raises(MergeError) as err:
        merge_in_process(linear_recipe(llama_models), out)
    assert err.value.exit_code == 2
    assert str(err.value) == (f"{partial(out)}: holds files that mergekit did not write: "
                              f"{foreign}; remove the folder or choose another output folder")
    assert tree_digest(tmp_path) == before
    assert not out.exists()

