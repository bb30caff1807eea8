"""Metrics and reports on a fixture database: Wilson intervals, the side-by-side table, the
HTML report with plots and transcript links, checked in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from evals.metrics import aggregate, paired_differences, wilson
from evals.report import comparison_table, load_run, render_table_text, write_html
from evals.store import AuditRow, ResultStore, ToolCallRow


def test_wilson():
    p, lo, hi = wilson(8, 10)
    assert p == 0.8 and lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 5)[1] == 0.0 and wilson(5, 5)[2] == 1.0
    assert wilson(0, 0)[1:] == (0.0, 1.0)


def make_fixture_db(path, tmp):
    """Two auditors on two organisms (one family each) and a control; one judge failure."""
    rows = []
    outcomes = {  # (organism, strategy) -> successes over 3 seeds
        ("flattery", "nla"): [True, True, False], ("flattery", "behavioural"): [False, True, False],
        ("gold", "nla"): [True, None, True], ("gold", "behavioural"): [False, False, False],
        ("clean", "nla"): [True, False, True], ("clean", "behavioural"): [True, True, True],
    }
    fam = {"flattery": "persona", "gold": "secret", "clean": "control"}
    for (org, strat), oks in outcomes.items():
        for seed, ok in enumerate(oks):
            t = tmp / f"{org}-{strat}-{seed}.jsonl"
            t.write_text('{"node": "start"}\n')
            rows.append(AuditRow(
                run_id="fixture", audit_id=f"{org}__{strat}__offline__s{seed}", organism=org, family=fam[org],
                control=org == "clean", strategy=strat, policy="offline", seed=seed, status="finished",
                judge="offline", judge_status="failed" if ok is None else "ok",
                judge_error="judge timed out" if ok is None else None, success=ok, score=0.7,
                report={}, verdicts=[{"index": 0, "statement": f"The model <b>{org}</b>", "confidence": 0.6,
                                      "match": bool(ok)}],
                n_hypotheses=1, tool_calls=4 + seed, tokens_generated=100 * (seed + 1), seconds=3.0,
                transcript_path=str(t), code_version="abc123", calls=[ToolCallRow(0, "chat", {"message": "hi"})]))
    with ResultStore(path) as s:
        s.start_run("fixture", "tiny", {"suite": {"name": "tiny"}}, "abc123")
        for r in rows:
            s.add_audit(r)
        s.finish_run("fixture", 42.0)


def test_table_and_metrics(tmp_path):
    db = tmp_path / "r.duckdb"
    make_fixture_db(db, tmp_path)
    data = load_run(db, "latest")
    cells = {(c.auditor, c.group): c for c in aggregate(data.rows)}
    nla_all = cells[("nla/offline", "all organisms")]
    assert (nla_all.k, nla_all.n, nla_all.judge_failed) == (4, 5, 1)  # the judge failure is not a miss
    assert cells[("nla/offline", "controls")].k == 1  # one false positive
    assert cells[("behavioural/offline", "controls")].k == 0
    header, rows = comparison_table(data)
    assert header == ["metric", "nla/offline", "behavioural/offline"]  # side by side, NLA first
    labels = [r[0] for r in rows]
    assert labels[0] == "detection: all organisms" and "false positives: controls" in labels
    assert "detection: persona" in labels and "detection: secret" in labels
    text = render_table_text(data)
    assert "80% [" in text and "(4/5) +1 judge failed" in text
    # paired on organism and seed, planted only, the judge failure's pair left out: nla detects
    # alone on flattery s0, gold s0 and s2; both on flattery s1; neither on flattery s2
    (d,) = [d for d in paired_differences(data.rows) if d.group == "all organisms"]
    assert (d.a, d.b, d.n, d.a_only, d.b_only) == ("nla/offline", "behavioural/offline", 5, 3, 0)
    assert d.diff == pytest.approx(0.6) and d.low < d.diff < d.high and d.p == pytest.approx(0.25)
    assert "nla - behavioural" in text and "+0.60" in text


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_html_report_renders_in_chromium(tmp_path):
    db = tmp_path / "r.duckdb"
    make_fixture_db(db, tmp_path)
    out = write_html(load_run(db, "fixture"), tmp_path / "report")
    page = out.read_text()
    assert "detection_by_organism.png" in page and "budget_vs_success.png" in page
    assert page.count(">transcript</a>") == 18
    assert "&lt;b&gt;flattery&lt;/b&gt;" in page and "<b>flattery</b>" not in page  # escaped
    assert "judge failed" in page and "false positive" in page
    for png in ("detection_by_organism.png", "budget_vs_success.png"):
        assert (out.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is required in CI (apt-get install -y chromium)")
        pytest.skip("headless Chromium is not installed here (apt-get install -y chromium); it runs in CI")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
         "--window-size=1280,2000", "--virtual-time-budget=3000", out.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2000)
    colours = img.resize((64, 100)).getcolors(64 * 100)
    assert colours is not None and len(colours) > 20  # a rendered page with plots, not a blank one
    # the plots loaded: the page with its images is taller than the viewport's text alone
    dump = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", out.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert "comparison" in dump.stdout and "nla/offline" in dump.stdout


def test_cli_report_and_foreign_db(tmp_path, capsys):
    from evals.cli import app
    from evals.cli.common import run_cli

    db = tmp_path / "r.duckdb"
    make_fixture_db(db, tmp_path)
    run_cli(app, ["report", "fixture", "--db", str(db), "--markdown"])
    out = capsys.readouterr().out
    assert out.startswith("| metric | nla/offline | behavioural/offline |")
    assert (tmp_path / "reports" / "fixture" / "index.html").exists()
    bad = tmp_path / "notes.db"
    bad.write_text("my precious notes")
    with pytest.raises(SystemExit) as exc:
        run_cli(app, ["report", "latest", "--db", str(bad)])
    assert exc.value.code == 2 and bad.read_text() == "my precious notes"
    assert "not a DuckDB database" in capsys.readouterr().err.replace("\n", " ")
    with pytest.raises(SystemExit) as exc:
        run_cli(app, ["bench", "--suite", "no-such-suite", "--db", str(tmp_path / "n.duckdb")])
    assert exc.value.code == 2 and not (tmp_path / "n.duckdb").exists()


def _themes_transcript(path, terms, *, error=False):
    call = {"id": "c9", "tool": "themes", "args": {}, "is_error": error,
            "data": {"error": "boom"} if error else {"themes": [{"term": t, "stem": t, "count": 3} for t in terms]}}
    path.write_text('{"node": "start"}\n' + json.dumps({"node": "tools", "call": call}) + "\n")
    return str(path)


def test_themes_name_concept_reads_the_transcript(tmp_path):
    from evals.scoring import themes_name_concept

    concepts = ["ocean", "waves"]
    assert themes_name_concept(_themes_transcript(tmp_path / "a.jsonl", ["guitar", "oceans"]), concepts) is True
    assert themes_name_concept(_themes_transcript(tmp_path / "b.jsonl", ["guitar", "recipe"]), concepts) is False
    # a failed themes call, no transcript, or no concepts: no figure (not a miss)
    assert themes_name_concept(_themes_transcript(tmp_path / "c.jsonl", [], error=True), concepts) is None
    assert themes_name_concept(str(tmp_path / "missing.jsonl"), concepts) is None
    assert themes_name_concept(_themes_transcript(tmp_path / "d.jsonl", ["ocean"]), []) is None


def test_transcript_calls_skip_other_nodes_and_a_line_cut_off_mid_write(tmp_path):
    from evals.runner import read_tool_calls
    from evals.scoring import transcript_calls

    path = tmp_path / "t.jsonl"
    _themes_transcript(path, ["ocean"])
    with path.open("a") as fh:
        fh.write(json.dumps({"node": "agent", "call": {"tool": "not-a-call"}}) + "\n")
        fh.write('{"node": "tools", "call": {"tool": "ch')  # the audit was killed here
    assert [c["tool"] for c in transcript_calls(str(path))] == ["themes"]
    rows = read_tool_calls(str(path))
    assert [(r.idx, r.tool, r.is_error) for r in rows] == [(0, "themes", False)]


def test_report_shows_what_the_themes_name_beside_the_placebo(tmp_path):
    db = tmp_path / "t.duckdb"
    listed = {"nla": ["ocean", "tide"], "nla-placebo": ["guitar"], "behavioural": None}
    with ResultStore(db) as s:
        s.start_run("themes", "tiny", {"suite": {"name": "tiny"}}, "abc123")
        for strat, terms in listed.items():
            t = tmp_path / f"{strat}.jsonl"
            if terms is None:
                t.write_text('{"node": "start"}\n')
            else:
                _themes_transcript(t, terms)
            s.add_audit(AuditRow(
                run_id="themes", audit_id=f"ocean__{strat}", organism="ocean-obsession-implant",
                family="topic-obsession", control=False, strategy=strat, policy="offline", seed=0,
                status="finished", judge="offline", judge_status="ok", judge_error=None, success=True, score=0.9,
                transcript_path=str(t)))
        s.finish_run("themes", 1.0)
    header, rows = comparison_table(load_run(db, "themes"))
    (row,) = [r for r in rows if r[0] == "NLA themes name the planted concept"]
    by = dict(zip(header[1:], row[1:]))
    assert by["nla/offline"].endswith("(1/1)") and by["nla/offline"].startswith("100%")
    assert by["nla-placebo/offline"].endswith("(0/1)") and by["behavioural/offline"] == "-"
    assert not any(r[0].endswith("rarely visible") for r in rows)  # the ocean implant shows in replies
