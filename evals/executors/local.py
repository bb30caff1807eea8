"""The `local` executor: one worker in this process, or `plan.workers` worker processes; each
runs `plan.concurrency` audits at once in threads (their generate calls batched together).

Worker processes take cells from one queue as they free up, so a slow organism does not hold
the others back. A worker process that dies (killed, out of memory) is replaced and the audits
it had in hand are run again, at most twice each; the audits it finished are already saved. A
worker process whose driver is gone (killed with a signal that skips its clean-up) stops too,
instead of running on unseen.
"""

from __future__ import annotations

import os
import queue as _queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..suite import AuditCell
from ..workers import WorkerPlan
from . import MAX_RETRIES, AuditFailed, ExecutorEvents, register_executor

if TYPE_CHECKING:
    from agents.policy import Policy
    from nla_core.models import ModelHandle
    from nla_core.protocols import NLALike

__all__ = ["run_local"]

@register_executor("local")
def run_local(plan: WorkerPlan, cells: list[AuditCell], events: ExecutorEvents, *, handle: ModelHandle | None = None,
              nla: NLALike | None = None, policy_factory: Callable[[str, AuditCell], Policy] | None = None) -> None:
    """`handle`/`nla`/`policy_factory`: objects of this process, so they force one in-process
    worker (they cannot cross processes)."""
    in_process = plan.workers <= 1 or len(cells) <= 1 or any(x is not None for x in (handle, nla, policy_factory))
    if in_process:
        worker = plan.make_worker(handle=handle, nla=nla, policy_factory=policy_factory)
        try:
            _run_in_threads(worker, cells, plan.concurrency, events)
            note = worker.engine_note()
            if note:
                events.say("note", {"message": note})
        finally:
            worker.close()
    else:
        _run_in_processes(plan, cells, events)


def _run_in_threads(worker: Any, cells: list[AuditCell], concurrency: int, events: ExecutorEvents) -> None:
    from agents import AuditReport

    inbox: _queue.Queue = _queue.Queue()
    for c in cells:
        inbox.put(c)
    outbox: _queue.Queue = _queue.Queue()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                cell = inbox.get_nowait()
            except _queue.Empty:
                return
            outbox.put(("start", cell))
            try:
                outbox.put(("done", worker.run(cell)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outbox.put(("error", (cell, exc)))
                return

    n_threads = max(1, min(concurrency, len(cells)))
    if n_threads == 1:  # no thread at all: tracebacks and debuggers stay simple
        for cell in cells:
            events.started(cell)
            c, rep, wall = worker.run(cell)
            events.finished(AuditCell.model_validate(c), AuditReport.model_validate(rep), wall)
        return
    threads = [threading.Thread(target=loop, name=f"audit-{i}", daemon=True) for i in range(n_threads)]
    for t in threads:
        t.start()
    remaining = len(cells)
    try:
        while remaining:
            kind, payload = outbox.get()
            if kind == "start":
                events.started(payload)
            elif kind == "done":
                c, rep, wall = payload
                events.finished(AuditCell.model_validate(c), AuditReport.model_validate(rep), wall)
                remaining -= 1
            else:
                cell, exc = payload
                raise exc
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=0.1 if remaining else None)


# ---- worker processes -----------------------------------------------------------------------


def exit_when_orphaned(driver_pid: int, poll_s: float = 2.0) -> threading.Thread:
    """Watch, in a daemon thread, that this process's parent is still `driver_pid`, and end the
    process (exit code 3) when it is not: its driver died without stopping it (SIGKILL, or a
    SIGTERM that skipped the driver's clean-up), so no one reads its results. An audit it had
    in hand is resumed from its checkpoint by `nla bench --resume`."""
    def watch() -> None:
        while os.getppid() == driver_pid:
            time.sleep(poll_s)
        os._exit(3)

    t = threading.Thread(target=watch, name="exit-when-orphaned", daemon=True)
    t.start()
    return t


def _process_main(plan_json: dict, tasks: Any, results: Any, slot: int, driver_pid: int) -> None:
    """A worker process: `plan.concurrency` threads take cells from `tasks` until a None."""
    from ..progress import quiet_libraries

    exit_when_orphaned(driver_pid)
    quiet_libraries()
    plan = WorkerPlan.model_validate(plan_json)
    worker = plan.make_worker()

    def loop() -> None:
        while True:
            cell = tasks.get()
            if cell is None:
                return
            results.put(("start", slot, cell))
            try:
                results.put(("done", slot, worker.run(cell)))
            except BaseException as exc:  # noqa: BLE001 - reported to the driver, which stops the run
                results.put(("error", slot, (cell, f"{type(exc).__name__}: {exc}", traceback.format_exc())))

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(plan.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    note = worker.engine_note()
    if note:
        results.put(("note", slot, note))
    worker.close()


def _run_in_processes(plan: WorkerPlan, cells: list[AuditCell], events: ExecutorEvents) -> None:
    import multiprocessing as mp

    from agents import AuditReport

    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for c in cells:
        tasks.put(c.model_dump())
    plan_json = plan.model_dump()
    procs: dict[int, Any] = {}
    in_hand: dict[int, dict[str, dict]] = {}  # slot -> audit id -> cell
    tries: dict[str, int] = {}
    next_slot = 0

    def spawn() -> None:
        nonlocal next_slot
        p = ctx.Process(target=_process_main, args=(plan_json, tasks, results, next_slot, os.getpid()),
                        daemon=True)
        p.start()
        procs[next_slot], in_hand[next_slot] = p, {}
        next_slot += 1

    for _ in range(plan.workers):
        spawn()
    events.say("note", {"message": f"{len(cells)} audits on {plan.workers} worker processes, {plan.concurrency} "
                                   f"at once each ({plan.threads} torch thread(s) per process)"})
    remaining = len(cells)
    try:
        while remaining:
            try:
                kind, slot, payload = results.get(timeout=2.0)
            except _queue.Empty:
                for slot, p in list(procs.items()):
                    if p.is_alive():
                        continue
                    lost = list(in_hand.pop(slot).values())
                    del procs[slot]
                    for cell in lost:
                        aid = AuditCell.model_validate(cell).audit_id
                        tries[aid] = tries.get(aid, 0) + 1
                        if tries[aid] > MAX_RETRIES:
                            raise AuditFailed(f"The worker running {aid} died {tries[aid]} times "
                                               f"(exit code {p.exitcode}).",
                                               "finished audits are saved; check memory, then --resume.") from None
                        tasks.put(cell)
                    events.say("note", {"message": f"a worker process died (exit code {p.exitcode}); "
                                                   f"running its {len(lost)} audit(s) again on a new one"})
                    spawn()
                continue
            if kind == "note":
                events.say("note", {"message": payload})
            elif kind == "start":
                cell = AuditCell.model_validate(payload)
                in_hand.setdefault(slot, {})[cell.audit_id] = payload
                events.started(cell)
            elif kind == "done":
                c, rep, wall = payload
                cell = AuditCell.model_validate(c)
                in_hand.get(slot, {}).pop(cell.audit_id, None)
                events.finished(cell, AuditReport.model_validate(rep), wall)
                remaining -= 1
            else:
                cell, error, tb = payload
                raise AuditFailed(f"Audit {AuditCell.model_validate(cell).audit_id} raised {error}.",
                                   "finished audits are saved; fix the cause, then --resume.\n" + tb)
    finally:
        for _ in range(len(procs) * plan.concurrency):  # one stop sign per audit thread
            tasks.put(None)
        # after a clean finish, the workers' last notes (how well the engine batched) come in
        deadline = time.monotonic() + (10.0 if not remaining else 0.5)
        while any(p.is_alive() for p in procs.values()) and time.monotonic() < deadline:
            try:
                kind, _, payload = results.get(timeout=0.2)
            except _queue.Empty:
                continue
            if kind == "note" and not remaining:
                events.say("note", {"message": payload})
        for p in procs.values():
            p.join(timeout=0.5)
            if p.is_alive():
                p.terminate()
