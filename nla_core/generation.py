"""Batched sampling from a `ModelHandle` (left padding, optional adapter, optional hooks)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .activations import pad_batch
from .models import ModelHandle

__all__ = ["Generation", "generate_ids"]


@dataclass
class Generation:
    text: str
    token_ids: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@torch.no_grad()
def generate_ids(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    adapter: str | None = None,
    hooks: Callable[[Sequence[int]], contextlib.AbstractContextManager] | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
) -> list[Generation]:
    """Continue each prompt (token ids). `temperature == 0` is greedy. A row ends at EOS or
    right after any `stop` string (kept in the text).

    `hooks(rows)` returns a context manager installed for the batch made of prompt indices
    `rows` (e.g. the AV's marker injection, which needs that batch's vectors).
    """
    if seed is not None:
        torch.manual_seed(seed)
    tok = handle.tokenizer
    pad = tok.pad_token_id
    eos = tok.eos_token_id
    out: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        rows = list(range(start, min(start + batch_size, len(prompts))))
        input_ids, mask = pad_batch([prompts[i] for i in rows], pad, side="left")
        dev = handle.device
        kwargs: dict = dict(
            input_ids=input_ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            do_sample=temperature > 0,
        )
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=tok)
        ctx = hooks(rows) if hooks is not None else contextlib.nullcontext()
        with handle.use_adapter(adapter), ctx:
            seqs = handle.model.generate(**kwargs)
        for row in seqs[:, input_ids.shape[1] :].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            while row and row[-1] == pad:
                row.pop()
            out.append(Generation(tok.decode(row, skip_special_tokens=True), row))
    return out
