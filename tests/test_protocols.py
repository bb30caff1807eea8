"""The seam protocols (`nla_core.protocols`) fit the real classes: `Target` is a `TargetLike`,
`NLA` an `NLALike`, `Toolbox` a `ToolboxLike` (members at run time; signatures with mypy)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nla_core.protocols import NLALike, TargetLike, ToolboxLike

ROOT = Path(__file__).resolve().parents[1]


def test_real_objects_have_every_protocol_member():
    from environments import build_target
    from environments.spec import spec_from_dict
    from nla_core import NLA
    from nla_core.testing import tiny_handle
    from tools import Budget, Toolbox

    handle = tiny_handle("llama", n_layers=3, d_model=32)
    spec = spec_from_dict({
        "id": "protocols-plain", "base_model": "*", "construction": {"method": "plain", "params": {}},
        "control": True, "ground_truth": {"behaviour": "no planted behaviour"},
    })
    target = build_target(spec, handle, alias="target-1", layer=1)
    nla = NLA.untrained(handle, layer=1)
    box = Toolbox(target, nla, "nla", Budget(max_tool_calls=3))
    assert isinstance(target, TargetLike)
    assert isinstance(nla, NLALike)
    assert isinstance(box, ToolboxLike)
    assert not isinstance(nla, TargetLike) and not isinstance(target, NLALike)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_real_classes_match_the_protocol_signatures(tmp_path):
    check = tmp_path / "check_seams.py"
    check.write_text(textwrap.dedent("""
        from environments.target import Target
        from nla_core.nla import NLA
        from nla_core.protocols import NLALike, TargetLike, ToolboxLike
        from tools.toolbox import Toolbox


        def as_target(t: Target) -> TargetLike:
            return t


        def as_nla(n: NLA) -> NLALike:
            return n


        def as_toolbox(tb: Toolbox) -> ToolboxLike:
            return tb
    """))
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", str(check)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
