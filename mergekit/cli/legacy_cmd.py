"""mergekit-legacy OUT --base-model B --merge M --weight W --density D ...: the original
flag-driven command line, translated to a recipe and run by the same engine."""

from pathlib import Path
from typing import Annotated

import typer

from mergekit.cli.edge import command_app, run_app
from mergekit.cli.merge_command import merge_command, run_recipe

app = command_app()


@app.command()
@merge_command
def mergekit_legacy(
    out_path: Annotated[Path | None, typer.Argument(metavar="OUT",
                        help="Output model folder.")] = None,
    base_model: Annotated[str | None, typer.Option(
        "--base-model", metavar="MODEL", help="The base model.")] = None,
    merge: Annotated[list[str] | None, typer.Option(
        "--merge", metavar="MODEL", help="A model to merge (repeat for several).")] = None,
    weight: Annotated[list[float] | None, typer.Option(
        "--weight", metavar="W", help="Weight: once for all --merge models, or once per "
        "--merge, in order. For slerp, the single t.")] = None,
    density: Annotated[list[float] | None, typer.Option(
        "--density", metavar="D", help="Density: once for all, or once per --merge.")] = None,
    method: Annotated[str, typer.Option("--method", metavar="NAME", help="Merge method (see "
                                        "mergekit-methods).")] = "ties",
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize",
                         help="Divide by the sum of the weights.")] = True,
    int8_mask: Annotated[bool, typer.Option("--int8-mask", help="Store masks as int8.")
                         ] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="Save in bfloat16.")] = False,
    naive_count: Annotated[bool, typer.Option(
        "--naive-count", help="Elect signs by counting them instead of summing weighted "
        "deltas (consensus: count).")] = False,
    print_yaml: Annotated[bool, typer.Option(
        "--print-yaml", help="Print the equivalent recipe and exit without merging.")
                          ] = False,
    flags: dict | None = None,
) -> None:
    """Merge models given on the command line (the original mergekit script's flags)."""
    from mergekit.wrappers.legacy import legacy_recipe

    run_recipe(
        lambda: legacy_recipe(
            base_model=base_model, merges=merge or [], weights=weight or [],
            densities=density or [], method=method, normalize=normalize,
            int8_mask=int8_mask, bf16=bf16, naive_count=naive_count),
        out_path, flags or {}, print_yaml=print_yaml, source="mergekit-legacy")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
