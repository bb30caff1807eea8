"""The `nla` command. Each area registers its sub-commands from its own module. The modules
import heavy packages (torch, transformers, duckdb) inside the command functions, so that
`nla --help` and usage errors answer at once."""

from __future__ import annotations

import sys

import typer

from .common import NLAGroup, console, run_cli

app = typer.Typer(
    name="nla",
    help="Audit language models through their activations with Natural Language Autoencoders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=NLAGroup,  # one error path however the app is invoked
)

# One module per area; each defines `register(app)`.
from . import model as _model  # noqa: E402

for _mod in (_model,):
    _mod.register(app)

for _name in ("train", "organisms", "toolcmds", "audit", "bench", "throughput", "explore"):
    try:
        _mod = __import__(f"{__name__}.{_name}", fromlist=["register"])
    except ModuleNotFoundError as exc:  # an area not built yet; only its own absence is tolerated
        if exc.name != f"{__name__}.{_name}":
            raise
        continue
    _mod.register(app)


def main() -> None:
    run_cli(app, sys.argv[1:])


__all__ = ["app", "main", "console"]
