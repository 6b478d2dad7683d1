"""Checks shared by the hostile-input tests: a hash of a folder tree (to show that nothing
outside OUT changed) and that OUT holds nothing partial."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path


def tree_digest(root: Path, skip: Iterable[Path] = ()) -> dict[str, str]:
    """{relative path: sha256 of the content, or the link target, or 'dir'} of every entry
    under ``root``, not following links, leaving out the ``skip`` paths and what is below
    them. Compare two digests to see that nothing changed."""
    skipped = {Path(os.path.abspath(p)) for p in skip}
    root = Path(os.path.abspath(root))
    out: dict[str, str] = {}
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if here / d not in skipped)
        for name in sorted(dirs + names):
            path = here / name
            if path in skipped:
                continue
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_nothing_partial(out: Path) -> None:
    """Neither OUT nor its temporary folder ``.OUT.partial`` exists."""
    out = Path(os.path.abspath(out))
    assert not out.exists(), f"{out} exists: {sorted(p.name for p in out.iterdir())}"
    tmp = out.parent / f".{out.name}.partial"
    assert not tmp.exists(), f"{tmp} was left behind"
