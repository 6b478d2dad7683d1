"""mergekit-verify OUT: check every file in OUT against the manifest the merge wrote."""

import sys
from pathlib import Path
from typing import Annotated

import typer

from mergekit.cli.edge import command_app, guarded, run_app

app = command_app()


@app.command()
def mergekit_verify(
    out_path: Annotated[Path, typer.Argument(metavar="OUT", help="A merged model folder.")],
) -> None:
    """Check that OUT holds exactly what the merge wrote (its mergekit_manifest.json): every
    file's size and sha256, the shards' headers against the index, and no other file;
    exit 0 when all match, 1 when anything differs, 2 when OUT or its manifest is unusable."""
    from mergekit.io.verify import printable, verify

    verdict = guarded(lambda: verify(out_path), verbose=False)
    out = printable(str(out_path))
    for line in verdict.notes + verdict.problems:
        print(f"{out}: {printable(line)}", file=sys.stderr)
    if verdict.problems:
        raise typer.Exit(1)
    index = "; the index agrees with the shards' headers" if verdict.indexed else ""
    if verdict.files_recorded:
        print(f"{out}: every file matches the manifest ({_count(verdict.shards, 'shard')} and "
              f"{_count(verdict.files, 'other file')}){index}")
    else:
        print(f"{out}: every shard matches the manifest ({_count(verdict.shards, 'shard')})"
              f"{index}")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"

def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
