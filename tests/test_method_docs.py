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
