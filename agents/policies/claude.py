"""`claude`: Claude through the `anthropic` SDK with native tool use.

The conversation with Claude lives in the graph state (`policy_state["messages"]`, plain JSON),
so a resumed run continues the same conversation. Each turn sends the results of the previous
turn's tool_use blocks (matched by tool_use id), plus a one-line budget status. The system
prompt and tool definitions carry a cache breakpoint (they never change within a run) and so
does the newest user turn (the conversation prefix is re-read from the cache next turn).

Transient API failures (connection, timeout, rate limit, 5xx / overloaded) are retried with
exponential backoff, or after the server's `retry-after` when it sends one; when the retries are
spent the policy raises `PolicyUnavailableError` and the graph records the run as failed (never
as "nothing found"). So does a refusal (`stop_reason == "refusal"`). Tool calls of a reply cut
off at `max_tokens` are not executed: they come back to Claude as malformed calls (their input
may be incomplete), so a truncated `finish_audit` never reads as a report.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

from ..policy import (
    FINISH,
    Decision,
    MissingAPIKeyError,
    PolicyFailedError,
    PolicyUnavailableError,
    PolicyView,
    memory_digest,
    register_policy,
)

__all__ = ["ClaudePolicy", "DEFAULT_MODEL", "retry_after_seconds", "is_retryable", "retry_delay", "accepts_param"]

DEFAULT_MODEL = os.environ.get("NLA_CLAUDE_MODEL", "claude-sonnet-4-5")
MAX_CONTEXT_CHARS = 400_000  # older tool results are shortened beyond this
MEMORY_EVERY = 8  # re-show the notes and hypotheses every this many turns
MAX_RETRY_AFTER = 600.0  # seconds: a longer retry-after is capped (the run would look hung)
NO_REPLY = "(no reply)"  # stands for an empty assistant turn: the API rejects empty or blank text


def retry_after_seconds(exc: BaseException) -> float | None:
    """The wait the server asked for (`retry-after-ms` or `retry-after`, in seconds or as an
    HTTP date) on an API error, or None when it did not say."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if not headers:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        val = headers.get("retry-after")
        if val is None:
            return None
        try:
            return max(0.0, float(val))
        except ValueError:
            from email.utils import parsedate_to_datetime

            return max(0.0, parsedate_to_datetime(val).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def retry_delay(exc: BaseException, retries: int, backoff: float, max_backoff: float) -> float:
    """How long to wait before retry number `retries + 1`: the server's retry-after when given,
    else exponential backoff with jitter."""
    after = retry_after_seconds(exc)
    if after is not None:
        return min(after, MAX_RETRY_AFTER)
    return min(max_backoff, backoff * (2 ** retries)) * (0.5 + random.random() / 2)


def accepts_param(client: Any, name: str) -> bool:
    """Whether `client.messages.create` takes keyword `name`: SDK releases drop sampling
    parameters the API no longer takes (2.x has no `temperature`), and passing one raises
    TypeError on every call. Stand-ins taking **kwargs accept everything."""
    import inspect

    try:
        params = inspect.signature(client.messages.create).parameters
    except (TypeError, ValueError, AttributeError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def is_retryable(exc: BaseException) -> bool:
    """Connection errors, timeouts, rate limits, overload and 5xx answers."""
    return _retryable(exc)


def _retryable(exc: BaseException) -> bool:
    try:
        import anthropic
    except ImportError:  # pragma: no cover
        return isinstance(exc, (ConnectionError, TimeoutError))
    if isinstance(exc, (anthropic.APIConnectionError, anthropic.APITimeoutError, anthropic.RateLimitError,
                        anthropic.InternalServerError)):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(exc, (ConnectionError, TimeoutError)) or status in (408, 409, 429, 500, 502, 503, 504, 529)


def _api_error(exc: BaseException) -> bool:
    try:
        import anthropic

        return isinstance(exc, anthropic.APIError)
    except ImportError:  # pragma: no cover
        return False


def _block_dict(block: Any) -> dict[str, Any] | None:
    kind = getattr(block, "type", None) if not isinstance(block, dict) else block.get("type")
    get = (lambda k: block.get(k)) if isinstance(block, dict) else (lambda k: getattr(block, k, None))
    if kind == "text":
        text = get("text") or ""
        return {"type": "text", "text": text} if text.strip() else None  # the API rejects blank text blocks
    if kind == "tool_use":
        return {"type": "tool_use", "id": get("id"), "name": get("name"), "input": get("input") or {}}
    return None  # thinking and other blocks are not sent back


@register_policy("claude")
class ClaudePolicy:
    name = "claude"

    def __init__(self, model: str | None = None, *, client: Any = None, api_key: str | None = None,
                 max_tokens: int = 4096, temperature: float | None = None, max_retries: int = 5,
                 backoff: float = 2.0, max_backoff: float = 60.0, sleep: Callable[[float], None] = time.sleep,
                 timeout: float = 300.0):
        self.model = model or DEFAULT_MODEL
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sleep = sleep
        if client is None:
            key = api_key or os.environ.get("ANTHROPIC_API_KEY")
            if not key:
                raise MissingAPIKeyError(
                    "The claude policy needs an Anthropic API key, and ANTHROPIC_API_KEY is not set.",
                    "export ANTHROPIC_API_KEY=... (or use --policy offline, which needs no key).",
                )
            import anthropic

            client = anthropic.Anthropic(api_key=key, max_retries=0, timeout=timeout)  # we retry ourselves
        self.client = client

    # ---- request building ------------------------------------------------------------------

    def tools_param(self, view: PolicyView) -> list[dict[str, Any]]:
        return [{"name": t.name, "description": t.description, "input_schema": t.input_schema} for t in view.tools]

    @staticmethod
    def status_line(view: PolicyView) -> str:
        b = view.budget_left
        open_h = [h for h in view.hypotheses.values() if h.get("status") != "rejected"]
        secs = f", {int(b['seconds'])} s" if "seconds" in b else ""
        return (f"[budget left: {int(b['tool_calls'])} tool calls, {int(b['generated_tokens'])} generated tokens"
                f"{secs}; {len(open_h)} open hypotheses]")

    def new_user_turn(self, view: PolicyView, messages: list[dict]) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = []
        if not messages:
            content.append({"type": "text", "text": view.task})
        else:
            last = messages[-1]
            uses = [b for b in last.get("content", []) if b.get("type") == "tool_use"] if last["role"] == "assistant" else []
            for b in uses:
                rec = next((c for c in reversed(view.calls) if c.get("ref") == b["id"]), None)
                text = rec.get("text", "") if rec else "error: this call was not executed."
                block = {"type": "tool_result", "tool_use_id": b["id"], "content": text or "(empty)"}
                if rec is None or rec.get("is_error"):
                    block["is_error"] = True
                content.append(block)
            if not uses:
                content.append({"type": "text", "text": "Continue the audit: call a tool, or call finish_audit to end."})
        turn = sum(1 for m in messages if m["role"] == "assistant")
        if turn and turn % MEMORY_EVERY == 0 or view.final:
            content.append({"type": "text", "text": memory_digest(view)})
        if view.final:
            content.append({"type": "text", "text": (
                f"The budget is spent. Call {FINISH} now with at most {view.max_hypotheses} hypotheses, ranked best "
                "first (or nothing_found=true if no hypothesis is supported by evidence).")})
        else:
            content.append({"type": "text", "text": self.status_line(view)})
        return content

    @staticmethod
    def _with_cache_marks(messages: list[dict]) -> list[dict]:
        """A copy with a cache breakpoint on the last block of the newest user turn, without the
        blank text blocks the API rejects (a turn left empty says so in words)."""
        out = []
        for m in messages:
            blocks = [dict(b) for b in m["content"] if not (b.get("type") == "text" and not str(b.get("text", "")).strip())]
            out.append(dict(m, content=blocks or [{"type": "text", "text": NO_REPLY}]))
        for m in reversed(out):
            if m["role"] == "user" and m["content"]:
                m["content"][-1]["cache_control"] = {"type": "ephemeral"}
                break
        return out

    @staticmethod
    def _shrink(messages: list[dict]) -> None:
        """Shorten the oldest tool results once the conversation gets very long."""
        total = sum(len(str(b.get("content", b.get("text", "")))) for m in messages for b in m["content"])
        for m in messages:
            if total <= MAX_CONTEXT_CHARS:
                return
            for b in m["content"]:
                if b.get("type") == "tool_result" and isinstance(b.get("content"), str) and len(b["content"]) > 400:
                    total -= len(b["content"]) - 400
                    b["content"] = b["content"][:400] + " [older output shortened; use read_output to see it]"

    def request(self, view: PolicyView, messages: list[dict]) -> dict[str, Any]:
        req: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": [{"type": "text", "text": view.system_prompt, "cache_control": {"type": "ephemeral"}}],
            "tools": self.tools_param(view),
            "messages": self._with_cache_marks(messages),
        }
        if view.final:
            req["tool_choice"] = {"type": "tool", "name": FINISH}
        if self.temperature is not None and accepts_param(self.client, "temperature"):
            req["temperature"] = self.temperature
        return req

    # ---- the call ------------------------------------------------------------------------------

    def _create(self, req: dict[str, Any]) -> tuple[Any, int]:
        retries = 0
        while True:
            try:
                return self.client.messages.create(**req), retries
            except Exception as exc:  # noqa: BLE001 - classified below
                if _retryable(exc) and retries < self.max_retries:
                    delay = retry_delay(exc, retries, self.backoff, self.max_backoff)
                    retries += 1
                    self.sleep(delay)
                    continue
                if _retryable(exc) or _api_error(exc):
                    what = f"after {retries} retries" if _retryable(exc) else "(not retryable)"
                    raise PolicyUnavailableError(f"Anthropic API call failed {what}: {type(exc).__name__}: {exc}") from exc
                raise

    def decide(self, view: PolicyView) -> Decision:
        messages: list[dict] = list(view.policy_state.get("messages", []))
        messages.append({"role": "user", "content": self.new_user_turn(view, messages)})
        self._shrink(messages)
        response, retries = self._create(self.request(view, messages))
        stop = getattr(response, "stop_reason", None)
        if stop == "refusal":
            raise PolicyFailedError(f"{self.model} refused to go on with the audit (stop_reason=refusal).")
        blocks = [b for b in (_block_dict(x) for x in (response.content or [])) if b is not None]
        if not blocks:
            blocks = [{"type": "text", "text": NO_REPLY}]
        messages.append({"role": "assistant", "content": blocks})
        actions: list[dict[str, Any]] = []
        for b in blocks:
            if b["type"] != "tool_use":
                continue
            act = {"id": b["id"], "tool": b["name"], "args": b["input"]}
            if stop == "max_tokens":  # its input may be cut off: never run it (nor read it as a report)
                act["error"] = (f"your reply was cut off at the {self.max_tokens}-token limit, so this call's "
                                "input may be incomplete; make the call again, shorter.")
            actions.append(act)
        thought = "\n".join(b["text"] for b in blocks if b["type"] == "text" and b["text"] != NO_REPLY).strip() or None
        u = getattr(response, "usage", None)
        usage = {
            "llm_calls": 1, "llm_retries": retries,
            "llm_input_tokens": int(getattr(u, "input_tokens", 0) or 0),
            "llm_output_tokens": int(getattr(u, "output_tokens", 0) or 0),
            "llm_cache_read_tokens": int(getattr(u, "cache_read_input_tokens", 0) or 0),
            "llm_cache_write_tokens": int(getattr(u, "cache_creation_input_tokens", 0) or 0),
        }
        return Decision(actions, state={"messages": messages, "model": self.model}, usage=usage, thought=thought)
