"""The same tool definitions, exported three ways: LangChain tools (for LangGraph), Anthropic
tool JSON schemas, and MCP tool listings (the server itself is in `mcp_server`)."""

from __future__ import annotations

import contextvars
import json
from typing import Any

from langchain_core.tools import BaseTool, ToolException
from pydantic import ConfigDict

from .base import TOOL_SETS, TOOLS

__all__ = ["langchain_tools", "anthropic_schemas", "mcp_tool_listing", "langchain_schemas", "schemas", "FORMATS"]

FORMATS = ("anthropic", "langchain", "mcp")

_CALL_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("nla_tool_call_id", default=None)


class ToolboxTool(BaseTool):
    """A LangChain tool that forwards to `Toolbox.call`. Arguments are validated by the toolbox
    (not by LangChain), so a bad call comes back as a readable error message (a ToolMessage with
    status "error" inside a ToolNode), never as an exception. The artifact is the structured
    result: `{"call_id", "data", "tokens_generated"}`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    toolbox: Any = None
    handle_tool_error: Any = True
    response_format: Any = "content_and_artifact"

    def run(self, tool_input: Any, *args: Any, tool_call_id: str | None = None, **kwargs: Any) -> Any:
        token = _CALL_ID.set(tool_call_id)
        try:
            return super().run(_as_dict(tool_input), *args, tool_call_id=tool_call_id, **kwargs)
        finally:
            _CALL_ID.reset(token)

    async def arun(self, tool_input: Any, *args: Any, tool_call_id: str | None = None, **kwargs: Any) -> Any:
        token = _CALL_ID.set(tool_call_id)
        try:
            return await super().arun(_as_dict(tool_input), *args, tool_call_id=tool_call_id, **kwargs)
        finally:
            _CALL_ID.reset(token)

    def _run(self, **kwargs: Any) -> tuple[str, dict[str, Any]]:
        if self.toolbox is None:
            raise ToolException("This tool was built for its schema only and is not bound to a target.")
        kwargs.pop("run_manager", None)
        raw = kwargs.pop("__raw_input__", None)
        result = self.toolbox.call(self.name, raw if raw is not None else kwargs, call_id=_CALL_ID.get())
        if result.is_error:
            raise ToolException(result.text)
        return result.text, {"call_id": result.call_id, "data": result.data,
                             "tokens_generated": result.tokens_generated}


def _as_dict(tool_input: Any) -> Any:
    """LangChain refuses a string input for a JSON-schema tool with an exception; hand strings
    (and other non-dicts) to the toolbox instead, which answers with a readable error."""
    if isinstance(tool_input, dict):
        return tool_input
    if isinstance(tool_input, str):
        try:
            parsed = json.loads(tool_input)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    return {"__raw_input__": tool_input}


def _names(names_or_set: str | list[str]) -> list[str]:
    return list(TOOL_SETS[names_or_set]) if isinstance(names_or_set, str) else list(names_or_set)


def langchain_tools(toolbox: Any = None, names: list[str] | str | None = None) -> list[BaseTool]:
    """LangChain tools for `toolbox` (or unbound ones, for their schemas only, from `names`)."""
    chosen = toolbox.names if toolbox is not None else _names(names or "nla")
    out = []
    for n in chosen:
        t = TOOLS[n]
        out.append(ToolboxTool(name=n, description=t.description, args_schema=t.input_schema(), toolbox=toolbox))
    return out


def anthropic_schemas(names: list[str] | str = "nla") -> list[dict[str, Any]]:
    """Tool definitions for the Anthropic Messages API (`tools=`): name, description, input_schema."""
    return [{"name": n, "description": TOOLS[n].description, "input_schema": TOOLS[n].input_schema()}
            for n in _names(names)]


def mcp_tool_listing(names: list[str] | str = "nla") -> list[dict[str, Any]]:
    """What the MCP server lists (`tools/list`): name, description, inputSchema."""
    return [{"name": n, "description": TOOLS[n].description, "inputSchema": TOOLS[n].input_schema()}
            for n in _names(names)]


def langchain_schemas(names: list[str] | str = "nla") -> list[dict[str, Any]]:
    """The tool-call format LangChain chat models are bound with (OpenAI function style)."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    return [convert_to_openai_tool(t) for t in langchain_tools(None, names)]


def schemas(fmt: str, names: list[str] | str = "nla") -> list[dict[str, Any]]:
    if fmt == "anthropic":
        return anthropic_schemas(names)
    if fmt == "langchain":
        return langchain_schemas(names)
    if fmt == "mcp":
        return mcp_tool_listing(names)
    raise ValueError(f"unknown schema format {fmt!r}; choose from {FORMATS}")
