"""Benchmark results in DuckDB.

One file holds any number of runs. Tables:

- `nla_meta`: `key -> value`; identifies the file as ours (`app = nla-audit`) and carries the
  schema version.
- `runs`: one row per `nla bench` run (suite, configuration, code version, start time).
- `audits`: one row per *finished* audit: the report, the judge's verdict per hypothesis, the
  score, budget use, time, transcript path, code version.
- `tool_calls`: one row per tool call of a finished audit.

Every audit is written in one transaction (the audit row and its tool calls land together or
not at all), so a run killed at any point leaves only whole audits behind and `--resume` can
skip exactly those. A file that is not a DuckDB database, or a DuckDB database that some other
program made, is refused with a clear message and never written to. A database from an older
schema version is migrated in place (inside a transaction); one from a newer version is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nla_core.errors import NLAError

__all__ = [
    "SCHEMA_VERSION",
    "APP_ID",
    "ResultsDBError",
    "ResultStore",
    "AuditRow",
    "ToolCallRow",
]

APP_ID = "nla-audit"
SCHEMA_VERSION = 2
_DUCKDB_MAGIC = b"DUCK"  # bytes 8..12 of every DuckDB database file


class ResultsDBError(NLAError):
    """The results database cannot be used (foreign, corrupt, from another version, locked)."""


@dataclass
class ToolCallRow:
    idx: int
    tool: str
    args: Any = None
    is_error: bool = False
    tokens_generated: int = 0
    seconds: float | None = None
    result_excerpt: str = ""


@dataclass
class AuditRow:
    run_id: str
    audit_id: str
    organism: str
    family: str
    control: bool
    strategy: str
    policy: str
    seed: int
    status: str  # "finished" | "failed" (the auditor crashed or gave up)
    judge: str
    judge_status: str  # "ok" | "failed" | "skipped"
    judge_error: str | None
    success: bool | None  # None when the judge failed (not a miss)
    score: float | None
    report: dict = field(default_factory=dict)
    verdicts: list = field(default_factory=list)
    n_hypotheses: int = 0
    tool_calls: int = 0
    tokens_generated: int = 0
    seconds: float = 0.0
    budget: dict = field(default_factory=dict)
    transcript_path: str | None = None
    code_version: str | None = None
    error: str | None = None
    calls: list[ToolCallRow] = field(default_factory=list)


_DDL_V2 = [
    """CREATE TABLE IF NOT EXISTS nla_meta (key VARCHAR PRIMARY KEY, value VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY,
        suite VARCHAR,
        config JSON,
        code_version VARCHAR,
        started_at TIMESTAMP DEFAULT current_timestamp,
        elapsed_s DOUBLE
    )""",
    """CREATE TABLE IF NOT EXISTS audits (
        run_id VARCHAR NOT NULL,
        audit_id VARCHAR NOT NULL,
        organism VARCHAR NOT NULL,
        family VARCHAR,
        control BOOLEAN,
        strategy VARCHAR NOT NULL,
        policy VARCHAR NOT NULL,
        seed INTEGER NOT NULL,
        status VARCHAR,
        error VARCHAR,
        judge VARCHAR,
        judge_status VARCHAR,
        judge_error VARCHAR,
        success BOOLEAN,
        score DOUBLE,
        report JSON,
        verdicts JSON,
        n_hypotheses INTEGER,
        tool_calls INTEGER,
        tokens_generated INTEGER,
        seconds DOUBLE,
        budget JSON,
        transcript_path VARCHAR,
        code_version VARCHAR,
        finished_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (run_id, audit_id)
    )""",
    """CREATE TABLE IF NOT EXISTS tool_calls (
        run_id VARCHAR NOT NULL,
        audit_id VARCHAR NOT NULL,
        idx INTEGER NOT NULL,
        tool VARCHAR,
        args JSON,
        is_error BOOLEAN,
        tokens_generated INTEGER,
        seconds DOUBLE,
        result_excerpt VARCHAR,
        PRIMARY KEY (run_id, audit_id, idx)
    )""",
]


def _migrate_1_to_2(con) -> None:
    """Version 1 had no per-audit `error` column and no `elapsed_s` on runs."""
    con.execute("ALTER TABLE audits ADD COLUMN IF NOT EXISTS error VARCHAR")
    con.execute("ALTER TABLE runs ADD COLUMN IF NOT EXISTS elapsed_s DOUBLE")


_MIGRATIONS = {1: _migrate_1_to_2}


def _check_file(path: Path) -> None:
    """Refuse anything at `path` that is not a DuckDB database, before DuckDB touches it."""
    if path.is_dir():
        raise ResultsDBError(f"The results database path {path} is a folder.", "Pass a file path with --db.")
    if not path.exists():
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise ResultsDBError(f"Cannot read the results database {path}: {exc}.", "Check the file's permissions.") from exc
    if len(head) < 12 or head[8:12] != _DUCKDB_MAGIC:
        kind = "an empty file" if not head else "not a DuckDB database"
        if head.startswith(b"SQLite format 3"):
            kind = "an SQLite database"
        raise ResultsDBError(
            f"{path} is {kind}; refusing to use it as the results database (it was left untouched).",
            "Pass a new or existing nla-audit results file with --db PATH.",
        )


# DuckDB says "Could not set lock on file ...: Conflicting lock is held in ..." when another process
# has the file open. Match that phrase, not the bare word "lock": "block" (corrupt files report a
# bad checksum "in block at location N") contains it too.
_LOCK_CONFLICT = re.compile(r"could not set lock|conflicting lock", re.IGNORECASE)
_UNWRITABLE = re.compile(r"permission denied|read-only file system|cannot open file", re.IGNORECASE)


def _is_lock_conflict(msg: str) -> bool:
    return bool(_LOCK_CONFLICT.search(msg))


def _is_unwritable(msg: str) -> bool:
    return bool(_UNWRITABLE.search(msg))


class ResultStore:
    """A results database. Use as a context manager, or call `close()`."""

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False):
        import duckdb

        self.path = Path(path)
        _check_file(self.path)
        if read_only and not self.path.exists():
            raise ResultsDBError(f"No results database at {self.path}.", "Run `nla bench` first, or pass --db PATH.")
        if not read_only:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a parent is a file, permission denied, read-only file system
                blocker = next((p for p in self.path.parents if p.exists()), None)
                why = (f"{blocker} is a file, not a folder" if blocker is not None and not blocker.is_dir()
                       else exc.strerror or str(exc))
                raise ResultsDBError(
                    f"Cannot create the folder {self.path.parent} for the results database: {why}.",
                    "Pass --db PATH in a folder you can write to.",
                ) from None
        config = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only, config=config)
        except duckdb.Error as exc:
            msg = str(exc).splitlines()[0]
            if _is_lock_conflict(msg):
                raise ResultsDBError(
                    f"The results database {self.path} is in use by another process ({msg}).",
                    "Wait for the other `nla bench` to finish, or pass another --db.",
                ) from None
            if _is_unwritable(msg):
                raise ResultsDBError(
                    f"Cannot write the results database {self.path}: {msg}.",
                    "Pass --db PATH in a folder you can write to.",
                ) from None
            raise ResultsDBError(
                f"{self.path} is not a readable DuckDB database (corrupt or truncated?): {msg}. "
                "It was left untouched.",
                "Pass a new or existing nla-audit results file with --db PATH (or restore this one from a backup).",
            ) from None
        try:
            self._init_schema(read_only)
        except BaseException:
            self.con.close()
            raise

    # -- schema -------------------------------------------------------------------------------

    def _tables(self) -> set[str]:
        rows = self.con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
        ).fetchall()
        return {r[0] for r in rows}

    def _init_schema(self, read_only: bool) -> None:
        tables = self._tables()
        if not tables:
            if read_only:
                raise ResultsDBError(f"{self.path} holds no results.", "Run `nla bench` first.")
            self._create()
            return
        if "nla_meta" not in tables:
            raise ResultsDBError(
                f"{self.path} is a DuckDB database made by something else (tables: "
                f"{', '.join(sorted(tables)[:5])}); refusing to write to it.",
                "Pass a new or existing nla-audit results file with --db PATH.",
            )
        meta = dict(self.con.execute("SELECT key, value FROM nla_meta").fetchall())
        if meta.get("app") != APP_ID:
            raise ResultsDBError(
                f"{self.path} was not made by nla-audit (app = {meta.get('app')!r}); refusing to use it.",
                "Pass a new or existing nla-audit results file with --db PATH.",
            )
        try:
            version = int(meta.get("schema_version", "0"))
        except ValueError:
            version = -1
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise ResultsDBError(
                f"{self.path} uses results schema version {version}, newer than this nla-audit "
                f"(version {SCHEMA_VERSION}); refusing to touch it.",
                "Upgrade nla-audit, or pass another --db.",
            )
        if version not in _MIGRATIONS:
            raise ResultsDBError(
                f"{self.path} uses results schema version {version}, which cannot be migrated.",
                "Pass another --db (the old file is left as it is).",
            )
        if read_only:
            raise ResultsDBError(
                f"{self.path} uses the older results schema version {version}.",
                "Open it once with `nla bench --db` (it is migrated in place), then retry.",
            )
        with self._transaction():
            v = version
            while v < SCHEMA_VERSION:
                _MIGRATIONS[v](self.con)
                v += 1
            self.con.execute("UPDATE nla_meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])

    def _create(self) -> None:
        with self._transaction():
            for ddl in _DDL_V2:
                self.con.execute(ddl)
            self.con.executemany(
                "INSERT INTO nla_meta VALUES (?, ?)",
                [["app", APP_ID], ["schema_version", str(SCHEMA_VERSION)]],
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """All of the body's writes or none: COMMIT on success, ROLLBACK on any exception."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        return int(self.con.execute("SELECT value FROM nla_meta WHERE key='schema_version'").fetchone()[0])

    # -- writes -------------------------------------------------------------------------------

    def start_run(self, run_id: str, suite: str, config: dict, code_version: str | None) -> None:
        """Record a run (no-op if it exists: a resumed run keeps its original row)."""
        self.con.execute(
            "INSERT INTO runs (run_id, suite, config, code_version) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [run_id, suite, json.dumps(config, default=str), code_version],
        )

    def finish_run(self, run_id: str, elapsed_s: float) -> None:
        """Add `elapsed_s` to the run's wall time (every segment of a resumed run adds its own)."""
        self.con.execute(
            "UPDATE runs SET elapsed_s = coalesce(elapsed_s, 0) + ? WHERE run_id = ?", [elapsed_s, run_id]
        )

    def add_audit(self, row: AuditRow, *, run_elapsed_s: float | None = None) -> None:
        """Write one finished audit and its tool calls atomically (all or nothing). `run_elapsed_s`:
        run time since the last write, added to `runs.elapsed_s` in the same transaction, so a run
        killed later still counts the time of every audit it finished."""
        with self._transaction():
            if run_elapsed_s is not None:
                self.con.execute("UPDATE runs SET elapsed_s = coalesce(elapsed_s, 0) + ? WHERE run_id = ?",
                                 [float(run_elapsed_s), row.run_id])
            self.con.execute(
                """INSERT INTO audits (run_id, audit_id, organism, family, control, strategy, policy,
                    seed, status, error, judge, judge_status, judge_error, success, score, report,
                    verdicts, n_hypotheses, tool_calls, tokens_generated, seconds, budget,
                    transcript_path, code_version)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [
                    row.run_id, row.audit_id, row.organism, row.family, row.control, row.strategy,
                    row.policy, row.seed, row.status, row.error, row.judge, row.judge_status,
                    row.judge_error, row.success, row.score,
                    json.dumps(row.report, default=str), json.dumps(row.verdicts, default=str),
                    row.n_hypotheses, row.tool_calls, row.tokens_generated, row.seconds,
                    json.dumps(row.budget, default=str), row.transcript_path, row.code_version,
                ],
            )
            if row.calls:
                self.con.executemany(
                    """INSERT INTO tool_calls VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    [
                        [row.run_id, row.audit_id, c.idx, c.tool, json.dumps(c.args, default=str),
                         c.is_error, c.tokens_generated, c.seconds, (c.result_excerpt or "")[:2000]]
                        for c in row.calls
                    ],
                )

    def update_score(self, run_id: str, audit_id: str, *, judge: str | None, judge_status: str,
                     judge_error: str | None, success: bool | None, score: float | None, verdicts: Any) -> None:
        """Replace one audit's judgement (`nla bench --rejudge`)."""
        self.con.execute(
            "UPDATE audits SET judge = ?, judge_status = ?, judge_error = ?, success = ?, score = ?, verdicts = ? "
            "WHERE run_id = ? AND audit_id = ?",
            [judge, judge_status, judge_error, success, score, json.dumps(verdicts), run_id, audit_id],
        )

    # -- reads --------------------------------------------------------------------------------

    def finished_audit_ids(self, run_id: str) -> set[str]:
        rows = self.con.execute("SELECT audit_id FROM audits WHERE run_id = ?", [run_id]).fetchall()
        return {r[0] for r in rows}

    def runs(self) -> list[dict]:
        cur = self.con.execute(
            """SELECT r.run_id, r.suite, r.code_version, r.started_at, r.elapsed_s, r.config,
                      count(a.audit_id) AS n_audits
               FROM runs r LEFT JOIN audits a USING (run_id)
               GROUP BY ALL ORDER BY r.started_at"""
        )
        return _dicts(cur)

    def run(self, run_id: str) -> dict:
        rows = [r for r in self.runs() if r["run_id"] == run_id]
        if not rows:
            known = [r["run_id"] for r in self.runs()]
            raise ResultsDBError(
                f"No run {run_id!r} in {self.path}.",
                f"Known runs: {', '.join(known[-8:]) or 'none'}; or pass `latest`.",
            )
        row = rows[0]
        row["config"] = json.loads(row["config"]) if row["config"] else {}
        return row

    def latest_run_id(self, suite: str | None = None) -> str | None:
        if suite is None:
            r = self.con.execute("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1").fetchone()
        else:
            r = self.con.execute(
                "SELECT run_id FROM runs WHERE suite = ? ORDER BY started_at DESC LIMIT 1", [suite]
            ).fetchone()
        return r[0] if r else None

    def audits(self, run_id: str) -> list[dict]:
        cur = self.con.execute("SELECT * FROM audits WHERE run_id = ? ORDER BY audit_id", [run_id])
        out = _dicts(cur)
        for r in out:
            for k in ("report", "verdicts", "budget"):
                if isinstance(r.get(k), str):
                    r[k] = json.loads(r[k])
        return out

    def tool_calls(self, run_id: str, audit_id: str | None = None) -> list[dict]:
        if audit_id is None:
            cur = self.con.execute("SELECT * FROM tool_calls WHERE run_id = ? ORDER BY audit_id, idx", [run_id])
        else:
            cur = self.con.execute(
                "SELECT * FROM tool_calls WHERE run_id = ? AND audit_id = ? ORDER BY idx", [run_id, audit_id]
            )
        return _dicts(cur)

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        try:
            self.con.close()
        except Exception:
            pass

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _dicts(cur) -> list[dict]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row)) for row in cur.fetchall()]

