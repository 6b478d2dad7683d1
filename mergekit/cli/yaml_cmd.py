"""mergekit-yaml CONFIG OUT: run a merge recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit.cli import merge_flags as f
from mergekit.cli.edge import guarded, setup_logging
from mergekit.errors import usage_error

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


@app.command()
def mergekit_yaml(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG", help="The YAML recipe.")],
    out_path: Annotated[Path, typer.Argument(metavar="OUT", help="Output model folder.")],
    cuda: f.Cuda = False,
    device: f.Device = None,
    out_shard_size: f.OutShardSize = "5B",
    copy_tokenizer: f.CopyTokenizer = True,
    allow_crimes: f.AllowCrimes = False,
    lazy_unpickle: f.LazyUnpickle = False,
    random_seed: f.RandomSeed = None,
    clone_tensors: f.CloneTensors = False,
    trust_remote_code: f.TrustRemoteCode = False,
    transformers_cache: f.TransformersCache = None,
    write_model_card: f.WriteModelCard = True,
    verbose: f.Verbose = False,
    quiet: f.Quiet = False,
    dry_run: f.DryRun = False,
) -> None:
    """Merge models as the YAML recipe CONFIG says and write the result to OUT.

    OUT appears only when the merge is complete. Methods and their parameters:
    see the README, or `mergekit-yaml` recipe errors, which list them.
    """
    options = dict(locals())
    config_path = options.pop("config_file")
    out = options.pop("out_path")
    setup_logging(verbose, quiet)

    def run() -> None:
        from mergekit.config import load_config
        from mergekit.options import MergeOptions, parse_size

        try:
            options["out_shard_size"] = parse_size(out_shard_size)
        except ValueError as exc:
            raise usage_error("--out-shard-size", str(exc)) from None
        config = load_config(config_path)
        from mergekit.run import run_merge

        run_merge(config, out, MergeOptions(**options))

    guarded(run, verbose)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
