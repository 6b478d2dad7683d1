"""The files beside the weights (tokenizer, chat template, generation config, card) are
resolved and checked before the first weight is read: a bad tokenizer source or a
malformed tokenizer config stops the run at once with an error naming the file, exit 2,
and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, write_recipe
from hostile import assert_nothing_partial, tree_digest
from stopped_merges import linear_recipe, merge_in_process

from mergekit.errors import MergeError


@pytest.fixture
def weights_read(monkeypatch) -> list[str]:
    """The output tensors whose inputs the merge has read (both engines, called through)."""
    import mergekit.run as run

    names: list[str] = []

    def spying(real):
        def execute(job, *args, **kwargs):
            names.append(job.output_name)
            return real(job, *args, **kwargs)
        return execute

    monkeypatch.setattr(run, "execute_job", spying(run.execute_job))
    return names


def tokenizer_folder(root: Path, tokenizer_config: str) -> Path:
    root.mkdir(parents=True)
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    (root / "tokenizer_config.json").write_text(tokenizer_config)
    return root


def refused(tmp_path: Path, recipe: dict, weights_read: list[str]) -> str:
    """The message of the merge's usage error, checking that it read no weight and wrote
    nothing."""
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    with pytest.raises(MergeError) as err:
        merge_in_process(recipe, out)
    assert err.value.exit_code == 2
    assert weights_read == []
    assert tree_digest(tmp_path) == before
    assert_nothing_partial(out)
    return str(err.value)


def test_tokenizer_source_without_a_tokenizer(tmp_path, llama_models, weights_read):
    recipe = {**linear_recipe(llama_models), "tokenizer_source": str(llama_models[2])}
    assert refused(tmp_path, recipe, weights_read) == (
        f"tokenizer_source: {llama_models[2]} holds no tokenizer files; name a model that has "
        "a tokenizer (tokenizer.json, tokenizer_config.json, ...)")


@pytest.mark.parametrize(("text", "what"), [
    ("{not json", "not valid JSON (line 1 column 2: Expecting property name enclosed in "
                  "double quotes)"),
    ("[1, 2]", "holds a list, not a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON (nested too deeply)"),
    ('"\xff"'.encode("latin-1"), "not UTF-8 text"),
], ids=["not-json", "list", "deep", "latin-1"])
def test_malformed_tokenizer_config_under_a_chat_template(text, what, tmp_path, llama_models,
                                                          weights_read):
    tok = tokenizer_folder(tmp_path / "tok", "{}")
    if isinstance(text, bytes):
        (tok / "tokenizer_config.json").write_bytes(text)
    else:
        (tok / "tokenizer_config.json").write_text(text)
    recipe = {**linear_recipe(llama_models), "tokenizer_source": str(tok),
              "chat_template": "chatml"}
    assert refused(tmp_path, recipe, weights_read) == (
        f"{tok / 'tokenizer_config.json'}: {what}; fix or replace the file")


@pytest.mark.parametrize(("value", "kind"), [(5, "a number"), ([{"name": "x"}], "a list")])
def test_auto_chat_template_that_is_not_a_string(value, kind, tmp_path, llama_models,
                                                 weights_read):
    model = shutil.copytree(llama_models[1], tmp_path / "b")
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": value}))
    recipe = {**linear_recipe([llama_models[0], model]), "chat_template": "auto"}
    assert refused(tmp_path, recipe, weights_read) == (
        f"{model / 'tokenizer_config.json'}: chat_template is {kind}, not a string; name a "
        "built-in or a Jinja template in the recipe's chat_template instead of auto")


def test_auto_chat_template_file_not_utf8(tmp_path, llama_models, weights_read):
    model = shutil.copytree(llama_models[1], tmp_path / "b")
    (model / "chat_template.jinja").write_bytes(b"{{ '\xff' }}")
    recipe = {**linear_recipe([llama_models[0], model]), "chat_template": "auto"}
    assert refused(tmp_path, recipe, weights_read) == (
        f"{model / 'chat_template.jinja'}: not UTF-8 text; fix or replace the file")


def test_tokenizer_source_missing_from_the_hub_cache(tmp_path, llama_models):
    """Before the fix this merged every shard, then failed, keeping them in .out.partial."""
    recipe = write_recipe(tmp_path / "r.yml", {**linear_recipe(llama_models),
                                               "tokenizer_source": "org/missing"})
    (tmp_path / "cache").mkdir()
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, out, "-q",
                   env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: model 'org/missing': not a local folder and not in "
                                  "the hub cache (offline mode (HF_HUB_OFFLINE))")
    assert tree_digest(tmp_path) == before
    assert_nothing_partial(out)


def test_good_artifacts_are_written_after_the_weights(tmp_path, llama_models):
    tok = tokenizer_folder(tmp_path / "tok", json.dumps({"marker": "tok", "chat_template": 1}))
    out = tmp_path / "out"
    merge_in_process({**linear_recipe(llama_models), "tokenizer_source": str(tok),
                      "chat_template": "{{ messages }}"}, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config == {"marker": "tok", "chat_template": "{{ messages }}"}
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (out / "tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()


def test_tokenizer_source_linking_outside_its_folder(tmp_path, llama_models, weights_read):
    """A tokenizer folder that is no input of the merge is checked before any weight is
    read: a link to a file elsewhere is refused, and its content goes nowhere."""
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    tok = tokenizer_folder(tmp_path / "tok", "{}")
    (tok / "tokenizer.json").unlink()
    (tok / "tokenizer.json").symlink_to(secret)
    recipe = {**linear_recipe(llama_models), "tokenizer_source": str(tok)}
    message = refused(tmp_path, recipe, weights_read)
    assert "tokenizer.json" in message and "outside" in message
