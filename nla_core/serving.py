"""`GenerationEngine`: one model serving the generate calls of several threads in shared batches.

Several audits run at once in one process (threads), each making generate calls one at a time
(chat, samples, prefills, steered replies, the NLA's verbalize). Alone, each call is a batch of
one to a few rows, and on a CPU a batch of one uses a fraction of what a batch of 16 does per
token. The engine gathers the pending calls of its client threads and runs them as one batch:
it waits until every client thread is blocked in a generate call (or `max_wait_s` after it
became free, since a client may be busy elsewhere), then decodes the rows of calls that
can share a batch together: every call on the same model whose hooks are none or `RowHooks`
(an organism's implant, the AV's injection), whatever LoRA adapter each uses (a PEFT mixed
batch: each row goes through its own adapter). A call with an opaque hooks function runs alone.
Rows with the same prompt, adapter and hook payload (a call's samples) are prefilled once.

A row's tokens come from its own generator (see `nla_core.generation`), so a call's result does
not depend on its batch-mates; only floating-point rounding differs between batch shapes, which
can flip a near-tie (tests check that results match the unbatched path).

    engine = GenerationEngine(handle)
    def audit():                      # in each of N threads
        with engine.client():
            ...                       # every generate_ids call on `handle` joins the engine's batches
    engine.close()
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .generation import Generation, GenRow, RowHooks, decode_rows
from .models import ModelHandle

__all__ = ["GenerationEngine", "EngineStats", "active_engine"]

_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # hf model -> engine
_ENGINES_GUARD = threading.Lock()


def active_engine(handle: ModelHandle) -> GenerationEngine | None:
    """The engine that should run the calling thread's generate calls on `handle`: one serving
    this model, if the thread is one of its clients and does not hold the model's lock itself
    (a thread inside a forward pass generates directly, as the engine would wait for it)."""
    with _ENGINES_GUARD:
        engine = _ENGINES.get(handle.hf_model)
    if engine is None or not engine.is_client() or handle.lock.held():
        return None
    return engine


@dataclass
class _Call:
    handle: ModelHandle
    rows: list[GenRow]
    adapter: str | None
    hooks: Any
    alone: bool  # an opaque hooks function: the call gets a batch of its own
    t: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Generation] | None = None
    error: BaseException | None = None


@dataclass
class EngineStats:
    calls: int = 0
    batches: int = 0
    rows: int = 0
    tokens: int = 0  # tokens the rows kept
    split: int = 0  # batches that left calls pending (an opaque hooks function, or the row cap)
    seconds: float = 0.0  # time spent decoding

    @property
    def rows_per_batch(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class GenerationEngine:
    """Batches the generate calls of its client threads on one model (see the module doc).
    `max_batch_rows`: rows per decode batch; `max_wait_s`: how long the oldest pending call waits
    for busy clients before its batch runs anyway."""

    def __init__(self, handle: ModelHandle, *, max_batch_rows: int = 64, max_wait_s: float = 0.5):
        self.handle = handle
        self.max_batch_rows = max(1, int(max_batch_rows))
        self.max_wait_s = float(max_wait_s)
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self._pending: list[_Call] = []
        self._clients = 0
        self._local = threading.local()
        self._closed = False
        with _ENGINES_GUARD:
            if _ENGINES.get(handle.hf_model) is not None:
                raise RuntimeError("This model is already served by a GenerationEngine; close that one first.")
            _ENGINES[handle.hf_model] = self
        self._thread = threading.Thread(target=self._serve, name="generation-engine", daemon=True)
        self._thread.start()

    # ---- clients --------------------------------------------------------------------------

    @contextlib.contextmanager
    def client(self) -> Iterator[None]:
        """Mark the calling thread as a client for the body: its generate calls join batches,
        and the engine counts it among those it waits for."""
        if self.is_client():
            yield
            return
        with self._cv:
            self._clients += 1
        self._local.client = True
        try:
            yield
        finally:
            self._local.client = False
            with self._cv:
                self._clients -= 1
                self._cv.notify_all()

    def is_client(self) -> bool:
        return bool(getattr(self._local, "client", False)) and not self._closed

    def generate(self, handle: ModelHandle, rows: Sequence[GenRow], *, adapter: str | None = None,
                 hooks: Any = None) -> list[Generation]:
        """Queue one call's rows and wait for its generations (in row order)."""
        if isinstance(hooks, RowHooks):
            rows = [_with_payload(r, hooks.payloads[i]) for i, r in enumerate(rows)]
        alone = hooks is not None and not isinstance(hooks, RowHooks)
        call = _Call(handle, list(rows), adapter, hooks, alone)
        with self._cv:
            if self._closed:
                raise RuntimeError("The generation engine is closed.")
            self._pending.append(call)
            self._cv.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        with _ENGINES_GUARD:
            if _ENGINES.get(self.handle.hf_model) is self:
                del _ENGINES[self.handle.hf_model]

    def __enter__(self) -> GenerationEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the serving thread -----------------------------------------------------------------

    def _take_batch(self) -> list[_Call] | None:
        """Wait for work, then take the oldest call and every pending call that can share its batch."""
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if not self._pending:
                return None
            # Wait from when the engine is free, not from a call's arrival: calls that queued
            # during the last batch would otherwise run at once, without the clients that
            # batch just answered, and the clients stay split into two half batches.
            ready = time.monotonic()
            while not self._closed:
                waited = time.monotonic() - ready
                if len(self._pending) >= self._clients or waited >= self.max_wait_s:
                    break
                self._cv.wait(timeout=self.max_wait_s - waited)
            first = min(self._pending, key=lambda c: c.t)
            batch: list[_Call] = []
            n = 0
            for c in sorted(self._pending, key=lambda c: c.t):
                if c is first or (not first.alone and not c.alone and n + len(c.rows) <= self.max_batch_rows):
                    batch.append(c)
                    n += len(c.rows)
            for c in batch:
                self._pending.remove(c)
            if self._pending:
                self.stats.split += 1
            return batch

    def _serve(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            rows = [r for c in batch for r in c.rows]
            first = batch[0]
            if first.alone:
                hooks: Any = first.hooks
                adapters: Any = first.adapter
            else:
                hooks, adapters = _merged_row_hooks(batch), [c.adapter for c in batch for _ in c.rows]
            t0 = time.monotonic()
            try:
                gens = decode_rows(first.handle, rows, batch_size=self.max_batch_rows, adapter=adapters, hooks=hooks)
                self.stats.seconds += time.monotonic() - t0
                self.stats.batches += 1
                self.stats.calls += len(batch)
                self.stats.rows += len(rows)
                self.stats.tokens += sum(g.n_tokens for g in gens)
                at = 0
                for c in batch:
                    c.result, at = gens[at:at + len(c.rows)], at + len(c.rows)
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
                for c in batch:
                    c.error = exc
            for c in batch:
                c.done.set()


def _merged_row_hooks(batch: list[_Call]) -> RowHooks | None:
    """One `RowHooks` for a batch of calls whose hooks are None or `RowHooks`: each row's payload
    is (its call's hooks key, its own payload), and each kind of hooks (by key) is entered once,
    with its calls' payloads on their rows and None on the other rows (see `RowHooks`)."""
    kinds: dict[Any, Any] = {}
    for c in batch:
        if isinstance(c.hooks, RowHooks) and c.hooks.key is not None:  # key None: hooks that do nothing
            kinds.setdefault(c.hooks.key, c.hooks.enter)
    if not kinds:
        return None
    pairs = [(c.hooks.key if isinstance(c.hooks, RowHooks) else None, r.payload) for c in batch for r in c.rows]
    pairs = [(k, p) if k in kinds else (None, None) for k, p in pairs]

    @contextlib.contextmanager
    def enter(rows: list[Any]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for k, fn in kinds.items():
                stack.enter_context(fn([p if owner == k else None for owner, p in rows]))
            yield

    return RowHooks(("merged", tuple(kinds)), pairs, enter)


def _with_payload(row: GenRow, payload: Any) -> GenRow:
    row.payload = payload
    return row
