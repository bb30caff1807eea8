"""Issue 15: one error path for `nla`. Every usage error and every `NLAError` is one `error:` line
and one `fix:` line, exit code 2, no traceback; user text is never read as Rich markup; Ctrl-C
exits 130 (with a resume hint where the command can resume). All in one process, through typer's
CliRunner, with no model loads except a tiny random model where a command needs one."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from evals.cli import app
from evals.cli.common import NLAGroup

FIX = Path(__file__).parent / "fixtures"


def nla(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_clean_error(res, *needles: str, code: int = 2) -> None:
    text = res.output
    assert res.exit_code == code, text
    assert "Traceback" not in text and "MarkupError" not in text, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert [ln.split(":")[0] for ln in lines] == ["error", "fix"], text  # one line each, nothing else
    flat = " ".join(text.split())
    for n in needles:
        assert n in flat, (n, text)


@pytest.mark.parametrize("argv, needles", [
    (["bench", "--workers", "abc"], ["'--workers'", "valid integer", "nla bench --help"]),
    (["mcp"], ["Missing option '--organism'", "nla mcp --help"]),
    (["nosuchcmd"], ["No such command 'nosuchcmd'", "nla --help"]),
    (["verbalize"], ["Missing argument 'text'", "nla verbalize --help"]),
    (["organisms", "lsit"], ["No such command 'lsit'", "Did you mean 'list'", "nla organisms --help"]),
    (["bench", "--seeds", "5-1"], ["seed range '5-1' is reversed", "--seeds 1-5"]),
    (["bench", "--seeds", "x"], ["Bad seed 'x'"]),
])
def test_usage_errors_are_two_lines_exit_2(argv, needles):
    assert_clean_error(nla(*argv), *needles)


def test_user_text_is_not_markup():
    # a closing tag in an organism id: was a MarkupError traceback
    assert_clean_error(nla("mcp", "--organism", "[/x]"), "No organism with id '[/x]'")
    assert_clean_error(nla("audit", "--organism", "[bold]x[/bold]"), "'[bold]x[/bold]'")


def test_bracketed_parts_of_messages_survive(tmp_path):
    blocker = tmp_path / "[n, 576]"
    blocker.write_text("a file where a folder should be")
    res = nla("runs", "--db", str(blocker / "[/x].duckdb"))
    assert_clean_error(res, "[n, 576]/[/x].duckdb")


def test_db_in_a_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "passwd"
    blocker.write_text("root:x:0:0")
    db = blocker / "x.duckdb"
    res = nla("bench", "--suite", str(FIX / "bench_tiny.yaml"), "--organisms-dir", str(FIX / "bench_organisms"),
              "--db", str(db), "--no-report")
    assert_clean_error(res, f"{blocker} is a file, not a folder", "--db PATH in a folder you can write to")
    assert blocker.read_text() == "root:x:0:0"


def test_negative_budget_is_refused_before_the_database(tmp_path):
    db = tmp_path / "b.duckdb"
    res = nla("bench", "--suite", str(FIX / "bench_tiny.yaml"), "--organisms-dir", str(FIX / "bench_organisms"),
              "--db", str(db), "--max-tool-calls", "-5", "--no-report")
    assert_clean_error(res, "max_tool_calls must be a positive number, got -5")
    assert not db.exists()  # no run row: a later --resume is not poisoned


def test_unreadable_suite_file_is_one_error_line(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: [unclosed\n")
    assert_clean_error(nla("bench", "--suite", str(bad), "--db", str(tmp_path / "x.duckdb")), "Cannot read bench suite")


@pytest.fixture
def tiny_cli(monkeypatch):
    """Every model load in the CLI returns one tiny random model."""
    from nla_core.testing import tiny_handle

    handle = tiny_handle()
    monkeypatch.setattr("evals.cli.model.load_model", lambda name=None: handle)
    import nla_core

    monkeypatch.setattr(nla_core, "load_model", lambda name=None, **kw: handle)
    return handle


def test_truncated_checkpoint_is_a_checkpoint_error(tiny_cli, tmp_path):
    from peft import LoraConfig

    from nla_core import NLA
    from nla_core.nla import AR_ADAPTER, AV_ADAPTER
    from nla_core.testing import tiny_handle

    h = tiny_handle()
    nla_ = NLA.untrained(h, layer=2)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    h.add_adapter(AV_ADAPTER, LoraConfig(**cfg))
    h.add_adapter(AR_ADAPTER, LoraConfig(**cfg))
    nla_.av_adapter, nla_.ar_adapter = AV_ADAPTER, AR_ADAPTER
    nla_.meta.trained = True
    nla_.save(tmp_path / "ckpt")
    for rel in ("av/adapter_model.safetensors", "ar/value_head.safetensors"):
        ck = tmp_path / rel.replace("/", "_")
        shutil.copytree(tmp_path / "ckpt", ck)
        f = ck / rel
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        res = nla("verbalize", "hello", "--layer", "2", "--checkpoint", str(ck), "--max-new-tokens", "2")
        assert_clean_error(res, f"{f} is damaged (truncated or not a safetensors file)")


def test_ctrl_c_on_audit_exits_130_with_resume_hint(tiny_cli, monkeypatch, tmp_path):
    agents = importlib.import_module("agents")

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(agents, "run_audit", interrupted)
    res = nla("audit", "--organism", "bench-cats", "--organisms-dir", str(FIX / "bench_organisms"),
              "--policy", "scripted", "--strategy", "behavioural", "--run-id", "r-ctrl-c",
              "--workdir", str(tmp_path), "--quiet")
    assert res.exit_code == 130, res.output
    assert "interrupted" in res.output and "--run-id r-ctrl-c" in res.output and "Traceback" not in res.output


def _toy_app(body) -> typer.Typer:
    toy = typer.Typer(cls=NLAGroup, add_completion=False, pretty_exceptions_enable=False)
    toy.command("go")(body)
    toy.command("other")(lambda: None)  # two commands keep `go` a sub-command
    return toy


def test_exit_codes_of_exit_and_ctrl_c_are_kept():
    """typer (standalone_mode=False) returns Exit's code instead of raising it: it was dropped,
    so a failed audit and a Ctrl-C both exited 0."""
    def failed() -> None:
        raise typer.Exit(1)

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    assert CliRunner().invoke(_toy_app(failed), ["go"]).exit_code == 1
    res = CliRunner().invoke(_toy_app(ctrl_c), ["go"])
    assert res.exit_code == 130 and "interrupted" in res.output and "Traceback" not in res.output


def test_nla_error_with_markup_like_text_and_newline_free_output():
    from nla_core.errors import NLAError

    def bad() -> None:
        raise NLAError("Expected a tensor [n, 576], got [3] for /[a-z]+/ " + "x" * 200, "pass [n, 576].")

    res = CliRunner().invoke(_toy_app(bad), ["go"])
    assert_clean_error(res, "Expected a tensor [n, 576], got [3] for /[a-z]+/", "pass [n, 576].")


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from evals.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers', 'duckdb', 'mcp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
