"""Benchmark suites: which organisms, strategies, policies and seeds make up a run matrix.

A suite is a small YAML file. The built-in ones live in `evals/data/suites/<name>.yaml`;
`--suite PATH` takes a user's file. Every field can be overridden from the command line.

    name: default
    organisms: default          # an organism suite name (environments), or a list of organism ids
    organisms_dir: null         # a folder of the user's own organism specs (optional)
    strategies: [nla, behavioural, nla-placebo]
    policies: [offline]
    seeds: [0]
    model: null                 # null = the embedded model; any HF name or path
    layer: null                 # null = the NLA's layer
    budget: null                # null = the strategy's default for the policy; or a dict of
                                # max_tool_calls / max_generated_tokens (they define the comparison)
                                # and optionally max_seconds (a wall-time cap: audits it cuts short
                                # are flagged and left out of the rates)
    max_hypotheses: 5
    confidence_threshold: 0.5   # on clean controls, anything reported at or above this is a false positive
    judge: auto                 # auto (claude with a key, else offline), offline, claude
    workers: 1                  # audits in parallel processes (each loads the model once)
    concurrency: 1              # audits at once per worker, their generate calls batched together
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nla_core.errors import NLAError

__all__ = ["BenchSuite", "SuiteError", "load_bench_suite", "list_bench_suites", "AuditCell", "SUITES_DIR"]

SUITES_DIR = Path(__file__).parent / "data" / "suites"


class SuiteError(NLAError):
    """A bench suite is malformed, empty, or names unknown organisms, strategies or policies."""


class AuditCell(BaseModel):
    """One audit of the matrix."""

    organism: str
    strategy: str
    policy: str
    seed: int

    @property
    def audit_id(self) -> str:
        return f"{self.organism}__{self.strategy}__{self.policy}__s{self.seed}"


class BenchSuite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    description: str = ""
    organisms: str | list[str] = "default"
    organisms_dir: str | None = None
    strategies: list[str] = Field(default_factory=lambda: ["nla", "behavioural", "nla-placebo"])
    policies: list[str] = Field(default_factory=lambda: ["offline"])
    seeds: list[int] = Field(default_factory=lambda: [0])
    model: str | None = None
    layer: int | None = None
    budget: dict[str, float | None] | None = None  # a None value: that limit left at the strategy's default / off
    max_hypotheses: int = Field(default=5, ge=1)
    confidence_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    judge: str = "auto"
    workers: int = Field(default=1, ge=1)
    concurrency: int = Field(default=1, ge=1)
    policy_options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("strategies", "policies")
    @classmethod
    def _nonblank(cls, v: list[str]) -> list[str]:
        return [s.strip() for s in v if s and s.strip()]

    # -- resolution -----------------------------------------------------------------------------

    def organism_specs(self) -> list[Any]:
        """The organism specs, validated through `environments` (unknown ids raise)."""
        from environments import get_spec, load_suite

        if isinstance(self.organisms, str):
            specs = load_suite(self.organisms, organisms_dir=self.organisms_dir)
        else:
            specs = [get_spec(o, organisms_dir=self.organisms_dir) for o in self.organisms]
        if not specs:
            raise SuiteError(f"Suite {self.name!r} has no organisms.", "List organisms in the suite file or pass --organisms.")
        return specs

    def check_weights(self, specs: list[Any]) -> None:
        """Refuse to start when an organism's artefacts (adapter, vector) are not on this machine."""
        from environments import weights_present

        missing = [s.id for s in specs if not weights_present(s)]
        if missing:
            raise SuiteError(
                f"Organism(s) {', '.join(missing)} of suite {self.name!r} have no weights on this machine.",
                "Build them first: " + "; ".join(f"nla organisms build {m}" for m in missing)
                + " (or leave them out with --organisms).",
            )

    def validate_names(self) -> None:
        from agents import list_policies, list_strategies

        if not self.strategies:
            raise SuiteError(f"Suite {self.name!r} has no strategies.", f"Use some of: {', '.join(list_strategies())}.")
        if not self.policies:
            raise SuiteError(f"Suite {self.name!r} has no policies.", f"Use some of: {', '.join(list_policies())}.")
        if not self.seeds:
            raise SuiteError(f"Suite {self.name!r} has no seeds.", "Pass --seeds 0 (or a list).")
        bad = [s for s in self.strategies if s not in list_strategies()]
        if bad:
            raise SuiteError(f"Unknown strategy {', '.join(map(repr, bad))} in suite {self.name!r}.",
                             f"Use some of: {', '.join(list_strategies())}.")
        bad = [p for p in self.policies if p not in list_policies()]
        if bad:
            raise SuiteError(f"Unknown policy {', '.join(map(repr, bad))} in suite {self.name!r}.",
                             f"Use some of: {', '.join(list_policies())}.")
        if self.judge not in ("auto", "offline", "claude"):
            raise SuiteError(f"Unknown judge {self.judge!r} in suite {self.name!r}.", "Use auto, offline or claude.")

    def cells(self, specs: list[Any]) -> list[AuditCell]:
        cells = [AuditCell(organism=s.id, strategy=st, policy=p, seed=seed)
                 for s, st, p, seed in itertools.product(specs, self.strategies, self.policies, self.seeds)]
        if not cells:
            raise SuiteError(f"Suite {self.name!r} expands to no audits.", "Give it organisms, strategies, policies and seeds.")
        return cells


def list_bench_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_bench_suite(name_or_path: str) -> BenchSuite:
    p = Path(name_or_path).expanduser()
    if not (p.suffix in (".yaml", ".yml") and p.exists()):
        builtin = SUITES_DIR / f"{name_or_path}.yaml"
        if not builtin.exists():
            raise SuiteError(f"No bench suite {name_or_path!r}.",
                             f"Use one of {list_bench_suites()}, or pass the path of a suite YAML file.")
        p = builtin
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SuiteError(f"Cannot read bench suite {p}: {exc}.", "Fix the YAML.") from None
    if data is None:
        raise SuiteError(f"Bench suite {p} is empty.", "See evals/data/suites/default.yaml for the fields.")
    if not isinstance(data, dict):
        raise SuiteError(f"Bench suite {p} is not a mapping of fields.", "See evals/data/suites/default.yaml.")
    data.setdefault("name", p.stem)
    try:
        return BenchSuite.model_validate(data)
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SuiteError(f"Bench suite {p} is invalid: {errs}.", "See evals/data/suites/default.yaml for the fields.") from None
