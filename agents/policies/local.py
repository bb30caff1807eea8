"""`local`: a local Hugging Face chat model that calls tools through its chat template
(e.g. Qwen2.5-7B-Instruct on a GPU).

The tool definitions go through `apply_chat_template(..., tools=...)` when the template knows
about tools (Qwen2.5, Llama 3.x, Hermes-style templates); otherwise they are written into the
system prompt with the same `<tool_call>{"name": ..., "arguments": ...}</tool_call>` convention.
Replies are parsed robustly: `<tool_call>` blocks, fenced JSON, bare JSON objects, Python-style
dicts, trailing commas, `parameters` instead of `arguments`, arguments given as a JSON string,
several calls in one reply. Anything that looks like a call but cannot be parsed comes back as
a malformed action (fed back to the model as an error, counted and bounded by the graph).

The conversation lives in `policy_state["messages"]`, so a resumed run continues it. What is
sent alternates user and assistant turns (the budget line rides on the last tool result or user
turn, and consecutive user turns are merged for templates without tool support), and is trimmed
to the model's context: old tool results are shortened first, then the oldest exchanges after the
task are left out (the memory digest the prompt shows every few turns keeps the notes). A chat
template that still rejects the conversation fails the run (`PolicyFailedError`).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from typing import Any

from ..policy import FINISH, Decision, PolicyFailedError, PolicyView, memory_digest, register_policy

__all__ = ["LocalPolicy", "parse_tool_calls", "merge_roles", "DEFAULT_LOCAL_MODEL"]

DEFAULT_CONTEXT_TOKENS = 32768  # when neither the option nor the model says
OLD_RESULT_CHARS = 300          # an old tool result is shortened to this when the context is full

DEFAULT_LOCAL_MODEL = "Qwen/Qwen2.5-7B-Instruct"
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
FENCE = re.compile(r"```(?:json|tool_call|python)?\s*(\{.*?\})\s*```", re.S)

TOOLS_IN_PROMPT = """\

# Tools

You may call one or more functions. Function signatures (JSON schema):
<tools>
{tools}
</tools>

For each call, write a JSON object with the function name and arguments inside <tool_call></tool_call> tags:
<tool_call>
{{"name": "<function-name>", "arguments": {{...}}}}
</tool_call>"""


def _loads(text: str) -> Any:
    """JSON, or the forms small models write instead (Python literals, trailing commas)."""
    text = text.strip()
    for attempt in (text, re.sub(r",\s*([}\]])", r"\1", text)):
        try:
            return json.loads(attempt)
        except json.JSONDecodeError:
            pass
    try:
        return ast.literal_eval(re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", text))))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"not valid JSON: {text[:200]!r}") from None


def _balanced_objects(text: str) -> list[str]:
    """Top-level {...} spans (string-aware brace matching)."""
    out, depth, start, in_str, esc, quote = [], 0, None, False, False, ""
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                in_str = False
            continue
        if ch in "\"'" and depth > 0:
            in_str, quote = True, ch
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0 and start is not None:
                out.append(text[start : i + 1])
    return out


def _as_call(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError("a tool call must be a JSON object with `name` and `arguments`")
    if "function" in obj and isinstance(obj["function"], dict):  # OpenAI style
        obj = obj["function"]
    name = obj.get("name") or obj.get("tool") or obj.get("tool_name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError("the tool call has no `name`")
    args = obj.get("arguments", obj.get("parameters", obj.get("args", obj.get("input", {}))))
    if isinstance(args, str):
        args = _loads(args) if args.strip() else {}
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ValueError(f"the arguments of {name} must be a JSON object")
    return {"tool": name.strip(), "args": args}


def parse_tool_calls(text: str, known: set[str] | None = None) -> tuple[list[dict[str, Any]], str]:
    """(actions, remaining text). Each action is `{"tool", "args"}` or `{"error"}`."""
    actions: list[dict[str, Any]] = []
    blocks = TOOL_CALL.findall(text)
    rest = TOOL_CALL.sub("", text)
    if not blocks:
        blocks = FENCE.findall(text)
        rest = FENCE.sub("", text) if blocks else text
    if not blocks:
        # bare JSON objects that look like calls
        for span in _balanced_objects(text):
            if re.search(r"[\"']name[\"']\s*:", span) or re.search(r"[\"']function[\"']\s*:", span):
                blocks.append(span)
                rest = rest.replace(span, "")
    for b in blocks:
        body = b.strip()
        spans = _balanced_objects(body) or [body]
        for span in spans:
            try:
                call = _as_call(_loads(span))
            except ValueError as exc:
                actions.append({"tool": "?", "args": {}, "error": f"{exc}. Write <tool_call>{{\"name\": ..., "
                                                                  f"\"arguments\": {{...}}}}</tool_call>."})
                continue
            if known is not None and call["tool"] not in known:
                # a near miss such as "functions.chat" or "chat()" is fixed silently
                tail = re.sub(r"\W+$", "", call["tool"].split(".")[-1])
                if tail in known:
                    call["tool"] = tail
            actions.append(call)
    return actions, rest.strip()


def merge_roles(messages: list[dict]) -> list[dict]:
    """Consecutive messages of one role joined into one (contents separated by a blank line)."""
    out: list[dict] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = dict(out[-1], content=f"{out[-1]['content']}\n\n{m['content']}")
        else:
            out.append(dict(m))
    return out


@register_policy("local")
class LocalPolicy:
    name = "local"

    def __init__(self, model: str | None = None, *, generate: Callable[[list[dict], list[dict]], str] | None = None,
                 max_new_tokens: int = 1024, temperature: float = 0.0, device: str | None = None,
                 dtype: str = "auto", max_context_tokens: int | None = None):
        """`generate(messages, tools) -> str` replaces the HF model (tests, other backends).
        `max_context_tokens`: the prompt plus the reply must fit in it (default: the model's
        context length, else 32768); without a tokenizer a token is counted as 4 characters."""
        self.model_name = model or DEFAULT_LOCAL_MODEL
        self.max_context_tokens = max_context_tokens
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.device = device
        self.dtype = dtype
        self._generate = generate
        self._model: Any = None
        self._tok: Any = None

    # ---- the model ------------------------------------------------------------------------------

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nla_core.errors import ModelNotFoundError

        try:
            self._tok = AutoTokenizer.from_pretrained(self.model_name)
            dev = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._model = AutoModelForCausalLM.from_pretrained(self.model_name, dtype=self.dtype).to(dev).eval()
        except OSError as exc:
            raise ModelNotFoundError(f"Cannot load the local policy model {self.model_name!r}: {exc}",
                                     "pass --policy-model with a local path or a cached HF model id.") from None

    def _template_knows_tools(self) -> bool:
        tpl = getattr(self._tok, "chat_template", None) or ""
        return "tools" in tpl

    def render(self, messages: list[dict], tools: list[dict]) -> str:
        """The prompt text for `messages` with `tools` (OpenAI-style function schemas)."""
        try:
            if self._template_knows_tools():
                return self._tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
            msgs = [dict(m) for m in messages]
            listing = "\n".join(json.dumps(t) for t in tools)
            # templates without tool support: tool results become user turns (merged, so that
            # templates which insist on alternating roles accept them)
            for m in msgs:
                if m["role"] == "tool":
                    m["role"], m["content"] = "user", f"<tool_response>\n{m['content']}\n</tool_response>"
            msgs[0] = {"role": "system", "content": msgs[0]["content"] + TOOLS_IN_PROMPT.format(tools=listing)}
            return self._tok.apply_chat_template(merge_roles(msgs), add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - jinja TemplateError and friends: the auditor cannot go on
            raise PolicyFailedError(f"The chat template of {self.model_name} rejected the conversation: "
                                    f"{type(exc).__name__}: {exc}") from exc

    # ---- the context window ---------------------------------------------------------------------

    def _context_tokens(self) -> int:
        if self.max_context_tokens:
            return int(self.max_context_tokens)
        cfg = getattr(self._model, "config", None)
        n = getattr(cfg, "max_position_embeddings", None) or getattr(self._tok, "model_max_length", None)
        return int(n) if isinstance(n, int) and 0 < n < 10_000_000 else DEFAULT_CONTEXT_TOKENS

    def _n_tokens(self, messages: list[dict], tools: list[dict]) -> int:
        if self._tok is None:  # a stand-in generate(): about 4 characters a token
            return (sum(len(str(m.get("content", ""))) for m in messages) + len(json.dumps(tools))) // 4
        return len(self._tok(self.render(messages, tools), add_special_tokens=False)["input_ids"])

    def fit_context(self, messages: list[dict], tools: list[dict]) -> list[dict]:
        """A copy of `messages` that fits the context with room for the reply: old tool results
        shortened first, then the oldest exchanges after the task left out (with a note)."""
        limit = self._context_tokens() - self.max_new_tokens
        msgs = [dict(m) for m in messages]
        if self._n_tokens(msgs, tools) <= limit:
            return msgs
        last_asst = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        for m in msgs[:last_asst]:
            c = str(m.get("content", ""))
            if m["role"] == "tool" and len(c) > OLD_RESULT_CHARS:
                m["content"] = c[:OLD_RESULT_CHARS] + " [shortened to fit the context; read_output shows it all]"
        dropped = 0
        head = 2 if len(msgs) > 1 and msgs[0]["role"] == "system" else 1  # system prompt and task stay
        while self._n_tokens(msgs, tools) > limit:
            # the oldest exchange: an assistant turn and the tool/user turns answering it
            starts = [i for i, m in enumerate(msgs) if i >= head and m["role"] == "assistant"]
            if len(starts) < 2:  # only the newest exchange is left: send it as it is
                break
            del msgs[starts[0]:starts[1]]
            dropped += 1
        if dropped:
            task = msgs[head - 1]
            msgs[head - 1] = dict(task, content=f"{task['content']}\n\n[{dropped} earlier exchange(s) are left out to "
                                                 "fit the context; read_notes shows your notes and hypotheses.]")
        return msgs

    def generate(self, messages: list[dict], tools: list[dict], *, seed: int = 0) -> str:
        """The model's next turn. Sampling (temperature > 0) draws from a generator seeded with
        `seed`, so a resumed audit, or one running beside others, writes the same turn."""
        if self._generate is not None:
            return self._generate(self.fit_context(messages, tools), tools)
        from nla_core.generation import generate_ids
        from nla_core.models import handle_from

        self._load()
        text = self.render(self.fit_context(messages, tools), tools)
        ids = self._tok(text, add_special_tokens=False)["input_ids"]
        handle = handle_from(self._model, self._tok, "auditor")
        gen = generate_ids(handle, [ids], max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                           seed=seed)[0]
        self._last_usage = (len(ids), gen.n_tokens)
        return gen.text

    # ---- the protocol ---------------------------------------------------------------------------------

    @staticmethod
    def tools_param(view: PolicyView) -> list[dict]:
        return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.input_schema}} for t in view.tools]

    def decide(self, view: PolicyView) -> Decision:
        messages: list[dict] = list(view.policy_state.get("messages", []))
        b = view.budget_left
        note = (f"[budget left: {int(b['tool_calls'])} tool calls, {int(b['generated_tokens'])} tokens"
                + (f", {int(b['seconds'])} s]" if "seconds" in b else "]"))
        turn = sum(1 for m in messages if m["role"] == "assistant")
        if turn and turn % 8 == 0:
            note = memory_digest(view) + "\n" + note
        if view.final:
            note = memory_digest(view) + (f"\nThe budget is spent. Call {FINISH} now with at most "
                                          f"{view.max_hypotheses} hypotheses (or hypotheses=[] and nothing_found=true).")
        # The note joins the turn that answers the model (never a user turn of its own: two user
        # turns in a row break templates that insist on alternating roles).
        if not messages:
            messages = [{"role": "system", "content": view.system_prompt},
                        {"role": "user", "content": f"{view.task}\n\n{note}"}]
        else:
            pending_refs = view.policy_state.get("pending_refs", [])
            for ref in pending_refs:
                rec = next((c for c in reversed(view.calls) if c.get("ref") == ref), None)
                messages.append({"role": "tool", "name": (rec or {}).get("tool", "?"),
                                 "content": (rec or {}).get("text") or "error: this call was not executed."})
            if pending_refs:
                messages[-1] = dict(messages[-1], content=f"{messages[-1]['content']}\n\n{note}")
            else:
                messages.append({"role": "user", "content": "Continue the audit: call a tool inside <tool_call> tags, "
                                                            f"or call {FINISH} to end.\n\n{note}"})
        self._last_usage = (0, 0)
        reply = self.generate(messages, self.tools_param(view), seed=view.seed * 1_000_003 + view.step)
        actions, text = parse_tool_calls(reply, set(view.tool_names))
        if view.final:
            actions = [a for a in actions if a.get("tool") == FINISH] or actions
        step = view.step
        for i, a in enumerate(actions):
            a["id"] = f"l{step}.{i}"
        messages.append({"role": "assistant", "content": reply})
        usage = {"llm_calls": 1, "llm_input_tokens": self._last_usage[0], "llm_output_tokens": self._last_usage[1]}
        return Decision(actions, state={"messages": messages, "pending_refs": [a["id"] for a in actions]},
                        usage=usage, thought=text or None)
