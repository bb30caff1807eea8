"""The `ray` executor: the run matrix on a Ray cluster (a local one started here by default).

`plan.workers` actors each hold one `AuditWorker` (the model loaded once, on first use) and run
up to `plan.concurrency` audits at once in threads (a threaded actor), their generate calls
batched together. The driver (this process) hands out one audit per free slot, collects results
with `ray.wait` as they finish, and the runner judges and writes each to DuckDB at once.

An audit whose actor died (killed, out of memory, its node lost) is sent again, at most twice;
Ray restarts the actor by itself. An exception inside an audit ends the run with that error
(finished audits are saved; `--resume` goes on). A Ray instance started here is shut down at
the end; a cluster given by `address` is left running (only this run's actors are killed).

The actors write transcripts and checkpoints under the run's workdir: on a cluster of several
machines that folder must be on a shared filesystem for the driver to read the tool calls.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import Any

from nla_core.errors import NLAError

from ..suite import AuditCell
from ..workers import WorkerPlan
from . import MAX_RETRIES, AuditFailed, ExecutorEvents, register_executor

__all__ = ["run_ray"]


class _AuditActor:
    """One Ray actor: the audits of one worker. Threaded (`max_concurrency=plan.concurrency`),
    so `run` is called from several threads at once; `AuditWorker.run` is thread-safe."""

    def __init__(self, plan_json: dict):
        self._plan_json = plan_json
        self._worker: Any = None
        self._lock = threading.Lock()

    def _get_worker(self) -> Any:
        with self._lock:
            if self._worker is None:
                from ..progress import quiet_libraries

                quiet_libraries()
                self._worker = WorkerPlan.model_validate(self._plan_json).make_worker()
            return self._worker

    def run(self, cell: dict) -> tuple[dict, dict, float]:
        return self._get_worker().run(cell)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise NLAError("The ray executor needs Ray, which is not installed.",
                       "pip install 'nla-audit[ray]' (or use --executor local).") from None
    return ray


@register_executor("ray")
def run_ray(plan: WorkerPlan, cells: list[AuditCell], events: ExecutorEvents, *, address: str | None = None,
            num_gpus_per_worker: float = 0, handle: Any = None, nla: Any = None, policy_factory: Any = None) -> None:
    """`address`: a running Ray cluster (`auto`, `ray://host:10001`, `host:6379`); None starts a
    local instance (or uses the one this process already joined). `num_gpus_per_worker`: GPUs
    each actor asks for (fractions share a GPU). `handle`/`nla`/`policy_factory` are refused:
    objects of this process cannot be sent to the actors."""
    given = [k for k, v in (("handle", handle), ("nla", nla), ("policy_factory", policy_factory)) if v is not None]
    if given:
        raise NLAError(f"The ray executor cannot use {', '.join(given)}: objects of this process cannot be sent to "
                       "Ray actors, which load the model themselves.",
                       "set the suite's model (a name or a saved folder) instead, or use executor='local'.")
    if num_gpus_per_worker < 0:
        raise NLAError(f"num_gpus_per_worker must be 0 or more, got {num_gpus_per_worker!r}.", "pass 0, a fraction or 1.")
    ray = _import_ray()
    started_here = False
    if ray.is_initialized():
        events.say("note", {"message": "using the Ray instance this process is already connected to"})
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        quiet = dict(log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False)
        try:
            if address is None:
                ray.init(num_cpus=os.cpu_count() or 1, **quiet)
            else:
                ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise NLAError(f"Could not start or reach Ray{f' at {address}' if address else ''}: {exc}",
                           "check the address (e.g. auto, host:6379, ray://host:10001) and that the cluster is up.") \
                from None
        started_here = True
    actors: list[Any] = []
    try:
        actors = _start_actors(ray, plan, num_gpus_per_worker, events)
        _dispatch(ray, actors, plan.concurrency, cells, events)
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if started_here:
            ray.shutdown()  # a local instance stops; a cluster given by address is only disconnected from


def _start_actors(ray: Any, plan: WorkerPlan, num_gpus: float, events: ExecutorEvents) -> list[Any]:
    cpus_total = float(ray.cluster_resources().get("CPU", 0))
    num_cpus: float = plan.threads
    if cpus_total and plan.workers * num_cpus > cpus_total:
        # more actors than cores: share the cores (torch still uses plan.threads threads each)
        num_cpus = cpus_total / plan.workers
        events.say("note", {"message": f"{plan.workers} actors x {plan.threads} CPU(s) is more than the cluster's "
                                       f"{cpus_total:g} CPUs; each actor asks for {num_cpus:.2g}"})
    gpus_total = float(ray.cluster_resources().get("GPU", 0))
    if num_gpus and plan.workers * num_gpus > gpus_total:
        events.say("note", {"message": f"{plan.workers} actors x {num_gpus:g} GPU(s) is more than the cluster's "
                                       f"{gpus_total:g} GPUs now: actors wait until GPUs are free (or added)"})
    remote_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=plan.concurrency,
                            max_restarts=-1)(_AuditActor)
    tag = f"nla-bench-{plan.run_id}-{uuid.uuid4().hex[:6]}"
    plan_json = plan.model_dump()
    actors = [remote_cls.options(name=f"{tag}-{i}").remote(plan_json) for i in range(plan.workers)]
    events.say("note", {"message": f"Ray: {plan.workers} actor(s) ({num_cpus:g} CPU, {num_gpus:g} GPU each), "
                                   f"{plan.concurrency} audit(s) at once each"})
    return actors


def _dispatch(ray: Any, actors: list[Any], concurrency: int, cells: list[AuditCell], events: ExecutorEvents) -> None:
    from agents import AuditReport

    retryable = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError)
    pending = list(reversed(cells))  # popped from the end: cells run in the given order
    in_flight: dict[Any, tuple[AuditCell, int]] = {}  # object ref -> (cell, actor index)
    load = [0] * len(actors)
    tries: dict[str, int] = {}

    while pending or in_flight:
        while pending and min(load) < concurrency:  # fill every free slot, least busy actor first
            i = load.index(min(load))
            cell = pending.pop()
            in_flight[actors[i].run.remote(cell.model_dump())] = (cell, i)
            load[i] += 1
            events.started(cell)  # submitted: the best the driver knows of when it begins
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            cell, i = in_flight.pop(ref)
            load[i] -= 1
            try:
                c, rep, wall = ray.get(ref)
            except retryable as exc:
                tries[cell.audit_id] = tries.get(cell.audit_id, 0) + 1
                if tries[cell.audit_id] > MAX_RETRIES:
                    raise AuditFailed(f"The Ray actor running {cell.audit_id} died {tries[cell.audit_id]} times "
                                         f"({type(exc).__name__}).",
                                         "finished audits are saved; check the actors' memory, then --resume.") from None
                events.say("note", {"message": f"the Ray actor running {cell.audit_id} died ({type(exc).__name__}); "
                                               "running the audit again"})
                pending.append(cell)  # next in line; Ray restarts the actor
                continue
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                raise AuditFailed(f"Audit {cell.audit_id} raised {type(cause).__name__}: {cause}",
                                     "finished audits are saved; fix the cause, then --resume.\n" + str(exc)) from None
            events.finished(AuditCell.model_validate(c), AuditReport.model_validate(rep), wall)
