"""mergekit-layershuffle OUT --model A --weight 0.5 --model B --weight 0.5: a random
layer-by-layer patchwork of same-depth models, run as a passthrough merge."""

from pathlib import Path
from typing import Annotated

import typer

from mergekit.cli.edge import command_app, run_app
from mergekit.cli.merge_command import merge_command, run_recipe

app = command_app()


@app.command()
@merge_command
def mergekit_layershuffle(
    out_path: Annotated[Path | None, typer.Argument(metavar="OUT",
                        help="Output model folder.")] = None,
    model: Annotated[list[str] | None, typer.Option(
        "--model", metavar="MODEL", help="A model to draw layers from (repeat).")] = None,
    weight: Annotated[list[float] | None, typer.Option(
        "--weight", metavar="W",
        help="Relative chance of each --model, in order (one per --model).")] = None,
    print_yaml: Annotated[bool, typer.Option(
        "--print-yaml", help="Print the recipe and exit without merging.")] = False,
    write_yaml: Annotated[Path | None, typer.Option(
        "--write-yaml", metavar="PATH", help="Also save the recipe to PATH.")] = None,
    flags: dict | None = None,
) -> None:
    """For each layer position pick a source model at random, in proportion to the weights,
    and merge the result (all models need the same layer count). --random-seed makes the
    draw reproducible."""
    from mergekit.wrappers.layershuffle import layershuffle_from_models

    flags = flags or {}
    run_recipe(
        lambda: layershuffle_from_models(model or [], weight or [], flags["random_seed"],
                                         flags["transformers_cache"]),
        out_path, flags, print_yaml=print_yaml, write_yaml=write_yaml,
        source="mergekit-layershuffle")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
