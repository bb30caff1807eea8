"""tools: the tool-call surface over a `Target` and an NLA.

One definition per tool (pydantic arguments, a docstring for the calling model, a function over
a `Toolbox`), registered by name and exported three ways: LangChain tools, Anthropic tool
schemas and an MCP server. Tool sets: `behavioural` (chat, prefill, sampling, notes) and `nla`
(everything). A new tool is one module that calls `register_tool`. What verbalize explains (the
target's activations, or a placebo's) is a toolbox option, `verbalize_source` (`tools.sources`).
"""

from . import behavioural as _behavioural  # noqa: F401  (registers chat, prefill, sample, ...)
from . import nla_tools as _nla_tools  # noqa: F401  (registers verbalize, reconstruct, steer, themes)
from .base import (
    TOOL_SETS,
    TOOLS,
    Budget,
    ToolArgs,
    ToolboxError,
    ToolDef,
    ToolError,
    ToolResult,
    get_tool,
    register_tool,
    tool_names,
)
from .export import FORMATS, anthropic_schemas, langchain_schemas, langchain_tools, mcp_tool_listing, schemas
from .notes import Hypothesis, Note, Notes  # registers note, read_notes, add/update_hypothesis, read_output
from .sources import VERBALIZE_SOURCES, VerbalizeSource, register_verbalize_source
from .toolbox import CallRecord, StoredVector, Toolbox

__all__ = [
    "TOOL_SETS", "TOOLS", "Budget", "ToolArgs", "ToolDef", "ToolError", "ToolboxError", "ToolResult", "get_tool",
    "register_tool", "tool_names", "Hypothesis", "Note", "Notes", "CallRecord", "StoredVector", "Toolbox",
    "FORMATS", "anthropic_schemas", "langchain_schemas", "langchain_tools", "mcp_tool_listing", "schemas",
    "build_mcp_server", "serve_stdio", "VERBALIZE_SOURCES", "VerbalizeSource", "register_verbalize_source",
]


def __getattr__(name: str):
    # The MCP SDK is imported only when the MCP server is used (`nla mcp`), not with every tool.
    if name in ("build_mcp_server", "serve_stdio"):
        from . import mcp_server

        return getattr(mcp_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
