"""`nla explore` (the audit and NLA explorer in the browser) and `nla export inspect RUN`
(a run as Inspect evaluation logs)."""

from __future__ import annotations

from pathlib import Path

import typer

from nla_core.errors import NLAError

from .common import console

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    export_app = typer.Typer(help="Export results to other tools' formats.", no_args_is_help=True)
    app.add_typer(export_app, name="export")

    @app.command("explore")
    def explore(
        db: Path | None = typer.Option(None, "--db",
                                       help="Results database (default: results/bench.duckdb, "
                                            "or $NLA_AUDIT_RESULTS/bench.duckdb)."),
        port: int = typer.Option(8765, "--port", min=1, max=65535, help="Port to serve on."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (the default serves this machine only)."),
        model: str | None = typer.Option(None, "--model", "-m", help="Model for the NLA lens (default: the embedded one)."),
        checkpoint: Path | None = typer.Option(None, "--checkpoint",
                                               help="NLA checkpoint for the lens (default: the shipped one)."),
        organisms_dir: Path | None = typer.Option(None, "--organisms-dir",
                                                  help="A folder of your own organism specs for the lens."),
        max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="Longest text the lens reads, in tokens."),
        explain_tokens: int = typer.Option(48, "--explain-tokens", min=4, help="Longest explanation per token, in tokens."),
    ) -> None:
        """Open runs and audits in the browser (ground truth, the auditor's steps, NLA explanations,
        hypotheses, verdicts) and read texts token by token through the NLA lens."""
        from ..explore import Lens, serve
        from ..runner import default_db_path

        db_path = db or default_db_path()
        if db_path.exists():  # refuse a foreign file before serving pages about it
            from ..store import ResultStore

            ResultStore(db_path, read_only=True).close()
        import socket

        with socket.socket() as s:  # uvicorn would only log a bind failure and exit
            try:
                s.bind((host, port))
            except OSError as exc:
                raise NLAError(f"Cannot serve on {host}:{port}: {exc.strerror or exc}.",
                               "Pass another --port (another `nla explore` may already run there).") from None
        if checkpoint is not None and not checkpoint.exists():
            raise NLAError(f"No NLA checkpoint at {checkpoint}.", "Pass an NLA checkpoint folder, or drop --checkpoint.")

        def loader():
            from nla_core import load_model, load_nla_for

            handle = load_model(model)
            return handle, load_nla_for(handle, checkpoint)

        lens = Lens(loader, organisms_dir=str(organisms_dir) if organisms_dir else None, max_tokens=max_tokens,
                    explain_tokens=explain_tokens)
        console.print(f"nla explore: http://{host}:{port}/  (results {db_path}; Ctrl-C stops)")
        serve(db_path, host=host, port=port, lens=lens)

    @export_app.command("inspect")
    def export_inspect_cmd(
        run: str = typer.Argument("latest", help="Run id (see `nla runs`), or `latest`."),
        db: Path | None = typer.Option(None, "--db", help="Results database."),
        out: Path | None = typer.Option(None, "--out", help="Folder for the logs (default: logs/RUN next to the database)."),
        fmt: str = typer.Option("eval", "--format", help="eval (Inspect's default) or json."),
    ) -> None:
        """Write a run as Inspect evaluation logs (one per auditor, one sample per audit) for `inspect view`."""
        from ..export_inspect import export_inspect
        from ..runner import default_db_path

        paths = export_inspect(db or default_db_path(), run, out, fmt=fmt)
        for p in paths:
            print(p)
        console.print(f"wrote {len(paths)} Inspect log(s); open them with: inspect view --log-dir {paths[0].parent}")
