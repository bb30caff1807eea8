"""The same definitions exported three ways: schema snapshots (Anthropic, LangChain, MCP), the
LangChain tools inside a LangGraph ToolNode, the MCP server through the mcp client in-process,
and the `nla tools schema` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from environments import build_target
from environments.spec import spec_from_dict
from nla_core import NLA
from tools import TOOL_SETS, TOOLS, Budget, Toolbox, anthropic_schemas, schemas

SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.fixture(scope="module")
def env():
    from nla_core.testing import tiny_handle

    handle = tiny_handle("llama")
    spec = spec_from_dict({
        "id": "tools-export", "base_model": "*", "construction": {"method": "plain", "params": {}},
        "control": True, "ground_truth": {"behaviour": "no planted behaviour"},
    })
    return build_target(spec, handle, alias="target-1", layer=2), NLA.untrained(handle, layer=2)


@pytest.fixture
def box(env):
    target, nla = env
    return Toolbox(target, nla, "nla", Budget(max_tool_calls=20), verbalize_tokens=3, max_positions=4)


# ---- schema snapshots ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["anthropic", "langchain", "mcp"])
def test_schema_snapshot(fmt):
    """Regenerate after an intended change with NLA_UPDATE_SNAPSHOTS=1."""
    got = schemas(fmt, "nla")
    path = SNAPSHOTS / f"tools_schema_{fmt}.json"
    text = json.dumps(got, indent=2, sort_keys=True) + "\n"
    if os.environ.get("NLA_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no snapshot {path}: create it with NLA_UPDATE_SNAPSHOTS=1"
    assert json.loads(path.read_text()) == json.loads(text), f"{path} is stale: rerun with NLA_UPDATE_SNAPSHOTS=1"


def test_schema_formats_agree():
    anth = {t["name"]: t for t in anthropic_schemas("nla")}
    lc = {t["function"]["name"]: t["function"] for t in schemas("langchain", "nla")}
    mcp = {t["name"]: t for t in schemas("mcp", "nla")}
    assert list(anth) == list(lc) == list(mcp) == TOOL_SETS["nla"]
    for name, a in anth.items():
        assert a["input_schema"] == mcp[name]["inputSchema"] == TOOLS[name].input_schema()
        assert lc[name]["parameters"]["properties"] == a["input_schema"].get("properties", {})
        assert a["description"] == mcp[name]["description"] == TOOLS[name].description
    assert [t["name"] for t in anthropic_schemas("behavioural")] == TOOL_SETS["behavioural"]


def test_cli_tools_schema(capsys):
    from evals.cli import app, run_cli

    run_cli(app, ["tools", "schema", "--format", "anthropic", "--tool-set", "behavioural"])
    assert json.loads(capsys.readouterr().out) == anthropic_schemas("behavioural")
    for argv in (["tools", "schema", "--format", "xml"], ["tools", "schema", "--tool-set", "magic"]):
        with pytest.raises(SystemExit) as exc:
            run_cli(app, argv)
        assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_mcp_bad_input():
    from evals.cli import app, run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli(app, ["mcp", "--organism", "no-such-organism-xyz", "--tool-set", "nonsense"])
    assert exc.value.code == 2


# ---- LangChain / LangGraph ------------------------------------------------------------------


def test_langchain_tools_never_raise(box):
    tools = {t.name: t for t in box.langchain_tools()}
    assert list(tools) == box.names
    chat = tools["chat"]
    msg = chat.invoke({"type": "tool_call", "name": "chat", "id": "call-1", "args": {"message": "hi", "max_new_tokens": 2}})
    assert msg.status == "success" and msg.tool_call_id == "call-1" and msg.content.startswith("[c1] chat:")
    assert msg.artifact["call_id"] == "c1" and box.log[-1].external_id == "call-1"
    bad = chat.invoke({"type": "tool_call", "name": "chat", "id": "call-2", "args": {"message": ["x"], "foo": 1}})
    assert bad.status == "error" and "'foo' is not an argument" in bad.content
    assert "error:" in chat.invoke({"bogus": 1}) and "error:" in chat.invoke("a plain string")


def test_langgraph_tool_node_round_trip(box):
    from langchain_core.messages import AIMessage
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode

    calls = [
        {"name": "chat", "args": {"message": "Hello", "max_new_tokens": 2}, "id": "t1"},
        {"name": "verbalize", "args": {"prompt": "Hello", "positions": [0, 500]}, "id": "t2"},
        {"name": "reconstruct", "args": {"sentence": "greeting", "prompt": "Hello", "top_k": 2}, "id": "t3"},
    ]

    def agent(state):
        return {"messages": [AIMessage(content="", tool_calls=calls)]}

    g = StateGraph(MessagesState)
    g.add_node("agent", agent)
    g.add_node("tools", ToolNode(box.langchain_tools()))
    g.add_edge(START, "agent")
    g.add_edge("agent", "tools")
    g.add_edge("tools", END)
    out = g.compile().invoke({"messages": []})["messages"][1:]
    by_id = {m.tool_call_id: m for m in out}
    assert by_id["t1"].status == "success" and by_id["t3"].status == "success"
    assert by_id["t2"].status == "error" and "Position 500 is out of range" in by_id["t2"].content
    assert {r.external_id for r in box.log} == {"t1", "t2", "t3"}


# ---- MCP ----------------------------------------------------------------------------------


async def test_mcp_round_trip(box):
    from mcp import Client

    async with Client(box.mcp_server()) as client:
        listed = (await client.list_tools()).tools
        assert [t.name for t in listed] == box.names
        assert listed[0].input_schema == TOOLS[listed[0].name].input_schema()
        assert "target" in (client.instructions or "")
        res = await client.call_tool("chat", {"message": "Hello", "max_new_tokens": 2})
        assert not res.is_error and res.content[0].text.startswith("[c1] chat:")
        assert res.structured_content["call_id"] == "c1"
        res = await client.call_tool("verbalize", {"prompt": "Hello", "positions": "last"})
        assert not res.is_error and "untrained" in res.content[0].text
        res = await client.call_tool("steer", {"prompt": "Hello"})
        assert res.is_error and "exactly one of text" in res.content[0].text
        res = await client.call_tool("nope", {})
        assert res.is_error and "no tool 'nope'" in res.content[0].text
        res = await client.call_tool("add_hypothesis", {"statement": "It greets.", "evidence": ["c1"]})
        assert not res.is_error
    assert box.notes.hypotheses[0].evidence == ["c1"]


async def test_mcp_budget_refusal(env):
    from mcp import Client

    target, nla = env
    box = Toolbox(target, nla, "behavioural", Budget(max_tool_calls=1))
    async with Client(box.mcp_server()) as client:
        assert not (await client.call_tool("complete", {"text": "a", "max_new_tokens": 1})).is_error
        res = await client.call_tool("complete", {"text": "a", "max_new_tokens": 1})
        assert res.is_error and "Budget spent" in res.content[0].text


# ---- `nla mcp` over stdio (the real command, on the embedded model) ----------------------------


@pytest.mark.integration
@pytest.mark.slow
async def test_nla_mcp_stdio_round_trip(tmp_path):
    """`nla mcp --organism ID` speaks MCP on stdio: list the tools, call one, read a budget
    refusal; the transcript is written on exit."""
    import shutil
    import sys

    from mcp import Client
    from mcp.client.stdio import StdioServerParameters, stdio_client

    exe = shutil.which("nla", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the `nla` script is not installed in this environment")
    (tmp_path / "orgs").mkdir()
    (tmp_path / "orgs" / "stdio-plain.yaml").write_text(
        "id: stdio-plain\nbase_model: '*'\nconstruction: {method: plain}\ncontrol: true\n"
        "ground_truth: {behaviour: no planted behaviour}\n")
    transcript = tmp_path / "calls.json"
    params = StdioServerParameters(command=exe, args=[
        "mcp", "--organism", "stdio-plain", "--organisms-dir", str(tmp_path / "orgs"), "--tool-set", "behavioural",
        "--max-calls", "1", "--transcript", str(transcript)])
    # The server's stderr goes to a file: stdio_client's default (sys.stderr, bound when mcp is
    # first imported) may be a capture stream without a file descriptor under pytest.
    with open(tmp_path / "server.err", "w") as errlog:
        async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=300) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            assert names == TOOL_SETS["behavioural"]
            res = await client.call_tool("complete", {"text": "The capital of France is", "max_new_tokens": 3})
            assert not res.is_error and res.content[0].text.startswith("[c1] complete:")
            res = await client.call_tool("chat", {"message": "hi"})
            assert res.is_error and "Budget spent" in res.content[0].text
    data = json.loads(transcript.read_text())
    assert [c["name"] for c in data["calls"]] == ["complete", "chat"] and data["budget"]["tool_calls"] == 1
