"""`GenerationEngine`: one model serving the generate calls of several threads in shared batches.

Several audits run at once in one process (threads), each making generate calls one at a time
(chat, samples, prefills, steered replies, the NLA's verbalize). Alone, each call is a batch of
one to a few rows, and on a CPU a batch of one uses a fraction of what a batch of 16 does per
token. The engine keeps one batch generating (`nla_core.generation.DecodeBatch`) and lets calls
join it between decode steps: a call's rows are prefilled and appended to the running batch, and
each call is answered as soon as its own rows end, so its thread can make its next call while
the others go on. Calls can share the batch when their hooks are none or `RowHooks` (an
organism's implant, the AV's injection), whatever LoRA adapter each uses (a PEFT mixed batch:
each row goes through its own adapter). A call with an opaque hooks function runs alone once the
batch has drained. When the engine is idle, it waits until every client thread is blocked in a
generate call (or `max_wait_s`), so a batch starts with all of them. Rows with the same prompt,
adapter and hook payload (a call's samples) are prefilled once. Between steps the engine lets
in any thread waiting for the model's lock (a forward pass outside the engine).

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

from .generation import DecodeBatch, Generation, GenRow, RowHooks, decode_rows, payload_identity
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


@dataclass(eq=False)  # compared and hashed by identity
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
    left: int = 0  # rows not yet finished


@dataclass
class EngineStats:
    calls: int = 0
    batches: int = 0  # batches started (a batch runs while rows keep joining it)
    joined: int = 0  # calls that joined a batch already generating
    alone: int = 0  # calls that ran in a batch of their own (an opaque hooks function)
    rows: int = 0
    tokens: int = 0  # tokens the rows kept
    steps: int = 0  # decode steps
    row_steps: int = 0  # rows generating, summed over steps
    seconds: float = 0.0  # time spent decoding

    @property
    def rows_per_step(self) -> float:
        return self.row_steps / self.steps if self.steps else 0.0


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
        self._owners: dict[int, tuple[_Call, int, Any]] = {}  # the running batch's row ids -> (call, its row, hooks key)
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
        if not rows:
            return []
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

    def _wait_for_work(self) -> list[_Call] | None:
        """Wait for calls while no batch runs; then the oldest and every pending call that can
        share its batch (None once closed)."""
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if not self._pending:
                return None
            # Wait from when the engine is free, not from a call's arrival, until every client
            # has its call in: the first batch then starts with all of them.
            ready = time.monotonic()
            while not self._closed:
                waited = time.monotonic() - ready
                if len(self._pending) >= self._clients or waited >= self.max_wait_s:
                    break
                self._cv.wait(timeout=self.max_wait_s - waited)
            first = min(self._pending, key=lambda c: c.t)
            return self._take(first, 0)

    def _joining(self, rows: int) -> list[_Call]:
        """The pending calls that join a running batch of `rows` rows now."""
        with self._cv:
            return self._take(None, rows) if self._pending else []

    def _take(self, first: _Call | None, rows: int) -> list[_Call]:
        """Pending calls in order of arrival (`first` whatever its size, and alone if it needs a
        batch of its own), up to the first that needs a batch of its own or would pass the row
        cap: that one waits for the running batch to drain rather than be overtaken for ever."""
        batch: list[_Call] = []
        for c in sorted(self._pending, key=lambda c: c.t):
            if c is not first and ((batch and batch[0].alone) or c.alone or rows + len(c.rows) > self.max_batch_rows):
                break
            batch.append(c)
            rows += len(c.rows)
        for c in batch:
            self._pending.remove(c)
        return batch

    def _serve(self) -> None:
        try:
            self._serve_batches()
        except BaseException as exc:  # a bug here must not leave callers waiting for ever
            with self._cv:
                self._closed = True
                running = list({o[0]: None for o in self._owners.values()})
                calls, self._pending = self._pending + running, []
            for c in calls:
                c.error = RuntimeError(f"The generation engine failed: {exc!r}")
                c.done.set()
            raise

    def _serve_batches(self) -> None:
        batch: DecodeBatch | None = None
        owners = self._owners
        kinds: dict[Any, Any] = {}  # hooks key -> enter, for the kinds of `RowHooks` in the running batch
        while True:
            if batch is None or not len(batch):
                if batch is not None:
                    batch.release()
                batch, kinds = None, {}
                owners.clear()
                calls = self._wait_for_work()
                if calls is None:
                    return
                if calls[0].alone:
                    self._run_alone(calls[0])
                    continue
                batch = DecodeBatch(calls[0].handle, hooks=_row_hooks(owners, kinds))
                self.stats.batches += 1
            else:
                calls = self._joining(len(batch)) if batch.joinable else []
                self.stats.joined += len(calls)
            t0 = time.monotonic()
            admitting = True
            try:
                if calls:
                    self._admit(batch, calls, owners, kinds)
                admitting = False
                if len(batch):
                    self.stats.steps += 1
                    self.stats.row_steps += len(batch)
                    ended = batch.step()
                    self._deliver(batch, ended, owners)
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
                # a failed admission loses only its own calls; a failed step the whole batch
                lost = set(calls) if admitting else {o[0] for o in owners.values()}
                for c in lost:
                    c.error = exc
                    c.done.set()
                for i in [i for i, o in owners.items() if o[0] in lost]:
                    del owners[i]  # in place: the batch's hooks function reads this dict
            finally:
                self.stats.seconds += time.monotonic() - t0
            if batch.handle.lock.waiting():
                # another thread waits for the model (a forward pass outside the engine): let it in
                batch.release()
                while batch.handle.lock.waiting():
                    time.sleep(0.001)

    def _admit(self, batch: DecodeBatch, calls: list[_Call], owners: dict, kinds: dict) -> None:
        rows, adapters, keys = [], [], []
        first = batch.next_id  # the hooks of the prefill look the new rows up
        for c in calls:
            key = c.hooks.key if isinstance(c.hooks, RowHooks) and c.hooks.key is not None else None
            if key is not None:
                kinds.setdefault(key, c.hooks.enter)
            c.left = len(c.rows)
            c.result = [Generation("", []) for _ in c.rows]
            for k, r in enumerate(c.rows):
                rows.append(r)
                adapters.append(c.adapter)
                keys.append((tuple(r.prompt), c.adapter, payload_identity((key, r.payload))))
                owners[first + len(rows) - 1] = (c, k, key)
        self.stats.calls += len(calls)
        self.stats.rows += len(rows)
        ids = batch.admit(rows, adapter=adapters, keys=keys)
        assert ids == list(range(first, first + len(rows)))
        self._deliver(batch, [i for i in ids if i in batch.done], owners)

    def _deliver(self, batch: DecodeBatch, ended: list[int], owners: dict) -> None:
        for i in ended:
            c, k, _ = owners.pop(i)
            gen = batch.done.pop(i)
            assert c.result is not None
            c.result[k] = gen
            self.stats.tokens += gen.n_tokens
            c.left -= 1
            if not c.left:
                c.done.set()

    def _run_alone(self, call: _Call) -> None:
        self.stats.calls += 1
        self.stats.alone += 1
        self.stats.batches += 1
        self.stats.rows += len(call.rows)
        t0 = time.monotonic()
        try:
            call.result = decode_rows(call.handle, call.rows, batch_size=self.max_batch_rows, adapter=call.adapter,
                                      hooks=call.hooks)
            self.stats.tokens += sum(g.n_tokens for g in call.result)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            call.error = exc
        self.stats.seconds += time.monotonic() - t0
        call.done.set()


def _row_hooks(owners: dict, kinds: dict):
    """The hooks function of a running batch: for the rows of a forward pass (ids), each kind of
    `RowHooks` in the batch is entered once, with its calls' payloads on their rows and None on
    the others (see `RowHooks`)."""

    @contextlib.contextmanager
    def enter(row_ids: Sequence[int]) -> Iterator[None]:
        # a row that has ended (answered, so no longer in `owners`) rides along until the batch
        # drops it: payload None, like another kind's row
        rows = [owners.get(i) for i in row_ids]
        with contextlib.ExitStack() as stack:
            for key, fn in kinds.items():
                if any(o is not None and o[2] == key for o in rows):
                    stack.enter_context(fn([o[0].rows[o[1]].payload if o is not None and o[2] == key else None
                                            for o in rows]))
            yield

    return enter


def _with_payload(row: GenRow, payload: Any) -> GenRow:
    row.payload = payload
    return row
