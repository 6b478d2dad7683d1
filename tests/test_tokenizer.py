"""Whose tokenizer the output gets (tokenizer_source), and chat templates."""

import json
import shutil

import pytest
from conftest import read_json

from mergekit.chat_templates import BUILTIN_TEMPLATES


@pytest.fixture(scope="module")
def tokenized(llama_models, tmp_path_factory):
    """Copies of the tiny models, each with its own (distinguishable) tokenizer files."""
    root = tmp_path_factory.mktemp("tok")
    out = []
    for i, src in enumerate(llama_models):
        folder = root / f"m{i}"
        shutil.copytree(src, folder)
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "marker": f"m{i}",
             "chat_template": "{{ 'template " + str(i) + "' }}" if i else None}))
        (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": f"</m{i}>"}))
        out.append(str(folder))
    return out


def linear(models, **extra):
    return {"merge_method": "linear", "models": [
        {"model": m, "parameters": {"weight": 1.0}} for m in models], **extra}


def marker(out):
    return read_json(out / "tokenizer_config.json")["marker"]


def test_default_is_the_first_model_without_a_base(tokenized, merge):
    assert marker(merge(linear(tokenized[1:]))) == "m1"


def test_default_is_the_base_model(tokenized, merge):
    base, a, b = tokenized
    out = merge({"merge_method": "ties", "base_model": base, "models": [
        {"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1}}]})
    assert marker(out) == "m0"
    assert read_json(out / "special_tokens_map.json") == {"eos_token": "</m0>"}


def test_tokenizer_source_base(tokenized, merge):
    base, a, b = tokenized
    out = merge(linear([a, b], base_model=base, tokenizer_source="base"))
    assert marker(out) == "m0"


def test_tokenizer_source_names_a_model(tokenized, merge):
    base, a, b = tokenized
    out = merge(linear([base, a], tokenizer_source=b))
    assert marker(out) == "m2"
    assert read_json(out / "special_tokens_map.json") == {"eos_token": "</m2>"}


def test_no_copy_tokenizer(tokenized, merge):
    out = merge(linear(tokenized[:2]), copy_tokenizer=False)
    assert not (out / "tokenizer_config.json").exists()


def test_builtin_chat_template_is_written(tokenized, merge):
    out = merge(linear(tokenized[:2], chat_template="chatml"))
    assert read_json(out / "tokenizer_config.json")["chat_template"] == BUILTIN_TEMPLATES["chatml"]
    assert (out / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES["chatml"]
    assert marker(out) == "m0"  # the rest of the copied config is kept


def test_auto_chat_template_picks_the_inputs_most_common(tokenized, merge):
    # m1 and m2 carry templates "template 1" and "template 2"; m0 has none
    out = merge(linear([tokenized[0], tokenized[2]], chat_template="auto"))
    assert read_json(out / "tokenizer_config.json")["chat_template"] == "{{ 'template 2' }}"


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_every_builtin_template_renders_each_turn(name):
    import jinja2

    messages = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "ASK"},
                {"role": "assistant", "content": "REPLY"}]
    text = jinja2.Environment().from_string(BUILTIN_TEMPLATES[name]).render(
        messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    positions = [text.index(m["content"]) for m in messages]
    assert positions == sorted(positions)
