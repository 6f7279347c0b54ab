"""The public plugin API is a versioned surface: ``workbench.__all__``, the hookspecs, the method
contract and ``workbench.testing``. Its shape is recorded in tests/data/plugin_api.json under the
API version; any change to it fails here until ``workbench.API_VERSION`` is bumped (MINOR for an
addition, MAJOR for anything that can break a plugin) and the record is rewritten with
``python tests/test_public_api.py``."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import workbench
from workbench import hookspecs, method, testing

RECORD = Path(__file__).resolve().parent / "data" / "plugin_api.json"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
CONTRACT_CLASSES = ("TensorContext", "PrepareContext", "RowBlocks", "MemoryNeed")


def _signature(obj: Any) -> str:
    return str(inspect.signature(obj))


def surface() -> dict[str, Any]:
    """The shape of the public API as plain data (names and signatures, not behaviour)."""
    merge_method = {
        name: "class"
        if inspect.isclass(value)
        else _signature(value)
        if callable(value)
        else type(value).__name__
        for name, value in vars(method.MergeMethod).items()
        if not name.startswith("_")
    }
    return {
        "api_version": workbench.API_VERSION,
        "workbench.__all__": sorted(workbench.__all__),
        "hookspecs": {
            name: _signature(fn) for name, fn in vars(hookspecs).items() if hasattr(fn, "workbench_spec")
        },
        "MergeMethod": dict(sorted(merge_method.items())),
        "MergeMethod annotations": sorted(method.MergeMethod.__annotations__),
        "contract dataclasses": {
            name: [f.name for f in dataclasses.fields(getattr(method, name))] for name in CONTRACT_CLASSES
        },
        "workbench.testing": {
            name: _signature(getattr(testing, name))
            if inspect.isfunction(getattr(testing, name))
            else type(getattr(testing, name)).__name__
            for name in sorted(testing.__all__)
        },
    }


def changes(current: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    """The parts of the surface that differ from the record."""
    return sorted(key for key in current.keys() | recorded.keys() if current.get(key) != recorded.get(key))


def record(path: Path = RECORD) -> None:
    """Write the current surface to ``path``; refused when it differs from the recorded one under
    the same API version, so a change cannot be recorded without a version bump."""
    current = surface()
    if path.exists():
        recorded = json.loads(path.read_text())
        changed = changes(current, recorded)
        if changed and recorded.get("api_version") == current["api_version"]:
            raise SystemExit(
                f"the plugin API changed ({', '.join(changed)}) but "
                f"workbench.API_VERSION is still {current['api_version']}: bump it first"
            )
    path.write_text(json.dumps(current, indent=1) + "\n")


def test_the_public_api_matches_its_record() -> None:
    changed = changes(surface(), json.loads(RECORD.read_text()))
    assert not changed, (
        f"the public plugin API changed ({', '.join(changed)}): bump workbench.API_VERSION (MINOR for an addition, "
        "MAJOR for a change that can break a plugin), then record it: python tests/test_public_api.py"
    )


def test_every_public_name_resolves_and_importing_stays_cheap() -> None:
    for name in workbench.__all__:
        assert getattr(workbench, name) is not None, name
    probe = "import sys, workbench; print(sorted(m for m in ('torch', 'pydantic', 'textual') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_guide_documents_every_public_name_and_the_version() -> None:
    guide = DOCS.read_text()
    for name in workbench.__all__:
        assert f"`{name}`" in guide or f"`workbench.{name}`" in guide, (
            f"docs/plugins.md does not mention `{name}`"
        )
    for name in testing.__all__:
        assert re.search(rf"`{name}[`(]", guide), (
            f"docs/plugins.md does not mention workbench.testing's `{name}`"
        )
    assert f'WORKBENCH_API = "{workbench.API_VERSION}"' in guide


def test_the_record_guard_sees_a_changed_surface(monkeypatch: Any) -> None:
    """Guard for the check above: a new public name (or a changed signature) is reported."""
    recorded = json.loads(RECORD.read_text())
    monkeypatch.setattr(workbench, "__all__", [*workbench.__all__, "a_new_public_name"])
    assert changes(surface(), recorded) == ["workbench.__all__"]
    monkeypatch.setattr(testing, "merge", lambda recipe, extra_argument: None)
    assert changes(surface(), recorded) == ["workbench.__all__", "workbench.testing"]


def test_a_changed_surface_cannot_be_recorded_without_a_version_bump(
    monkeypatch: Any, tmp_path: Path
) -> None:
    copy = tmp_path / "plugin_api.json"
    copy.write_text(RECORD.read_text())
    monkeypatch.setattr(workbench, "__all__", [*workbench.__all__, "a_new_public_name"])
    try:
        record(copy)
    except SystemExit as refusal:
        assert "bump it first" in str(refusal)
    else:
        raise AssertionError("a changed surface was recorded under the same API version")
    assert copy.read_text() == RECORD.read_text()
    major, minor = workbench.API_VERSION.split(".")
    bumped = f"{major}.{int(minor) + 1}"
    monkeypatch.setattr(workbench, "API_VERSION", bumped)
    record(copy)
    assert json.loads(copy.read_text())["api_version"] == bumped


if __name__ == "__main__":
    record()
    print(f"recorded plugin API {workbench.API_VERSION} in {RECORD}")
