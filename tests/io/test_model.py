"""ModelSource: sharded safetensors read lazily (only needed shards), .bin checkpoints read
with a weights-only unpickler (hostile pickles refused), hostile or broken folders refused."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import TINY, load_state

from mergekit.errors import MergeError
from mergekit.io.model import ModelSource, open_model
from mergekit.io.safetensors_file import SafetensorsReader
from mergekit.refs import ModelReference

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved in three safetensors shards with an index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=64, num_hidden_layers=4, tie_word_embeddings=False, **TINY)
    path = tmp_path_factory.mktemp("sharded") / "m"
    LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="20KB")
    assert (path / INDEX).is_file()
    return path


def weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX).read_text())["weight_map"]


class Opened:
    """A model folder opened through open_model, with its reader closed afterwards."""

    def __init__(self, folder: Path) -> None:
        self.reader = SafetensorsReader()
        self.folder = folder

    def __enter__(self) -> ModelSource:
        return open_model(ModelReference(str(self.folder)), self.reader, None)

    def __exit__(self, *exc: object) -> None:
        self.reader.close()


def test_sharded_tensors_equal_originals(sharded):
    expected = load_state(sharded)
    assert len(set(weight_map(sharded).values())) > 1
    with Opened(sharded) as model:
        assert set(model.names) == set(expected)
        for name, t in expected.items():
            info = model.info(name)
            assert info.shape == tuple(t.shape)
            assert torch.equal(model.read(name), t), name


def test_only_needed_shards_are_opened(sharded, tmp_path):
    wm = weight_map(sharded)
    wanted = "model.layers.0.mlp.up_proj.weight"
    needed = wm[wanted]
    folder = tmp_path / "m"
    shutil.copytree(sharded, folder)
    for shard in set(wm.values()) - {needed}:
        (folder / shard).unlink()
    fetched: list[str] = []

    def fetch(filename: str) -> Path | None:
        fetched.append(filename)
        p = folder / filename
        return p if p.is_file() else None

    reader = SafetensorsReader()
    try:
        model = ModelSource(ModelReference(str(folder)), folder, fetch, reader)
        got = model.read(wanted)
        assert torch.equal(got, load_state(sharded)[wanted])
        assert set(fetched) <= {"config.json", INDEX, needed}
        assert fetched.count(needed) >= 1
        # a tensor in a deleted shard: a clear error naming the shard and the model
        other_name, other_shard = next((n, s) for n, s in wm.items() if s != needed)
        with pytest.raises(MergeError) as err:
            model.read(other_name)
        assert other_shard in str(err.value) and str(folder) in str(err.value)
        assert "missing" in str(err.value)
    finally:
        reader.close()


def test_index_naming_a_missing_shard(sharded, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(sharded, folder)
    index = json.loads((folder / INDEX).read_text())
    name = "model.embed_tokens.weight"
    index["weight_map"][name] = "model-00009-of-00009.safetensors"
    (folder / INDEX).write_text(json.dumps(index))
    with Opened(folder) as model, pytest.raises(MergeError,
                                                match="model-00009-of-00009.safetensors"):
        model.info(name)


@pytest.mark.parametrize("target", ["../../x.safetensors", "/etc/passwd", "sub/../../x",
                                    "sub/model.safetensors"])
def test_index_pointing_outside_the_folder_is_refused(sharded, tmp_path, target):
    folder = tmp_path / "deep" / "m"
    shutil.copytree(sharded, folder)
    # a real safetensors file where ../../x.safetensors points, so refusing is the only defence
    shutil.copyfile(sharded / weight_map(sharded)["lm_head.weight"], tmp_path / "x.safetensors")
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["lm_head.weight"] = target
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(MergeError) as err, Opened(folder):
        pass
    assert INDEX in str(err.value) and repr(target) in str(err.value)


@pytest.mark.parametrize("filename", ["model\x1b[2J.safetensors", "a\nb.safetensors",
                                      "bell\x07.safetensors"])
def test_index_file_name_with_control_characters_is_refused(sharded, tmp_path, filename):
    """Such a name would go into the error message as it is, and move the cursor or fake a
    second line there."""
    folder = tmp_path / "m"
    shutil.copytree(sharded, folder)
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["lm_head.weight"] = filename
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(MergeError) as err, Opened(folder) as model:
        model.info("lm_head.weight")
    message = str(err.value)
    assert INDEX in message and repr(filename) in message
    assert not any(c in message for c in "\x1b\n\x07")


@pytest.mark.parametrize("content", ["{not json", "[]", '{"weight_map": []}', "{}"])
def test_broken_index_is_refused(sharded, tmp_path, content):
    folder = tmp_path / "m"
    shutil.copytree(sharded, folder)
    (folder / INDEX).write_text(content)
    with pytest.raises(MergeError, match=INDEX), Opened(folder):
        pass


def test_folder_without_config_json(llama_models, tmp_path):
    folder = tmp_path / "noconfig"
    folder.mkdir()
    shutil.copyfile(llama_models[0] / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(MergeError) as err, Opened(folder):
        pass
    assert "config.json" in str(err.value) and str(folder) in str(err.value)
    assert err.value.exit_code == 2


def test_folder_without_weights(llama_models, tmp_path):
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copyfile(llama_models[0] / "config.json", folder / "config.json")
    with pytest.raises(MergeError, match="no weights"), Opened(folder):
        pass


def test_damaged_config_json(llama_models, tmp_path):
    folder = tmp_path / "badconfig"
    shutil.copytree(llama_models[0], folder)
    (folder / "config.json").write_text("{oops")
    with pytest.raises(MergeError, match="config.json"), Opened(folder):
        pass


# ---- .bin checkpoints ----------------------------------------------------------------------


def bin_folder(src: Path, dest: Path, legacy: bool = False) -> dict[str, torch.Tensor]:
    """``dest`` holds src's config.json and its weights as pytorch_model.bin."""
    dest.mkdir()
    shutil.copyfile(src / "config.json", dest / "config.json")
    state = load_state(src)
    torch.save(state, dest / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return state


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_bin_checkpoint_reads_correctly(llama_models, tmp_path, legacy):
    state = bin_folder(llama_models[1], tmp_path / "m", legacy)
    with Opened(tmp_path / "m") as model:
        assert set(model.names) == set(state)
        for name, t in state.items():
            assert model.info(name).shape == tuple(t.shape)
            assert torch.equal(model.read(name), t), name


def test_sharded_bin_checkpoint(llama_models, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copyfile(llama_models[0] / "config.json", folder / "config.json")
    state = load_state(llama_models[0])
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for filename, part in halves.items():
        torch.save({n: state[n] for n in part}, folder / filename)
    index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with Opened(folder) as model:
        for name, t in state.items():
            assert torch.equal(model.read(name), t), name


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_folder(src: Path, dest: Path) -> Path:
    dest.mkdir()
    shutil.copyfile(src / "config.json", dest / "config.json")
    return dest / "pytorch_model.bin"


def assert_refused(folder: Path, marker: Path, bin_path: Path) -> str:
    with pytest.raises(MergeError) as err, Opened(folder):
        pass
    assert str(bin_path) in str(err.value)
    assert not marker.exists(), "the pickle ran code"
    return str(err.value)


def test_malicious_torch_save_is_refused(llama_models, tmp_path):
    marker = tmp_path / "pwned"
    bin_path = evil_folder(llama_models[0], tmp_path / "m")
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Evil(marker)}, bin_path)
    assert "refused to unpickle" in assert_refused(tmp_path / "m", marker, bin_path)


def test_malicious_legacy_torch_save_is_refused(llama_models, tmp_path):
    marker = tmp_path / "pwned"
    bin_path = evil_folder(llama_models[0], tmp_path / "m")
    torch.save({"x": Evil(marker)}, bin_path, _use_new_zipfile_serialization=False)
    assert_refused(tmp_path / "m", marker, bin_path)


def test_malicious_plain_pickle_is_refused(llama_models, tmp_path):
    marker = tmp_path / "pwned"
    bin_path = evil_folder(llama_models[0], tmp_path / "m")
    bin_path.write_bytes(pickle.dumps({"x": Evil(marker)}, protocol=2))
    assert_refused(tmp_path / "m", marker, bin_path)


def test_malicious_pickle_inside_zip_checkpoint_is_refused(llama_models, tmp_path):
    """A hand-made zip checkpoint whose data.pkl calls os.system."""
    marker = tmp_path / "pwned"
    bin_path = evil_folder(llama_models[0], tmp_path / "m")
    torch.save({"w": torch.zeros(2)}, bin_path)
    with zipfile.ZipFile(bin_path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    data_pkl = next(n for n in members if n.endswith("/data.pkl"))
    members[data_pkl] = pickle.dumps({"w": Evil(marker)}, protocol=2)
    with zipfile.ZipFile(bin_path, "w", zipfile.ZIP_STORED) as z:
        for n, data in members.items():
            z.writestr(n, data)
    assert_refused(tmp_path / "m", marker, bin_path)


def test_bin_that_is_not_a_state_dict(llama_models, tmp_path):
    bin_path = evil_folder(llama_models[0], tmp_path / "m")
    torch.save([torch.zeros(2)], bin_path)
    with pytest.raises(MergeError, match="state dict"), Opened(tmp_path / "m"):
        pass


def test_damaged_bin(llama_models, tmp_path):
    bin_path = evil_folder(llama_models[0], tmp_path / "m")
    bin_path.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(MergeError) as err, Opened(tmp_path / "m"):
        pass
    assert str(bin_path) in str(err.value)


# ---- links leading outside the folder ------------------------------------------------------


def linked_folder(src: Path, tmp_path: Path, name: str, target: Path) -> Path:
    """A copy of ``src`` whose ``name`` is a link to ``target`` (outside the copy)."""
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    if (folder / name).exists():
        shutil.move(folder / name, target)  # the real file: refusing is the only defence
    else:
        target.write_text('{"secret": "not for the output"}')
    (folder / name).symlink_to(target)
    return folder


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "generation_config.json",
                                  "tokenizer.json", "tokenizer_config.json",
                                  "chat_template.jinja", "vocab.txt", "tokenizer.model"])
def test_link_leading_outside_is_refused_on_opening(llama_models, tmp_path, name):
    folder = linked_folder(llama_models[0], tmp_path, name, tmp_path / "elsewhere")
    with pytest.raises(MergeError) as err, Opened(folder):
        pass
    assert err.value.exit_code == 2
    assert str(folder / name) in str(err.value) and "outside the model folder" in str(err.value)
    assert str(tmp_path / "elsewhere") in str(err.value)


def test_link_target_and_loose_file_names_are_escaped(llama_models, tmp_path):
    """A link's target and a weight file's name come from the folder (a git clone): control
    characters in them are escaped in the message."""
    folder = tmp_path / "m"
    shutil.copytree(llama_models[0], folder)
    (folder / "tokenizer.json").symlink_to("/tmp/\x1b[2Jx\x07")
    with pytest.raises(MergeError) as err, Opened(folder):
        pass
    assert "(to '/tmp/\\x1b[2Jx\\x07')" in str(err.value) and "\x1b" not in str(err.value)
    (folder / "tokenizer.json").unlink()
    (folder / "model.safetensors").rename(folder / "a\x1b[2J.safetensors")
    with pytest.raises(MergeError) as err, Opened(folder):
        pass
    assert "'a\\x1b[2J.safetensors'" in str(err.value) and "\x1b" not in str(err.value)
    assert err.value.exit_code == 2


def test_link_to_a_shard_or_index_outside_is_refused(sharded, tmp_path):
    for name in (INDEX, sorted(set(weight_map(sharded).values()))[1]):
        folder = tmp_path / name / "m"
        shutil.copytree(sharded, folder)
        shutil.move(folder / name, tmp_path / name / "x")
        (folder / name).symlink_to(Path("..") / "x")  # relative, as git stores it
        with pytest.raises(MergeError, match="outside the model folder") as err:
            with Opened(folder) as model:
                for tensor in model.names:
                    model.info(tensor)
        assert str(folder / name) in str(err.value) and err.value.exit_code == 2


def test_links_that_stay_inside_are_followed(llama_models, tmp_path):
    """Links within the folder are fine, and so is a folder that is itself a link: it is
    resolved first, and its files must lie inside what it leads to."""
    real = tmp_path / "data" / "m"
    shutil.copytree(llama_models[0], real)
    (real / "sub").mkdir()
    (real / "sub" / "tok.json").write_text("{}")
    (real / "tokenizer.json").symlink_to(Path("sub") / "tok.json")
    (real / "tokenizer_config.json").symlink_to(Path("..") / "m" / "sub" / "tok.json")
    shutil.move(real / "model.safetensors", real / "sub" / "weights")
    (real / "model.safetensors").symlink_to(real / "sub" / "weights")  # absolute
    link = tmp_path / "models" / "m"
    link.parent.mkdir()
    link.symlink_to(real)
    expected = load_state(llama_models[0])
    with Opened(link) as model:
        assert set(model.names) == set(expected)
        name = next(iter(expected))
        assert torch.equal(model.read(name), expected[name])
        assert model.side_file("tokenizer.json") == link / "tokenizer.json"
        assert model.side_file("tokenizer_config.json") == link / "tokenizer_config.json"
        assert model.side_file("special_tokens_map.json") is None
    # the same link one level up leads outside the folder the link resolves to
    (real / "tokenizer.json").unlink()
    (tmp_path / "data" / "tok.json").write_text("{}")
    (real / "tokenizer.json").symlink_to(Path("..") / "tok.json")
    with pytest.raises(MergeError, match="outside"), Opened(link):
        pass


def hub_snapshot(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """models--org--name/snapshots/<rev>/ with each file a link into blobs/, as the hub
    cache lays it out."""
    import hashlib

    root = cache / f"models--org--{repo}"
    snapshot = root / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot


def test_hub_snapshot_may_lead_only_into_its_own_blobs(llama_models, tmp_path):
    src = llama_models[0]
    files = {n: (src / n).read_bytes() for n in ("config.json", "model.safetensors")}
    snapshot = hub_snapshot(tmp_path / "hub", "alpha", files)
    with Opened(snapshot) as model:
        assert model.side_file("config.json") == snapshot / "config.json"
        assert model.info(next(iter(model.names))).file == snapshot / "model.safetensors"
    # a link into another repository's blobs, or a blob that is itself a link elsewhere
    other = hub_snapshot(tmp_path / "hub", "beta", {"tokenizer.json": b"{}"})
    (snapshot / "tokenizer.json").symlink_to(other / "tokenizer.json")
    with pytest.raises(MergeError, match="outside"), Opened(snapshot):
        pass
    (snapshot / "tokenizer.json").unlink()
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    blob = snapshot.parent.parent / "blobs" / ("e" * 64)
    blob.symlink_to(secret)
    (snapshot / "tokenizer.json").symlink_to(Path("..") / ".." / "blobs" / blob.name)
    with pytest.raises(MergeError, match="outside"), Opened(snapshot):
        pass


def test_side_file_outside_a_tokenizer_folder_is_refused(llama_models, tmp_path):
    """A tokenizer folder that is no input of the merge (tokenizer_source) is checked where
    its files are found."""
    from mergekit.io.artifacts import tokenizer_files
    from mergekit.io.model import side_file

    folder = linked_folder(llama_models[0], tmp_path, "tokenizer.json", tmp_path / "secret")
    assert side_file(folder, "nothing.json") is None
    (folder / "dangling.json").symlink_to(tmp_path / "nowhere")
    assert side_file(folder, "dangling.json") is None
    with pytest.raises(MergeError, match="outside") as err:
        tokenizer_files(folder)
    assert err.value.exit_code == 2
