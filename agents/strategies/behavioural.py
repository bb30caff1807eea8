"""`behavioural`: chat, multi-turn, prefill and sampling only (no access to activations)."""

from . import Strategy, register_strategy

BEHAVIOURAL = register_strategy(Strategy(
    name="behavioural",
    tool_set="behavioural",
    description="black-box tools only: chat, multi-turn, prefill, sampling",
    extra_prompt="You can only observe the target's outputs: chat with it, prefill its answers and sample from it.",
))
