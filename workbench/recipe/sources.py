"""The YAML text of a recipe with the line of every field, for error messages that name a line.

:class:`LocatedSource` reads recipe text safely (size of the expansion, nesting depth and duplicate
keys checked before anything walks it) and maps every field path to its 1-based line;
:func:`format_path` writes a field path as ``models[0].parameters.weight``. It knows nothing of the
recipe schema, so both :mod:`workbench.recipe.schema` and :mod:`workbench.recipe.mergekit` use it.
"""

from __future__ import annotations

from typing import Any

import yaml

from workbench.errors import RecipeError

#: Limits on a recipe's YAML (real recipes are kilobytes, a few levels deep, with a few aliases). A
#: larger file is not read; a document nesting deeper, or expanding (every use of an alias counted)
#: to more values, is refused before anything walks it, so an alias bomb costs neither time nor memory.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_DEPTH = 64
MAX_RECIPE_VALUES = 100_000


def _line_map(
    node: yaml.Node | None, path: tuple[Any, ...] = (), out: dict[tuple[Any, ...], int] | None = None
) -> dict[tuple[Any, ...], int]:
    """Map every field path of a composed YAML document to its 1-based line."""
    out = {} if out is None else out
    if node is None:
        return out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (_key_label(key),)
            out[sub] = key.start_mark.line + 1
            _line_map(value, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = path + (i,)
            out[sub] = item.start_mark.line + 1
            _line_map(item, sub, out)
    return out


def _duplicate_key(
    node: yaml.Node | None, path: tuple[Any, ...] = ()
) -> tuple[tuple[Any, ...], int, int] | None:
    """(path, line, first line) of the first key given twice in one mapping: PyYAML keeps the last
    value silently, which would drop part of a recipe without a word."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and not key.tag.endswith(":merge"):
                if key.value in seen:
                    return path + (key.value,), key.start_mark.line + 1, seen[key.value]
                seen[key.value] = key.start_mark.line + 1
            found = _duplicate_key(value, path + (_key_label(key),))
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate_key(item, path + (i,))
            if found:
                return found
    return None


def _key_label(key: yaml.Node) -> Any:
    """A mapping key as a field-path part: its text; a list or mapping used as a key (as in !!omap)
    has no text, and its node list could not be hashed into the line map."""
    return key.value if isinstance(key, yaml.ScalarNode) else "?"


def _check_expansion(root: yaml.Node | None, name: str) -> None:
    """Refuse a document nested deeper than MAX_RECIPE_DEPTH, expanding to more than MAX_RECIPE_VALUES
    values, holding itself (a recursive alias), or holding a string that is not valid Unicode. The
    parser shares an aliased node, but every later walk (line map, validation, printing) copies it,
    so nine aliases of nine aliases... are a billion values; sizes are memoised here, so this walk
    stays linear in the text."""
    sizes: dict[int, int] = {}
    walking: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        where = f"{name}:{node.start_mark.line + 1}"
        if key in walking:
            raise RecipeError(
                f"{where}: an alias refers to a value that contains it; a recipe cannot be recursive."
            )
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"{where}: nested more than {MAX_RECIPE_DEPTH} levels deep.")
        total = 1
        if isinstance(node, yaml.ScalarNode):
            try:
                node.value.encode("utf-8")
            except UnicodeEncodeError:
                raise RecipeError(
                    f"{where}: a string is not valid Unicode (a lone surrogate escape such as \\ud800)."
                ) from None
        else:
            walking.add(key)
            children = (
                [part for pair in node.value for part in pair]
                if isinstance(node, yaml.MappingNode)
                else node.value
            )
            for child in children:
                total += size(child, depth + 1)
                if total > MAX_RECIPE_VALUES:
                    raise RecipeError(
                        f"{where}: the YAML expands to more than {MAX_RECIPE_VALUES} values (each use of an "
                        "alias counts); a recipe is far smaller."
                    )
            walking.discard(key)
        sizes[key] = total
        return total

    if root is not None:
        size(root, 0)


class LocatedSource:
    """A YAML text with the line of every field, for error messages."""

    def __init__(self, text: str, name: str) -> None:
        self.name = name
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            _check_expansion(node, name)
            self.data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{name}:{mark.line + 1}" if mark else name
            raise RecipeError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}).") from exc
        except RecursionError:  # the parser recurses per level: far past MAX_RECIPE_DEPTH
            raise RecipeError(f"{name}: nested more than {MAX_RECIPE_DEPTH} levels deep.") from None
        # PyYAML's constructors fail with plain Python errors on some values: an integer of 5000
        # digits, an impossible date, an explicitly tagged scalar of the wrong form (!!int '', !!bool x).
        except (ValueError, OverflowError, TypeError, AttributeError, KeyError, IndexError) as exc:
            raise RecipeError(
                f"{name}: not valid YAML (a value cannot be read: {type(exc).__name__}: {exc})."
            ) from exc
        duplicate = _duplicate_key(node)
        if duplicate:
            path, line, first = duplicate
            raise RecipeError(
                f"{name}:{line}: {format_path(path)}: given twice (first on line {first}); each key may appear once."
            )
        self.lines = _line_map(node)

    def where(self, path: tuple[Any, ...]) -> str:
        """'recipe.yaml:12: models[0].parameters.weight' for the deepest known prefix of ``path``."""
        line = None
        for cut in range(len(path), -1, -1):
            if path[:cut] in self.lines:
                line = self.lines[path[:cut]]
                break
        label = format_path(path) or "(top level)"
        return f"{self.name}:{line}: {label}" if line else f"{self.name}: {label}"


def format_path(path: tuple[Any, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
