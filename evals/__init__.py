"""evals: the auditing-game harness (run matrix, judge, DuckDB results, reports) and the `nla` CLI."""

__all__: list[str] = []
