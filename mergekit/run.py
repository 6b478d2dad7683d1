"""Run a merge: plan it, resolve and check the files beside the weights (config, tokenizer,
model card), execute its tensor jobs (``execute.py``) into shards streamed to a temporary
folder, write those files and the manifest, move it into place."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mergekit.config import MergeConfiguration
from mergekit.errors import usage_error
from mergekit.execute import FiniteCheck, execute_job
from mergekit.execute_numpy import execute_job_numpy, numpy_can_run
from mergekit.io import artifacts, output_folder
from mergekit.io.journal import Journal, fingerprint, keep_partial_work, stop_for_test
from mergekit.io.manifest import MANIFEST, write_manifest
from mergekit.io.model import ModelSource, open_model
from mergekit.io.readahead import Readahead
from mergekit.io.safetensors_file import SafetensorsReader
from mergekit.io.writer import ShardEntry, ShardWriter, write_index
from mergekit.methods.registry import get_method
from mergekit.options import MergeOptions
from mergekit.plan import MergePlan, TensorJob, build_plan, format_plan
from mergekit.refs import ModelReference, parse_model_reference

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mergekit")

INDEX = "model.safetensors.index.json"
# the files of an output besides the shards
OUTPUT_NAMES = (*artifacts.FILE_NAMES, INDEX, MANIFEST)
# recipe fields that decide only the files beside the weights: a rerun that changes them
# keeps the finished shards
ARTIFACT_FIELDS = ("tokenizer_source", "tokenizer", "chat_template")


def run_merge(
    config: MergeConfiguration, out_path: str | Path, options: MergeOptions | None = None
) -> MergePlan:
    """Merge as the recipe says into ``out_path``; returns the plan it executed.

    The work happens in ``.OUT.partial`` beside OUT; after a failure or an interruption the
    finished shards stay there and the same call resumes from them (unless
    ``options.resume`` is false)."""
    options = options or MergeOptions()
    out = Path(out_path)
    if options.torch_device != "cpu":  # before any work: the engine would find out last
        _device(options)
    reader = SafetensorsReader()
    try:
        sources = {
            str(ref): open_model(ref, reader, options.transformers_cache)
            for ref in config.referenced_models()
        }
        plan = build_plan(config, sources, options.out_shard_size, options.allow_crimes,
                          options.random_seed)
        for warning in plan.warnings:
            log.warning(warning)
        made_by = _made_by(config, plan, options)
        if not options.dry_run:
            output_folder.check_output(
                out, [Path(s.ref.path) for s in sources.values() if s.ref.is_local],
                made_by, options.overwrite,
            )
        # everything besides the weights is checked before any weight is read
        files = _artifacts(config, plan, sources, out, options)
        if options.dry_run:
            print(format_plan(plan))
            return plan
        provenance = _provenance(config, plan, sources, options)
        tmp = output_folder.make_temp(out, OUTPUT_NAMES)
        lock = output_folder.lock(tmp, out)
        journal = None
        try:
            journal = Journal.open(tmp, fingerprint(_shards_provenance(provenance),
                                                    format_plan(plan, full=True)),
                                   plan.shard_files, options.resume)
            hashes = _write_weights(plan, sources, tmp, options, journal)
            artifacts.write_artifacts(tmp, files)
            with output_folder.writing(tmp / MANIFEST):
                write_manifest(tmp, {**provenance, "shards": hashes},
                               skip={output_folder.JOURNAL, output_folder.LOCK})
            stop_for_test("before-move")
            journal.close()
            # drops the lock file and the journal
            output_folder.move_into_place(tmp, out, made_by, options.overwrite)
            lock.release(None)
        except BaseException as exc:
            keep_partial_work(exc, tmp, lock, journal, len(plan.shard_files))
            raise
    finally:
        reader.close()
    if not options.quiet:
        log.info("merged %d tensors into %s", len(plan.jobs), out)
    return plan


def _device(options: MergeOptions) -> torch.device:
    """The device the options name, checked: it exists on this machine."""
    torch = import_torch()
    flag = f"--device {options.device}" if options.device else "--cuda"
    try:
        device = torch.device(options.torch_device)
    except (RuntimeError, ValueError):
        raise usage_error(flag, "is not a torch device", "use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise usage_error(flag, "no CUDA device is available",
                              f"run without {flag.split()[0]}")
        if device.index is not None and device.index >= count:
            raise usage_error(flag, f"this machine has {count} CUDA device(s), numbered from "
                              "0", f"use cuda:0 to cuda:{count - 1}")
    return device


def _write_weights(
    plan: MergePlan, sources: Mapping[str, ModelSource], tmp: Path, options: MergeOptions,
    journal: Journal,
) -> dict[str, str]:
    """Write every shard the journal does not list as finished, recording each one there;
    returns every shard's sha256."""
    from tqdm import tqdm

    weight_map: dict[str, str] = {}
    hashes = dict(journal.done)
    by_shard: list[list[TensorJob]] = [[] for _ in plan.shard_files]
    for job in plan.jobs:
        by_shard[job.shard].append(job)
    readahead = Readahead([j for name, jobs in zip(plan.shard_files, by_shard)
                           if name not in hashes for j in jobs], sources)
    method = get_method(plan.method)
    check = FiniteCheck(options.strict_finite, options.allow_nonfinite)
    added = 0  # tensors written by this run (for the test hook)
    on_numpy = _numpy_runs(plan, sources, options)
    # the readahead starts first: the disk reads the first inputs while torch loads
    with readahead, (nullcontext(0) if on_numpy else _torch_threads()) as threads, tqdm(
            total=plan.write_bytes, unit="B", unit_scale=True, desc="merging",
            disable=options.quiet, dynamic_ncols=True) as bar:
        device = None if on_numpy else _device(options)
        cpu_threads = threads if device is not None and device.type == "cpu" else None
        for number, (filename, jobs) in enumerate(zip(plan.shard_files, by_shard), 1):
            weight_map.update((j.output_name, filename) for j in jobs)
            if filename in hashes:  # finished by an earlier run
                bar.update(sum(j.nbytes for j in jobs))
                continue
            stop_for_test(f"shard-start:{number}")
            entries = [ShardEntry(j.output_name, j.dtype, j.shape) for j in jobs]
            writer = ShardWriter(tmp / filename, entries)
            try:
                for job in jobs:
                    readahead.next_job()
                    if device is None:
                        for array in execute_job_numpy(job, method, sources, check):
                            writer.add(job.output_name, array, job.dtype)
                    else:
                        for chunk in execute_job(job, method, sources, device, check,
                                                 cpu_threads):
                            writer.add(job.output_name, chunk)
                    bar.update(job.nbytes)
                    added += 1
                    stop_for_test(f"tensor:{added}")
                hashes[filename] = writer.finish()
            except BaseException:
                writer.abort()
                raise
            journal.add(filename, hashes[filename])
            stop_for_test(f"shard-done:{number}")
    if len(plan.shard_files) > 1:
        with output_folder.writing(tmp / INDEX):
            write_index(tmp, weight_map, plan.write_bytes)
    return {name: hashes[name] for name in plan.shard_files}


# CPU merges of methods that take arrays run on numpy (``execute_numpy.py``) wherever the
# dtypes allow: it skips torch's import (a second, 200 MB) and measured as fast or faster at
# each size tried. 2 cores, times of alternating runs, numpy against torch: 3-model linear,
# 0.53 GB of output, 1.3-1.5 s against 2.2 s; 2.2 GB, 4.8-5.3 s against 5.7-7.0 s; slerp,
# 2.2 GB, 4.9-5.5 s against 6.0-6.6 s; peak RSS 60 MB instead of 350-450 MB. Tests set it
# False to run torch.
NUMPY_ENGINE = True


def _numpy_runs(plan: MergePlan, sources: Mapping[str, ModelSource],
                options: MergeOptions) -> bool:
    """Whether the merge runs on numpy (``execute_numpy.py``) instead of torch."""
    method = get_method(plan.method)
    return (NUMPY_ENGINE and options.torch_device == "cpu" and bool(method.arrays)
            and all(numpy_can_run(job, method, sources) for job in plan.jobs))


def import_torch() -> ModuleType:
    """Import torch with Python's cyclic garbage collector paused (and then restored as it
    was). The import creates a few hundred thousand long-lived objects, none of them
    garbage, and the full collections they trigger traverse all of them again and again:
    measured, 0.13 s of a 2 s merge."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch
    finally:
        if enabled:
            gc.enable()
    return torch


@contextmanager
def _torch_threads() -> Iterator[int]:
    """torch's intra-op thread count, given back at the end (``execute_job`` changes it)."""
    torch = import_torch()
    threads = torch.get_num_threads()
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def _artifacts(
    config: MergeConfiguration,
    plan: MergePlan,
    sources: Mapping[str, ModelSource],
    out: Path,
    options: MergeOptions,
) -> artifacts.Artifacts:
    """The output's files besides the weights, resolved and checked."""
    from mergekit.io.card import model_card

    generation = sources[plan.config_model].side_file(artifacts.GENERATION_CONFIG)
    tokenizer = None
    if options.copy_tokenizer:
        folder = _tokenizer_folder(config, plan, sources, options)
        tokenizer = artifacts.tokenizer_files(folder)
        if not tokenizer and config.tokenizer_source is not None:
            raise usage_error("tokenizer_source", f"{folder} holds no tokenizer files",
                              "name a model that has a tokenizer (tokenizer.json, "
                              "tokenizer_config.json, ...)")
        if not tokenizer:
            log.warning("no tokenizer files found in %s; the output has no tokenizer", folder)
    return artifacts.resolve_artifacts(
        config=artifacts.output_config(sources, plan),
        recipe_yaml=config.to_yaml(),
        generation_config=generation,
        tokenizer=tokenizer,
        chat_template=config.chat_template,
        input_folders=[s.folder for s in sources.values()],
        card=model_card(config, out.name) if options.write_model_card else None,
    )


def _provenance(
    config: MergeConfiguration,
    plan: MergePlan,
    sources: Mapping[str, ModelSource],
    options: MergeOptions,
) -> dict[str, Any]:
    """The manifest without the shards' sha256: what decides the output's bytes."""
    from mergekit import __version__
    from mergekit.io.manifest import manifest

    read: dict[str, set[str]] = {}
    for job in plan.jobs:
        for ref in job.inputs + ((job.base,) if job.base else ()):
            read.setdefault(ref.model, set()).add(sources[ref.model].weight_map[ref.name])
    made_by = _made_by(config, plan, options)
    record = manifest(__version__, made_by["recipe"], made_by["options"], sources, read, {},
                      options.hash_inputs)
    del record["shards"]
    return record


def _made_by(config: MergeConfiguration, plan: MergePlan,
             options: MergeOptions) -> dict[str, Any]:
    """The manifest's ``recipe`` and ``options`` records: the recipe and the options that
    change the output's bytes. An earlier output with other ones is replaced only with
    --overwrite."""
    from mergekit.config import recipe_to_plain

    result_options: dict[str, object] = {"out_shard_size": options.out_shard_size}
    if get_method(plan.method).random:
        result_options["random_seed"] = options.random_seed
    return {"recipe": recipe_to_plain(config), "options": result_options}


def _shards_provenance(provenance: dict[str, Any]) -> dict[str, Any]:
    """The provenance less the recipe fields that do not decide the shards' bytes."""
    recipe = {k: v for k, v in provenance["recipe"].items() if k not in ARTIFACT_FIELDS}
    return {**provenance, "recipe": recipe}


def _tokenizer_folder(
    config: MergeConfiguration,
    plan: MergePlan,
    sources: Mapping[str, ModelSource],
    options: MergeOptions,
) -> Path:
    choice = config.tokenizer_source
    if choice is None:
        return sources[plan.config_model].folder
    ref: ModelReference = config.base_model if choice == "base" else parse_model_reference(
        choice)  # type: ignore[assignment]
    if str(ref) in sources:
        return sources[str(ref)].folder
    if ref.is_local:
        return Path(ref.path)
    from mergekit.io import hub

    return hub.fetch_small_files(ref, options.transformers_cache)

