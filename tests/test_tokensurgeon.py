"""mergekit-tokensurgeon: shared tokens keep their rows bit for bit, missing ones follow
each approximation (expected rows computed here from the models' files), the output loads
in transformers, and bad input stops with exit 2 and one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from hostile import assert_nothing_partial, tree_digest
from safetensors.torch import load_file, save_file
from vocab_models import build_vocab_model

from mergekit.surgery.rows import omp
from mergekit.surgery.tokensurgeon_run import tokensurgeon

# end to end through the command line: the whole suite runs them, -m "not slow" not
pytestmark = pytest.mark.slow

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
DONOR_WORDS = ["alpha", "beta", "gamma", "surgeon"]


def vocab(folder: Path) -> dict[str, int]:
    """token text -> id, read straight from tokenizer.json (vocabulary and added tokens)."""
    data = json.loads((folder / "tokenizer.json").read_text())
    ids = dict(data["model"]["vocab"])
    ids.update({t["content"]: t["id"] for t in data["added_tokens"]})
    return ids


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("surgeon")
    return {
        "donor": build_vocab_model(root / "donor", 1, "bpe", extra_words=DONOR_WORDS,
                                   added=["<tool>"], special=["<|im_start|>"]),
        # a permuted superset of the donor: more words, in another order, and more added
        # tokens before the donor's, so the same texts have other ids
        "superset": build_vocab_model(root / "superset", 2, "bpe",
                                      extra_words=["zeta", *reversed(DONOR_WORDS)],
                                      added=["<x>", "<tool>"],
                                      special=["<|sys|>", "<|im_start|>"]),
        # lacks the donor's words, their merges and its added tokens
        "plain": build_vocab_model(root / "plain", 3, "bpe"),
        "tied": build_vocab_model(root / "tied", 4, "bpe", tied=True, extra_words=["beta"]),
    }


def test_superset_keeps_every_row_bit_for_bit(models, tmp_path):
    """Through the real entry point: every donor token sits at its donor id with the
    model's own embedding and head rows; every other tensor is unchanged; the output
    verifies against its manifest."""
    model, donor, out = models["superset"], models["donor"], tmp_path / "out"
    proc = run_cli("mergekit.cli.tokensurgeon_cmd", model, donor, out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    donor_ids, model_ids = vocab(donor), vocab(model)
    assert set(donor_ids) <= set(model_ids)
    assert any(donor_ids[t] != model_ids[t] for t in donor_ids)  # really permuted
    before, after = weights(model), weights(out)
    size = max(donor_ids.values()) + 1
    for name in (EMBED, HEAD):
        assert after[name].shape == (size, before[name].shape[1])
        for text, i in donor_ids.items():
            assert same_bits(after[name][i], before[name][model_ids[text]]), (name, text)
    assert set(after) == set(before)
    for name in set(before) - {EMBED, HEAD}:
        assert same_bits(after[name], before[name]), name
    assert json.loads((out / "config.json").read_text())["vocab_size"] == size
    copied = [n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
              if (donor / n).exists()]
    assert copied[:2] == ["tokenizer.json", "tokenizer_config.json"]
    for name in copied:
        assert (out / name).read_bytes() == (donor / name).read_bytes()
    check = run_cli("mergekit.cli.verify_cmd", out)
    assert check.returncode == 0, check.stderr


def write_embedding(folder: Path, matrix: torch.Tensor) -> None:
    state = weights(folder)
    state[EMBED] = matrix.contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("k", [4, 64])
def test_omp_rows_are_the_known_combinations(models, tmp_path, k):
    """The donor's rows of the missing tokens are exact combinations of 3 of 12 shared rows
    (orthogonal, of different lengths; every other shared row is zero, so the combination
    is the only one): each output row is the same combination of the model's rows."""
    import shutil

    model, donor, out = models["plain"], tmp_path / "donor", tmp_path / "out"
    shutil.copytree(models["donor"], donor)
    donor_ids, model_ids = vocab(donor), vocab(model)
    shared = sorted(t for t in donor_ids if t in model_ids)
    missing = sorted(t for t in donor_ids if t not in model_ids)
    assert len(missing) >= 10
    rng = np.random.default_rng(0)
    matrix = torch.zeros(weights(donor)[EMBED].shape)
    atoms = [shared[i] for i in rng.choice(len(shared), 12, replace=False)]
    basis = np.linalg.qr(rng.normal(size=(16, 16)))[0][:12] * rng.uniform(0.5, 3, (12, 1))
    for text, row in zip(atoms, basis):
        matrix[donor_ids[text]] = torch.tensor(row, dtype=torch.float32)
    combos = {}
    for text in missing:
        picked = rng.choice(12, 3, replace=False)
        w = rng.uniform(-2, 2, 3)
        combos[text] = [(atoms[p], wi) for p, wi in zip(picked, w)]
        matrix[donor_ids[text]] = torch.tensor(basis[picked].T @ w, dtype=torch.float32)
    write_embedding(donor, matrix)

    tokensurgeon(model, donor, out, "omp", k, quiet=True)
    before, after = weights(model), weights(out)
    for name in (EMBED, HEAD):
        rows = before[name].double()
        for text, combo in combos.items():
            expected = sum(w * rows[model_ids[s]] for s, w in combo)
            got = after[name][donor_ids[text]].double()
            assert torch.allclose(got, expected, atol=1e-4), (name, text)


def test_omp_recovers_a_sparse_combination():
    """The pure function: 5 atoms of a 200-row random dictionary in 64 dimensions."""
    rng = np.random.default_rng(1)
    dictionary = rng.normal(size=(200, 64)).astype(np.float32)
    support = rng.choice(200, 5, replace=False)
    w = rng.uniform(0.5, 2, 5) * rng.choice([-1, 1], 5)
    target = (w @ dictionary[support].astype(np.float64))[None]
    mix = omp(dictionary, target, 8)
    found = {int(a): float(x) for a, x in zip(mix.atoms[0], mix.weights[0]) if abs(x) > 1e-9}
    assert sorted(found) == sorted(support.tolist())
    for a, x in zip(support, w):
        assert found[int(a)] == pytest.approx(x, abs=1e-5)


def missing_rows(models, tmp_path, method: str) -> tuple[dict, dict, dict, dict]:
    model, donor, out = models["plain"], models["donor"], tmp_path / method
    tokensurgeon(model, donor, out, method, quiet=True)
    return vocab(model), vocab(donor), weights(model), weights(out)


def test_mean_rows(models, tmp_path):
    model_ids, donor_ids, before, after = missing_rows(models, tmp_path, "mean")
    shared = [model_ids[t] for t in donor_ids if t in model_ids]
    for name in (EMBED, HEAD):
        expected = before[name].double()[shared].mean(0)
        for text, i in donor_ids.items():
            if text not in model_ids:
                assert torch.allclose(after[name][i].double(), expected, atol=1e-6), text


def test_zero_rows(models, tmp_path):
    model_ids, donor_ids, before, after = missing_rows(models, tmp_path, "zero")
    for name in (EMBED, HEAD):
        for text, i in donor_ids.items():
            if text not in model_ids:
                assert not after[name][i].any(), text
            else:
                assert same_bits(after[name][i], before[name][model_ids[text]]), text


def test_subword_rows(models, tmp_path):
    """Each missing token's text (as the donor's transformers tokenizer decodes it),
    encoded by the model's transformers tokenizer: the mean of those pieces' rows."""
    from transformers import AutoTokenizer

    model_ids, donor_ids, before, after = missing_rows(models, tmp_path, "subword")
    model_tok = AutoTokenizer.from_pretrained(models["plain"])
    donor_tok = AutoTokenizer.from_pretrained(models["donor"])
    checked = 0
    for text, i in donor_ids.items():
        if text in model_ids:
            continue
        decoded = donor_tok.decode([i], skip_special_tokens=False)
        pieces = model_tok(decoded, add_special_tokens=False)["input_ids"]
        assert len(pieces) > 1, text  # the model has no single token for it
        for name in (EMBED, HEAD):
            expected = before[name].double()[pieces].mean(0)
            assert torch.allclose(after[name][i].double(), expected, atol=1e-6), (name, text)
        checked += 1
    assert checked >= 10


def test_tied_model_loads_in_transformers(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, donor, out = models["tied"], models["donor"], tmp_path / "out"
    tokensurgeon(model, donor, out, quiet=True)
    before, after = weights(model), weights(out)
    assert HEAD not in after and set(after) == set(before)
    for name in set(before) - {EMBED}:
        assert same_bits(after[name], before[name]), name
    donor_ids = vocab(donor)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == max(donor_ids.values()) + 1 == after[EMBED].shape[0]
    assert config["tie_word_embeddings"] is True

    tok = AutoTokenizer.from_pretrained(out)
    for text in ("<tool>", "<|im_start|>"):
        assert tok(text, add_special_tokens=False)["input_ids"] == [donor_ids[text]]
    lm = AutoModelForCausalLM.from_pretrained(out)
    batch = tok("<|im_start|>hello <tool> surgeon of the model", return_tensors="pt")
    with torch.no_grad():
        logits = lm(**batch).logits
    assert logits.shape[-1] == config["vocab_size"]
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("which", "args", "named"), [
    ("missing", ["--k", "4"], "no such folder"),
    ("no_tokenizer", [], "tokenizer.json"),
    ("ok", ["--k", "0"], "--k"),
    ("ok", ["--approximation-method", "nearest"], "--approximation-method"),
])
def test_bad_input_exits_2_with_one_line(models, tmp_path, which, args, named):
    import shutil

    model = {"missing": tmp_path / "nowhere", "ok": models["plain"],
             "no_tokenizer": tmp_path / "bare"}[which]
    if which == "no_tokenizer":
        shutil.copytree(models["plain"], model)
        (model / "tokenizer.json").unlink()
    out = tmp_path / "out"
    digest = tree_digest(tmp_path, skip=[out])
    proc = run_cli("mergekit.cli.tokensurgeon_cmd", model, models["donor"], out, *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert named in lines[0]
    if which != "ok":
        assert str(model) in lines[0]
    assert tree_digest(tmp_path, skip=[out]) == digest
    assert_nothing_partial(out)


def test_bfloat16_rows_and_a_rerun_with_other_options(models, tmp_path):
    """A bfloat16 model: shared rows keep their bits, mean rows are the float64 mean rounded
    once to bfloat16. OUT made with another method is replaced only with overwrite."""
    import shutil

    from mergekit.errors import MergeError

    model, out = tmp_path / "bf16", tmp_path / "out"
    shutil.copytree(models["plain"], model)
    state = {n: t.to(torch.bfloat16) for n, t in weights(model).items()}
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    tokensurgeon(model, models["donor"], out, "mean", quiet=True)
    model_ids, donor_ids, after = vocab(model), vocab(models["donor"]), weights(out)
    shared = [model_ids[t] for t in donor_ids if t in model_ids]
    for name in (EMBED, HEAD):
        assert after[name].dtype == torch.bfloat16
        expected = state[name].double()[shared].mean(0).float().to(torch.bfloat16)
        for text, i in donor_ids.items():
            want = state[name][model_ids[text]] if text in model_ids else expected
            assert same_bits(after[name][i], want), (name, text)
    with pytest.raises(MergeError, match="--overwrite") as refused:
        tokensurgeon(model, models["donor"], out, "zero", quiet=True)
    assert refused.value.exit_code == 2
    tokensurgeon(model, models["donor"], out, "zero", overwrite=True, quiet=True)
    assert not weights(out)[EMBED][donor_ids["<tool>"]].any()


def test_sharded_model_keeps_its_shards(models, tmp_path):
    """A model in two weight files: two output shards with an index, the same tensors in
    each, and the output verifies against its manifest."""
    import shutil

    from mergekit.io.verify import verify

    model, out = tmp_path / "sharded", tmp_path / "out"
    shutil.copytree(models["superset"], model)
    state = weights(model)
    (model / "model.safetensors").unlink()
    names = sorted(state)
    files = {"first.safetensors": names[: len(names) // 2],
             "second.safetensors": names[len(names) // 2:]}
    for file, part in files.items():
        save_file({n: state[n] for n in part}, model / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in files.items() for n in part}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    tokensurgeon(model, models["donor"], out, quiet=True)
    shard_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    renamed = dict(zip(files, ["model-00001-of-00002.safetensors",
                               "model-00002-of-00002.safetensors"]))
    assert shard_map == {n: renamed[f] for n, f in index["weight_map"].items()}
    after = {n: t for f in renamed.values() for n, t in load_file(out / f).items()}
    for name in set(state) - {EMBED, HEAD}:
        assert same_bits(after[name], state[name]), name
    assert after[EMBED].shape[0] == max(vocab(models["donor"]).values()) + 1
    assert verify(out).problems == []


def test_the_established_tool_s_short_flags(models, tmp_path):
    """-a and -k, as mergekit 0.1.x spells them: -a mean gives the mean rows."""
    model, donor, out = models["plain"], models["donor"], tmp_path / "out"
    proc = run_cli("mergekit.cli.tokensurgeon_cmd", model, donor, out, "-a", "mean", "-k", "3",
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    model_ids, donor_ids = vocab(model), vocab(donor)
    before, after = weights(model), weights(out)
    shared = [model_ids[t] for t in donor_ids if t in model_ids]
    missing = [i for t, i in donor_ids.items() if t not in model_ids]
    expected = before[EMBED].double()[shared].mean(0)
    assert missing and all(torch.allclose(after[EMBED][i].double(), expected, atol=1e-6)
                           for i in missing)
