"""mergekit-verify: every file of an output against its manifest, the shards' headers against
the index, and nothing in the folder that the merge did not write."""

import hashlib
import json
import shutil

import pytest
from conftest import read_json, run_cli
from stopped_merges import SHARD, linear_recipe, merge_in_process

MANIFEST = "mergekit_manifest.json"
INDEX = "model.safetensors.index.json"
VERIFY = "mergekit.cli.verify_cmd"


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tokenized_model(llama_models, tmp_path_factory):
    """The first tiny Llama with tokenizer files, so that the output has some."""
    folder = tmp_path_factory.mktemp("tok") / "a"
    shutil.copytree(llama_models[0], folder)
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    return folder


@pytest.fixture(scope="module")
def built(tokenized_model, llama_models, tmp_path_factory):
    """A sharded output (three shards and an index) and a single-file one."""
    root = tmp_path_factory.mktemp("verify")
    recipe = linear_recipe([tokenized_model, llama_models[1]])
    merge_in_process(recipe, root / "sharded", out_shard_size=SHARD)
    merge_in_process(recipe, root / "single")
    return root


@pytest.fixture
def out(built, tmp_path):
    """A fresh copy of the sharded output, to damage."""
    return shutil.copytree(built / "sharded", tmp_path / "out")


@pytest.fixture
def single(built, tmp_path):
    return shutil.copytree(built / "single", tmp_path / "single")


def verify(folder):
    """(exit code, stdout, stderr lines) of the real command."""
    proc = run_cli(VERIFY, folder)
    return proc.returncode, proc.stdout, proc.stderr.splitlines()


def edit_manifest(folder, change):
    data = read_json(folder / MANIFEST)
    change(data)
    (folder / MANIFEST).write_text(json.dumps(data))


def relist(folder, name):
    """Record ``name`` as it is now, as if the merge had written it so: then only the
    structural checks (headers, index) can tell that something is wrong."""
    def change(data):
        if name in data["shards"]:
            data["shards"][name] = sha256(folder / name)
        else:
            path = folder / name
            data["files"][name] = {"size": path.stat().st_size, "sha256": sha256(path)}
    edit_manifest(folder, change)


def holders(folder):
    """{tensor: the shard holding it}, read with the safetensors library."""
    from safetensors import safe_open

    held = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "np") as f:
            held.update((name, shard.name) for name in f.keys())
    return held


def test_a_clean_output_passes(out, single):
    code, stdout, errors = verify(out)
    assert (code, errors) == (0, [])
    assert stdout == (f"{out}: every file matches the manifest (3 shards and 7 other files); "
                      "the index agrees with the shards' headers\n")
    code, stdout, errors = verify(single)
    assert (code, errors) == (0, [])
    assert stdout == f"{single}: every file matches the manifest (1 shard and 6 other files)\n"


def test_a_changed_or_missing_shard_is_reported(out):
    shard = sorted(out.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, errors = verify(out)
    recorded = read_json(out / MANIFEST)["shards"][shard.name]
    assert code == 1 and errors == [f"{out}: {shard.name}: sha256 {sha256(shard)} differs from "
                                    f"the manifest's {recorded}"]
    shard.unlink()
    code, _, errors = verify(out)
    assert code == 1 and errors == [f"{out}: {shard.name}: missing"]


def test_index_pointing_at_the_wrong_shard_names_each_tensor(out):
    index = read_json(out / INDEX)
    held = holders(out)
    shards = sorted(set(held.values()))
    moved = sorted(index["weight_map"])[::2]
    wrong = {t: shards[(shards.index(held[t]) + 1) % len(shards)] for t in moved}
    index["weight_map"].update(wrong)
    (out / INDEX).write_text(json.dumps(index))
    expected = sorted(
        f"{out}: {INDEX}: tensor {t!r} is mapped to {wrong[t]}, but {held[t]} holds it"
        for t in moved)
    code, _, errors = verify(out)
    assert code == 1
    assert errors[0].startswith(f"{out}: {INDEX}: ") and " bytes, but the manifest says " in (
        errors[0])
    assert sorted(errors[1:]) == expected
    relist(out, INDEX)  # the manifest agrees with the index: only the headers can tell
    code, _, errors = verify(out)
    assert code == 1 and sorted(errors) == expected


def test_tensors_missing_from_the_index_or_in_two_shards(out):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    held = holders(out)
    first, last = sorted(set(held.values()))[0], sorted(set(held.values()))[-1]
    twice = next(t for t, s in held.items() if s == first)
    tensors = load_file(out / last)
    tensors[twice] = load_file(out / first)[twice]
    tensors["extra.weight"] = np.zeros((2, 3), np.float32)
    save_file(tensors, out / last, metadata={"format": "pt"})
    relist(out, last)
    total = sum(a.nbytes for s in sorted(set(held.values()))
                for a in load_file(out / s).values())
    code, _, errors = verify(out)
    assert code == 1
    assert sorted(errors) == sorted([
        f"{out}: {last}: tensor {twice!r} is also in {first}",
        f"{out}: {INDEX}: tensor 'extra.weight' of {last} is not in weight_map",
        f"{out}: {INDEX}: metadata.total_size is {read_json(out / INDEX)['metadata']['total_size']}"
        f" bytes, but the shards' tensors take {total}",
    ])


def test_index_total_size_and_missing_index(out):
    index = read_json(out / INDEX)
    right = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = right + 4
    (out / INDEX).write_text(json.dumps(index))
    relist(out, INDEX)
    code, _, errors = verify(out)
    assert code == 1 and errors == [f"{out}: {INDEX}: metadata.total_size is {right + 4} bytes, "
                                    f"but the shards' tensors take {right}"]
    (out / INDEX).unlink()
    edit_manifest(out, lambda data: data["files"].pop(INDEX))
    code, _, errors = verify(out)
    assert code == 1 and errors == [
        f"{out}: {INDEX}: missing; loaders need it to find the tensors of 3 shards"]


@pytest.mark.parametrize("which", ["sharded", "single"])
def test_a_damaged_header_is_reported_even_when_the_manifest_agrees(out, single, which):
    folder = out if which == "sharded" else single
    shard = sorted(folder.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    assert b'"F32"' in data[:200]
    shard.write_bytes(data.replace(b'"F32"', b'"F16"', 1))  # same length, half the bytes
    relist(folder, shard.name)
    code, _, errors = verify(folder)
    assert code == 1 and len(errors) == 1
    assert errors[0].startswith(f"{folder}: {shard.name}: tensor ")
    assert "F16" in errors[0] and str(folder / shard.name) not in errors[0]


def test_deleted_config_or_changed_tokenizer_is_reported(out):
    tokenizer = out / "tokenizer.json"
    text = tokenizer.read_bytes()
    tokenizer.write_bytes(text.replace(b"1.0", b"2.0"))  # same size
    (out / "config.json").unlink()
    code, _, errors = verify(out)
    assert code == 1
    assert errors == [
        f"{out}: config.json: missing",
        f"{out}: tokenizer.json: sha256 {sha256(tokenizer)} differs from the manifest's "
        f"{read_json(out / MANIFEST)['files']['tokenizer.json']['sha256']}",
    ]
    tokenizer.write_bytes(text + b" ")
    # a manifest that no longer lists config.json still needs it
    edit_manifest(out, lambda data: data["files"].pop("config.json"))
    code, _, errors = verify(out)
    assert code == 1 and errors == [
        f"{out}: tokenizer.json: {len(text) + 1} bytes, but the manifest says {len(text)}",
        f"{out}: config.json: missing"]


def test_files_the_merge_did_not_write_are_reported(out):
    (out / "pytorch_model.bin").write_bytes(b"weights")
    (out / "sub").mkdir()
    (out / "sub" / "model.gguf").write_bytes(b"GGUF")
    (out / "notes.txt").write_text("added later")
    # what the hub and git keep beside a repository's files is left alone
    (out / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (out / ".git").mkdir()
    (out / ".git" / "model.safetensors").write_bytes(b"x")
    (out / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (out / ".cache" / "huggingface" / "download" / "config.json.metadata").write_text("x")
    code, _, errors = verify(out)
    assert code == 1
    assert errors == [
        f"{out}: notes.txt: not in the manifest; remove it, the merge did not write it",
        f"{out}: pytorch_model.bin: a weight file not in the manifest; remove it, a loader may "
        "read it instead of the merged weights",
        f"{out}: sub/model.gguf: a weight file not in the manifest; remove it, a loader may "
        "read it instead of the merged weights",
    ]


def test_a_manifest_without_files_still_checks_shards_and_index(out):
    edit_manifest(out, lambda data: data.pop("files"))
    note = (f"{out}: {MANIFEST}: written before mergekit recorded the other files' sizes and "
            "sha256; config.json, the tokenizer, the recipe and the card were not checked")
    (out / "notes.txt").write_text("not judged: the manifest does not say what belongs")
    code, stdout, errors = verify(out)
    assert (code, errors) == (0, [note])
    assert stdout == (f"{out}: every shard matches the manifest (3 shards); the index agrees "
                      "with the shards' headers\n")
    (out / "extra.pt").write_bytes(b"x")
    index = read_json(out / INDEX)
    tensor = sorted(index["weight_map"])[0]
    held = holders(out)[tensor]
    index["weight_map"][tensor] = next(s for s in read_json(out / MANIFEST)["shards"]
                                       if s != held)
    (out / INDEX).write_text(json.dumps(index))
    code, _, errors = verify(out)
    assert code == 1
    assert errors[1:] == [
        f"{out}: {INDEX}: tensor {tensor!r} is mapped to {index['weight_map'][tensor]}, but "
        f"{held} holds it",
        f"{out}: extra.pt: a weight file not in the manifest; remove it, a loader may read it "
        "instead of the merged weights"]


def test_each_problem_on_its_own_line_with_names_escaped(out):
    hostile = "evil\n\x1b[2J\u202e.bin"
    (out / hostile).write_bytes(b"x")
    edit_manifest(out, lambda data: data["files"].update(
        {"a/b": {"size": 1, "sha256": "0" * 64}, "..": {"size": 1, "sha256": "0" * 64},
         "bell\a.json": {"size": 1, "sha256": "0" * 64}}))
    edit_manifest(out, lambda data: data["shards"].update(
        {name: 7 for name in data["shards"]}))
    code, _, errors = verify(out)
    assert code == 1
    assert all(line.startswith(f"{out}: ") for line in errors)
    assert not any(c in "\n".join(errors) for c in "\x1b\a\u202e")
    assert f"{out}: evil\\n\\x1b[2J\\u202e.bin: a weight file not in the manifest" in "\n".join(
        errors)
    assert f"{out}: bell\\x07.json: missing" in errors
    assert f"{out}: ..: the manifest lists a name that is not a file name" in errors
    assert f"{out}: a/b: the manifest lists a name that is not a file name" in errors
    for shard in read_json(out / MANIFEST)["shards"]:
        assert f"{out}: {shard}: the manifest's sha256 for it is not a sha256 digest" in errors



def test_a_header_json_cannot_parse_is_reported_not_crashed_on(out):
    shard = sorted(out.glob("*.safetensors"))[0]
    header = ('{"t": {"dtype": "F32", "shape": [1' + "0" * 5000 + '], "data_offsets": [0, 4]}}'
              ).encode()  # a number past json's limit on digits
    shard.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    relist(out, shard.name)
    code, _, errors = verify(out)
    assert code == 1 and errors[0] == (
        f"{out}: {shard.name}: the safetensors header is not valid JSON; the file is damaged; "
        "download it again")
    assert not any("run again with -v" in line for line in errors)


def test_a_tree_deeper_than_the_recursion_limit_is_reported(out):
    import inspect
    import sys

    from mergekit.io.verify import verify as verify_folder

    deep = out / ("d/" * 300)
    deep.mkdir(parents=True)
    (deep / "x.bin").write_bytes(b"x")
    limit = sys.getrecursionlimit()
    # what a recursive walk of 300 folders cannot do (kept low here, not made deeper, so
    # that pytest's own recursive removal of tmp_path still copes)
    sys.setrecursionlimit(len(inspect.stack()) + 150)
    try:
        problems = verify_folder(out).problems
    finally:
        sys.setrecursionlimit(limit)
    assert problems == [f"{'d/' * 300}x.bin: a weight file not in the manifest; remove it, a "
                        "loader may read it instead of the merged weights"]


@pytest.mark.parametrize("text, what", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply to be a manifest"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"shards": ["model.safetensors"]}', "has no 'shards' object"),
    ('{"shards": {}, "files": 3}', "'files' is not an object"),
], ids=["deep", "not-json", "list", "shards-list", "files-number"])
def test_an_unusable_manifest_is_a_one_line_usage_error(tmp_path, text, what):
    (tmp_path / MANIFEST).write_text(text)
    code, stdout, errors = verify(tmp_path)
    assert (code, stdout) == (2, "")
    assert errors == [f"error: {tmp_path / MANIFEST}: {what}; the file is damaged; merge again"]


def test_out_must_be_a_folder_with_a_manifest(tmp_path):
    code, _, errors = verify(tmp_path / "nowhere")
    assert (code, errors) == (2, [f"error: {tmp_path / 'nowhere'}: no such folder; give the "
                                  "folder that mergekit-yaml wrote"])
    (tmp_path / "file").write_text("x")
    code, _, errors = verify(tmp_path / "file")
    assert (code, errors) == (2, [f"error: {tmp_path / 'file'}: is a file, not a folder; give "
                                  "the folder that holds mergekit_manifest.json"])
    code, _, errors = verify(tmp_path)
    assert (code, errors) == (2, [f"error: {tmp_path}: no {MANIFEST} here; verify a folder "
                                  "written by mergekit-yaml"])


def test_each_file_is_hashed_once(out, monkeypatch):
    import mergekit.io.verify as verify_module

    hashed = []
    real = verify_module.file_sha256

    def counting(path):
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(verify_module, "file_sha256", counting)
    verdict = verify_module.verify(out)
    assert verdict.problems == []
    listed = read_json(out / MANIFEST)
    assert sorted(hashed) == sorted([*listed["shards"], *listed["files"]])
