"""Run a merge: plan it, resolve and check the files beside the weights (config, tokenizer,
model card), execute its tensor jobs (``execute.py``) into shards streamed to a temporary
folder, write those files and the manifest, move it into place."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path

from mergekit.backends import (
    Backend,
    check_device,
    numpy_backend,
    numpy_can_run,
    torch_backend,
)
from mergekit.config import MergeConfiguration
from mergekit.errors import usage_error
from mergekit.execute import execute_job, job_params
from mergekit.failpoints import failpoint
from mergekit.finite import FiniteCheck
from mergekit.io import artifacts, output_folder
from mergekit.io.adapter import open_input
from mergekit.io.journal import Journal, fingerprint, keep_partial_work
from mergekit.io.manifest import MANIFEST, write_manifest
from mergekit.io.model import ModelSource
from mergekit.io.readahead import Readahead
from mergekit.io.safetensors_file import SafetensorsReader
from mergekit.io.writer import ShardEntry, ShardWriter, write_index
from mergekit.methods.registry import get_method
from mergekit.options import MergeOptions
from mergekit.output_artifacts import external_tokenizer_folder, resolve_output_artifacts
from mergekit.plan import MergePlan, TensorJob, build_plan, format_plan
from mergekit.provenance import made_by, output_provenance, shards_provenance

log = logging.getLogger("mergekit")

INDEX = "model.safetensors.index.json"
# the files of an output besides the shards
OUTPUT_NAMES = (*artifacts.FILE_NAMES, INDEX, MANIFEST)


def run_merge(
    config: MergeConfiguration, out_path: str | Path, options: MergeOptions | None = None
) -> MergePlan:
    """Merge as the recipe says into ``out_path``; returns the plan it executed.

    The work happens in ``.OUT.partial`` beside OUT; after a failure or an interruption the
    finished shards stay there and the same call resumes from them (unless
    ``options.resume`` is false)."""
    options = options or MergeOptions()
    if options.lora_out is None and config.output is not None and config.output.lora_rank:
        options = options.model_copy(update={"lora_out": config.output.lora_rank})
    out = Path(out_path)
    if options.torch_device != "cpu":  # before any work: the engine would find out last
        check_device(options.torch_device, options.device)
    reader = SafetensorsReader()
    try:
        if options.lora_out is not None or config.merge_method == "lora_cat":
            _check_lora_out(config, options.lora_out or 1)
        if config.merge_method == "lora_cat":
            from mergekit.lora_out import check_lora_cat

            check_lora_cat([m.model for m in config.models or []], config.base_model)
        sources = {
            str(ref): open_input(ref, reader, options.transformers_cache)
            for ref in config.referenced_models()
        }
        plan = build_plan(config, sources, options.out_shard_size, options.allow_crimes,
                          options.random_seed,
                          external_tokenizer_folder(config, sources, options))
        for warning in plan.warnings:
            log.warning(warning)
        if plan.vocab is not None and not options.dry_run and not options.quiet:
            for line in plan.vocab.summary[:2]:
                log.info(line.strip())
        made = made_by(config, plan, options)
        if not options.dry_run:
            output_folder.check_output(
                out, [Path(s.ref.path) for s in sources.values() if s.ref.is_local],
                made, options.overwrite,
            )
        # everything besides the weights is checked before any weight is read
        files = resolve_output_artifacts(config, plan, sources, out, options)
        if options.dry_run:
            print(format_plan(plan))
            if options.lora_out is not None:
                print(f"written as a LoRA adapter of {config.base_model}, rank at most "
                      f"{options.lora_out}")
            return plan
        if options.lora_out is not None or plan.method == "lora_cat":
            _write_adapter(config, plan, sources, out, options, made)
            return plan
        provenance = output_provenance(config, plan, sources, options)
        tmp = output_folder.make_temp(out, OUTPUT_NAMES)
        lock = output_folder.lock(tmp, out)
        journal = None
        try:
            journal = Journal.open(tmp, fingerprint(shards_provenance(provenance),
                                                    format_plan(plan, full=True)),
                                   plan.shard_files, options.resume)
            hashes = _write_weights(plan, sources, tmp, options, journal)
            artifacts.write_artifacts(tmp, files)
            with output_folder.writing(tmp / MANIFEST):
                write_manifest(tmp, {**provenance, "shards": hashes},
                               skip={output_folder.JOURNAL, output_folder.LOCK})
            failpoint("before-move")
            journal.close()
            # drops the lock file and the journal
            output_folder.move_into_place(tmp, out, made, options.overwrite)
            lock.release(None)
        except BaseException as exc:
            keep_partial_work(exc, tmp, lock, journal, len(plan.shard_files))
            raise
    finally:
        reader.close()
    if not options.quiet:
        log.info("merged %d tensors into %s", len(plan.jobs), out)
    return plan


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
    added = 0  # tensors merged by this run (for the fault-injection points)
    # the readahead starts first: the disk reads the first inputs while torch loads
    with readahead, _backend(plan, sources, options) as backend, tqdm(
            total=plan.write_bytes, unit="B", unit_scale=True, desc="merging",
            disable=options.quiet, dynamic_ncols=True) as bar:
        for number, (filename, jobs) in enumerate(zip(plan.shard_files, by_shard), 1):
            weight_map.update((j.output_name, filename) for j in jobs)
            if filename in hashes:  # finished by an earlier run
                bar.update(sum(j.nbytes for j in jobs))
                continue
            failpoint("shard-start", number)
            entries = [ShardEntry(j.output_name, j.dtype, j.shape) for j in jobs]
            writer = ShardWriter(tmp / filename, entries)
            try:
                for job in jobs:
                    readahead.next_job()
                    for chunk in execute_job(job, method, sources, backend, check):
                        writer.add(job.output_name, chunk, job.dtype)
                    bar.update(job.nbytes)
                    added += 1
                    failpoint("tensor", added)
                hashes[filename] = writer.finish()
            except BaseException:
                writer.abort()
                raise
            journal.add(filename, hashes[filename])
            failpoint("shard-done", number)
    if len(plan.shard_files) > 1:
        with output_folder.writing(tmp / INDEX):
            write_index(tmp, weight_map, plan.write_bytes)
    return {name: hashes[name] for name in plan.shard_files}


def _check_lora_out(config: MergeConfiguration, rank: int) -> None:
    if rank < 1:
        raise usage_error("--lora-out", f"{rank} is not a rank", "give a rank of 1 or more")
    if config.base_model is None or config.base_model.lora is not None:
        raise usage_error("--lora-out", "the output is an adapter of the recipe's base_model, "
                          "which must be a plain model", "set base_model to the model the "
                          "adapter is for")


def _write_adapter(config: MergeConfiguration, plan: MergePlan,
                   sources: Mapping[str, ModelSource], out: Path, options: MergeOptions,
                   made: dict) -> None:
    """The merge as a LoRA adapter of the base model (``lora_out.py``), written into a
    temporary folder and moved into place with its manifest."""
    from tqdm import tqdm

    from mergekit.lora.adapter_out import FILE_NAMES
    from mergekit.lora_out import cat_adapters, merge_to_adapter

    base = str(config.base_model)
    tmp = output_folder.make_temp(out, (*FILE_NAMES, MANIFEST))
    lock = output_folder.lock(tmp, out)
    try:
        method = get_method(plan.method)
        check = FiniteCheck(options.strict_finite, options.allow_nonfinite)
        with _backend(plan, sources, options) as backend, tqdm(
                total=plan.write_bytes, unit="B", unit_scale=True, desc="merging",
                disable=options.quiet, dynamic_ncols=True) as bar:
            if plan.method == "lora_cat" and options.lora_out is None:
                adapter = cat_adapters(plan, sources, base, method, backend, check, bar)
            else:
                adapter = merge_to_adapter(plan, sources, base, options.lora_out, method,
                                           backend, check, bar, options.random_seed or 0)
        card = (f"---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- mergekit\n- merge\n"
                f"- lora\n---\n\nA merge of {plan.method}, written as a LoRA adapter of "
                f"`{base}`.\n\n```yaml\n"
                f"{config.to_yaml()}```\n") if options.write_model_card else None
        with output_folder.writing(tmp / FILE_NAMES[1]):
            adapter.write(tmp, card)
        provenance = output_provenance(config, plan, sources, options)
        with output_folder.writing(tmp / MANIFEST):
            write_manifest(tmp, {**provenance, "shards": {}},
                           skip={output_folder.JOURNAL, output_folder.LOCK})
        output_folder.move_into_place(tmp, out, made, options.overwrite)
        lock.release(None)
    except BaseException:
        lock.release(tmp)
        output_folder.discard(tmp)
        raise


# Tests set it False to run torch where numpy would run.
NUMPY_ENGINE = True


def _backend(plan: MergePlan, sources: Mapping[str, ModelSource],
             options: MergeOptions) -> AbstractContextManager[Backend]:
    """The one place that decides the backend: numpy for CPU merges that it can run
    (``backends.py``), else torch on the chosen device."""
    method = get_method(plan.method)
    if (NUMPY_ENGINE and options.torch_device == "cpu" and bool(method.arrays)
            and all(numpy_can_run(job, method, lambda j=job: job_params(j, method), sources)
                    for job in plan.jobs)):
        return numpy_backend()
    return torch_backend(options.torch_device)
