"""Package a trained NLA as a small checkpoint: adapters and head in half precision,
`nla_meta.yaml` (trained, with provenance), `stats.safetensors` (training-set mean) and the
training report (config, curves as numbers, held-out FVE before and after RL, hardware)."""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..checkpoint import read_meta, write_meta
from ..errors import NLAError
from ..nla import NLA
from ..reference import write_reference_explanations
from .run import Run

__all__ = ["ship_checkpoint", "training_report", "curves", "heldout_figures", "hardware"]


def _half(path: Path, dtype: torch.dtype) -> None:
    tensors = load_file(str(path))
    save_file({k: v.to(dtype).contiguous() if v.is_floating_point() else v for k, v in tensors.items()}, str(path))


def curves(run: Run, stage: str, keys: tuple[str, ...], every: int = 1) -> dict[str, list]:
    """Per-step numbers from a stage's JSONL log (the last record per step wins)."""
    by_step: dict[int, dict] = {}
    for rec in run.log(stage).read():
        if rec.get("event") == "step":
            by_step[int(rec["step"])] = rec
    steps = sorted(by_step)[:: max(1, every)]
    out: dict[str, list] = {"step": steps}
    for k in keys:
        out[k] = [by_step[s].get(k) for s in steps]
    return out


def heldout_figures(ev: dict) -> dict:
    """The headline held-out figures of an `evaluate` report (the keys the README cites)."""
    return {"n": ev.get("n_heldout"), "fve": ev.get("round_trip_fve"), "fve_centred": ev.get("round_trip_fve_centred"),
            "topic_recall": ev.get("topic_recall"), "topic_recall_placebo": ev.get("topic_recall_placebo"),
            "distinct_rate": ev.get("distinct_rate"), "collapse_gap": ev.get("collapse_gap"),
            "ar_on_warmstart_summaries_fve": ev.get("ar_on_warmstart_summaries_fve"), "n_topics": ev.get("n_topics"),
            "topic_retrieval": ev.get("topic_retrieval"), "topic_probe": ev.get("topic_probe")}


def training_report(run: Run, extra: dict | None = None) -> dict:
    rep: dict = {"config": run.config.model_dump(mode="json"), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for name in ("stages/data/summary.json", "stages/ar_warmstart/summary.json", "stages/av_warmstart/summary.json",
                 "stages/rl/summary.json", "eval_av_warmstart.json", "eval_rl.json"):
        f = run.root / name
        if f.exists():
            rep[name.replace("stages/", "").replace("/summary.json", "").replace(".json", "")] = json.loads(f.read_text())
    rep["curves"] = {
        "ar_warmstart": curves(run, "ar_warmstart", ("mse", "seconds")),
        "av_warmstart": curves(run, "av_warmstart", ("nll", "seconds")),
        "rl": curves(run, "rl", ("reward", "fve_samples", "nce", "tag_fraction", "kl", "ar_mse", "mean_tokens",
                                 "t_generation", "t_scoring", "t_backward_av", "t_backward_ar")),
    }
    head_fit = [r for r in run.log("ar_warmstart").read() if r.get("event") == "head_fit"]
    if head_fit:
        rep["ar_head_fit"] = head_fit[-1]
    if extra:
        rep.update(extra)
    return rep


def ship_checkpoint(run: Run, source: Path, out: Path, *, dtype: torch.dtype = torch.float16, extra: dict | None = None,
                    handle: Any = None) -> Path:
    """Copy the NLA folder `source` (our adapter layout) to `out` in half precision and write the
    training report beside it; with the base model's `handle`, also the reference explanations
    (`reference.py`) of the shipped weights."""
    source, out = Path(source), Path(out)
    if not (source / "av" / "adapter_config.json").exists():
        raise NLAError(f"{source} is not an NLA adapter checkpoint.", "ship a stage's final/ or ckpt/ folder.")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for sub in ("av", "ar"):
        (tmp / sub).mkdir()
        for f in (source / sub).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / sub / f.name)
        for f in (tmp / sub).glob("*.safetensors"):
            _half(f, dtype)
    for name in ("stats.safetensors",):
        if (source / name).exists():
            shutil.copy2(source / name, tmp / name)
    meta = read_meta(source)
    meta.trained = True
    report = training_report(run, extra)
    stage = source.parent.name if source.name in ("final", "ckpt") else source.name
    if f"eval_{stage}" in report:  # the figures of the stage shipped, not of the latest one
        report["heldout"] = heldout_figures(report[f"eval_{stage}"])
    meta_extra = {"stage": stage, "weights_dtype": str(dtype).replace("torch.", "")}
    for key in ("eval_av_warmstart", "eval_rl"):
        if key in report:
            meta_extra[f"{key}_round_trip_fve"] = round(report[key]["round_trip_fve"], 4)
    meta.training = meta_extra  # type: ignore[attr-defined]  # an extra sidecar field (extra="allow")
    write_meta(tmp, meta)
    (tmp / "training_report.json").write_text(json.dumps(report, indent=1, default=float))
    (tmp / "config.yaml").write_text(yaml.safe_dump(run.config.model_dump(mode="json"), sort_keys=False))
    if handle is not None:
        write_reference_explanations(NLA.load(tmp, handle), tmp)
    for f in tmp.rglob("*"):
        if f.is_file():
            f.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def hardware() -> dict:
    """Where the shipped NLA was trained (for the training report)."""
    return {"device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
