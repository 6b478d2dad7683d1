"""Execute a merge plan: read inputs, apply the method, stream outputs to disk."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit.config import MergeConfiguration
from mergekit.errors import merge_failure, usage_error
from mergekit.io import artifacts, output_folder
from mergekit.io.dtypes import torch_dtype
from mergekit.io.journal import Journal, fingerprint, keep_partial_work, stop_for_test
from mergekit.io.manifest import write_manifest
from mergekit.io.model import ModelSource, open_model
from mergekit.io.safetensors_file import SafetensorsReader
from mergekit.io.writer import ShardEntry, ShardWriter, write_index
from mergekit.methods.registry import Method, get_method
from mergekit.options import MergeOptions
from mergekit.plan import MergePlan, TensorJob, build_plan, format_plan
from mergekit.refs import ModelReference, parse_model_reference

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mergekit")


def run_merge(
    config: MergeConfiguration, out_path: str | Path, options: MergeOptions | None = None
) -> MergePlan:
    """Merge as the recipe says into ``out_path``; returns the plan it executed.

    The work happens in ``.OUT.partial`` beside OUT; after a failure or an interruption the
    finished shards stay there and the same call resumes from them (unless
    ``options.resume`` is false)."""
    options = options or MergeOptions()
    out = Path(out_path)
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
        if options.dry_run:
            print(format_plan(plan))
            return plan
        output_folder.check_output(
            out, [Path(s.ref.path) for s in sources.values() if s.ref.is_local]
        )
        provenance = _provenance(config, plan, sources, options)
        tmp = output_folder.make_temp(out)
        lock = output_folder.lock(tmp, out)
        journal = None
        try:
            journal = Journal.open(tmp, fingerprint(provenance, format_plan(plan)),
                                   plan.shard_files, options.resume)
            hashes = _write_weights(plan, sources, tmp, options, journal)
            _write_artifacts(config, plan, sources, tmp, out, options)
            write_manifest(tmp, {**provenance, "shards": hashes})
            stop_for_test("before-move")
            journal.remove()
            output_folder.move_into_place(tmp, out)
            lock.release(out)
        except BaseException as exc:
            keep_partial_work(exc, tmp, lock, journal, len(plan.shard_files))
            raise
    finally:
        reader.close()
    if not options.quiet:
        log.info("merged %d tensors into %s", len(plan.jobs), out)
    return plan


def _device(options: MergeOptions) -> torch.device:
    import torch

    device = torch.device(options.torch_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise usage_error("--cuda", "no CUDA device is available", "run without --cuda")
    return device


def _write_weights(
    plan: MergePlan, sources: Mapping[str, ModelSource], tmp: Path, options: MergeOptions,
    journal: Journal,
) -> dict[str, str]:
    """Write every shard the journal does not list as finished, recording each one there;
    returns every shard's sha256."""
    import torch
    from tqdm import tqdm

    device = _device(options)
    method = get_method(plan.method)
    check = FiniteCheck(options.strict_finite)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    weight_map: dict[str, str] = {}
    hashes = dict(journal.done)
    by_shard: list[list[TensorJob]] = [[] for _ in plan.shard_files]
    for job in plan.jobs:
        by_shard[job.shard].append(job)
    added = 0  # tensors written by this run (for the test hook)
    with _restore_threads(), tqdm(total=plan.write_bytes, unit="B", unit_scale=True,
                                  desc="merging", disable=options.quiet,
                                  dynamic_ncols=True) as bar:
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
                    for chunk in execute_job(job, method, sources, device, check, threads):
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
        write_index(tmp, weight_map, plan.write_bytes)
    return {name: hashes[name] for name in plan.shard_files}


# Row chunks of about this many elements (4 MB per float32 input: cache-sized, measured
# fastest on 2 MB-L2 CPUs) bound the memory of
# elementwise methods on large tensors and keep their buffers reusable.
CHUNK_ELEMENTS = 1 << 20
# Methods with a prepare pass keep a tensor's inputs in memory between passes when they
# fit in this many bytes (as float32); larger tensors are read again for each pass.
PREPARE_CACHE_BYTES = 256 * 1024**2


class FiniteCheck:
    """Warns once per input tensor holding NaN or Inf; with ``strict`` that is an error."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self._seen: set[tuple[str, str, tuple[int, int] | None]] = set()
        self._warned: set[tuple[str, str]] = set()

    def __call__(self, model: str, name: str, rows: tuple[int, int] | None,
                 tensor: torch.Tensor) -> None:
        import torch

        if (model, name, rows) in self._seen:
            return
        self._seen.add((model, name, rows))
        # one sum is finite only when every element is (NaN and Inf propagate), and is
        # ~20x faster than an elementwise test; an overflowing sum falls back to that test
        if (tensor.is_floating_point()
                and not bool(torch.isfinite(tensor.sum(dtype=torch.float32)))
                and not bool(torch.isfinite(tensor).all())):
            if self.strict:
                raise merge_failure(f"model {model}", f"tensor {name} holds NaN or Inf values",
                                    "fix the input model, or drop --strict-finite to merge "
                                    "anyway")
            if (model, name) not in self._warned:
                self._warned.add((model, name))
                log.warning("model %s: tensor %s holds NaN or Inf values; the merged tensor "
                            "may too (--strict-finite makes this an error)", model, name)


@contextmanager
def _restore_threads() -> Iterator[None]:
    """Give torch back the intra-op thread count it had (``execute_job`` changes it)."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _set_threads(threads: int | None, chunked: bool) -> None:
    """Row-chunk passes of elementwise methods are bound by memory, not arithmetic: on the
    CPU they leave one of ``threads`` cores to the output's writer and hasher threads
    (measured on 2 cores: linear and slerp merges 5% faster, ties unchanged). Whole-tensor
    work (prepare passes, other methods) uses them all. ``None``: leave torch's setting."""
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads - 1) if chunked else threads)


def execute_job(
    job: TensorJob, method: Method, sources: Mapping[str, ModelSource], device: torch.device,
    check: FiniteCheck | None = None, threads: int | None = None,
) -> Iterator[torch.Tensor]:
    """Merge one output tensor in float32 and cast it to the output dtype; yields the whole
    tensor, or consecutive row chunks of it when the method is elementwise. ``threads``:
    the CPU cores torch may use (see ``_set_threads``)."""
    import torch

    out_dtype = torch_dtype(job.dtype)
    if not job.compute:
        ref = job.base or job.inputs[0]
        yield _fit(sources[ref.model].read(ref.name), job.shape, None).to(out_dtype)
        return
    params = method.make_params(dict(job.params))
    if method.copies_input(params):  # the result is the input's bits: no float32 round trip
        (ref,) = job.inputs
        for rows in _row_chunks(job, method, params, sources):
            t = sources[ref.model].read(ref.name, rows)
            if check is not None:
                check(ref.model, ref.name, rows, t)
            yield _fit(t, job.shape if rows is None else tuple(t.shape), None).to(out_dtype)
        return

    row_numel = math.prod(job.shape[1:])

    def inputs(
        rows: tuple[int, int] | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, int]:
        """The chunk's float32 inputs and base, and the flat index of its first element."""
        def load(model: str, name: str) -> torch.Tensor:
            t = sources[model].read(name, rows).to(device=device, dtype=torch.float32,
                                                   non_blocking=True)
            if check is not None:
                check(model, name, rows, t)
            return t

        shape = job.shape if rows is None else (rows[1] - rows[0], *job.shape[1:])
        base = _fit(load(job.base.model, job.base.name), shape, None) if job.base else None
        offset = rows[0] * row_numel if rows else 0
        return [_fit(load(r.model, r.name), shape, base) for r in job.inputs], base, offset

    chunks = _row_chunks(job, method, params, sources)
    loaded = None
    _set_threads(threads, chunked=False)
    if method.prepare is not None:
        if _f32_bytes(job) <= PREPARE_CACHE_BYTES:  # read once, for every pass
            loaded = [inputs(rows) for rows in chunks]
            params = method.prepare(lambda: loaded, params)
        else:  # too large to hold: each pass reads the chunks again
            params = method.prepare(lambda: (inputs(rows) for rows in chunks), params)
    _set_threads(threads, chunked=len(chunks) > 1)
    for n, rows in enumerate(chunks):
        tensors, base, offset = loaded[n] if loaded is not None else inputs(rows)
        if method.random:  # draws follow the element's position in the whole tensor
            result = method.fn(tensors, base, params.model_copy(update={"offset": offset}))
        else:
            result = method.fn(tensors, base, params)
        shape = tensors[0].shape
        if result.shape != shape:
            raise RuntimeError(f"internal: {job.method} returned shape {tuple(result.shape)} "
                               f"for {job.output_name}, expected {tuple(shape)}")
        yield result.to(device="cpu", dtype=out_dtype)


def _f32_bytes(job: TensorJob) -> int:
    """Bytes of all of a job's inputs in float32."""
    return math.prod(job.shape) * 4 * (len(job.inputs) + (1 if job.base else 0))


def _row_chunks(
    job: TensorJob, method: Method, params: object, sources: Mapping[str, ModelSource]
) -> list[tuple[int, int] | None]:
    """[None] for one whole-tensor call, else row ranges covering the first dimension."""
    numel = math.prod(job.shape)
    # 1-D tensors stay whole: row-wise methods (della) treat them as one row
    if numel <= CHUNK_ELEMENTS or len(job.shape) < 2 or not method.runs_elementwise(params):
        return [None]
    refs = ([job.base] if job.base else []) + list(job.inputs)
    if any(sources[r.model].info(r.name).shape != job.shape for r in refs):
        return [None]  # inputs to crop or pad: do it on whole tensors
    step = max(1, CHUNK_ELEMENTS // max(1, numel // job.shape[0]))
    return [(i, min(i + step, job.shape[0])) for i in range(0, job.shape[0], step)]


def _fit(x: torch.Tensor, shape: tuple[int, ...], base: torch.Tensor | None) -> torch.Tensor:
    """Crop ``x`` to ``shape``; rows it lacks are taken from ``base`` (vocab mismatch)."""
    if tuple(x.shape) == shape:
        return x
    crop = x[tuple(slice(0, min(a, b)) for a, b in zip(x.shape, shape))]
    if tuple(crop.shape) == shape:
        return crop
    if base is None:
        raise RuntimeError(f"internal: cannot fit shape {tuple(x.shape)} to {shape}")
    out = base.clone()
    out[tuple(slice(0, d) for d in crop.shape)] = crop
    return out


def _write_artifacts(
    config: MergeConfiguration,
    plan: MergePlan,
    sources: Mapping[str, ModelSource],
    tmp: Path,
    out: Path,
    options: MergeOptions,
) -> None:
    from mergekit.io.card import model_card

    main = sources[plan.config_model]
    out_config = artifacts.output_config(sources, plan)
    (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    if (main.folder / "generation_config.json").is_file():
        shutil.copyfile(main.folder / "generation_config.json", tmp / "generation_config.json")
    if options.copy_tokenizer:
        folder = _tokenizer_folder(config, plan, sources, options)
        if not artifacts.copy_tokenizer(folder, tmp):
            log.warning("no tokenizer files found in %s; the output has no tokenizer", folder)
    if config.chat_template:
        artifacts.apply_chat_template(tmp, config.chat_template, list(sources.values()))
    (tmp / output_folder.MARKER).write_text(config.to_yaml())
    if options.write_model_card:
        (tmp / "README.md").write_text(model_card(config, out.name))


def _provenance(
    config: MergeConfiguration,
    plan: MergePlan,
    sources: Mapping[str, ModelSource],
    options: MergeOptions,
) -> dict[str, object]:
    """The manifest without the shards' sha256: what decides the output's bytes."""
    from mergekit import __version__
    from mergekit.config import recipe_to_plain
    from mergekit.io.manifest import manifest

    read: dict[str, set[str]] = {}
    for job in plan.jobs:
        for ref in job.inputs + ((job.base,) if job.base else ()):
            read.setdefault(ref.model, set()).add(sources[ref.model].weight_map[ref.name])
    # the options that change the output's bytes
    result_options: dict[str, object] = {"out_shard_size": options.out_shard_size}
    if get_method(plan.method).random:
        result_options["random_seed"] = options.random_seed
    record = manifest(__version__, recipe_to_plain(config), result_options, sources, read, {},
                      options.hash_inputs)
    del record["shards"]
    return record


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

