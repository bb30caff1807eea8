"""`nla explore`: a local web app to read benchmark runs audit by audit (ground truth, the
auditor's steps with their tool calls and NLA explanations, notes, hypotheses, the judge's
verdict) and an NLA lens (every token of a text read through the NLA, and steering).

    from evals.explore import create_app, Lens
    app = create_app("results/bench.duckdb")          # the embedded model loads on first lens use
    app = create_app(db, lens=Lens(lambda: (handle, nla)))   # any model and NLA

The same audit renderer writes the report's static audit pages (`render_audit_static`)."""

from __future__ import annotations

from .app import create_app
from .data import AuditDetail, budget_cut, load_audit, outcome
from .lens import Lens, LensError
from .render import render_audit_static

__all__ = ["create_app", "Lens", "LensError", "AuditDetail", "load_audit", "budget_cut", "outcome",
           "render_audit_static", "serve"]


def serve(db_path, *, host: str = "127.0.0.1", port: int = 8765, lens: Lens | None = None) -> None:
    """Run the explorer with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(db_path, lens=lens), host=host, port=port, log_level="warning")
