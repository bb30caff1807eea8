"""The DuckDB results store: schema, atomic writes, refusal of foreign/corrupt/newer files,
migration of older ones."""

from __future__ import annotations

import sqlite3

import duckdb
import pytest

from evals.store import SCHEMA_VERSION, AuditRow, ResultsDBError, ResultStore, ToolCallRow


def _row(audit_id="a1", **kw) -> AuditRow:
    base = dict(run_id="r1", audit_id=audit_id, organism="org", family="f", control=False, strategy="nla",
                policy="scripted", seed=0, status="finished", judge="offline", judge_status="ok", judge_error=None,
                success=True, score=0.9, report={"hypotheses": []}, verdicts=[{"index": 0, "match": True}],
                tool_calls=2, tokens_generated=10, seconds=1.5, transcript_path="/tmp/t.jsonl", code_version="abc",
                calls=[ToolCallRow(0, "chat", {"message": "hi"}), ToolCallRow(1, "sample", {"n": 2})])
    base.update(kw)
    return AuditRow(**base)


def test_roundtrip_and_atomic(tmp_path):
    db = tmp_path / "r.duckdb"
    with ResultStore(db) as s:
        assert s.schema_version == SCHEMA_VERSION
        s.start_run("r1", "tiny", {"x": 1}, "abc")
        s.add_audit(_row())
        with pytest.raises(duckdb.Error):  # same audit twice: the transaction is rolled back whole
            s.add_audit(_row(calls=[ToolCallRow(5, "chat", {})]))
        assert s.finished_audit_ids("r1") == {"a1"}
        assert len(s.tool_calls("r1")) == 2
        (a,) = s.audits("r1")
        assert a["success"] is True and a["verdicts"][0]["match"] is True and a["report"] == {"hypotheses": []}
    with ResultStore(db, read_only=True) as s:  # reopens cleanly
        assert s.latest_run_id() == "r1" and s.run("r1")["config"] == {"x": 1}


@pytest.mark.parametrize("content", [b"", b"hello, not a database at all" * 10, "sqlite"])
def test_refuses_foreign_files_untouched(tmp_path, content):
    db = tmp_path / "foreign.db"
    if content == "sqlite":
        con = sqlite3.connect(db)
        con.execute("create table t(a)")
        con.commit()
        con.close()
    else:
        db.write_bytes(content)
    before = db.read_bytes()
    with pytest.raises(ResultsDBError) as exc:
        ResultStore(db)
    assert "refusing" in exc.value.problem and exc.value.fix
    assert db.read_bytes() == before


def test_refuses_other_duckdb_and_newer_version(tmp_path):
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("create table sales(x int)")
    con.close()
    with pytest.raises(ResultsDBError, match="made by something else"):
        ResultStore(other)
    newer = tmp_path / "newer.duckdb"
    ResultStore(newer).close()
    con = duckdb.connect(str(newer))
    con.execute("update nla_meta set value = '99' where key = 'schema_version'")
    con.close()
    with pytest.raises(ResultsDBError, match="newer"):
        ResultStore(newer)


def test_migrates_version_1(tmp_path):
    old = tmp_path / "v1.duckdb"
    con = duckdb.connect(str(old))
    con.execute("create table nla_meta (key varchar primary key, value varchar)")
    con.execute("insert into nla_meta values ('app', 'nla-audit'), ('schema_version', '1')")
    con.execute("create table runs (run_id varchar primary key, suite varchar, config json, code_version varchar,"
                " started_at timestamp default current_timestamp)")
    from evals.store import _DDL_V2

    con.execute(_DDL_V2[2].replace("        error VARCHAR,\n", ""))  # version 1: no `error` column
    con.execute(_DDL_V2[3])
    con.close()
    with ResultStore(old) as s:
        assert s.schema_version == SCHEMA_VERSION
        s.start_run("r1", "tiny", {}, None)
        s.add_audit(_row(error="boom"))
        assert s.audits("r1")[0]["error"] == "boom"
