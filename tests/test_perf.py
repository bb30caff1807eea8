"""`nla perf`'s measurements run on a tiny model and report the figures they print."""

from __future__ import annotations

import math

from nla_core.perf import _engine_ratio, _rows_sweep


def test_rows_sweep_reports_time_per_token_at_each_batch_size(tiny):
    lines: list[str] = []
    out = _rows_sweep(tiny, sizes=(1, 4), new_tokens=4, printer=lines.append)
    assert set(out) == {"decode_ms_per_token_1_rows", "decode_ms_per_token_4_rows", "decode_rows_speedup"}
    assert all(math.isfinite(v) and v > 0 for v in out.values())
    assert out["decode_rows_speedup"] == out["decode_ms_per_token_1_rows"] / out["decode_ms_per_token_4_rows"]
    assert len(lines) == 1 and "4 rows" in lines[0]


def test_engine_ratio_compares_one_after_another_with_batched(tiny):
    lines: list[str] = []
    out = _engine_ratio(tiny, n_threads=2, new_tokens=3, printer=lines.append)
    assert out["engine_speedup"] == out["engine_alone_s"] / out["engine_batched_s"] > 0
    assert "rows per step" in lines[0]
