"""The command group under fleetctl's commands: its consoles, FleetError turned into one line
and an exit code, and `bench` loaded only when it is asked for (it brings numpy and aiohttp)."""
from __future__ import annotations

import shutil
import sys

import click
from rich.console import Console

from fleetctl.errors import FleetError

# Tables stay readable when piped (rich would fall back to 80 columns); a terminal sets its own.
console = Console(width=None if sys.stdout.isatty() else shutil.get_terminal_size((160, 24)).columns)
err = Console(stderr=True, width=None if sys.stderr.isatty() else shutil.get_terminal_size((160, 24)).columns)


class FleetGroup(click.Group):
    """Turns a FleetError into its one-line message and exit code (also under CliRunner), and
    loads `bench` (fleetctl/bench_cli.py) only when it is asked for."""

    def get_command(self, ctx: click.Context, name: str):
        if name == "bench":
            from fleetctl.bench_cli import bench_command

            return bench_command
        return super().get_command(ctx, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "bench"])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FleetError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            ctx.exit(exc.exit_code)
