"""`nla audit`: bad input gives a clean error (exit 2, no traceback); budget parsing."""

from __future__ import annotations

import pytest
import typer

from evals.cli.audit import AuditCLIError, parse_budget, register
from evals.cli.common import run_cli


@pytest.fixture
def app():
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    register(app)

    @app.command("noop")
    def noop() -> None:  # a second command keeps `audit` a sub-command
        pass

    return app


@pytest.mark.parametrize("argv, needle", [
    (["audit", "--organism", "x", "--policy", "gpt9"], "Unknown policy 'gpt9'"),
    (["audit", "--organism", "x", "--strategy", "magic"], "Unknown strategy 'magic'"),
    (["audit", "--organism", "x", "--policy", "claude"], "ANTHROPIC_API_KEY"),
    (["audit", "--organism", "x", "--budget", "calls=-3"], "must be positive"),
    (["audit", "--organism", "x", "--budget", "bananas=3"], "Cannot read the budget item"),
])
def test_bad_input_is_a_clean_error(app, argv, needle, monkeypatch, capsys):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exc:
        run_cli(app, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in " ".join(err.split()) and "fix:" in err and "Traceback" not in err


def test_parse_budget():
    assert parse_budget(None, None, None, None) is None
    assert parse_budget("calls=30,tokens=4000,seconds=600", None, None, None) == {
        "max_tool_calls": 30, "max_generated_tokens": 4000, "max_seconds": 600}
    assert parse_budget("12", None, 99, None) == {"max_tool_calls": 12, "max_generated_tokens": 99}
    with pytest.raises(AuditCLIError):
        parse_budget("calls=x", None, None, None)


def test_live_view_renders_every_event_kind():
    from evals.cli.audit import LiveView

    events = [
        {"node": "start", "run_id": "r", "target": "target-1", "strategy": "nla", "policy": "offline", "tools": ["chat"],
         "limits": {"max_tool_calls": 3, "max_generated_tokens": 10, "max_seconds": 5}},
        {"node": "policy", "step": 1, "actions": [{"tool": "chat"}], "thought": "hello"},
        {"node": "tools", "step": 1, "call": {"id": "c1", "tool": "chat", "text": "[c1] hi", "is_error": False}},
        {"node": "reduce", "step": 2, "call": {"id": "x1", "tool": "finish_audit", "text": "error: x", "is_error": True}},
        {"node": "resume", "step": 2, "resumed_after_calls": 1},
        {"node": "report", "step": 3, "status": "finished", "nothing_found": True, "hypotheses": []},
    ]
    with LiveView(quiet=False) as view:
        for ev in events:
            view(ev)
    assert len(view.rows) == len(events) and view.rows[-1][-1] == "nothing found"
