"""``gradclip recipes``: the bundled recipes (docs/options.md)."""

from __future__ import annotations

from gradcheck_cli.cli._shell import exit_on_errors, stdout_console


@exit_on_errors
def recipes_command() -> None:
    """List the bundled sweep recipes (use one with: gradclip sweep --recipe NAME)."""
    from rich.table import Table

    from gradcheck_cli.recipes import list_bundled_recipes

    table = Table(title="bundled recipes")
    table.add_column("name")
    table.add_column("description")
    table.add_column("file")
    for name, description, path in list_bundled_recipes():
        table.add_row(name, description, str(path))
    stdout_console().print(table)
