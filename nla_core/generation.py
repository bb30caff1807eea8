"""Batched sampling from a `ModelHandle`: left padding, an optional adapter, optional hooks, and
one random stream per row.

Each row samples from its own `torch.Generator` (seeded from the call's seed and the row's
index), so a row's text does not depend on which other rows share its batch. That is what lets
`nla_core.serving.GenerationEngine` merge the generate calls of several audits into one batch
and still give each call what it would have got alone.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .activations import pad_batch
from .models import ModelHandle

__all__ = ["Generation", "GenRow", "RowHooks", "generate_ids", "decode_rows", "row_seed"]


@dataclass
class Generation:
    text: str
    token_ids: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class RowHooks:
    """Hooks that depend on each row's own data (an organism's implant reads the row's text; the
    AV's injection the row's vector), so rows of different calls can share a batch.
    `enter(payloads)` gives the context for a batch with one payload per row; a row of another
    kind of call has payload None, and the hooks must leave that row untouched. Calls whose
    hooks share `key` enter once for all their rows. Called with row indices (`hooks(rows)`), it
    is an ordinary `generate_ids` hooks function."""

    key: Hashable
    payloads: Sequence[Any]
    enter: Callable[[list[Any]], contextlib.AbstractContextManager]

    def __call__(self, rows: Sequence[int]) -> contextlib.AbstractContextManager:
        return self.enter([self.payloads[r] for r in rows])


@dataclass
class GenRow:
    """One sequence to generate. `payload` is this row's share of its `RowHooks`."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...] = ()
    payload: Any = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row` of a call seeded with `seed` (a stable 63-bit mix of both)."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(row)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _eos_ids(handle: ModelHandle) -> set[int]:
    ids: set[int] = set()
    for v in (handle.tokenizer.eos_token_id, getattr(handle.hf_model.generation_config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def _pick(logits: torch.Tensor, row: GenRow) -> int:
    """The next token of one row from its logits [vocab]: greedy at temperature 0, else a sample
    from softmax(logits / T) cut to the top-p nucleus, drawn with the row's own generator (one
    uniform number, inverse CDF: `torch.multinomial` costs 1 ms on a 49k vocabulary)."""
    if row.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / row.temperature, dim=-1)
    ids = None
    if row.top_p < 1.0:
        probs, ids = _nucleus(probs, row.top_p)
    cdf = torch.cumsum(probs.double(), 0)
    u = torch.rand((), generator=row.generator, dtype=torch.float64) * cdf[-1]
    j = min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)
    return int(ids[j]) if ids is not None else j


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of most likely tokens whose probability reaches `top_p`: their
    probabilities and token ids, most likely first. When the k most likely tokens hold more than
    `top_p`, every token of the set is among them, so a top-k replaces sorting the vocabulary."""
    for k in (64, 1024):
        if k < probs.numel():
            p, ids = torch.topk(probs, k)
            if float(p.sum()) > top_p:
                break
    else:
        p, ids = torch.sort(probs, descending=True)
    n = int((torch.cumsum(p, 0) - p <= top_p).sum())  # tokens whose predecessors hold at most top_p
    return p[:n], ids[:n]


Adapters = str | None | Sequence[str | None]


def decode_rows(handle: ModelHandle, rows: Sequence[GenRow], *, batch_size: int, adapter: Adapters = None,
                hooks: Callable[[Sequence[int]], contextlib.AbstractContextManager] | None = None) -> list[Generation]:
    """Generate `rows` in batches of at most `batch_size` (in order); `hooks(indices)` gets the
    indices into `rows` of each batch. `adapter` is one LoRA adapter for every row, or one per
    row (None: adapters off), which the rows of one forward pass may mix. With no hooks or
    `RowHooks`, rows with the same prompt, adapter and payload share one prefill."""
    per_row = [adapter] * len(rows) if adapter is None or isinstance(adapter, str) else list(adapter)
    keys = None
    if hooks is None or isinstance(hooks, RowHooks):
        keys = [(tuple(r.prompt), per_row[i], _identity(hooks.payloads[i]) if hooks is not None else None)
                for i, r in enumerate(rows)]
    out: list[Generation] = []
    for start in range(0, len(rows), max(1, batch_size)):
        idx = list(range(start, min(start + batch_size, len(rows))))
        batch_hooks = None if hooks is None else (lambda sub, idx=idx: hooks([idx[j] for j in sub]))
        batch_adapter = adapter if adapter is None or isinstance(adapter, str) else [adapter[i] for i in idx]
        out += _decode_batch(handle, [rows[i] for i in idx], adapter=batch_adapter, hooks=batch_hooks,
                             prefill_keys=None if keys is None else [keys[i] for i in idx])
    return out


def _identity(payload: Any) -> Hashable:
    """A hashable stand-in for a row's payload: its value for plain data, its identity for
    anything else (a tensor), so rows share a prefill only when their hooks see the same data."""
    if payload is None or isinstance(payload, (str, int, float, bool)):
        return payload
    if isinstance(payload, tuple):
        return tuple(_identity(p) for p in payload)
    return ("id", id(payload))


def _adapter_args(adapter: Adapters) -> tuple[str | None, list[str] | None]:
    """The adapter to activate, and the per-row names of a PEFT mixed batch (`adapter_names`,
    "__base__" for adapters off) when the rows' adapters differ (else None)."""
    if adapter is None or isinstance(adapter, str):
        return adapter, None
    names = set(adapter)
    if len(names) == 1:
        return next(iter(names)), None
    active = next(a for a in adapter if a is not None)
    return active, [a if a is not None else "__base__" for a in adapter]


_DROP_SHARE = 8  # drop finished rows once they are 1/8 of the batch (or the batch is under 8 rows)


def _distinct(keys: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """The first row of each distinct key, and for every row the position of its key's row."""
    slot: dict[Hashable, int] = {}
    firsts: list[int] = []
    src = []
    for i, k in enumerate(keys):
        if k not in slot:
            slot[k] = len(firsts)
            firsts.append(i)
        src.append(slot[k])
    return firsts, src


@torch.no_grad()
def _decode_batch(handle: ModelHandle, rows: Sequence[GenRow], *, adapter: Adapters,
                  hooks: Callable[[Sequence[int]], contextlib.AbstractContextManager] | None,
                  prefill_keys: Sequence[Hashable] | None = None) -> list[Generation]:
    """Generate every row in one batch (KV cache, left padding). A row ends at an EOS token
    (dropped), after its `max_new_tokens`, or right after one of its `stop` strings (kept).
    `hooks(indices)` is installed for the rows in the forward pass: the rows prefilled, then all
    of them, then, each time finished rows are dropped from the batch (and the cache), the rows
    still going. Rows with equal `prefill_keys` (same prompt, adapter and hook payload; e.g. the
    samples of one call) are prefilled once and their cache is copied, since prefill is most of
    the compute of short replies to long prompts."""
    tok = handle.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = _eos_ids(handle)
    dev = handle.device
    out_ids: list[list[int]] = [[] for _ in rows]
    live = [r.max_new_tokens > 0 for r in rows]
    if not any(live):
        return [Generation("", []) for _ in rows]
    firsts, src = _distinct(prefill_keys) if prefill_keys is not None else (list(range(len(rows))), None)
    input_ids, mask = pad_batch([rows[i].prompt for i in firsts], pad, side="left")  # [b', seq]
    input_ids, mask = input_ids.to(dev), mask.to(dev)
    # position ids count from each row's first real token (as transformers' generate does)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [b', seq]
    active, names = _adapter_args(adapter)
    going = firsts  # the rows in the forward pass, as indices into `rows`
    with handle.use_adapter(active), contextlib.ExitStack() as installed:  # closed and refilled as rows change

        def install(indices: list[int]) -> None:
            if hooks is not None:
                installed.enter_context(hooks(indices))

        def forward(ids: torch.Tensor, positions: torch.Tensor, cache: Any) -> Any:
            args = {"adapter_names": [names[i] for i in going]} if names else {}
            return handle.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                cache=cache, use_cache=True, logits_to_keep=1, **args)

        install(going)
        out = forward(input_ids, pos, None)
        cache, logits = out.cache, out.logits[:, -1, :]  # [b', vocab]
        step_pos = pos[:, -1:]  # [b', 1]
        if len(firsts) < len(rows):
            sel = torch.tensor(src, device=dev)  # every row takes its first row's cache and logits
            cache.batch_select_indices(sel)
            logits, mask, step_pos = logits[sel], mask[sel], step_pos[sel]
            going = list(range(len(rows)))
            installed.close()
            install(going)
        while True:
            nxt = []
            for j, i in enumerate(going):
                row = rows[i]
                if not live[i]:
                    nxt.append(pad)
                    continue
                t = _pick(logits[j], row)
                nxt.append(t)
                if t in eos:
                    live[i] = False
                    continue
                out_ids[i].append(t)
                if len(out_ids[i]) >= row.max_new_tokens:
                    live[i] = False
                elif row.stop and any(s in tok.decode(out_ids[i][-16:], skip_special_tokens=True) for s in row.stop):
                    live[i] = False
            if not any(live):
                break
            step_ids = torch.tensor(nxt, device=dev)[:, None]  # [b, 1]
            step_pos = step_pos + 1  # [b, 1]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [b, seq + steps]
            keep = [j for j, i in enumerate(going) if live[i]]
            if len(going) - len(keep) >= max(1, len(going) // _DROP_SHARE):
                # Finished rows would ride along until the longest row ends; dropping them (a
                # copy of the cache) pays off once they are a fair share of the batch.
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                step_ids, step_pos, mask = step_ids[sel], step_pos[sel], mask[sel]
                going = [going[j] for j in keep]
                installed.close()
                install(going)
            out = forward(step_ids, step_pos, cache)
            cache, logits = out.cache, out.logits[:, -1, :]
    return [Generation(tok.decode(ids, skip_special_tokens=True), ids) for ids in out_ids]


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
    `rows` (e.g. the AV's marker injection, which needs that batch's vectors); a `RowHooks` lets
    the generation engine batch these rows with other calls' rows.

    Row i samples with seed `row_seed(seed, i)` (`seed=None`: one drawn from torch's global
    generator). Inside a `GenerationEngine`'s audits, the call joins that engine's next batch;
    its result is the same as here.
    """
    if not prompts:
        return []
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    rows = [GenRow(list(p), int(max_new_tokens), float(temperature), float(top_p), row_seed(seed, i),
                   tuple(stop or ())) for i, p in enumerate(prompts)]
    from .serving import active_engine

    engine = active_engine(handle)
    if engine is not None:
        return engine.generate(handle, rows, adapter=adapter, hooks=hooks)
    return decode_rows(handle, rows, batch_size=batch_size, adapter=adapter, hooks=hooks)
