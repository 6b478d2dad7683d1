"""mergekit-extract-lora --model FINETUNED --base-model BASE --out-path OUT: the difference
between a fine-tune and its base as a peft LoRA adapter (truncated SVD of each changed
matrix). Flags as mergekit 0.1.x spells them."""

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from mergekit.cli import merge_flags as f
from mergekit.cli.edge import command_app, guarded, run_app, setup_logging

app = command_app()


@app.command()
def mergekit_extract_lora(
    model: Annotated[str, typer.Option("--model", metavar="MODEL",
                                       help="The fine-tuned model (folder or hub id).")],
    base_model: Annotated[str, typer.Option("--base-model", metavar="BASE",
                                            help="The model it was fine-tuned from.")],
    out_path: Annotated[Path, typer.Option("--out-path", metavar="OUT",
                                           help="Output folder for the adapter.")],
    max_rank: Annotated[int, typer.Option("--max-rank", metavar="R",
                                          help="Largest rank of a LoRA module.")] = 128,
    sv_epsilon: Annotated[float, typer.Option(
        "--sv-epsilon", metavar="EPS",
        help="Drop singular values at or below this (a module's rank may fall below "
        "--max-rank).")] = 0.0,
    distribute_scale: Annotated[bool, typer.Option(
        "--distribute-scale/--no-distribute-scale",
        help="Split the singular values between A and B as square roots (default), or put "
        "them all in B (A's rows orthonormal).")] = True,
    embed_lora: Annotated[bool, typer.Option(
        "--embed-lora/--no-embed-lora",
        help="Factor the input embedding too, instead of saving it whole.")] = False,
    save_module: Annotated[list[str] | None, typer.Option(
        "--save-module", metavar="MODULE",
        help="Save this module whole (modules_to_save): a full name or its last part; "
        "repeatable.")] = None,
    exclude_regex: Annotated[str | None, typer.Option(
        "--exclude-regex", "-e", metavar="REGEX",
        help="Leave out modules whose name this matches (re.search).")] = None,
    include_regex: Annotated[str | None, typer.Option(
        "--include-regex", "-i", metavar="REGEX",
        help="Only modules whose name this matches (re.search).")] = None,
    skip_undecomposable: Annotated[bool, typer.Option(
        "--skip-undecomposable",
        help="Leave out changed weights that are not factored (norms, biases, a resized "
        "vocabulary) instead of saving them whole.")] = False,
    random_seed: f.RandomSeed = None,
    cuda: Annotated[bool, typer.Option(
        "--cuda", help="Accepted for compatibility; the SVD runs on the CPU.")] = False,
    transformers_cache: f.TransformersCache = None,
    trust_remote_code: f.TrustRemoteCode = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Compare the two models' weights and print what happens to each; "
        "no SVD, nothing written.")] = False,
    overwrite: f.Overwrite = False,
    verbose: f.Verbose = False,
    quiet: Annotated[bool, typer.Option("--quiet/--no-quiet", "-q",
                                        help="No progress bar or info lines.")] = False,
) -> None:
    """Write to OUT a LoRA adapter that turns BASE into MODEL: each changed matrix as the
    truncated SVD of its difference, the changed weights that cannot be factored whole
    (modules_to_save). It loads with peft's PeftModel.from_pretrained(BASE, OUT)."""
    setup_logging(verbose, quiet)

    def run() -> None:
        from mergekit.surgery.extract_lora import Options, compile_regex
        from mergekit.surgery.extract_lora_run import Request, extract_lora

        options = Options(max_rank, embed_lora, skip_undecomposable,
                          compile_regex("--include-regex", include_regex),
                          compile_regex("--exclude-regex", exclude_regex),
                          tuple(save_module or ()))
        command = shlex.join(["mergekit-extract-lora", *sys.argv[1:]])
        request = Request(model, base_model, out_path, options, sv_epsilon, distribute_scale,
                          random_seed or 0, command)
        extract_lora(request, dry_run, overwrite, quiet, transformers_cache)

    guarded(run, verbose)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
