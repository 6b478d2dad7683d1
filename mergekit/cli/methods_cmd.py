"""mergekit-methods: list every merge method with its parameters and defaults."""

from __future__ import annotations

from typing import Annotated

import typer

from mergekit.cli.edge import command_app, run_app

app = command_app()


@app.command()
def mergekit_methods(
    name: Annotated[str | None, typer.Argument(help="Show only this method.")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the README table.")] = False,
) -> None:
    """List the merge methods a recipe's merge_method can name, with their parameters."""
    from mergekit.cli.edge import guarded
    from mergekit.methods.registry import get_method
    from mergekit.reference import method_details, method_listing, method_table

    def show() -> None:
        if markdown:
            print(method_table())
        elif name:
            print(method_details(get_method(name, where=name)))
        else:
            print(method_listing())

    guarded(show, verbose=False)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
