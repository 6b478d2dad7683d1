"""Run the token surgery: check the inputs, plan the rows (``tokensurgeon``), stream every
other tensor unchanged into shards in a temporary folder, write the rebuilt embedding (and
head), the donor's tokenizer, config and manifest, then move the folder into place as a
merge does. Nothing is resumed: a stopped run leaves nothing behind and starts over."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mergekit.architecture import embedding_name, is_head_name
from mergekit.errors import usage_error
from mergekit.io import artifacts, output_folder
from mergekit.io.dtypes import NUMPY_CODES, from_float32, to_float32
from mergekit.io.manifest import MANIFEST, manifest, write_manifest
from mergekit.io.model import ModelSource, open_model
from mergekit.io.safetensors_file import SafetensorsReader
from mergekit.io.vocab import TOKENIZER_JSON, Vocabulary, read_vocabulary
from mergekit.io.weight_index import INDEX
from mergekit.io.writer import ShardEntry, ShardWriter, write_index
from mergekit.refs import ModelReference
from mergekit.surgery.rows import apply_mix
from mergekit.surgery.tokensurgeon import METHODS, RowPlan, plan_rows
from mergekit.version import __version__

log = logging.getLogger("mergekit")

OUTPUT_NAMES = (*artifacts.FILE_NAMES, INDEX, MANIFEST)
COPY_CHUNK_BYTES = 64 * 1024**2  # rows of an unchanged tensor read and written at once
# token ids the config names: they must be the donor tokenizer's
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def tokensurgeon(model_dir: Path, donor_dir: Path, out: Path, method: str = "omp",
                 k: int = 64, overwrite: bool = False, quiet: bool = False) -> RowPlan:
    """Write into ``out`` the model of ``model_dir`` with the tokenizer of ``donor_dir``;
    returns the row plan it used."""
    if method not in METHODS:
        raise usage_error("--approximation-method", f"unknown method {method!r}",
                          f"choose one of {', '.join(METHODS)}")
    if k < 1:
        raise usage_error("--k", f"{k} atoms is fewer than one",
                          "give the number of shared tokens per approximation, e.g. 64")
    model_vocab = _vocabulary(model_dir, "MODEL")
    donor_vocab = _vocabulary(donor_dir, "DONOR")
    reader = SafetensorsReader()
    try:
        model = open_model(ModelReference(str(model_dir)), reader, None)
        donor = open_model(ModelReference(str(donor_dir)), reader, None)
        embed = _matrix_name(model, embedding_name(model.names), "input embedding")
        heads = [n for n in model.names if is_head_name(n) and len(model.info(n).shape) == 2]
        for head in heads:
            _matrix_name(model, head, "output head")
            if model.info(head).shape[0] != model.info(embed).shape[0]:
                raise usage_error(f"model '{model.ref}'", f"{head} has "
                                  f"{model.info(head).shape[0]} rows and {embed} "
                                  f"{model.info(embed).shape[0]}",
                                  "token surgery needs one row per token in both")
        recipe = {"tokensurgeon": {"model": str(model_dir), "donor": str(donor_dir),
                                   "approximation_method": method, "k": k}}
        made = {"recipe": recipe, "options": {}}
        output_folder.check_output(out, [model_dir, donor_dir], made, overwrite)

        def donor_matrix() -> np.ndarray:
            name = _matrix_name(donor, embedding_name(donor.names), "input embedding")
            raw, code = _raw_matrix(donor, name)
            return to_float32(raw, code)

        plan = plan_rows(method, k, model_vocab, donor_vocab, model.info(embed).shape[0],
                         donor_matrix, (model_dir / TOKENIZER_JSON, donor_dir / TOKENIZER_JSON),
                         None if quiet else _bar)
        donor_tokenizer = artifacts.tokenizer_files(donor_dir)
        files = artifacts.resolve_artifacts(
            config=_config(model.config, donor.config, plan.size),
            recipe_yaml=_recipe_yaml(recipe),
            generation_config=model.side_file(artifacts.GENERATION_CONFIG),
            tokenizer=donor_tokenizer)
        tmp = output_folder.make_temp(out, OUTPUT_NAMES)
        lock = output_folder.lock(tmp, out)
        try:
            shards = _write_weights(model, {embed, *heads}, plan, tmp, quiet)
            artifacts.write_artifacts(tmp, files)
            donor_read = set(donor_tokenizer)
            if method == "omp":
                donor_read.add(donor.weight_map[embedding_name(donor.names) or ""])
            read = {str(model_dir): {*model.weight_map.values(), TOKENIZER_JSON},
                    str(donor_dir): donor_read}
            sources = {str(model_dir): model, str(donor_dir): donor}
            with output_folder.writing(tmp / MANIFEST):
                write_manifest(tmp, manifest(__version__, recipe, {}, sources, read, shards),
                               skip={output_folder.LOCK, output_folder.JOURNAL})
            output_folder.move_into_place(tmp, out, made, overwrite)
            lock.release(None)
        except BaseException:
            lock.release(tmp)
            output_folder.discard(tmp)
            raise
    finally:
        reader.close()
    if not quiet:
        log.info("%s: %d tokens kept their rows, %d approximated (%s); %d rows", out,
                 len(plan.shared_donor), plan.approximated, method, plan.size)
    return plan


def _vocabulary(folder: Path, role: str) -> Vocabulary:
    if not folder.exists():
        raise usage_error(f"{role} {folder}", "no such folder", "give a local model folder")
    if not folder.is_dir():
        raise usage_error(f"{role} {folder}", "is not a folder", "give a local model folder")
    vocab = read_vocabulary(folder)
    if vocab is None:
        raise usage_error(f"{role} {folder}", f"has no {TOKENIZER_JSON}",
                          "token surgery needs a fast tokenizer's tokenizer.json")
    return vocab


def _matrix_name(source: ModelSource, name: str | None, what: str) -> str:
    if name is None:
        raise usage_error(f"model '{source.ref}'", f"no {what} matrix found",
                          "expected a tensor such as model.embed_tokens.weight")
    info = source.info(name)
    if len(info.shape) != 2 or info.dtype not in NUMPY_CODES:
        raise usage_error(f"model '{source.ref}'", f"{name} is {info.dtype} of shape "
                          f"{list(info.shape)}", "expected a 2-D float32, float16 or bfloat16 "
                          "matrix")
    return name


def _raw_matrix(source: ModelSource, name: str) -> tuple[np.ndarray, str]:
    """The stored bytes of a matrix as numpy (bfloat16 as uint16) and its dtype code."""
    code = source.info(name).dtype
    if source.is_safetensors(name):
        return source.read_array(name), code
    import torch

    t = source.read(name).contiguous()
    return (t.view(torch.int16).numpy().view(np.uint16) if code == "BF16" else t.numpy()), code


def _rebuilt(source: ModelSource, name: str, plan: RowPlan) -> np.ndarray:
    """The matrix ``name`` with the donor's rows: shared rows copied bit for bit, the
    approximated ones mixed in float64 and rounded to the stored dtype."""
    raw, code = _raw_matrix(source, name)
    out = np.zeros((plan.size, raw.shape[1]), raw.dtype)  # zero bits are 0.0 in every dtype
    out[plan.shared_donor] = raw[plan.shared_model]
    values = to_float32(raw, code)
    for ids, mix in plan.groups:
        out[ids] = from_float32(apply_mix(mix, values), code, finite=False)
    return out


def _write_weights(model: ModelSource, rebuilt: set[str], plan: RowPlan, tmp: Path,
                   quiet: bool) -> dict[str, str]:
    """One output shard per weight file of the model, named as merges name them, holding
    the same tensors in the same order; returns each shard's sha256."""
    from tqdm import tqdm

    inputs = list(dict.fromkeys(model.weight_map.values()))
    names = (["model.safetensors"] if len(inputs) == 1 else
             [f"model-{i:05d}-of-{len(inputs):05d}.safetensors"
              for i in range(1, len(inputs) + 1)])
    per_file: list[list[ShardEntry]] = [[] for _ in inputs]
    for name, file in model.weight_map.items():
        info = model.info(name)
        shape = (plan.size, *info.shape[1:]) if name in rebuilt else info.shape
        per_file[inputs.index(file)].append(ShardEntry(name, info.dtype, tuple(shape)))
    hashes: dict[str, str] = {}
    total = sum(e.nbytes for entries in per_file for e in entries)
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=quiet,
              dynamic_ncols=True) as bar:
        for out_name, entries in zip(names, per_file):
            writer = ShardWriter(tmp / out_name, entries)
            try:
                for entry in entries:
                    if entry.name in rebuilt:
                        writer.add(entry.name, _rebuilt(model, entry.name, plan), entry.dtype)
                    else:
                        _copy(model, entry, writer)
                    bar.update(entry.nbytes)
                hashes[out_name] = writer.finish()
            except BaseException:
                writer.abort()
                raise
    if len(names) > 1:
        with output_folder.writing(tmp / INDEX):
            write_index(tmp, {e.name: n for n, entries in zip(names, per_file)
                              for e in entries}, total)
    return hashes


def _copy(model: ModelSource, entry: ShardEntry, writer: ShardWriter) -> None:
    """Stream the tensor unchanged, a chunk of rows at a time."""
    rows = entry.shape[0] if entry.shape else 0
    if rows == 0 or entry.nbytes <= COPY_CHUNK_BYTES:
        writer.add(entry.name, model.read(entry.name))
        return
    step = max(1, COPY_CHUNK_BYTES // (entry.nbytes // rows))
    for start in range(0, rows, step):
        writer.add(entry.name, model.read(entry.name, (start, min(start + step, rows))))


def _config(model_config: dict[str, Any], donor_config: dict[str, Any],
            size: int) -> dict[str, Any]:
    """The model's config.json with the donor's vocabulary size and special token ids."""
    config = json.loads(json.dumps(model_config))
    targets = [config] + ([config["text_config"]] if isinstance(config.get("text_config"),
                                                            dict) else [])
    for target in targets:
        if target is config or "vocab_size" in target:
            target["vocab_size"] = size
        for key in TOKEN_ID_KEYS:
            if key in donor_config:
                target[key] = donor_config[key]
    return config


def _recipe_yaml(recipe: dict[str, Any]) -> str:
    import yaml

    return ("# made by mergekit-tokensurgeon (a record of the command, not a merge recipe)\n"
            + yaml.safe_dump(recipe, sort_keys=False))


def _bar(total: int, what: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc=what, dynamic_ncols=True)
