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
from transformers import DynamicLayer

from .activations import pad_batch
from .errors import NLAError
from .models import ModelHandle

__all__ = ["DecodeBatch", "Generation", "GenRow", "RowHooks", "generate_ids", "decode_rows", "row_seed"]


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
    indices into `rows` of each forward pass. `adapter` is one LoRA adapter for every row, or one
    per row (None: adapters off), which the rows of one forward pass may mix. With no hooks or
    `RowHooks`, rows with the same prompt, adapter and payload share one prefill."""
    per_row = adapters_per_row(adapter, len(rows))
    keys = None
    if hooks is None or isinstance(hooks, RowHooks):
        keys = [(tuple(r.prompt), per_row[i], payload_identity(hooks.payloads[i]) if hooks is not None else None)
                for i, r in enumerate(rows)]
    out: list[Generation] = []
    for start in range(0, len(rows), max(1, batch_size)):
        idx = list(range(start, min(start + batch_size, len(rows))))
        # the batch numbers its rows from 0, in admission order: row j of the batch is rows[idx[j]]
        batch_hooks = None if hooks is None else (lambda sub, idx=idx: hooks([idx[j] for j in sub]))
        batch = DecodeBatch(handle, hooks=batch_hooks)
        try:
            batch.admit([rows[i] for i in idx], adapter=[per_row[i] for i in idx],
                        keys=None if keys is None else [keys[i] for i in idx])
            while len(batch):
                batch.step()
        finally:
            batch.release()
        out += [batch.done[j] for j in range(len(idx))]
    return out


def adapters_per_row(adapter: Adapters, n: int) -> list[str | None]:
    """`adapter` (one name for every row, None for adapters off, or one per row) as one per row."""
    if adapter is None or isinstance(adapter, str):
        return [adapter] * n
    per_row = list(adapter)
    if len(per_row) != n:
        raise NLAError(f"{len(per_row)} adapters for {n} rows.", "give one adapter for all rows, or one per row.")
    return per_row


def payload_identity(payload: Any) -> Hashable:
    """A hashable stand-in for a row's payload: its value for plain data, its identity for
    anything else (a tensor), so rows share a prefill only when their hooks see the same data."""
    if payload is None or isinstance(payload, (str, int, float, bool)):
        return payload
    if isinstance(payload, tuple):
        return tuple(payload_identity(p) for p in payload)
    return ("id", id(payload))


def _adapter_args(adapter: Sequence[str | None]) -> tuple[str | None, list[str] | None]:
    """The adapter to activate for rows with these adapters, and the per-row names of a PEFT
    mixed batch (`adapter_names`, "__base__" for adapters off) when they differ (else None)."""
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


class DecodeBatch:
    """Rows sampling together in one KV cache (left padding), one token per `step`.

    Rows join between steps (`admit`: their prompts are prefilled in a forward pass of their
    own, and their cache is left-padded to the batch's length and appended) and leave when they
    end (at an EOS token, which is dropped, after `max_new_tokens`, or right after one of their
    `stop` strings, which is kept), so a serving loop can keep the batch full while calls come
    and go (`nla_core.serving`). Finished rows ride along, masked, until they are a fair share of
    the batch; then they are dropped from the cache, with any padding column no row needs.

    `hooks(row_ids)` gives the context for a forward pass over those rows (the ids `admit`
    returned, in batch order). The model's lock, its active adapter and the hooks stay entered
    from one forward pass to the next while the rows stay the same; `release` gives them up
    (another thread waits for the model, or the batch is done).
    """

    def __init__(self, handle: ModelHandle,
                 hooks: Callable[[Sequence[int]], contextlib.AbstractContextManager] | None = None):
        self.handle = handle
        self.hooks = hooks
        tok = handle.tokenizer
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._eos = _eos_ids(handle)
        self.done: dict[int, Generation] = {}  # finished rows by id
        self.going: list[int] = []  # the rows in the cache, in batch order (finished ones too, until dropped)
        self._rows: dict[int, GenRow] = {}
        self._adapters: dict[int, str | None] = {}
        self._out: dict[int, list[int]] = {}
        self._live: set[int] = set()
        self._cache: Any = None
        self._mask = self._pos = self._logits = torch.empty(0)  # [b, seq], [b, 1], [b, vocab]
        self._session = contextlib.ExitStack()
        self._session_rows: list[int] | None = None
        self._next_id = 0

    def __len__(self) -> int:
        """Rows still generating."""
        return len(self._live)

    @property
    def next_id(self) -> int:
        """The id the next admitted row gets (ids count up from 0 in admission order)."""
        return self._next_id

    @property
    def joinable(self) -> bool:
        """Whether rows can join while others generate: the cache must be one that left padding
        can extend (full attention; a sliding-window cache keeps a window per row)."""
        return self._cache is None or all(type(layer) is DynamicLayer for layer in self._cache.layers)

    @torch.no_grad()
    def admit(self, rows: Sequence[GenRow], *, adapter: Adapters = None,
              keys: Sequence[Hashable] | None = None) -> list[int]:
        """Add `rows` (prefilled now) and return their ids. `adapter`: one for all, or one per
        row. Rows with equal `keys` (same prompt, adapter and hook payload) are prefilled once and
        their cache copied. If the prefill fails, the rows already here are untouched."""
        if self._cache is not None and not self.joinable:
            raise RuntimeError("This batch's cache cannot take new rows; wait until it is done.")
        per_row = adapters_per_row(adapter, len(rows))
        ids = list(range(self._next_id, self._next_id + len(rows)))
        self._next_id += len(rows)
        start, start_keys = [], []
        for j, (i, r) in enumerate(zip(ids, rows)):
            if r.max_new_tokens <= 0:
                self.done[i] = Generation("", [])
                continue
            self._rows[i], self._adapters[i], self._out[i] = r, per_row[j], []
            start.append(i)
            start_keys.append(keys[j] if keys is not None else i)
        if not start:
            return ids
        firsts, src = _distinct(start_keys)
        dev = self.handle.device
        input_ids, mask = pad_batch([self._rows[start[f]].prompt for f in firsts], self._pad, side="left")  # [b', seq]
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        # position ids count from each row's first real token (as transformers' generate does)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [b', seq]
        try:
            out = self._forward([start[f] for f in firsts], input_ids, mask, pos, None)
        except BaseException:
            self.release()
            for i in start:
                del self._rows[i], self._adapters[i], self._out[i]
            raise
        cache, logits, step_pos = out.cache, out.logits[:, -1, :], pos[:, -1:]  # [b', vocab], [b', 1]
        if len(firsts) < len(start):
            sel = torch.tensor(src, device=dev)  # every row takes its first row's cache and logits
            cache.batch_select_indices(sel)
            logits, mask, step_pos = logits[sel], mask[sel], step_pos[sel]
        self._join(start, cache, mask, step_pos, logits)
        return ids

    def _join(self, ids: list[int], cache: Any, mask: torch.Tensor, pos: torch.Tensor, logits: torch.Tensor) -> None:
        self._live.update(ids)
        if self._cache is None:
            self._cache, self._mask, self._pos, self._logits, self.going = cache, mask, pos, logits, list(ids)
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:  # zeros before the first column
            short = width - t.shape[dim]
            if not short:
                return t
            shape = list(t.shape)
            shape[dim] = short
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old, new in zip(self._cache.layers, cache.layers):  # keys, values: [b, heads, seq, head_dim]
            old.keys = torch.cat([left_pad(old.keys, 2), left_pad(new.keys, 2)])
            old.values = torch.cat([left_pad(old.values, 2), left_pad(new.values, 2)])
        self._mask = torch.cat([left_pad(self._mask, 1), left_pad(mask, 1)])
        self._pos = torch.cat([self._pos, pos])
        self._logits = torch.cat([self._logits, logits])
        self.going = self.going + ids

    @torch.no_grad()
    def step(self) -> list[int]:
        """Sample one token for every live row, then run the forward pass for the next one.
        Returns the ids of the rows that ended (their generations are in `done`). If anything
        fails, the batch is emptied (its cache is no longer consistent) and the error raised."""
        if not self._live:
            return []
        try:
            return self._step()
        except BaseException:
            self._reset()
            raise

    def _step(self) -> list[int]:
        tok = self.handle.tokenizer
        nxt, ended = [], []
        for j, i in enumerate(self.going):
            if i not in self._live:  # ended, riding along until dropped
                nxt.append(self._pad)
                continue
            row = self._rows[i]
            t = _pick(self._logits[j], row)
            nxt.append(t)
            ids = self._out[i]
            if t not in self._eos:
                ids.append(t)
            if (t in self._eos or len(ids) >= row.max_new_tokens
                    or (row.stop and any(s in tok.decode(ids[-16:], skip_special_tokens=True) for s in row.stop))):
                ended.append(i)
        for i in ended:
            self._live.discard(i)
            self.done[i] = Generation(tok.decode(self._out[i], skip_special_tokens=True), self._out[i])
            del self._rows[i], self._out[i]  # its adapter stays while it rides along
        if not self._live:
            self._reset()
            return ended
        dev = self.handle.device
        step_ids = torch.tensor(nxt, device=dev)[:, None]  # [b, 1]
        self._pos = self._pos + 1  # [b, 1]
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)  # [b, seq + 1]
        keep = [j for j, i in enumerate(self.going) if i in self._live]
        if len(self.going) - len(keep) >= max(1, len(self.going) // _DROP_SHARE):
            # Finished rows would ride along until the longest row ends; dropping them (a copy of
            # the cache) pays off once they are a fair share of the batch.
            sel = torch.tensor(keep, device=dev)
            self._cache.batch_select_indices(sel)
            step_ids, self._pos, self._mask = step_ids[sel], self._pos[sel], self._mask[sel]
            for i in set(self.going) - self._live:
                del self._adapters[i]
            self.going = [self.going[j] for j in keep]
            self._trim_padding()
        out = self._forward(self.going, step_ids, self._mask, self._pos, self._cache)
        self._cache, self._logits = out.cache, out.logits[:, -1, :]
        return ended

    def _trim_padding(self) -> None:
        """Drop the leading columns that are padding in every row (rows that joined with a longer
        prompt, since dropped, left them)."""
        if not self.joinable:
            return
        lead = int(self._mask.any(0).int().argmax())  # first column some row attends to
        if lead > 0:
            self._mask = self._mask[:, lead:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]

    def _forward(self, row_ids: list[int], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any) -> Any:
        adapters = [self._adapters[i] for i in row_ids]
        active, names = _adapter_args(adapters)
        if self._session_rows != row_ids:
            self.release()
            self._session.enter_context(self.handle.use_adapter(active))
            self._session_rows = list(row_ids)
            if self.hooks is not None:
                self._session.enter_context(self.hooks(row_ids))
        args = {"adapter_names": names} if names else {}
        return self.handle.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 cache=cache, use_cache=True, logits_to_keep=1, **args)

    def release(self) -> None:
        """Leave the model's lock, adapter and hooks (entered again at the next forward pass)."""
        self._session_rows = None
        self._session.close()

    def _reset(self) -> None:
        """Forget the cache and every unfinished row (no row is live, or a forward pass failed)."""
        self.release()
        self._rows.clear()
        self._out.clear()
        self._adapters.clear()
        self._live.clear()
        self._cache, self.going = None, []
        self._mask = self._pos = self._logits = torch.empty(0)


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
