"""Method pages generated from the schemas (`workbench methods --docs`)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from workbench.cli.main import main
from workbench.method import MergeMethod, MethodParameters, Param
from workbench.registry import Registry
from workbench.tools.method_docs import method_page, method_pages

DOCS = Path(__file__).resolve().parent.parent / "docs" / "methods"


class _Toy(MergeMethod):
    name = "toy"
    summary = "A toy | with a pipe."
    paper = "https://example.org/toy"
    when_to_use = "Never; it is a test."
    base_model = "required"
    min_models = 2
    max_models = 2

    class Parameters(MethodParameters):
        strength: float = Param(0.5, description="How strong.")

    class ModelParameters(MethodParameters):
        weight: float = Param(1.0, per_layer=False, description="A weight.")


def test_a_page_shows_what_the_class_declares() -> None:
    page = method_page(_Toy, "toy_plugin", "toy-package")
    assert page.startswith("# `toy`\n\nA toy | with a pipe.\n")
    assert "Paper: <https://example.org/toy>" in page
    assert "## When to use it\n\nNever; it is a test.\n" in page
    assert "- base model: required" in page and "- models: exactly 2" in page
    assert "plugin `toy_plugin` (package `toy-package`)" in page
    assert "| `strength` | float | `0.5` | yes | How strong. |" in page
    assert "| `weight` | float | `1.0` | no | A weight. |" in page


def test_every_method_has_a_page_with_every_parameter(registry: Registry) -> None:
    pages = method_pages(registry)
    assert set(pages) == {"README.md"} | {f"{name}.md" for name in registry.methods}
    for name, entry in registry.methods.items():
        page = pages[f"{name}.md"]
        assert f"[`{name}`]({name}.md)" in pages["README.md"]
        assert entry.obj.when_to_use, f"{name} has no when_to_use paragraph"
        for schema in (entry.obj.Parameters, entry.obj.ModelParameters):
            for field_name, info in schema.model_fields.items():
                assert f"| `{info.alias or field_name}` |" in page, (name, field_name)


def test_committed_pages_are_up_to_date(registry: Registry) -> None:
    """docs/methods/ is what `workbench methods --docs docs/methods` writes today."""
    for file_name, text in method_pages(registry).items():
        committed = DOCS / file_name
        assert committed.is_file() and committed.read_text() == text, (
            f"regenerate {committed}: workbench methods --docs docs/methods"
        )


def test_cli_writes_the_pages(tmp_path: Path, registry: Registry) -> None:
    result = CliRunner().invoke(main, ["methods", "--docs", str(tmp_path / "pages")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == sorted(method_pages(registry))


def test_methods_json_lists_every_method_with_its_parameters() -> None:
    import json

    result = CliRunner().invoke(main, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    listed = {record["name"]: record for record in json.loads(result.stdout)["methods"]}
    # the built-in methods of pyproject.toml's entry points (a few of them), by their recipe names
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "slerp", "passthrough"} <= set(listed)
    linear = listed["linear"]
    assert (linear["base_model"], linear["mode"], linear["package"]) == (
        "unused",
        "elementwise",
        "merge-workbench",
    )
    [normalize] = linear["parameters"]
    assert normalize == {
        "name": "normalize",
        "type": "bool",
        "required": False,
        "default": True,
        "per_layer": False,
        "bounds": {},
        "description": "Divide by the sum of the weights (a true average).",
    }
    # an alias is the recipe key ('lambda', which Python cannot name a field)
    assert "lambda" in [p["name"] for p in listed["task_arithmetic"]["parameters"]]


def test_methods_json_of_one_method_gives_bounds() -> None:
    import json

    result = CliRunner().invoke(main, ["methods", "ties", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["name"] == "ties" and record["base_model"] == "required"
    density = next(p for p in record["model_parameters"] if p["name"] == "density")
    # density is the fraction of a task vector's entries kept: 0 <= density <= 1, default 1 (keep all)
    assert density["bounds"] == {"ge": 0.0, "le": 1.0} and density["default"] == 1.0
    assert density["per_layer"] is True
