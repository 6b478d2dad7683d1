"""Recipe YAML to plain data: parsed by libyaml where PyYAML has it, composed here so that
duplicate keys, runaway aliases and deep nesting are refused, with their line."""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from mergekit.errors import usage_error

# Values that aliases may add beyond those written out. A recipe reuses a few blocks
# (shared parameters, a gradient): thousands of values. Alias bombs reach billions, and a
# few million cost gigabytes once validated and copied into the card and the manifest.
MAX_ALIAS_VALUES = 100_000
# Far deeper than any recipe (about ten levels); stops the parse early, as libyaml's
# scanner is quadratic in flow nesting and its own composer overflows the C stack.
MAX_DEPTH = 100


def add_exponent_floats(resolver: type[Resolver]) -> None:
    """Resolve the floats YAML 1.2 has and YAML 1.1 lacks (``1e-5``, ``1.5e3``: 1.1 wants a
    dot and a signed exponent), which PyYAML would read as strings. The recipe dumper has
    them too, so that a string written so is quoted."""
    resolver.add_implicit_resolver(  # copies the class's table before adding to it
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))


class _RecipeResolver(Resolver):
    pass


add_exponent_floats(_RecipeResolver)


class _Refused(Exception):
    """A document refused while composing: the mark of the node, what, and the fix."""

    def __init__(self, mark: Any, what: str, fix: str) -> None:
        super().__init__(what)
        self.mark, self.what, self.fix = mark, what, fix


class _CheckedComposer(Composer):
    """PyYAML's composer, counting what each node expands to (aliases included), refusing
    a key written twice in one mapping, and nesting past MAX_DEPTH."""

    def __init__(self) -> None:
        super().__init__()
        self._values: dict[int, int] = {}  # id(node) -> values it expands to
        self._alias_values = 0
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None:  # an undefined one is PyYAML's error
                values = self._values.get(id(target))
                if values is None:  # still being composed
                    raise _Refused(event.start_mark, f"the alias *{event.anchor} is inside "
                                   "the value it names", "a recipe value cannot hold itself")
                self._alias_values += values
                if self._alias_values > MAX_ALIAS_VALUES:
                    raise _Refused(event.start_mark, "aliases expand the recipe past "
                                   f"{MAX_ALIAS_VALUES} values",
                                   "reuse smaller blocks, or fewer times")
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(self.peek_event().start_mark, "malformed YAML (nested too deeply)",
                           "flatten the recipe")
        node = super().compose_node(parent, index)
        self._depth -= 1
        if isinstance(node, ScalarNode):
            self._values[id(node)] = 1
        elif isinstance(node, MappingNode):
            self._values[id(node)] = 1 + sum(self._values[id(k)] + self._values[id(v)]
                                             for k, v in node.value)
        else:
            self._values[id(node)] = 1 + sum(self._values[id(v)] for v in node.value)
        return node

    def compose_mapping_node(self, anchor: str | None) -> Node:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], int] = {}  # (tag, text) -> line
        for key, _ in node.value:
            if not isinstance(key, ScalarNode):
                continue  # a list or mapping as a key: refused when constructed
            if (key.tag, key.value) in seen:  # the later value would silently win
                name = repr(key.value)
                name = name if len(name) <= 60 else name[:57] + "..."
                raise _Refused(key.start_mark, f"duplicate key {name} (also on line "
                               f"{seen[key.tag, key.value]})", "keep one of them")
            seen[key.tag, key.value] = key.start_mark.line + 1
        return node


class PyLoader(Reader, Scanner, Parser, _CheckedComposer, SafeConstructor, _RecipeResolver):
    """PyYAML's own parser: used where PyYAML was built without libyaml."""

    byte_offsets = False

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        _CheckedComposer.__init__(self)
        SafeConstructor.__init__(self)
        _RecipeResolver.__init__(self)


def _libyaml_loader() -> type | None:
    try:
        from yaml.cyaml import CParser
    except ImportError:
        return None

    # libyaml's events, composed by the checked composer (ahead of CParser's own in the MRO)
    class LibyamlLoader(_CheckedComposer, CParser, SafeConstructor, _RecipeResolver):
        byte_offsets = True  # libyaml's reader errors count UTF-8 bytes

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _CheckedComposer.__init__(self)
            SafeConstructor.__init__(self)
            _RecipeResolver.__init__(self)

    return LibyamlLoader


# A few times faster than PyYAML's own parser on a large recipe; most of the rest is
# PyYAML's resolver and constructor, in Python either way.
LOADER: type = _libyaml_loader() or PyLoader


def load_yaml(text: str, source: str) -> Any:
    """The plain data of one YAML document; errors are one-line usage errors naming
    ``source`` and, where there is one, the line and column."""
    loader = None
    try:
        loader = LOADER(text)  # PyYAML's reader checks the characters here
        node = loader.get_single_node()
        return None if node is None else loader.construct_document(node)
    except _Refused as exc:
        where = f"{source}:{exc.mark.line + 1}:{exc.mark.column + 1}"
        raise usage_error(where, exc.what, exc.fix) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.character, int):
            offset = exc.position
            if LOADER.byte_offsets:  # in characters, as PyYAML counts
                offset = len(text.encode("utf-8")[:offset].decode("utf-8", "ignore"))
            problem = f"unacceptable character #x{exc.character:04x} at offset {offset}"
        else:
            problem = getattr(exc, "problem", None) or str(exc)
        problem = " ".join(problem.split())  # one line
        if "maximum nesting depth" in problem:  # libyaml's own limit, met first in flow style
            raise usage_error(where, "malformed YAML (nested too deeply)",
                              "flatten the recipe") from None
        raise usage_error(where, f"malformed YAML ({problem})", "fix the syntax") from None
    except RecursionError:
        raise usage_error(source, "malformed YAML (nested too deeply)",
                          "flatten the recipe") from None
    finally:
        if loader is not None:
            loader.dispose()

