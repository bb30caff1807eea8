"""Shared CLI plumbing: one console, and the one error path of `nla`.

Every usage error (typer/click: bad option value, missing option, unknown command) and every
`NLAError` ends the same way: `error: <what is wrong>` and `fix: <what to do>` on stderr, exit
code 2, no traceback. Messages are printed as plain text, never parsed as Rich markup, so user
text such as `[/x]` or `[n, 576]` is shown as written. Ctrl-C exits 130.

This module imports nothing heavy: `nla --help` must not load torch."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from nla_core.errors import NLAError

try:  # typer >= 0.20 vendors click as typer._click; older typer uses click itself
    from typer import _click as _vclick
except ImportError:  # pragma: no cover - depends on the installed typer
    _vclick = None
try:
    import click as _click
except ImportError:  # pragma: no cover
    _click = None

_MODS = [m for m in (_vclick, _click) if m is not None]
_CLICK_ERRORS = tuple({m.exceptions.ClickException for m in _MODS})
_USAGE_ERRORS = tuple({m.exceptions.UsageError for m in _MODS})
_NO_ARGS_HELP = tuple({m.exceptions.NoArgsIsHelpError for m in _MODS if hasattr(m.exceptions, "NoArgsIsHelpError")})
# typer's own Exit/Abort (typer >= 0.20) or click's (older typer, where they are the same classes)
_EXITS = tuple({typer.Exit, *(m.exceptions.Exit for m in _MODS if hasattr(m.exceptions, "Exit"))})
_ABORTS = tuple({typer.Abort, *(m.exceptions.Abort for m in _MODS if hasattr(m.exceptions, "Abort"))})

console = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)

__all__ = ["console", "out", "run_cli", "print_json", "fail", "error_lines", "escape", "Interrupted",
           "handle_errors", "NLAGroup"]


class Interrupted(Exception):
    """Raised by a command that caught Ctrl-C and knows how to continue (exit code 130)."""

    def __init__(self, hint: str):
        self.hint = hint
        super().__init__(hint)


def fail(problem: str, fix: str | None = None) -> None:
    """Stop a command with a readable error (exit code 2)."""
    raise NLAError(problem, fix)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def error_lines(problem: str, fix: str | None) -> None:
    """Print `error: ...` and `fix: ...` as plain text (no markup parsing, no highlighting)."""
    # One line each: newlines inside a message (a YAML parser's report, say) are folded, and
    # soft_wrap keeps a narrow terminal from breaking the line.
    console.print(Text.assemble(("error: ", "bold red"), _one_line(problem)), highlight=False, soft_wrap=True)
    if fix:
        console.print(Text.assemble(("fix: ", "bold"), _one_line(fix)), highlight=False, soft_wrap=True)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


_AGAIN = "run the same command again; commands that keep progress (train, bench --resume, audit --run-id) continue."


def _help_hint(ctx: Any, prog: str) -> str:
    path = getattr(ctx, "command_path", None) or prog
    return f"see `{path} --help` for the commands and options."


def handle_errors(call: Callable[[], Any], prog: str = "nla") -> Any:
    """Run `call` (a typer/click invocation with standalone_mode=False) and turn every usage
    error, `NLAError`, Ctrl-C and file-system error into the two-line message and an exit code."""
    try:
        rv = call()
    except SystemExit:
        raise
    except NLAError as exc:
        error_lines(exc.problem, exc.fix or f"see `{prog} --help`.")
        raise SystemExit(2) from None
    except Interrupted as exc:
        error_lines("interrupted.", exc.hint)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        error_lines("interrupted.", _AGAIN)
        raise SystemExit(130) from None
    except _NO_ARGS_HELP as exc:  # a group called without a sub-command: its help is the answer
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except _USAGE_ERRORS as exc:
        error_lines(exc.format_message(), _help_hint(exc.ctx, prog))
        raise SystemExit(2) from None
    except _CLICK_ERRORS as exc:  # e.g. a FileError of a click.File parameter
        error_lines(exc.format_message(), f"check the arguments; {_help_hint(None, prog)}")
        raise SystemExit(2) from None
    except _EXITS as exc:
        code = getattr(exc, "exit_code", 0)
        if code:
            raise SystemExit(code) from None
        return None
    except _ABORTS:
        error_lines("aborted.", None)
        raise SystemExit(1) from None
    except OSError as exc:
        # A path the user named cannot be written or read (not a directory, permission denied,
        # read-only file system): the user's environment, not a bug, so no traceback.
        if exc.filename is None:
            raise
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        error_lines(f"{exc.strerror or exc}: {where}", "check the path and its permissions, or pick another one.")
        raise SystemExit(2) from None
    # With standalone_mode=False typer returns the code of a `typer.Exit` (and 130 for a Ctrl-C
    # it caught itself) instead of raising it.
    if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
        if rv == 130:
            error_lines("interrupted.", _AGAIN)
        raise SystemExit(rv)
    return rv


class NLAGroup(typer.core.TyperGroup):
    """The root group of `nla`: every way of invoking it (the console script, `app()`, typer's
    CliRunner) goes through `handle_errors`."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        parent = super().main
        return handle_errors(lambda: parent(args=args, prog_name=prog_name, complete_var=complete_var,
                                            standalone_mode=False, **extra), prog_name or self.name or "nla")


def run_cli(app: typer.Typer, argv: list[str]) -> None:
    handle_errors(lambda: app(argv, prog_name="nla", standalone_mode=False))
