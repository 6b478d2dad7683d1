"""Shared by every command that runs a merge: the merge flags, added to a typer command's
signature once, and the step from a recipe (file or translated dict) to ``run_merge``."""

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergekit.cli import merge_flags as f
from mergekit.cli.edge import guarded, setup_logging
from mergekit.errors import usage_error

# (parameter name, typer annotation, default) of every flag that becomes a MergeOptions field
MERGE_FLAGS: list[tuple[str, Any, Any]] = [
    ("cuda", f.Cuda, False),
    ("device", f.Device, None),
    ("out_shard_size", f.OutShardSize, "5B"),
    ("copy_tokenizer", f.CopyTokenizer, True),
    ("allow_crimes", f.AllowCrimes, False),
    ("lazy_unpickle", f.LazyUnpickle, False),
    ("random_seed", f.RandomSeed, None),
    ("clone_tensors", f.CloneTensors, False),
    ("trust_remote_code", f.TrustRemoteCode, False),
    ("transformers_cache", f.TransformersCache, None),
    ("write_model_card", f.WriteModelCard, True),
    ("verbose", f.Verbose, False),
    ("quiet", f.Quiet, False),
    ("dry_run", f.DryRun, False),
    ("strict_finite", f.StrictFinite, False),
    ("allow_nonfinite", f.AllowNonfinite, False),
    ("hash_inputs", f.HashInputs, False),
    ("lora_out", f.LoraOut, None),
    ("lora_merge_cache", f.LoraMergeCache, None),
    ("lora_merge_dtype", f.LoraMergeDtype, None),
    ("resume", f.Resume, True),
    ("overwrite", f.Overwrite, False),
]


def merge_command(fn: Callable[..., None]) -> Callable[..., None]:
    """Append the merge flags to ``fn``'s command-line signature; ``fn`` receives them as
    one dict argument named ``flags``."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.name != "flags"]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                          annotation=annotation)
        for name, annotation, default in MERGE_FLAGS
    ]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> None:
        flags = {name: kwargs.pop(name) for name, _, _ in MERGE_FLAGS}
        setup_logging(flags["verbose"], flags["quiet"])
        fn(flags=flags, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {}
    return wrapper


def merge_options(flags: dict[str, Any]) -> Any:
    from mergekit.options import MergeOptions, parse_size

    values = dict(flags)
    try:
        values["out_shard_size"] = parse_size(values["out_shard_size"])
    except ValueError as exc:
        raise usage_error("--out-shard-size", str(exc)) from None
    return MergeOptions(**values)


def run_recipe(
    recipe: Callable[[], dict[str, Any]],
    out: Path | None,
    flags: dict[str, Any],
    *,
    print_yaml: bool = False,
    write_yaml: Path | None = None,
    source: str = "recipe",
) -> None:
    """Translate (``recipe`` builds the dict, raising MergeError on bad flags), validate,
    then print, save or run it."""

    def run() -> None:
        from mergekit.config import parse_config

        options = merge_options(flags)
        if write_yaml is not None:  # before the recipe's translation reads any header
            _check_writable(write_yaml)
        config = parse_config(recipe(), source)
        if write_yaml is not None:
            try:
                write_yaml.write_text(config.to_yaml())
            except OSError as exc:
                raise usage_error(f"--write-yaml {write_yaml}", f"cannot write the recipe "
                                  f"({exc.strerror})", "give a writable file path") from None
        if print_yaml:
            print(config.to_yaml(), end="")
            return
        if out is None:
            raise usage_error("OUT", "no output folder given", "name one, or use --print-yaml")
        from mergekit.process_tuning import tune_process

        tune_process()  # before torch is imported
        from mergekit.run import run_merge

        run_merge(config, out, options)

    guarded(run, flags["verbose"])


def _check_writable(path: Path) -> None:
    """--write-yaml's folder exists and the path is not a folder (it is relative to the
    current folder, not to OUT)."""
    folder = path.parent
    if not folder.is_dir():
        raise usage_error(f"--write-yaml {path}", f"{folder} is not an existing folder",
                          "create it first, or give a path in an existing folder")
    if path.is_dir():
        raise usage_error(f"--write-yaml {path}", "is a folder", "give a file path")
