"""Merges of models whose vocabularies differ: every embedding and head row of the output
is checked by token text against rows computed here from the inputs' own files, by the
rules of the recipe reference (``tokenizer_source``, the ``tokenizer:`` block)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from stopped_merges import merge_in_process
from vocab_models import build_vocab_model

from mergekit import execute, run

IM = ["<|im_start|>", "<|im_end|>"]
TOOL = ["<tool_call>", "</tool_call>"]


def weights(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


class Model:
    """An input's tokens and rows, read with safetensors and transformers."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ids = vocab(folder)
        self.w = weights(folder)
        self.embed = self.w["model.embed_tokens.weight"]
        self.head = self.w.get("lm_head.weight", self.embed)

    def row(self, token: str, head: bool = False) -> np.ndarray | None:
        i = self.ids.get(token)
        return None if i is None else (self.head if head else self.embed)[i]


def expected_row(models: list[Model], base: Model | None, token: str, head: bool,
                 weight: list[float]) -> np.ndarray:
    """The linear merge's row for ``token`` by the default rules: a model's own row, else
    the base's, else the one model's with it, else the mean of those with it."""
    holders = [m.row(token, head) for m in models if m.row(token, head) is not None]
    if base is not None and base.row(token, head) is not None:
        fill = base.row(token, head)
    elif len(holders) == 1:
        fill = holders[0]
    else:
        fill = np.mean(np.stack(holders), axis=0)
    rows = [m.row(token, head) if m.row(token, head) is not None else fill for m in models]
    return sum(w * r for w, r in zip(weight, rows)) / sum(weight)


def linear(models: list[Path], base: Path | None = None, **extra: object) -> dict:
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(m), "parameters": {"weight": 1.0 + i}}
                         for i, m in enumerate(models)], **extra}
    if base is not None:
        recipe["base_model"] = str(base)
    return recipe


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vocab")
    return {
        "base": build_vocab_model(d / "base", 1),
        "chat": build_vocab_model(d / "chat", 2, special=IM),
        # <|im_end|> at another id than in chat; tool's own plain word too
        "tool": build_vocab_model(d / "tool", 3, extra_words=["call"], added=TOOL,
                                  special=IM[1:]),
    }


def check_rows(out: Path, inputs: list[Path], base: Path | None, weight: list[float],
               tol: float = 1e-6) -> dict[str, int]:
    models = [Model(p) for p in inputs]
    base_model = Model(base) if base is not None else None
    ids = vocab(out)
    w = weights(out)
    for head, name in ((False, "model.embed_tokens.weight"), (True, "lm_head.weight")):
        if name not in w:
            continue
        for token, i in ids.items():
            want = expected_row(models, base_model, token, head, weight)
            np.testing.assert_allclose(w[name][i], want, rtol=tol, atol=tol,
                                       err_msg=f"{name} {token!r}")
    return ids


def test_union_of_chat_and_tool_fine_tunes(tmp_path, chat_models):
    """The issue's merge: every token of every input is in the output, each row is the
    merge of the inputs' rows for that token (filled by the default rules), the tokenizer
    encodes each added token to one id and transformers gives finite logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = chat_models
    inputs = [m["base"], m["chat"], m["tool"]]
    out = tmp_path / "out"
    merge_in_process(linear(inputs, m["base"], tokenizer_source="union"), out)
    ids = check_rows(out, inputs, m["base"], [1.0, 2.0, 3.0])
    union = set().union(*(vocab(p) for p in inputs))
    assert set(ids) == union and sorted(ids.values()) == list(range(len(union)))
    assert all(ids[t] == i for t, i in vocab(m["base"]).items())  # the base's ids first
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(union)
    assert weights(out)["model.embed_tokens.weight"].shape[0] == len(union)
    tok = AutoTokenizer.from_pretrained(out)
    for token in IM + TOOL:
        assert tok(token, add_special_tokens=False)["input_ids"] == [ids[token]]
    # the flags come along: special tokens are skipped when decoding, others are not
    assert tok.decode([ids["<|im_start|>"], ids["<tool_call>"]],
                      skip_special_tokens=True) == "<tool_call>"
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tok("<|im_start|>hello <tool_call>world</tool_call><|im_end|>",
                 return_tensors="pt")
    assert torch.isfinite(model(**prompt).logits).all()


def test_union_with_a_chat_template(tmp_path, chat_models):
    """chat_template keeps working with a union: the template and the new tokens are both
    in tokenizer_config.json, and the rendered prompt encodes its markers as single ids."""
    from transformers import AutoTokenizer

    m = chat_models
    out = tmp_path / "out"
    merge_in_process(linear([m["base"], m["chat"]], m["base"], tokenizer_source="union",
                            chat_template="chatml"), out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    decoder = {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()}
    ids = vocab(out)
    assert decoder["<|im_start|>"] == ids["<|im_start|>"]
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    encoded = tok(text, add_special_tokens=False)["input_ids"]
    assert encoded.count(ids["<|im_start|>"]) == 1 and encoded.count(ids["<|im_end|>"]) == 1


def test_a_model_s_tokenizer_as_the_output_s(tmp_path, chat_models):
    """tokenizer_source naming the tool model: its 1003-style vocabulary, each of its ids
    holding the rows of its tokens (chat's <|im_end|> row moves to tool's id)."""
    m = chat_models
    inputs = [m["chat"], m["tool"]]
    out = tmp_path / "out"
    merge_in_process(linear(inputs, tokenizer_source=str(m["tool"])), out)
    ids = check_rows(out, inputs, None, [1.0, 2.0])
    assert ids == vocab(m["tool"])
    assert "<|im_start|>" not in ids


def test_identical_vocabularies_merge_row_by_row(tmp_path, chat_models):
    """Nothing to permute: the plan has no row maps and the rows are merged by number."""
    m = chat_models
    out = tmp_path / "out"
    plan = run.run_merge(
        __import__("mergekit.config", fromlist=["parse_config"]).parse_config(
            linear([m["chat"], m["chat"]], tokenizer_source="union")),
        out, run.MergeOptions(quiet=True))
    assert plan.vocab is None and all(j.rows is None for j in plan.jobs)


@pytest.mark.parametrize("kind", ["unigram", "wordpiece"])
def test_other_tokenizer_kinds(tmp_path, kind):
    a = build_vocab_model(tmp_path / "a", 1, kind, special=IM)
    b = build_vocab_model(tmp_path / "b", 2, kind, extra_words=["extra"], added=TOOL)
    out = tmp_path / "out"
    merge_in_process(linear([a, b], a, tokenizer_source="union"), out)
    ids = check_rows(out, [a, b], a, [1.0, 2.0])
    assert set(ids) == set(vocab(a)) | set(vocab(b))


def test_tied_and_untied_inputs(tmp_path):
    """A tied model's head is its embedding: the untied output's head rows use it."""
    a = build_vocab_model(tmp_path / "a", 1, special=IM, tied=True)
    b = build_vocab_model(tmp_path / "b", 2, added=TOOL)
    out = tmp_path / "out"
    merge_in_process(linear([b, a], b, tokenizer_source="union"), out)
    assert "lm_head.weight" in weights(out)
    check_rows(out, [b, a], b, [1.0, 2.0])


def test_all_tied(tmp_path):
    a = build_vocab_model(tmp_path / "a", 1, special=IM, tied=True)
    b = build_vocab_model(tmp_path / "b", 2, added=TOOL, tied=True)
    out = tmp_path / "out"
    merge_in_process(linear([a, b], a, tokenizer_source="union"), out)
    assert "lm_head.weight" not in weights(out)
    check_rows(out, [a, b], a, [1.0, 2.0])


def test_token_sources_of_the_recipe(tmp_path, chat_models):
    """tokens: a model's row, a given row of a model (by text and by id), zeros, force."""
    m = chat_models
    chat, tool = Model(m["chat"]), Model(m["tool"])
    inputs = [m["chat"], m["tool"]]
    out = tmp_path / "out"
    tokens = {
        "<|im_start|>": {"source": {"kind": "model_token", "model": str(m["tool"]),
                                    "token": "<tool_call>"}},
        "<tool_call>": {"source": {"kind": "zero"}},
        "</tool_call>": {"source": {"kind": "model_token", "model": str(m["chat"]),
                                    "token_id": 5}},
        "<|im_end|>": {"source": str(m["chat"]), "force": True},
        "hello": {"source": {"kind": "zero"}},  # everyone has it: not forced, no effect
    }
    merge_in_process(linear(inputs, tokenizer={"source": "union", "tokens": tokens}), out)
    ids, w = vocab(out), weights(out)
    for head, name in ((False, "model.embed_tokens.weight"), (True, "lm_head.weight")):
        def row(model: Model, token: str, head: bool = head) -> np.ndarray:
            return model.row(token, head)

        def by_id(model: Model, i: int, head: bool = head) -> np.ndarray:
            return (model.head if head else model.embed)[i]

        got = w[name]
        want = {
            # chat has it; tool gets tool's <tool_call> row
            "<|im_start|>": (row(chat, "<|im_start|>") + 2 * row(tool, "<tool_call>")) / 3,
            "<tool_call>": 2 * row(tool, "<tool_call>") / 3,  # chat's is zeros
            "</tool_call>": (by_id(chat, 5) + 2 * row(tool, "</tool_call>")) / 3,
            "<|im_end|>": row(chat, "<|im_end|>"),  # forced for both
            "hello": (row(chat, "hello") + 2 * row(tool, "hello")) / 3,
        }
        for token, value in want.items():
            np.testing.assert_allclose(got[ids[token]], value, rtol=1e-6, atol=1e-6,
                                       err_msg=f"{name} {token}")


def test_pad_to_multiple_of(tmp_path, chat_models):
    """Rows past the last token: the vocabulary is padded, config.json says the padded
    size, and each padding row is the merge of each input's mean over its token rows."""
    m = chat_models
    inputs = [m["chat"], m["tool"]]
    out = tmp_path / "out"
    merge_in_process(linear(inputs, tokenizer={"pad_to_multiple_of": 64}), out)
    ids = check_rows(out, inputs, None, [1.0, 2.0])
    size = -(-len(ids) // 64) * 64
    assert size > len(ids)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == size
    w = weights(out)["model.embed_tokens.weight"]
    assert w.shape[0] == size
    means = []
    for p in inputs:
        model = Model(p)
        used = [model.ids[t] for t in ids if t in model.ids]
        means.append(model.embed[used].astype(np.float64).mean(axis=0))
    want = (means[0] + 2 * means[1]) / 3
    for i in range(len(ids), size):
        np.testing.assert_allclose(w[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [3, 40])
def test_permuted_vocabulary_in_chunks(tmp_path, monkeypatch, chunk_rows):
    """A model whose ids are a permutation of the other's, merged in chunks of a few rows
    (each run of consecutive rows read alone) and of more (one read, rows picked from
    it), on both backends, to the same bytes."""
    words = [f"w{c}{d}" for c in "pqrs" for d in "xyz"]
    a = build_vocab_model(tmp_path / "a", 1, "wordpiece", extra_words=words)
    b = build_vocab_model(tmp_path / "b", 2, "wordpiece", extra_words=words[::-1],
                          added=IM)
    assert vocab(a)[words[0]] != vocab(b)[words[0]]
    monkeypatch.setattr(execute, "CHUNK_ELEMENTS", 16 * chunk_rows)  # rows of 16
    outs = []
    for engine in (True, False):
        monkeypatch.setattr(run, "NUMPY_ENGINE", engine)
        outs.append(tmp_path / f"out{engine}")
        merge_in_process(linear([a, b], a, tokenizer_source="union"), outs[-1])
        check_rows(outs[-1], [a, b], a, [1.0, 2.0])
    numpy_out, torch_out = weights(outs[0]), weights(outs[1])
    assert numpy_out.keys() == torch_out.keys()
    for name, x in numpy_out.items():
        assert np.array_equal(x, torch_out[name]), name


def test_base_row_comes_before_the_mean(tmp_path):
    """A token the base and another model have and a third lacks: the third takes the
    base's row, not the mean of the two."""
    base = build_vocab_model(tmp_path / "base", 1, special=IM)
    chat = build_vocab_model(tmp_path / "chat", 2, special=IM)
    plain = build_vocab_model(tmp_path / "plain", 3)
    out = tmp_path / "out"
    merge_in_process(linear([base, chat, plain], base, tokenizer_source="union"), out)
    check_rows(out, [base, chat, plain], base, [1.0, 2.0, 3.0])
    ids, w = vocab(out), weights(out)["model.embed_tokens.weight"]
    b, c = Model(base), Model(chat)
    want = (b.row(IM[0]) + 2 * c.row(IM[0]) + 3 * b.row(IM[0])) / 6
    np.testing.assert_allclose(w[ids[IM[0]]], want, rtol=1e-6, atol=1e-6)


def test_token_missing_from_every_model_is_zero(tmp_path, chat_models):
    """A token of the output's tokenizer (here an external one) that no model has."""
    m = chat_models
    other = build_vocab_model(tmp_path / "other", 9, special=["<new>"])
    out = tmp_path / "out"
    merge_in_process(linear([m["base"], m["chat"]], tokenizer_source=str(other)), out)
    ids = vocab(out)
    assert ids == vocab(other)
    assert not weights(out)["model.embed_tokens.weight"][ids["<new>"]].any()


@pytest.mark.parametrize(("tokens", "message"), [
    ({"<|im_start|>": {"source": "TOOL"}}, "has no token '<|im_start|>'"),
    ({"<x>": {"source": {"kind": "model_token", "model": "TOOL", "token_id": 10**6}}},
     "token_id 1000000 is past the"),
    ({"<x>": {"source": {"kind": "model_token", "model": "TOOL", "token": "<nope>"}}},
     "has no token '<nope>'"),
    ({"<x>": {"source": "org/elsewhere"}}, "is not a model of the recipe"),
])
def test_bad_token_sources_are_found_by_dry_run(tmp_path, chat_models, tokens, message):
    """Exit 2, one line naming the token's source, before any weight is read."""
    import yaml

    m = chat_models
    tokens = json.loads(json.dumps(tokens).replace("TOOL", str(m["tool"])))
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(linear([m["chat"], m["tool"]],
                                            tokenizer={"tokens": tokens})))
    proc = subprocess.run([sys.executable, "-m", "mergekit.cli.yaml_cmd", str(recipe),
                           str(tmp_path / "out"), "--dry-run"], capture_output=True,
                          text=True)
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "tokenizer.tokens." in lines[0] and message in lines[0]


def test_dry_run_prints_the_vocabulary_summary(tmp_path, chat_models):
    import yaml

    m = chat_models
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(linear([m["base"], m["chat"], m["tool"]], m["base"],
                                            tokenizer_source="union")))
    proc = subprocess.run([sys.executable, "-m", "mergekit.cli.yaml_cmd", str(recipe),
                           str(tmp_path / "out"), "--dry-run"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    union = set().union(*(vocab(p) for p in m.values()))
    assert f"vocabulary: union of 3 tokenizers, {len(union)} rows" in proc.stdout
    for token in IM + TOOL + ["Ġcall"[1:]]:
        if token in union:
            assert f"'{token}'" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_base_as_the_source_keeps_its_untokened_rows(tmp_path, caplog):
    """tokenizer_source: base whose embedding has rows past its last token (as Qwen's
    152064 rows for 151665 tokens): the output keeps every row, the untokened ones the
    merge of each model's mean over its rows for the output's tokens; a token only the
    output's tokenizer has is zeros, with a warning."""
    base = build_vocab_model(tmp_path / "base", 1, special=["<only-base>"], extra_rows=5)
    other = build_vocab_model(tmp_path / "other", 2, special=IM)
    out = tmp_path / "out"
    merge_in_process(linear([base, other], base, tokenizer_source="base"), out)
    ids = check_rows(out, [base, other], base, [1.0, 2.0])
    assert ids == vocab(base)
    rows = len(ids) + 5
    w = weights(out)["model.embed_tokens.weight"]
    assert w.shape[0] == rows == json.loads((out / "config.json").read_text())["vocab_size"]
    means = []
    for p in (base, other):
        model = Model(p)
        used = [model.ids[t] for t in ids if t in model.ids]
        means.append(model.embed[used].astype(np.float64).mean(axis=0))
    for i in range(len(ids), rows):
        np.testing.assert_allclose(w[i], (means[0] + 2 * means[1]) / 3, rtol=1e-5, atol=1e-6)


def test_a_token_no_model_has_warns(tmp_path, caplog, chat_models):
    import logging

    m = chat_models
    other = build_vocab_model(tmp_path / "other", 9, special=["<new>"])
    with caplog.at_level(logging.WARNING, logger="mergekit"):
        merge_in_process(linear([m["base"], m["chat"]], tokenizer_source=str(other)),
                         tmp_path / "out")
    assert any("'<new>': no model has it; its row is zeros" in r.getMessage()
               for r in caplog.records)
