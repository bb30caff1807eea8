"""`nla data build`, `nla train {config,ar-warmstart,av-warmstart,rl,all,ship}`, `nla eval`.

Every command works in a run folder (`--run`). The first command creates it with the config
given (`--config FILE` or `--preset`); later commands resume with the stored config, and a
different `--config` is refused."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from nla_core.errors import NLAError

from .common import console, out, print_json

__all__ = ["register"]

RunOpt = typer.Option(..., "--run", "-r", help="Run folder (created on first use).")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML training config (see `nla train config`).")
PresetOpt = typer.Option(None, "--preset", help="cpu | gpu | tiny (used when creating the run).")
ModelOpt = typer.Option(None, "--model", "-m", help="HF model name or local path (default: the run's model).")
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")
MaxStepsOpt = typer.Option(None, "--max-steps", help="Stop after this many steps (resume later).")


def _open(run: Path, config: Path | None, preset_name: str | None):
    from nla_core.training import Run, TrainConfig

    cfg = TrainConfig.from_file(config) if config is not None else None
    return Run.open(run, cfg, preset_name=preset_name)


def _handle(run, model: str | None):
    import torch

    from nla_core import load_model

    torch.set_num_threads(run.config.threads)
    name = model if model is not None else run.config.model
    return load_model(name)


def _show(result: dict, as_json: bool) -> None:
    # what a report left out, and why: on stderr, so that it is seen beside --json too
    for note in result.get("notes", []):
        console.print(escape(f"note: {note}"))
    if as_json:
        print_json(result)
        return
    for k, v in result.items():
        if k in ("examples", "notes"):
            continue
        text = json.dumps(v, default=float) if isinstance(v, (dict, list)) else str(v)
        out.print(f"[bold]{k}[/]: {escape(text)}")


def data_probe_layers(
    topics: int = typer.Option(1500, "--topics", help="WordNet topic documents to read."),
    every: int = typer.Option(2, "--every", help="Probe every n-th block."),
    model: str | None = ModelOpt, threads: int = typer.Option(2, "--threads"), as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Which block carries the topic: a ridge probe from each block's activation to the topic word,
    ranked on held-out topics (top-1 / top-10 among them). Needs WordNet (wordnet-base)."""
    import torch

    from nla_core import load_model
    from nla_core.training.layer_probe import probe_layers

    torch.set_num_threads(threads)
    h = load_model(model)
    figs = probe_layers(h, n_topics=topics, every=every)
    if as_json:
        print_json({str(k): v for k, v in figs.items()})
        return
    out.print(f"topic probe, {next(iter(figs.values()))['n_topics']} held-out topics (chance top-1 "
              f"{1 / next(iter(figs.values()))['n_topics']:.3f})")
    for k, v in figs.items():
        out.print(f"  block {k:>3}: top-1 {v['top1']:.3f}  top-10 {v['top10']:.3f}  median rank {v['median_rank']:.0f}")

def data_build(
    run: Path = RunOpt, config: Path | None = ConfigOpt, preset: str | None = PresetOpt,
    model: str | None = ModelOpt, yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before paying for Claude."),
    progress: bool = ProgressOpt, as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Corpus -> activations after block K (Parquet + dataset.yaml) -> warm-start explanations."""
    from nla_core.training import build_data

    r = _open(run, config, preset)
    h = _handle(r, model)

    def confirm(est: dict) -> bool:
        console.print(escape(f"Claude cost estimate: {est}"))
        return yes or typer.confirm("Go ahead?", default=False)

    _show(build_data(r, h, progress=progress, confirm=confirm), as_json)

def train_config(preset: str = typer.Option("cpu", "--preset"), out_file: Path | None = typer.Option(None, "--out")) -> None:
    """Print (or write) a preset's config as YAML, to edit and pass with --config."""
    from nla_core.training import preset as get_preset

    text = get_preset(preset).to_yaml()
    if out_file is None:
        print(text)
    else:
        out_file.write_text(text)
        console.print(escape(f"wrote {out_file}"))

def _stage_command(fn_name: str):
    def command(run: Path = RunOpt, config: Path | None = ConfigOpt, preset: str | None = PresetOpt,
                model: str | None = ModelOpt, max_steps: int | None = MaxStepsOpt,
                progress: bool = ProgressOpt, as_json: bool = typer.Option(False, "--json")) -> None:
        import nla_core.training as T

        r = _open(run, config, preset)
        h = _handle(r, model)
        _show(getattr(T, fn_name)(r, h, progress=progress, max_steps=max_steps), as_json)

    return command


def train_all(run: Path = RunOpt, config: Path | None = ConfigOpt, preset: str | None = PresetOpt,
              model: str | None = ModelOpt, progress: bool = ProgressOpt,
              yes: bool = typer.Option(False, "--yes", "-y")) -> None:
    """Every stage in order (each resumes where it stopped), then held-out evaluation."""
    from nla_core.training import build_data, evaluate, train_ar_warmstart, train_av_warmstart, train_rl

    r = _open(run, config, preset)
    h = _handle(r, model)
    build_data(r, h, progress=progress, confirm=(lambda est: yes or typer.confirm(f"Claude cost estimate: {est}. Go ahead?")))
    train_ar_warmstart(r, h, progress=progress)
    train_av_warmstart(r, h, progress=progress)
    evaluate(r, h, stage="av_warmstart", progress=progress)
    train_rl(r, h, progress=progress)
    _show(evaluate(r, h, stage="rl", progress=progress), False)

def train_ship(run: Path = RunOpt, out_dir: Path = typer.Option(..., "--out", help="Where to write the packaged checkpoint."),
               stage: str = typer.Option("rl", "--stage", help="rl | av_warmstart"),
               fp32: bool = typer.Option(False, "--fp32", help="Keep float32 weights."),
               reference: bool = typer.Option(True, "--reference/--no-reference",
                                              help="Also write the NLA's explanations of the base model "
                                                   "on the shipped texts."),
               model: str | None = ModelOpt) -> None:
    """Package a stage's result: half-precision adapters and head, nla_meta.yaml, training report,
    and the reference explanations (the NLA on the base model) that auditors score surprise against."""
    import torch

    from nla_core.training import Run
    from nla_core.training.ship import hardware, ship_checkpoint

    r = Run.open(run)
    src = r.final(stage) if r.is_done(stage) else r.stage_dir(stage) / "ckpt"
    if not (src / "nla_meta.yaml").exists():
        raise NLAError(f"Stage {stage} of {run} has no checkpoint yet.", f"run `nla train {stage.replace('_', '-')}` first.")
    path = ship_checkpoint(r, src, out_dir, dtype=torch.float32 if fp32 else torch.float16,
                           extra={"hardware": {**hardware(), "threads": r.config.threads}, "shipped_from": str(src)},
                           handle=_handle(r, model) if reference else None)
    console.print(escape(f"shipped {src} -> {path}"))

def eval_cmd(run: Path = RunOpt, stage: str | None = typer.Option(None, "--stage",
                                                                  help="rl | av_warmstart (default: latest)"),
             checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Evaluate this NLA folder instead."),
             n: int | None = typer.Option(None, "-n", help="Held-out activations to use."),
             best_of: int = typer.Option(1, "--best-of", min=1, max=16,
                                         help="Candidate explanations per activation; the AR keeps the closest."),
             unseen_by: Path | None = typer.Option(
                 None, "--unseen-by", help="Keep only held-out topics that this run's or checkpoint's corpus lacks."),
             model: str | None = ModelOpt, progress: bool = ProgressOpt,
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Held-out report: round-trip FVE, warm-start FVE, length, copy rate, tag fraction, examples."""
    from nla_core.training import Run, evaluate

    r = Run.open(run)
    h = _handle(r, model)
    rep = evaluate(r, h, stage=stage, checkpoint=checkpoint, n=n, progress=progress, best_of=best_of,
                   unseen_by=unseen_by)
    _show(rep, as_json)
    if not as_json:
        for ex in rep["examples"]:
            out.print(f"\n[dim]...{escape(repr(ex['context'][-160:]))}[/]\n"
                      f"  -> {escape(repr(ex['explanation']))} (mse {ex['mse']:.3f})")


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Activation datasets for NLA training.", no_args_is_help=True)
    train_app = typer.Typer(help="Train an NLA: warm-starts, joint RL, packaging.", no_args_is_help=True)
    app.add_typer(data_app, name="data")
    app.add_typer(train_app, name="train")
    data_app.command("probe-layers")(data_probe_layers)
    data_app.command("build")(data_build)
    train_app.command("config")(train_config)
    train_app.command("ar-warmstart", help="AR warm-start: head fit on cached features, then LoRA+head MSE steps.")(
        _stage_command("train_ar_warmstart"))
    train_app.command("av-warmstart", help="AV warm-start: SFT on the warm-start explanations.")(
        _stage_command("train_av_warmstart"))
    train_app.command("rl", help="Joint loop: GRPO for the AV (reward -MSE from the live AR), MSE for the AR.")(
        _stage_command("train_rl"))
    train_app.command("all")(train_all)
    train_app.command("ship")(train_ship)
    app.command("eval")(eval_cmd)
