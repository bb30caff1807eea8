"""`nla bench-throughput`: audits per minute, one audit at a time vs batched, in one run."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console, escape, out

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command("bench-throughput")
    def bench_throughput(
        suite: str = typer.Option("default", "--suite", "-s", help="A built-in bench suite name or a suite YAML file."),
        audits: int = typer.Option(36, "--audits", "-n", min=1, help="Audits per arm (the suite's first cells)."),
        concurrency: int | None = typer.Option(None, "--concurrency", "-c", min=1,
                                               help="Audits at once per worker in the batched arm (default: the suite's)."),
        workers: int | None = typer.Option(None, "--workers", "-w", min=1,
                                           help="Worker processes of the batched arm (default: the suite's)."),
        baseline_workers: int | None = typer.Option(None, "--baseline-workers", min=1,
                                                    help="Worker processes of the one-at-a-time arm (default: the suite's)."),
        workdir: Path | None = typer.Option(None, "--workdir", help="Where the two scratch databases go (default: a temp dir)."),
    ) -> None:
        """Run the same audits one at a time per worker and batched (several per worker sharing a
        generation engine), side by side, and print audits per minute, the ratio, peak memory
        and whether every audit reached the same verdict and hypotheses."""
        from ..progress import quiet_libraries
        from ..suite import load_bench_suite
        from ..throughput import run_throughput

        quiet_libraries()
        s = load_bench_suite(suite)

        def say(event: str, info: dict) -> None:
            if event == "done":
                console.print(escape(f"    {info['i']}/{info['n']} {info['audit_id']} ({info['seconds']} s)"))
            elif event == "note":
                console.print(escape(str(info["message"])))

        res = run_throughput(s, n_audits=audits, baseline_workers=baseline_workers, workers=workers or s.workers,
                             concurrency=concurrency or s.concurrency, workdir=workdir, say=say)
        for arm in (res.baseline, res.batched):
            out.print(f"{arm.label:<14} {arm.workers} worker(s) x {arm.concurrency} at once: {arm.audits} audits in "
                      f"{arm.seconds:.0f} s = {arm.per_minute:.2f} audits/min, "
                      f"{sum(arm.tool_calls.values()) / max(arm.audits, 1):.1f} tool calls per audit")
        out.print(f"ratio (batched / one at a time): {res.ratio:.2f}x")
        out.print(f"peak memory (largest process): {res.peak_rss_mb:.0f} MB")
        same = len(res.baseline.outcomes) - len(res.differing)
        out.print(f"same verdict and hypotheses: {same}/{len(res.baseline.outcomes)} audits; "
                  f"same detections: {'yes' if res.same_detections else 'NO'}")
        for a in res.differing:
            out.print(escape(f"  differs: {a}: {res.baseline.outcomes[a]} vs {res.batched.outcomes.get(a)}"))
