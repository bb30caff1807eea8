"""A training run folder: its config (fixed at creation), per-stage JSONL logs and checkpoints.

    RUN/config.yaml                 the run's config; a different one on resume is refused
    RUN/data/                       corpus cache, activations.parquet + dataset.yaml, explanations
    RUN/stages/<stage>/log.jsonl    one JSON object per logged step
    RUN/stages/<stage>/ckpt/        latest resumable checkpoint (NLA layout + trainer_state.pt)
    RUN/stages/<stage>/final/       the stage's result, an NLA checkpoint folder
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import NLAError
from .config import ConfigChangedError, TrainConfig, config_diff, preset

__all__ = ["Run", "StageLog"]

STAGES = ("ar_warmstart", "av_warmstart", "rl")


# Which stage a config field belongs to; "all": every stage depends on it; None: never
# changes results (may change any time).
_SECTION_OWNER = {"ar_warmstart": "ar_warmstart", "av_warmstart": "av_warmstart", "rl": "rl", "eval": None,
                  "threads": None, "save_every": None, "claude_concurrency": None, "preset": None}


def _owner(diff_line: str) -> str | None:
    top = diff_line.split(" ", 1)[0].split(".", 1)[0]
    return _SECTION_OWNER.get(top, "all")


def _longer_stage(stored: TrainConfig, new: TrainConfig, started: list[str]) -> str | None:
    """The stage whose `steps` may grow although it has started: the last started stage, when
    the new count is higher (it continues from its checkpoint). Earlier stages stay frozen,
    since a later stage was trained on their result."""
    last = next((s for s in reversed(STAGES) if s in started), None)
    if last is not None and getattr(new, last).steps > getattr(stored, last).steps:
        return last
    return None


class StageLog:
    """Appends JSON lines; every record gets the wall time."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


class Run:
    def __init__(self, root: Path, config: TrainConfig):
        self.root, self.config = root, config

    @classmethod
    def open(cls, root: str | Path, config: TrainConfig | None = None, *, preset_name: str | None = None) -> Run:
        """Open (or create) a run. A stored config wins when none is given; a given config that
        differs from the stored one is refused, naming the changed fields."""
        root = Path(root).expanduser()
        stored_path = root / "config.yaml"
        if stored_path.exists():
            stored = TrainConfig.from_file(stored_path)
            if config is None and preset_name is not None and preset_name != stored.preset:
                config = preset(preset_name)
            if config is not None:
                run = cls(root, stored)
                diff = config_diff(stored, config)
                started = run.started_stages()
                longer = _longer_stage(stored, config, started)
                growing = f"{longer}.steps " if longer else None
                blocked = [d for d in diff if (_owner(d) in started or (_owner(d) == "all" and started))
                           and not (growing and d.startswith(growing))]
                if blocked:
                    raise ConfigChangedError(
                        f"Run {root} was started with a different config; changed: {'; '.join(blocked[:8])}"
                        + (f" (+{len(blocked) - 8} more)" if len(blocked) > 8 else "")
                        + f" (stages already started: {', '.join(started)}).",
                        "resume with the stored config (omit --config), or start a new run folder.",
                    )
                if diff:  # only stages that have not started yet are affected: accepted, and recorded
                    StageLog(root / "config_changes.jsonl").write(changed=diff)
                    stored_path.write_text(config.to_yaml())
                    return cls(root, config)
                stored.threads = config.threads
            return cls(root, stored)
        config = config or preset(preset_name or "cpu")
        root.mkdir(parents=True, exist_ok=True)
        stored_path.write_text(config.to_yaml())
        return cls(root, config)

    def started_stages(self) -> list[str]:
        """Stages with anything on disk (the data stage counts once its dataset exists)."""
        out = ["data"] if (self.data_dir / "dataset.yaml").exists() or (self.data_dir / "transcripts.jsonl").exists() else []
        return out + [s for s in STAGES if (self.stage_dir(s) / "ckpt").exists() or self.is_done(s)]

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def stage_dir(self, stage: str) -> Path:
        return self.root / "stages" / stage

    def log(self, stage: str) -> StageLog:
        return StageLog(self.stage_dir(stage) / "log.jsonl")

    def final(self, stage: str) -> Path:
        return self.stage_dir(stage) / "final"

    def is_done(self, stage: str) -> bool:
        f = self.final(stage)
        return (f / "nla_meta.yaml").exists() or (f / "av" / "nla_meta.yaml").exists()

    def require(self, stage: str, command: str) -> Path:
        if not self.is_done(stage):
            raise NLAError(f"Stage {stage} has not finished in {self.root}.", f"run `{command}` first.")
        return self.final(stage)

    def _write_text(self, name: str, text: str) -> Path:
        """Write through a temporary file, so a killed process never leaves half a file."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    def write_json(self, name: str, data: Any) -> Path:
        return self._write_text(name, json.dumps(data, indent=2, default=float))

    def write_jsonl(self, name: str, rows: list[dict]) -> Path:
        return self._write_text(name, "".join(json.dumps(r, default=float) + "\n" for r in rows))

    def read_yaml(self, name: str) -> Any:
        return yaml.safe_load((self.root / name).read_text())
