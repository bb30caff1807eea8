"""Executors: how the audits of a bench run are spread over threads, processes or machines.

An executor is a function

    run(plan: WorkerPlan, cells: list[AuditCell], events: ExecutorEvents, **options) -> None

that runs every cell on `AuditWorker`s built from `plan` (`plan.make_worker()`), and calls, in
the caller's thread, `events.started(cell)` when an audit begins and `events.finished(cell,
report, wall_s)` when it ends (the runner judges it and writes it to DuckDB there, so finished
work is saved as it comes). An audit whose worker died is run again; an exception inside an
audit ends the run with that error (finished audits stay saved; `--resume` goes on).

Registered: `local` (the default: in-process threads, or worker processes) and `ray` (a Ray
cluster, local by default; needs the `ray` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nla_core.errors import NLAError
from nla_core.registry import Registry

__all__ = ["EXECUTORS", "ExecutorEvents", "AuditFailed", "MAX_RETRIES", "register_executor", "get_executor"]

EXECUTORS: Registry[Callable[..., None]] = Registry("executor")
MAX_RETRIES = 2  # runs again of an audit whose worker died, before the run stops


class AuditFailed(NLAError):
    """An audit raised inside a worker (policy failures become failed reports instead), or its
    worker died more than `MAX_RETRIES` times."""


@dataclass
class ExecutorEvents:
    started: Callable[[Any], None]  # (AuditCell)
    finished: Callable[[Any, Any, float], None]  # (AuditCell, AuditReport, wall seconds)
    say: Callable[[str, dict], None]  # progress notes: say("note", {"message": ...})


def register_executor(name: str):
    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        EXECUTORS.register(name, fn)
        return fn

    return deco


def get_executor(name: str) -> Callable[..., None]:
    if name == "ray" and name not in EXECUTORS:
        from . import ray_executor  # noqa: F401 - registers itself; imports ray lazily
    if name not in EXECUTORS:
        raise NLAError(f"Unknown executor {name!r}.", f"use one of: {', '.join(sorted(set(EXECUTORS) | {'ray'}))}.")
    return EXECUTORS[name]


from . import local  # noqa: E402,F401 - registers `local`
