"""`nla bench-throughput`: audits per minute of the bench one audit at a time per worker (the
executor's old way) against several audits per worker batched by the generation engine, measured
side by side in one run on the same cells, with the detections of both compared audit by audit.

Both arms run the same first `n` cells of the suite (planted organisms and controls interleaved,
so neither arm gets the cheap ones), each into its own scratch database, on the same machine
moments apart; the figure that counts is the ratio.
"""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .suite import BenchSuite

__all__ = ["ThroughputArm", "ThroughputResult", "run_throughput"]


@dataclass
class ThroughputArm:
    label: str
    workers: int
    concurrency: int
    audits: int
    seconds: float
    outcomes: dict[str, Any]  # audit id -> (success, the hypotheses' texts)
    tool_calls: dict[str, int]

    @property
    def per_minute(self) -> float:
        return 60.0 * self.audits / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class ThroughputResult:
    baseline: ThroughputArm
    batched: ThroughputArm
    peak_rss_mb: float

    @property
    def ratio(self) -> float:
        return self.batched.per_minute / self.baseline.per_minute

    @property
    def same_detections(self) -> bool:
        return all(self.baseline.outcomes[a][0] == self.batched.outcomes.get(a, (None,))[0]
                   for a in self.baseline.outcomes)

    @property
    def differing(self) -> list[str]:
        return [a for a in self.baseline.outcomes if self.baseline.outcomes[a] != self.batched.outcomes.get(a)]


def _cells_subset(suite: BenchSuite, n: int) -> BenchSuite:
    """The suite cut to its first `n` organisms' cells (all strategies and seeds of each)."""
    specs = suite.organism_specs()
    per_organism = len(suite.strategies) * len(suite.policies) * len(suite.seeds)
    keep = max(1, -(-n // per_organism))
    planted = [s.id for s in specs if not s.control]
    controls = [s.id for s in specs if s.control]
    mixed = [x for pair in zip(planted, controls) for x in pair] + planted[len(controls):] + controls[len(planted):]
    return suite.model_copy(update={"organisms": mixed[:keep]})


def _arm(suite: BenchSuite, label: str, workers: int, concurrency: int, n: int, db: Path, say: Any) -> ThroughputArm:
    from .runner import run_bench

    t0 = time.monotonic()
    res = run_bench(suite, db_path=db, run_id=label, workers=workers, concurrency=concurrency, max_audits=n,
                    on_progress=say)
    seconds = time.monotonic() - t0
    outcomes = {r["audit_id"]: (r["success"], _statements(r)) for r in res.rows}
    return ThroughputArm(label, workers, concurrency, res.n_run, seconds, outcomes,
                         {r["audit_id"]: int(r["tool_calls"]) for r in res.rows})


def _statements(row: dict) -> tuple[str, ...]:
    return tuple(h.get("statement", "") for h in (row["report"] or {}).get("hypotheses", []))


def run_throughput(suite: BenchSuite, *, n_audits: int = 12, baseline_workers: int | None = None,
                   workers: int = 1, concurrency: int = 8, workdir: str | Path | None = None,
                   say: Any = None) -> ThroughputResult:
    """Run the first `n_audits` cells twice: `baseline_workers` processes one audit at a time
    (default: the suite's workers), then `workers` x `concurrency` batched; return both."""
    say = say or (lambda event, info: None)
    sub = _cells_subset(suite, n_audits)
    base = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="nla-throughput-"))
    base.mkdir(parents=True, exist_ok=True)
    first = _arm(sub, "one-at-a-time", baseline_workers or suite.workers, 1, n_audits, base / "one.duckdb", say)
    second = _arm(sub, "batched", workers, concurrency, n_audits, base / "batched.duckdb", say)
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return ThroughputResult(first, second, peak / 1024.0)
