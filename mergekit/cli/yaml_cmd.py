"""mergekit-yaml CONFIG OUT: run a merge recipe."""

from pathlib import Path
from typing import Annotated

import typer

from mergekit.cli.edge import command_app, run_app
from mergekit.cli.merge_command import merge_command, run_recipe

app = command_app()


@app.command()
@merge_command
def mergekit_yaml(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG", help="The YAML recipe.")],
    out_path: Annotated[Path, typer.Argument(metavar="OUT", help="Output model folder.")],
    flags: dict | None = None,
) -> None:
    """Merge models as the YAML recipe CONFIG says and write the result to OUT.

    OUT appears only when the merge is complete. `mergekit-methods` lists the merge
    methods and their parameters; the README describes every recipe field.
    """

    def recipe() -> dict:
        from mergekit.config import read_recipe

        return read_recipe(config_file)

    run_recipe(recipe, out_path, flags or {}, source=str(config_file))


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
