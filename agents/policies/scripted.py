"""`scripted`: replays a fixed list of actions (for tests and demos).

Each item of `actions` is one turn: an action `{"tool": name, "args": {...}}`, a list of
actions (several tool calls in one turn), `None` (a turn with no action), or
`{"error": "..."}` (a malformed call, as an LLM might produce). When the script runs out, or
when the graph demands the final report, it submits the hypotheses recorded so far (or the
`final` it was given).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..policy import FINISH, Decision, PolicyView, register_policy

__all__ = ["ScriptedPolicy"]


def ranked_from_notes(view: PolicyView) -> list[dict[str, Any]]:
    """The open/confirmed hypotheses of the notes, best first, as a `finish_audit` list."""
    live = [h for h in view.hypotheses.values() if h.get("status") != "rejected"]
    live.sort(key=lambda h: -float(h.get("confidence", 0)))
    return [{"statement": h["statement"], "confidence": h["confidence"], "evidence": h.get("evidence", [])}
            for h in live[: view.max_hypotheses]]


@register_policy("scripted")
class ScriptedPolicy:
    name = "scripted"

    def __init__(self, actions: Sequence[Any] = (), final: list[dict[str, Any]] | None = None,
                 final_when_done: bool = True):
        self.actions = list(actions)
        self.final = final
        self.final_when_done = final_when_done

    def _finish(self, view: PolicyView) -> dict[str, Any]:
        hyps = self.final if self.final is not None else ranked_from_notes(view)
        return {"id": "finish", "tool": FINISH, "args": {"hypotheses": hyps, "nothing_found": not hyps}}

    def decide(self, view: PolicyView) -> Decision:
        i = int(view.policy_state.get("i", 0))
        if view.final:
            return Decision([self._finish(view)], state={"i": i}, thought="final report (forced)")
        if i >= len(self.actions):
            if not self.final_when_done:
                return Decision([], state={"i": i}, thought="script exhausted")
            return Decision([self._finish(view)], state={"i": i}, thought="script done")
        item = self.actions[i]
        turn = [] if item is None else (list(item) if isinstance(item, (list, tuple)) else [item])
        actions = [dict(a, id=a.get("id") or f"s{i}.{k}") for k, a in enumerate(turn)]
        return Decision(actions, state={"i": i + 1}, thought=f"scripted turn {i}")
