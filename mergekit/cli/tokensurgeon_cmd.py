"""mergekit-tokensurgeon MODEL DONOR OUT: give MODEL the DONOR's tokenizer, so that models
with different tokenizers can be merged afterwards."""

from pathlib import Path
from typing import Annotated

import typer

from mergekit.cli import merge_flags as f
from mergekit.cli.edge import command_app, guarded, run_app, setup_logging

app = command_app()


@app.command()
def mergekit_tokensurgeon(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="The model folder to change.")],
    donor: Annotated[Path, typer.Argument(metavar="DONOR",
                                          help="The model folder whose tokenizer to take.")],
    out_path: Annotated[Path, typer.Argument(metavar="OUT", help="Output model folder.")],
    approximation_method: Annotated[str, typer.Option(
        "--approximation-method", "-a", metavar="METHOD",
        help="How to make rows for the donor's tokens that MODEL lacks: omp (sparse "
        "combination of shared tokens fitted on the donor's embeddings), mean, zero or "
        "subword (mean of MODEL's pieces of the token's text).")] = "omp",
    k: Annotated[int, typer.Option("--k", "-k", metavar="K",
                                   help="Shared tokens per omp approximation.")] = 64,
    trust_remote_code: f.TrustRemoteCode = False,
    overwrite: f.Overwrite = False,
    verbose: f.Verbose = False,
    quiet: f.Quiet = False,
) -> None:
    """Write to OUT the MODEL with the DONOR's tokenizer: the embedding (and an untied
    head) gets the DONOR's vocabulary; tokens both have keep MODEL's rows exactly, the
    others are approximated. Every other tensor is copied unchanged."""
    setup_logging(verbose, quiet)

    def run() -> None:
        from mergekit.surgery.tokensurgeon_run import tokensurgeon

        tokensurgeon(model, donor, out_path, approximation_method, k, overwrite, quiet)

    guarded(run, verbose)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
