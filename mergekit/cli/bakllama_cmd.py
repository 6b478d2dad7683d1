"""bakllama CONFIG OUT: layer recombination from a bakllama file, run as a passthrough
merge by the same engine."""

from pathlib import Path
from typing import Annotated

import typer

from mergekit.cli.edge import command_app, run_app
from mergekit.cli.merge_command import merge_command, run_recipe

app = command_app()


@app.command()
@merge_command
def bakllama(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG",
                                                help="The bakllama YAML file.")],
    out_path: Annotated[Path | None, typer.Argument(metavar="OUT",
                        help="Output model folder.")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Save in float16.")] = False,
    print_yaml: Annotated[bool, typer.Option(
        "--print-yaml", help="Print the equivalent recipe and exit without merging.")
                          ] = False,
    flags: dict | None = None,
) -> None:
    """Stack layer slices of models into a new model (bakllama format: layer_slices,
    embedding_source, lm_head_source)."""
    from mergekit.wrappers.bakllama import load_bakllama

    run_recipe(lambda: load_bakllama(config_file, fp16), out_path, flags or {},
               print_yaml=print_yaml, source=str(config_file))


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
