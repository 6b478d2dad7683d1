"""mergekit: merge pre-trained language models in weight space."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergekit.version import __version__ as __version__

__all__ = ["MergeConfiguration", "MergeOptions", "MergeError", "run_merge"]

if TYPE_CHECKING:
    from mergekit.config import MergeConfiguration
    from mergekit.errors import MergeError
    from mergekit.options import MergeOptions
    from mergekit.run import run_merge


def __getattr__(name: str) -> Any:
    # Lazy: importing mergekit stays instant; torch loads only when a merge runs.
    if name == "MergeConfiguration":
        from mergekit.config import MergeConfiguration

        return MergeConfiguration
    if name == "MergeOptions":
        from mergekit.options import MergeOptions

        return MergeOptions
    if name == "MergeError":
        from mergekit.errors import MergeError

        return MergeError
    if name == "run_merge":
        from mergekit.run import run_merge

        return run_merge
    raise AttributeError(f"module 'mergekit' has no attribute {name!r}")
