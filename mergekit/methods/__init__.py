"""Merge methods, one module each; importing this package registers them all."""

from mergekit.methods import linear, passthrough, slerp, ties  # noqa: F401
