"""Generate the hook reference in docs/plugins.md from :mod:`workbench.hookspecs`.

The reference is built from the hookspecs themselves (signature and docstring of each, grouped by the
``# <Title> phase: ...`` section comments of hookspecs.py) so that the guide cannot drift from the
hooks a plugin can actually implement. Only the text between the two marker lines is rewritten.

    python -m workbench.tools.hook_docs docs/plugins.md          # regenerate the block
    python -m workbench.tools.hook_docs --check docs/plugins.md  # exit 1 if the block is out of date
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from workbench import hookspecs as default_hookspecs

START = "<!-- hook-reference:start -->"
END = "<!-- hook-reference:end -->"
REGENERATE = "python -m workbench.tools.hook_docs {path}  (or: make docs)"

# "# Registration phase: called once ..." opens a phase; further "# ..." lines continue its text.
_PHASE = re.compile(r"^# (?P<title>[A-Z][\w ]* phase): (?P<about>.+)$")
_RULE = re.compile(r"^# -{3,}$")
# Sphinx roles and RST literals become Markdown code spans: :class:`x` and ``x`` -> `x`.
_ROLE = re.compile(r":[a-z]+:`([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


@dataclass
class Phase:
    title: str
    about: str
    hooks: list[Callable[..., object]] = field(default_factory=list)


def find_hookspecs(module: ModuleType = default_hookspecs) -> list[Callable[..., object]]:
    """Every function pluggy's ``HookspecMarker`` marked, in source order (not a hand-kept list)."""
    marker = f"{module.hookspec.project_name}_spec"
    found = [obj for obj in vars(module).values() if inspect.isfunction(obj) and hasattr(obj, marker)]
    return sorted(found, key=lambda fn: fn.__code__.co_firstlineno)


def phases(module: ModuleType = default_hookspecs) -> list[Phase]:
    """Group the hookspecs under the section comment above each; a hook with none is an error."""
    lines = inspect.getsource(module).splitlines()
    openings: list[tuple[int, Phase]] = []  # (1-based line, phase)
    continuing = False  # the previous line opened or continued a phase
    for number, line in enumerate(lines, start=1):
        match = _PHASE.match(line)
        if match:
            openings.append((number, Phase(match["title"], match["about"].strip())))
            continuing = True
        elif continuing and line.startswith("# ") and not _RULE.match(line):
            openings[-1][1].about += " " + line[2:].strip()
        else:
            continuing = False
    for hook in find_hookspecs(module):
        before = [phase for number, phase in openings if number < hook.__code__.co_firstlineno]
        if not before:
            raise ValueError(
                f"hookspec {hook.__name__} comes before any '# <Title> phase: ...' comment in {module.__name__}"
            )
        before[-1].hooks.append(hook)
    return [phase for _, phase in openings if phase.hooks]


class _Text(str):
    """An annotation kept as source text (hookspecs.py uses postponed annotations): shown unquoted."""

    def __repr__(self) -> str:
        return str(self)


def signature(hook: Callable[..., object]) -> str:
    """``name(arg: Type) -> Type`` as written in hookspecs.py, without the quotes of string annotations."""
    sig = inspect.signature(hook)
    params = [
        p.replace(annotation=_Text(p.annotation)) if isinstance(p.annotation, str) else p
        for p in sig.parameters.values()
    ]
    result = _Text(sig.return_annotation) if isinstance(sig.return_annotation, str) else sig.return_annotation
    return f"{hook.__name__}{sig.replace(parameters=params, return_annotation=result)}"


def _markdown(text: str) -> str:
    return _LITERAL.sub(r"`\1`", _ROLE.sub(r"`\1`", text))


def render(module: ModuleType = default_hookspecs) -> str:
    """The Markdown between the markers (without them), ending in a newline."""
    parts = [
        "<!-- Generated from workbench/hookspecs.py by `python -m workbench.tools.hook_docs "
        "docs/plugins.md`; do not edit. -->",
        (
            "Implement a hook with a function of the same name marked `@workbench.hookimpl`, taking one argument "
            "named `register` (it is passed by keyword). `Register` is `Callable[[Any], None]`. Use a plain "
            "`@hookimpl`: the registry calls implementations in plugin load order itself, so pluggy's `tryfirst`, "
            "`trylast` and wrapper options are not supported."
        ),
    ]
    for phase in phases(module):
        about = phase.about[:1].upper() + phase.about[1:]
        parts.append(f"### {phase.title}\n\n{_markdown(about)}")
        for hook in phase.hooks:
            doc = inspect.getdoc(hook) or ""  # getdoc dedents; the meta-tests require a docstring
            parts.append(f"#### `{hook.__name__}`\n\n```python\n{signature(hook)}\n```\n\n{_markdown(doc)}")
    return "\n\n".join(parts) + "\n"


def splice(text: str, block: str, path: Path) -> str:
    """``text`` with everything between the marker lines replaced by ``block``."""
    lines = text.splitlines(keepends=True)
    stripped = [line.strip() for line in lines]
    for marker in (START, END):
        if stripped.count(marker) != 1:
            raise ValueError(f"{path}: expected exactly one line '{marker}', found {stripped.count(marker)}")
    start, end = stripped.index(START), stripped.index(END)
    if end < start:
        raise ValueError(f"{path}: '{END}' comes before '{START}'")
    return "".join(lines[: start + 1]) + block + "".join(lines[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workbench.tools.hook_docs", description=__doc__.splitlines()[0]
    )
    parser.add_argument("path", type=Path, help="the Markdown file with the marker lines (docs/plugins.md)")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the block is out of date; write nothing"
    )
    args = parser.parse_args(argv)
    path: Path = args.path
    try:
        text = path.read_text(encoding="utf-8")
        updated = splice(text, render(), path)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if updated != text:
            print(
                f"{path}: the hook reference is out of date; regenerate it with: {REGENERATE.format(path=path)}",
                file=sys.stderr,
            )
            return 1
        return 0
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
