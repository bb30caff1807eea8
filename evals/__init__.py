"""evals: the auditing-game harness (run matrix, judge, DuckDB results, reports) and the `nla` CLI.

    from evals import load_bench_suite, run_bench, load_run, write_html
    res = run_bench(load_bench_suite("default"), db_path="results/bench.duckdb")
    write_html(load_run(res.db_path, res.run_id), "results/reports/" + res.run_id)

Heavy dependencies (torch, transformers, duckdb, matplotlib) are imported lazily.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BenchSuite": "suite", "AuditCell": "suite", "SuiteError": "suite", "load_bench_suite": "suite",
    "list_bench_suites": "suite",
    "run_bench": "runner", "rejudge": "runner", "BenchResult": "runner", "code_version": "runner",
    "default_db_path": "runner",
    "ResultStore": "store", "ResultsDBError": "store", "AuditRow": "store", "ToolCallRow": "store",
    "SCHEMA_VERSION": "store",
    "GroundTruth": "judge", "Verdict": "judge", "JudgeError": "judge", "EmbeddingJudge": "judge",
    "ClaudeJudge": "judge", "make_judge": "judge",
    "register_judge": "judge", "JUDGES": "judge", "calibrate": "judge", "load_calibration": "judge",
    "score_report": "scoring", "Score": "scoring",
    "wilson": "metrics", "aggregate": "metrics", "Cell": "metrics",
    "load_run": "report", "comparison_table": "report", "render_table_text": "report", "write_html": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'evals' has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{mod}"), name)
