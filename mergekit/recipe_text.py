"""How user data and YAML paths appear in messages: short reprs and field locations."""

from __future__ import annotations

import reprlib
from typing import Any


def short_repr(value: Any) -> str:
    """A one-line repr of user data, cut short: recipes may hold huge or aliased values."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict = 2, 6, 6, 4
    short.maxset = short.maxfrozenset = 4
    short.maxstring = short.maxother = 60
    text = short.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def yaml_key(key: Any) -> str:
    """A mapping key as a location names it: quoted (and cut short) where it is empty, long,
    or has line breaks or other unprintable characters."""
    text = key if isinstance(key, str) else str(key)
    plain = text and text.isprintable() and text.strip() == text and len(text) <= 200
    return text if plain else short_repr(text)


def yaml_location(loc: tuple[Any, ...]) -> str:
    """('slices', 1, 'sources', 0, 'layer_range') -> 'slices[1].sources[0].layer_range'."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif out:
            out += f".{yaml_key(part)}"
        else:
            out = yaml_key(part)
    return out
