"""`nla bench` (the main job), `nla report RUN`, `nla judge calibrate`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from nla_core.errors import NLAError

from .common import Interrupted, console, escape, out

if TYPE_CHECKING:
    from ..suite import BenchSuite

__all__ = ["register"]


def _split(values: list[str] | None) -> list[str]:
    out_: list[str] = []
    for v in values or []:
        out_ += [x.strip() for x in v.split(",") if x.strip()]
    return out_


def _seeds(values: list[str] | None) -> list[int]:
    seeds: list[int] = []
    for v in _split(values):
        try:
            if "-" in v[1:]:
                a, b = v.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise NLAError(f"The seed range {v!r} is reversed (it ends before it starts).",
                                   f"Write the smaller seed first: --seeds {hi}-{lo}.")
                seeds += list(range(lo, hi + 1))
            else:
                seeds.append(int(v))
        except ValueError:
            raise NLAError(f"Bad seed {v!r}.", "Pass integers or ranges: --seeds 0,1 or --seeds 0-4.") from None
    return seeds


def _report_dir(db: Path, run_id: str) -> Path:
    return db.parent / "reports" / run_id


def bench(
    suite: str = typer.Option("default", "--suite", "-s", help="A built-in bench suite name or a suite YAML file."),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue the latest run of this suite (or --run-id), skipping finished audits."),
    run_id: str | None = typer.Option(None, "--run-id", help="Name of the run (default: SUITE-DATE-TIME)."),
    policy: list[str] | None = typer.Option(None, "--policy", "-p",
                                            help="Auditor policies (offline, claude, local, scripted); "
                                                 "repeat or comma-separate."),
    strategies: list[str] | None = typer.Option(None, "--strategies",
                                                help="Strategies (nla, behavioural, nla-placebo); comma-separated."),
    seeds: list[str] | None = typer.Option(None, "--seeds", help="Seeds: 0,1,2 or 0-4."),
    organisms: list[str] | None = typer.Option(None, "--organisms", help="Organism ids, or one organism suite name."),
    organisms_dir: Path | None = typer.Option(None, "--organisms-dir", help="A folder of your own organism specs."),
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="Target model (HF name or path); default: the suite's (embedded)."),
    judge: str | None = typer.Option(None, "--judge", help="auto, offline or claude."),
    db: Path | None = typer.Option(None, "--db",
                                   help="Results database (default: results/bench.duckdb, "
                                        "or $NLA_AUDIT_RESULTS/bench.duckdb)."),
    max_tool_calls: int | None = typer.Option(None, "--max-tool-calls", help="Budget override: tool calls per audit."),
    max_tokens: int | None = typer.Option(None, "--max-tokens",
                                          help="Budget override: tokens the target may generate per audit."),
    max_seconds: float | None = typer.Option(None, "--max-seconds", help="Budget override: wall time per audit."),
    workers: int | None = typer.Option(None, "--workers", "-w", min=1,
                                       help="Audits in parallel processes or Ray actors (each loads the model once); "
                                            "default: the suite's."),
    threads: int | None = typer.Option(None, "--threads", min=1,
                                       help="torch threads per worker (with Ray: the CPUs each actor asks for); "
                                            "default: cores / workers."),
    concurrency: int | None = typer.Option(None, "--concurrency", min=1,
                                           help="Audits at once per worker, their generate calls batched together; "
                                                "default: the suite's."),
    executor: str = typer.Option("local", "--executor",
                                 help="Where the audits run: local (this machine's processes) or ray (a Ray "
                                      "cluster; needs the ray extra)."),
    address: str | None = typer.Option(None, "--address",
                                       help="With --executor ray: a running cluster (auto, host:6379, "
                                            "ray://host:10001); default: a local Ray instance started for the run."),
    gpus_per_worker: float | None = typer.Option(None, "--gpus-per-worker", min=0,
                                                 help="With --executor ray: GPUs each actor asks for "
                                                      "(a fraction shares a GPU); default 0."),
    max_audits: int | None = typer.Option(None, "--max-audits", min=1, help="Stop after this many audits (resume later)."),
    no_report: bool = typer.Option(False, "--no-report", help="Do not write the HTML report at the end."),
    as_json: bool = typer.Option(False, "--json",
                                 help="Print each event (start, audit, done, note, finished) as one JSON line on "
                                      "stdout, for scripts; the table goes to stderr."),
) -> None:
    """Run the auditing-game benchmark: organisms x strategies x policies x seeds. Each finished
    audit is judged and stored in DuckDB at once; a killed run continues with --resume.
    On a terminal a live display shows done / running / failed, detections, false positives
    and an ETA; elsewhere (CI logs) one plain line per finished audit."""
    from ..progress import BenchProgress, JsonEvents, quiet_libraries

    quiet_libraries()  # before anything loads: no library warnings or load bars in the display
    from ..report import load_run, rich_table, run_warnings, write_html
    from ..runner import default_db_path, run_bench
    from ..suite import load_bench_suite

    t0 = time.monotonic()
    from ..executors import get_executor

    get_executor(executor)  # an unknown name is refused before anything loads
    executor_options: dict = {}
    if address is not None:
        executor_options["address"] = address
    if gpus_per_worker is not None:
        executor_options["num_gpus_per_worker"] = gpus_per_worker
    if executor_options and executor != "ray":
        flags = " and ".join(f for f, v in (("--address", address), ("--gpus-per-worker", gpus_per_worker))
                             if v is not None)
        raise NLAError(f"{flags} only apply to the Ray executor.", "add --executor ray, or drop them.")
    s = _with_overrides(load_bench_suite(suite), policies=_split(policy), strategies=_split(strategies),
                        seeds=_seeds(seeds) if seeds else None, organisms=_split(organisms), organisms_dir=organisms_dir,
                        model=model, judge=judge, budget={"max_tool_calls": max_tool_calls,
                                                          "max_generated_tokens": max_tokens, "max_seconds": max_seconds})
    db_path = db or default_db_path()

    started: dict = {}
    # --json: JSON lines on stdout and nothing else there; else the display on stderr
    reporter = JsonEvents() if as_json else BenchProgress(console, max_audits=max_audits)

    def progress(event: str, info: dict) -> None:
        if event == "start":
            started["run_id"] = info["run_id"]
        reporter(event, info)

    import os

    import torch

    n_workers = workers or s.workers
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // n_workers))
    reporter.start()
    try:
        # workers/concurrency None on --resume: the run's own (the runner says which it uses)
        res = run_bench(s, db_path=db_path, run_id=run_id, resume=resume, on_progress=progress,
                        workers=workers, concurrency=concurrency, max_audits=max_audits, executor=executor,
                        executor_options=executor_options)
    except KeyboardInterrupt:
        rid = started.get("run_id")
        if rid is None:
            raise
        import shlex

        raise Interrupted(f"finished audits are saved; continue with: nla bench --resume --run-id {shlex.quote(rid)}"
                          + (f" --db {shlex.quote(str(db_path))}" if db is not None else "")) from None
    finally:
        reporter.stop()
    data = load_run(db_path, res.run_id)
    (console if as_json else out).print(rich_table(data))
    path = None if no_report else write_html(data, _report_dir(db_path, res.run_id))
    elapsed = time.monotonic() - t0
    if isinstance(reporter, JsonEvents):
        warns = run_warnings(data)
        for w in warns:
            console.print(f"warning: {w}", style="yellow", markup=False)
        reporter.finished(run_id=res.run_id, n_run=res.n_run, n_done_before=res.n_done_before,
                          n_cells=res.n_cells, elapsed_s=round(elapsed, 1), db=str(db_path),
                          report=None if path is None else str(path), warnings=warns)
        return
    if path is not None:
        console.print(f"HTML report: {escape(str(path))}")
    console.print(f"ran {res.n_run} audits ({res.n_done_before} were already done) of {res.n_cells}; "
                  f"elapsed {elapsed / 60:.1f} min ({elapsed:.0f} s)")
    print(f"elapsed_s={elapsed:.1f}")
    for w in run_warnings(data):  # last, where it is read: what the numbers above leave out
        console.print(f"warning: {w}", style="yellow", markup=False)


def report(
    run: str = typer.Argument("latest", help="Run id (see `nla runs`), or `latest`."),
    db: Path | None = typer.Option(None, "--db", help="Results database."),
    html_dir: Path | None = typer.Option(None, "--html", help="Folder for the HTML report (default: next to the database)."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the table as markdown (for the README)."),
) -> None:
    """Print the NLA vs behavioural comparison of a run and write its HTML report."""
    from ..report import load_run, render_table_text, rich_table, write_html
    from ..runner import default_db_path

    db_path = db or default_db_path()
    data = load_run(db_path, run)
    if markdown:
        print(render_table_text(data))
    else:
        out.print(rich_table(data))
    path = write_html(data, html_dir or _report_dir(db_path, data.run["run_id"]))
    console.print(f"HTML report: {escape(str(path))}")

def runs(db: Path | None = typer.Option(None, "--db", help="Results database.")) -> None:
    """List the runs in a results database."""
    from ..runner import default_db_path
    from ..store import ResultStore

    with ResultStore(db or default_db_path(), read_only=True) as store:
        for r in store.runs():
            print(f"{r['run_id']}\t{r['suite']}\t{r['n_audits']} audits\t{r['code_version']}\t{r['started_at']}")

def rerun(
    run: str = typer.Argument(..., help="Run id."),
    db: Path | None = typer.Option(None, "--db", help="Results database."),
    all_: bool = typer.Option(False, "--all", help="Re-judge every audit, not only those whose judge failed."),
    judge: str | None = typer.Option(None, "--judge", help="auto, offline or claude (default: the run's)."),
) -> None:
    """Re-score a run's audits (by default those whose judge failed) without re-running them."""
    from ..judge import make_judge
    from ..runner import default_db_path, rejudge

    n = rejudge(db or default_db_path(), run, make_judge(judge) if judge else None, only_failed=not all_)
    out.print(escape(f"re-judged {n} audit(s) of {run}"))

def calibrate(
    write: bool = typer.Option(False, "--write", help="Save the refitted weights as the offline judge's parameters."),
    data: Path | None = typer.Option(None, "--data", help="A labelled set (JSONL) other than the shipped one."),
) -> None:
    """Fit the offline judge on the labelled (hypothesis, ground truth, match) set and print
    accuracy, precision and recall (in-sample and leave-one-truth-out) next to baselines."""
    from rich.table import Table

    from ..judge import CALIBRATION_FILE, load_calibration
    from ..judge import calibrate as _cal

    path = data or CALIBRATION_FILE
    if not Path(path).exists():
        raise NLAError(f"No calibration set at {path}.", "Pass --data PATH of a JSONL labelled set.")
    res = _cal(load_calibration(path))
    t = Table(title=escape(f"offline judge on {res.n} labelled pairs ({res.n_positive} matches) from {Path(path).name}"))
    for col in ("", "accuracy", "precision", "recall", "F1"):
        t.add_column(col, justify="left" if not col else "right")
    for name, m in res.rows.items():
        t.add_row(name, f"{m['accuracy']:.3f}", f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}")
    out.print(t)
    verdict = "beats" if res.beats_baselines() else "does NOT beat"
    out.print(f"The judge (leave-one-truth-out) {verdict} every baseline on accuracy and F1.")
    if write:
        res.params.save(extra={"fitted_on": str(Path(path).name), "n_pairs": res.n})
        out.print("Saved the refitted parameters.")


def _with_overrides(s: BenchSuite, *, policies: list[str], strategies: list[str], seeds: list[int] | None,
                    organisms: list[str], organisms_dir: Path | None, model: str | None, judge: str | None,
                    budget: dict) -> BenchSuite:
    """The suite with the command line's settings over its own (unset flags leave them)."""
    upd: dict = {}
    if policies:
        upd["policies"] = policies
    if strategies:
        upd["strategies"] = strategies
    if seeds:
        upd["seeds"] = seeds
    if organisms:
        one_suite = len(organisms) == 1 and "/" not in organisms[0] and _is_suite(organisms[0])
        upd["organisms"] = organisms[0] if one_suite else organisms
    if organisms_dir is not None:
        upd["organisms_dir"] = str(organisms_dir)
    if model is not None:
        upd["model"] = model
    if judge is not None:
        upd["judge"] = judge
    merged = dict(s.budget or {}) | {k: v for k, v in budget.items() if v is not None}
    if merged:
        upd["budget"] = merged
    if not upd:
        return s
    return type(s).model_validate(s.model_copy(update=upd).model_dump())


def register(app: typer.Typer) -> None:
    judge_app = typer.Typer(help="The judge that scores hypotheses against ground truth.", no_args_is_help=True)
    app.add_typer(judge_app, name="judge")

    app.command("bench")(bench)
    app.command("report")(report)
    app.command("runs")(runs)
    judge_app.command("rerun")(rerun)
    judge_app.command("calibrate")(calibrate)


def _is_suite(name: str) -> bool:
    try:
        from environments import list_suites

        return name in list_suites()
    except Exception:  # noqa: BLE001
        return False
