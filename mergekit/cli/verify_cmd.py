"""mergekit-verify OUT: recompute the output shards' sha256 and compare with the manifest."""

import sys
from pathlib import Path
from typing import Annotated

import typer

from mergekit.cli.edge import guarded, run_app

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


@app.command()
def mergekit_verify(
    out_path: Annotated[Path, typer.Argument(metavar="OUT", help="A merged model folder.")],
) -> None:
    """Check that the weight shards in OUT are the ones the merge wrote (its
    mergekit_manifest.json); exit 0 when all match, 1 when any differs."""
    from mergekit.io.manifest import verify

    problems = guarded(lambda: verify(out_path), verbose=False)
    for problem in problems:
        print(f"{out_path}: {problem}", file=sys.stderr)
    if problems:
        raise typer.Exit(1)
    print(f"{out_path}: every shard matches the manifest")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
