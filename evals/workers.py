"""`AuditWorker`: runs the audits of one bench run inside one process (the run's own process, a
local worker process, or a Ray actor).

- The model and the NLA are loaded once per worker and shared by every audit; each organism is
  planted once (a LoRA organism is one adapter on the shared model) and every audit gets a
  fresh `Target` over it with the run's opaque alias.
- `concurrency > 1`: several audits run at once in threads, and one `GenerationEngine` gathers
  their generate calls (chat, samples, prefills, steering, the NLA's verbalize) into shared
  batches. Model use is serialised by the model's lock, so the threads only overlap in the
  auditor's own work; the gain is the batch.
- `run(cell)` is what an executor calls, from any thread; it returns plain JSON-able data so the
  result crosses a process (or a Ray object store) as is.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .suite import AuditCell, BenchSuite

if TYPE_CHECKING:
    from agents.policy import Policy
    from environments.target import Target
    from nla_core.models import ModelHandle
    from nla_core.protocols import NLALike
    from nla_core.serving import GenerationEngine

__all__ = ["AuditWorker", "WorkerPlan", "WorkerResult", "audit_alias", "opaque_audit_id"]


def audit_alias(salt: str | None, run_id: str, organism: str) -> str:
    """An opaque per-run alias: the organism's id would give its behaviour away. Keyed with the
    run's random salt (stored in its config, so a resume keeps the aliases); runs recorded
    before the salt existed keep their old unsalted alias when resumed."""
    if salt:
        from environments.target import alias_for

        return alias_for(salt, organism)
    return "target-" + hashlib.sha1(f"{run_id}/{organism}".encode()).hexdigest()[:6]


def opaque_audit_id(run_id: str, audit_id: str) -> str:
    """The id `run_audit` (and so the auditor's state and transcript) sees: audit ids name the
    organism. The mapping is stable, so a resumed run finds its checkpoints again."""
    return "audit-" + hashlib.sha1(f"{run_id}/{audit_id}".encode()).hexdigest()[:12]


WorkerResult = tuple[dict, dict, float]  # (cell, AuditReport as JSON, wall seconds)


class AuditWorker:
    """The audits of run `run_id` in this process. `handle`/`nla`: already loaded ones (else
    loaded on first use from the suite's model). `policy_factory(name, cell)` builds a cell's
    policy (default: `agents.get_policy(name, **suite.policy_options[name])`)."""

    def __init__(self, suite: BenchSuite | dict, run_id: str, workdir: str, *, alias_salt: str | None = None,
                 threads: int | None = None, concurrency: int = 1, handle: ModelHandle | None = None,
                 nla: NLALike | None = None, policy_factory: Callable[[str, AuditCell], Policy] | None = None):
        if threads is not None:
            import torch

            torch.set_num_threads(max(1, int(threads)))
        self.suite = suite if isinstance(suite, BenchSuite) else BenchSuite.model_validate(suite)
        self.run_id = run_id
        self.workdir = str(workdir)
        self.alias_salt = alias_salt
        self.concurrency = max(1, int(concurrency))
        self.policy_factory = policy_factory
        self._handle = handle
        self._nla = nla
        self._specs = {s.id: s for s in self.suite.organism_specs()}
        self._load_lock = threading.Lock()  # loading and planting change the shared model
        self._engine: GenerationEngine | None = None

    # ---- what every audit shares ----------------------------------------------------------

    @property
    def handle(self) -> ModelHandle:
        with self._load_lock:
            if self._handle is None:
                from nla_core import load_model

                self._handle = load_model(self.suite.model)
            return self._handle

    @property
    def nla(self) -> NLALike:
        handle = self.handle
        with self._load_lock, handle.lock:  # loading adds adapters to the shared model
            if self._nla is None:
                from nla_core.defaults import load_nla_for

                self._nla = load_nla_for(handle, layer=self.suite.layer)
            return self._nla

    @property
    def layer(self) -> int:
        return self.suite.layer if self.suite.layer is not None else self.nla.layer

    def engine(self) -> GenerationEngine | None:
        """The generation engine the concurrent audits share (None when they run one at a time)."""
        if self.concurrency <= 1:
            return None
        handle = self.handle
        with self._load_lock:
            if self._engine is None:
                from nla_core.serving import GenerationEngine

                self._engine = GenerationEngine(handle)
            return self._engine

    def target(self, organism: str, *, seed: int) -> Target:
        from environments import build_target

        handle, layer = self.handle, self.layer
        # planting adds an adapter (trained or loaded) to the shared model: no audit may use it meanwhile
        with self._load_lock, handle.lock:
            return build_target(self._specs[organism], handle, layer=layer, seed=seed,
                                alias=audit_alias(self.alias_salt, self.run_id, organism))

    # ---- one audit --------------------------------------------------------------------------

    def run(self, cell: AuditCell | dict) -> WorkerResult:
        """Run one audit of the matrix. Thread-safe: with `concurrency > 1` an executor calls it
        from that many threads at once."""
        from agents import get_policy, run_audit

        cell = cell if isinstance(cell, AuditCell) else AuditCell.model_validate(cell)
        policy = (self.policy_factory(cell.policy, cell) if self.policy_factory is not None
                  else get_policy(cell.policy, **self.suite.policy_options.get(cell.policy, {})))
        target = self.target(cell.organism, seed=cell.seed)
        nla = self.nla
        engine = self.engine()
        a0 = time.monotonic()
        with engine.client() if engine is not None else contextlib.nullcontext():
            report = run_audit(target, nla, strategy=cell.strategy, policy=policy, budget=self.suite.budget,
                               run_id=opaque_audit_id(self.run_id, cell.audit_id), workdir=self.workdir,
                               seed=cell.seed, max_hypotheses=self.suite.max_hypotheses)
        return cell.model_dump(), report.model_dump(mode="json"), time.monotonic() - a0

    def engine_note(self) -> str | None:
        """How well the engine batched (None without one, or before its first call)."""
        st = self._engine.stats if self._engine is not None else None
        if not st or not st.calls:
            return None
        return (f"generation engine: {st.calls} generate calls ({st.joined} joined a running batch, "
                f"{st.alone} ran alone), {st.rows_per_step:.1f} rows per decode step, {st.tokens} tokens, "
                f"{st.seconds:.0f} s decoding")

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


class WorkerPlan(BaseModel):
    """What every worker of a run is built from (crosses processes and Ray as JSON)."""

    suite: dict
    run_id: str
    workdir: str
    alias_salt: str | None = None
    workers: int = 1  # worker processes (local) or actors (Ray)
    threads: int = 1  # torch threads per worker
    concurrency: int = 1  # audits at once per worker, batched by one generation engine

    def make_worker(self, **shared: Any) -> AuditWorker:
        """`shared`: `handle`, `nla`, `policy_factory` already in this process (in-process only)."""
        return AuditWorker(self.suite, self.run_id, self.workdir, alias_salt=self.alias_salt,
                           threads=self.threads, concurrency=self.concurrency, **shared)
