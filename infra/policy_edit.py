"""Small edits of a policy's YAML text that keep its comments and layout. Pure: no I/O.

:func:`set_values` sets values at dotted paths (``agents.billing-agent.limits.run.value``)
by editing the text where the value lives: a scalar is replaced in place, a missing key is
inserted as indented block lines after the last line of its parent mapping (or appended at
the end for a missing top-level key), and a flow mapping (``run: {value: 2000}``) is
re-rendered as a flow mapping. The result is checked by loading it: when it does not hold
exactly the intended data (an exotic layout), the whole document is dumped instead and
``EditResult.rewritten`` says the comments were lost. :func:`unified_diff` shows the change.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import yaml

from backout.schemas.errors import ConfigError

Path: TypeAlias = tuple[str, ...]
Value: TypeAlias = int | float | str | list[str]


@dataclass(frozen=True)
class EditResult:
    """The edited text and how it was made."""

    text: str
    rewritten: bool
    """True when the document had to be dumped whole (comments and layout lost)."""


def with_values(data: Mapping[str, Any] | None, changes: Mapping[Path, Value]) -> dict[str, Any]:
    """A deep copy of ``data`` with ``changes`` set (missing or null mappings are created).

    Raises:
        ConfigError: a path runs through a value that is not a mapping.
    """
    out: dict[str, Any] = copy.deepcopy(dict(data or {}))
    for path, value in changes.items():
        node = out
        for depth, key in enumerate(path[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"cannot set {'.'.join(path)}: {where} is not a mapping")
            node = child
        node[path[-1]] = copy.deepcopy(value)
    return out


def set_values(text: str, changes: Mapping[Path, Value]) -> EditResult:
    """``text`` with ``changes`` applied, keeping comments and layout where possible.

    Raises:
        ConfigError: the text is not a YAML mapping, or a path runs through a non-mapping.
    """
    original = yaml.safe_load(text) if text.strip() else {}
    if original is None:
        original = {}
    if not isinstance(original, dict):
        raise ConfigError("the policy is not a YAML mapping")
    wanted = with_values(original, changes)
    edited = text
    try:
        for path, value in changes.items():
            edited = _set_one(edited, path, value)
        if yaml.safe_load(edited) == wanted:
            return EditResult(edited, False)
    except (yaml.YAMLError, _Unsupported):
        pass
    return EditResult(yaml.safe_dump(wanted, sort_keys=False, allow_unicode=True), True)


def unified_diff(old: str, new: str, *, name: str = "policy.yaml") -> str:
    """A unified diff of two texts (``a/NAME`` -> ``b/NAME``); empty when they are equal."""
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=f"a/{name}",
            tofile=f"b/{name}",
        )
    )


# --- text surgery --------------------------------------------------------------------------
class _Unsupported(Exception):
    """A layout the text edit does not handle (the caller dumps the document instead)."""


def render(value: object) -> str:
    """A value as one line of YAML (flow style for lists and mappings)."""
    text = yaml.safe_dump(
        value, default_flow_style=True, width=1_000_000, allow_unicode=True, sort_keys=False
    )
    text = text.strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")].strip()
    elif text.endswith("..."):
        text = text[:-3].strip()
    return text


def _set_one(text: str, path: Path, value: Value) -> str:
    root = yaml.compose(text, Loader=yaml.SafeLoader) if text.strip() else None
    step = _indent_step(root)
    if root is None or _is_null(root):
        return _append(text, _block(path, value, 0, step))
    if not isinstance(root, yaml.MappingNode):
        raise _Unsupported("the document is not a mapping")
    node: yaml.Node = root
    for depth, key in enumerate(path):
        assert isinstance(node, yaml.MappingNode)
        last = depth == len(path) - 1
        if node.flow_style:
            return _replace(text, node, render(_flow_data(text, node, path[depth:], value)))
        found = next((v for k, v in node.value if str(k.value) == key), None)
        if found is None:
            indent = node.value[0][0].start_mark.column if node.value else 0
            lines = _block(path[depth:], value, indent, step)
            if node is root:
                return _append(text, lines)
            return _insert_after(text, _last_line(node), lines)
        if last:
            if isinstance(found, yaml.ScalarNode) and not _is_null(found):
                return _replace(text, found, render(value))
            if isinstance(found, yaml.SequenceNode):
                return _replace(text, found, render(value))
            raise _Unsupported(f"{'.'.join(path)} is not a plain value")
        if _is_null(found):
            key_node = next(k for k, v in node.value if v is found)
            lines = _block(path[depth + 1 :], value, key_node.start_mark.column + step, step)
            return _insert_after(text, key_node.start_mark.line, lines)
        if not isinstance(found, yaml.MappingNode):
            raise _Unsupported(f"{'.'.join(path[: depth + 1])} is not a mapping")
        node = found
    raise _Unsupported("empty path")


def _flow_data(text: str, node: yaml.MappingNode, rest: Path, value: Value) -> dict[str, Any]:
    current = yaml.safe_load(text[node.start_mark.index : node.end_mark.index]) or {}
    return with_values(current, {rest: value})


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _indent_step(root: yaml.Node | None) -> int:
    """The document's indentation step (2 when it cannot tell)."""
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if isinstance(value, yaml.MappingNode) and not value.flow_style and value.value:
                step = int(value.value[0][0].start_mark.column - key.start_mark.column)
                if step > 0:
                    return step
    return 2


def _last_line(node: yaml.Node) -> int:
    """The 0-based line holding the end of ``node``'s last value."""
    while isinstance(node, yaml.MappingNode | yaml.SequenceNode) and not node.flow_style:
        if not node.value:
            break
        tail = node.value[-1]
        node = tail[1] if isinstance(tail, tuple) else tail
    end = node.end_mark
    # A block scalar (|, >) ends at column 0 of the line after its content.
    return end.line - 1 if end.column == 0 and end.line > node.start_mark.line else end.line


def _block(path: Sequence[str], value: Value, indent: int, step: int) -> list[str]:
    lines = []
    for depth, key in enumerate(path):
        pad = " " * (indent + depth * step)
        if depth == len(path) - 1:
            lines.append(f"{pad}{render(key)}: {render(value)}")
        else:
            lines.append(f"{pad}{render(key)}:")
    return lines


def _replace(text: str, node: yaml.Node, new: str) -> str:
    start, end = node.start_mark.index, node.end_mark.index
    span = text[start:end]
    trailing = span[len(span.rstrip()) :]  # a block collection's span ends after its newline
    return text[:start] + new + trailing + text[end:]


def _insert_after(text: str, line: int, lines: Sequence[str]) -> str:
    rows = text.splitlines(keepends=True)
    if rows and not rows[-1].endswith("\n"):
        rows[-1] += "\n"
    rows[line + 1 : line + 1] = [row + "\n" for row in lines]
    return "".join(rows)


def _append(text: str, lines: Sequence[str]) -> str:
    if text and not text.endswith("\n"):
        text += "\n"
    return text + "".join(row + "\n" for row in lines)


__all__ = ["EditResult", "render", "set_values", "unified_diff", "with_values"]
