"""``gradclip recipes``: the bundled recipes (docs/options.md)."""

from __future__ import annotations

from rich.table import Table

from gradcheck_cli.cli._shell import stdout_console
from gradcheck_cli.recipes import list_bundled_recipes


def run() -> None:
    """The bundled recipes as a table on stdout."""
    table = Table(title="bundled recipes")
    table.add_column("name")
    table.add_column("description")
    table.add_column("file")
    for name, description, path in list_bundled_recipes():
        table.add_row(name, description, str(path))
    stdout_console().print(table)
