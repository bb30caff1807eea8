"""Shared CLI plumbing: one console, and one place that turns `NLAError`s into readable
messages with exit code 2 instead of tracebacks."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console

from nla_core.errors import NLAError

console = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)

__all__ = ["console", "out", "run_cli", "print_json", "fail"]


def fail(problem: str, fix: str | None = None) -> None:
    """Stop a command with a readable error (exit code 2)."""
    raise NLAError(problem, fix)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def run_cli(app: typer.Typer, argv: list[str]) -> None:
    try:
        app(argv, standalone_mode=False)
    except NLAError as exc:
        console.print(f"[bold red]error:[/] {exc.problem}")
        if exc.fix:
            console.print(f"[bold]fix:[/] {exc.fix}")
        raise SystemExit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise SystemExit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors etc.
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            raise SystemExit(exc.exit_code)
        if isinstance(exc, click.exceptions.Exit):
            raise SystemExit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            raise SystemExit(1)
        raise
