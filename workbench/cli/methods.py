"""``workbench methods``: the registered merge methods, one method's parameters, their pages, or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click

from workbench.cli.common import handle_errors, load_registry, terminal


@click.command()
@click.argument("name", required=False)
@click.option(
    "--docs",
    "docs_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write one Markdown page per method (and an index) into this folder.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the methods (or method NAME) as JSON: parameters with types, defaults and bounds.",
)
@handle_errors
def methods(name: str | None, docs_dir: Path | None, as_json: bool) -> None:
    """List merge methods, or show the parameters of method NAME."""
    from rich.table import Table

    from workbench.tools.method_docs import method_record, parameter_rows, write_method_docs

    registry = load_registry()
    console = terminal()
    if as_json:
        names = [registry.method(name).name] if name else sorted(registry.methods)
        records = [method_record(registry, n) for n in names]
        click.echo(json.dumps(records[0] if name else {"methods": records}, indent=2))
        return
    if docs_dir is not None:
        written = write_method_docs(registry, docs_dir)
        console.print(f"wrote {len(written)} pages to {docs_dir}")
        return
    if name is None:
        table = Table("method", "plugin", "summary", box=None, pad_edge=False)
        table.add_column("paper", overflow="fold")
        for method_name, entry in sorted(registry.methods.items()):
            table.add_row(method_name, entry.plugin.package, entry.obj.summary, entry.obj.paper or "")
        console.print(table)
        return
    method = registry.method(name)
    entry = registry.methods[name]
    console.print(f"[bold]{method.name}[/] (plugin {entry.plugin.name}, package {entry.plugin.package})")
    console.print(method.summary)
    if method.paper:
        console.print(f"paper: {method.paper}")
    console.print(
        f"base model: {method.base_model}; models: {method.min_models}..{method.max_models or 'any'}"
    )
    table = Table(
        "parameter", "scope", "type", "default", "per-layer", "description", box=None, pad_edge=False
    )
    for scope, schema in (("global", method.Parameters), ("per-model", method.ModelParameters)):
        for row in parameter_rows(schema):
            table.add_row(row[0], scope, *row[1:])
    console.print(table)
