"""The explorer's web app (Starlette): server-rendered pages for runs, audits and the NLA lens,
and a small JSON API for the lens. The results database is opened read-only per request, so a
running `nla bench` that holds the file is reported instead of blocked on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nla_core.errors import NLAError

from ..store import ResultsDBError, ResultStore
from .data import build_detail, resolve_run_id, summaries
from .lens import Lens, LensError
from .render import render

__all__ = ["create_app"]


def create_app(db_path: str | Path, *, lens: Lens | None = None) -> Any:
    """The ASGI app over the results database at `db_path`. `lens`: the NLA lens to serve
    (default: the embedded model and its shipped NLA, loaded on first lens use)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    db = Path(db_path)
    the_lens = lens if lens is not None else Lens()

    def page(name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        return HTMLResponse(render(name, **ctx), status_code=status)

    def error_page(exc: NLAError) -> HTMLResponse:
        text = exc.problem
        status = 404 if (text.startswith("No run") or " has no audit " in text) else 503
        return page("error", status=status, title="Cannot show this", problem=text, fix=exc.fix)

    def store() -> ResultStore:
        return ResultStore(db, read_only=True)

    def runs_page(request: Request):
        if not db.exists():
            return page("runs", title="Runs", runs=[], db=str(db))
        try:
            with store() as s:
                runs = list(reversed(s.runs()))
        except ResultsDBError as exc:
            return error_page(exc)
        return page("runs", title="Runs", runs=runs, db=str(db))

    def run_page(request: Request):
        q = request.query_params
        f = {k: q.get(k, "") for k in ("organism", "strategy", "outcome")}
        try:
            with store() as s:
                rid = resolve_run_id(s, request.path_params["run_id"])
                run, rows = s.run(rid), s.audits(rid)
        except ResultsDBError as exc:
            return error_page(exc)
        items = sorted(summaries(rows), key=lambda d: (d.row["organism"], d.row["strategy"], d.row["policy"], d.row["seed"]))
        outcomes = sorted({d.outcome[0].split(" (")[0] for d in items}) + ["cut short by a budget"]

        def keep(d) -> bool:
            if f["organism"] and d.row["organism"] != f["organism"]:
                return False
            if f["strategy"] and d.row["strategy"] != f["strategy"]:
                return False
            o = f["outcome"]
            if o == "cut short by a budget":
                return d.budget_cut is not None
            return not o or d.outcome[0].split(" (")[0] == o

        return page("run", title=f"run {rid}", run=run, rows=[d for d in items if keep(d)], rows_all=items, f=f,
                    organisms=sorted({d.row["organism"] for d in items}),
                    strategies=sorted({d.row["strategy"] for d in items}), outcomes=outcomes)

    def _detail(s: ResultStore, run_id: str, audit_id: str):
        run = s.run(run_id)
        rows = [r for r in s.audits(run_id) if r["audit_id"] == audit_id]
        if not rows:
            raise ResultsDBError(f"Run {run_id!r} has no audit {audit_id!r}.", "Pick an audit from the run's list.")
        return build_detail(run, rows[0], s.tool_calls(run_id, audit_id))

    def audit_page(request: Request):
        try:
            with store() as s:
                rid = resolve_run_id(s, request.path_params["run_id"])
                d = _detail(s, rid, request.path_params["audit_id"])
        except ResultsDBError as exc:
            return error_page(exc)
        return page("audit", title=f"audit {d.row['audit_id']}", d=d)

    def compare_page(request: Request):
        ids = request.query_params.getlist("audit")
        if len(ids) != 2:
            return page("error", status=400, title="Compare two audits",
                        problem=f"Comparing needs exactly two audits; {len(ids)} were ticked.",
                        fix="Go back, tick two audits and press compare.")
        try:
            with store() as s:
                rid = resolve_run_id(s, request.path_params["run_id"])
                a, b = (_detail(s, rid, i) for i in ids)
        except ResultsDBError as exc:
            return error_page(exc)
        return page("compare", title="compare", a=a, b=b)

    def lens_page(request: Request):
        handle_note = "" if the_lens.loaded else "The model loads on first use (about half a minute for the embedded one)."
        return page("lens", title="NLA lens", organisms=the_lens.organisms(), layer=the_lens.layer,
                    model_note=handle_note)

    def bad(exc: NLAError, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": exc.problem, "fix": exc.fix}, status_code=status)

    async def _json(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise LensError("The request body is not JSON.", 'Send e.g. {"text": "..."}.') from None
        if not isinstance(body, dict):
            raise LensError("The request body must be a JSON object.", 'Send e.g. {"text": "..."}.')
        return body

    async def api_lens_start(request: Request):
        try:
            body = await _json(request)
            jid = the_lens.start(text=body.get("text"), messages=body.get("messages"), organism=body.get("organism"))
        except NLAError as exc:
            return bad(exc)
        return JSONResponse({"job": jid}, status_code=202)

    def api_lens_job(request: Request):
        try:
            return JSONResponse(the_lens.job(request.path_params["job"]))
        except LensError as exc:
            return bad(exc, 404)

    async def api_steer(request: Request):
        try:
            body = await _json(request)
            out = await run_in_threadpool(the_lens.steer, body.get("prompt"), body.get("text"),
                                          body.get("strength", 0.3), body.get("organism"))
        except NLAError as exc:
            return bad(exc)
        return JSONResponse(out)

    routes = [
        Route("/", runs_page),
        Route("/runs/{run_id}", run_page),
        Route("/runs/{run_id}/audits/{audit_id}", audit_page),
        Route("/runs/{run_id}/compare", compare_page),
        Route("/lens", lens_page),
        Route("/api/lens", api_lens_start, methods=["POST"]),
        Route("/api/lens/{job}", api_lens_job),
        Route("/api/steer", api_steer, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.lens = the_lens
    app.state.db = db
    return app
