"""`nla organisms ...`: list the suite with its measured figures, rebuild an organism from its
spec, and measure it against its base model (figures written back into the spec)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import console, escape, out

__all__ = ["register"]

_DIR_HELP = "extra folder of organism specs (*.yaml; adapters next to them)"


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f}%" if pct else f"{x:.3g}"


def _recall(m) -> str:
    """NLA concept recall, organism / base, with its sample size (n explanations per model)."""
    if m is None or m.concept_recall is None:
        return "-"
    return f"{_fmt(m.concept_recall)} / {_fmt(m.base_concept_recall)}  (n={m.recall_n})"


def _contrast(m) -> str:
    """The same for contrast readings, organism / null."""
    if m is None or m.contrast_recall is None:
        return "-"
    return f"{_fmt(m.contrast_recall)} / {_fmt(m.null_contrast_recall)}  (n={m.contrast_n})"


def _load_handles():
    cache: dict[str, object] = {}

    def get(base: str):
        from nla_core import load_model
        from nla_core.models import is_embedded

        key = "embedded" if is_embedded(base) else base
        if key not in cache:
            cache[key] = load_model(None if key == "embedded" else base)
        return cache[key]

    return get


def list_cmd(
    suite: str = typer.Option("default", help="suite name (built in: default, catalog)"),
    organisms: Path | None = typer.Option(None, "--organisms", help=_DIR_HELP),
    truth: bool = typer.Option(False, "--truth", help="also print each ground-truth sentence (operator view)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Organisms of a suite with their measured figures (organism vs base model)."""
    from rich.table import Table

    from environments import get_builder, load_suite, weights_present
    from environments.measure import passes, revealed_by

    specs = load_suite(suite, organisms)
    if as_json:
        rows = []
        for s in specs:
            d = s.model_dump(mode="json", exclude_none=True)
            if not truth:
                d.pop("ground_truth", None)
                d.pop("construction", None)
            d["revealed_by"] = revealed_by(s)
            rows.append(d)
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    table = Table(title=escape(f"organisms: {suite}" + (f" + {organisms}" if organisms else "")))
    table.add_column("id", no_wrap=True)
    for col in ("method", "families", "behaviour (org / base)", "ordinary prompts", "ppl (org / base)",
                "concept cos (org / base)", "NLA recall (org / base)", "NLA contrast recall (org / null)",
                "revealed by", "status"):
        table.add_column(col, overflow="fold")
    if truth:
        table.add_column("ground truth", overflow="fold")
    for s in specs:
        m = s.measured
        builder = get_builder(s.construction.method)
        needs = not s.catalog and builder.needs_build(s, builder.params(s))
        if s.catalog:
            status = "catalog: weights here" if weights_present(s) else "catalog: weights absent"
        elif needs:
            status = "[yellow]needs build[/]"
        elif s.control:
            status = "control"
        elif m is None:
            status = "[yellow]unmeasured[/]"
        else:
            status = "[green]ok[/]" if passes(m) else "[red]below base[/]"
        table.add_row(
            escape(s.id),
            s.construction.method,
            escape(", ".join(s.families)),
            "-" if m is None or s.check is None else f"{_fmt(m.behaviour_rate)} / {_fmt(m.base_rate)}  (n={m.n_prompts})",
            "-" if m is None or m.ordinary_rate is None else f"{_fmt(m.ordinary_rate)} / {_fmt(m.base_ordinary_rate)}",
            "-" if m is None or m.perplexity is None else f"{m.perplexity:.1f} / {m.base_perplexity:.1f}",
            "-" if m is None or m.concept_cos is None else f"{m.concept_cos:+.3f} / {m.base_concept_cos:+.3f}",
            _recall(m),
            _contrast(m),
            "-" if s.control or m is None else (", ".join(revealed_by(s)) or "[red]nothing measured[/]"),
            status,
            *([escape(s.ground_truth.behaviour)] if truth else []),
        )
    out.print(table)
    n_planted = sum(not s.control for s in specs)
    out.print(f"{len(specs)} organisms: {n_planted} planted, {len(specs) - n_planted} clean controls")

def build_cmd(
    organism_id: str = typer.Argument(..., metavar="ID", help="organism id (see `nla organisms list`)"),
    organisms: Path | None = typer.Option(None, "--organisms", help=_DIR_HELP),
    steps: int | None = typer.Option(None, help="override the spec's training steps (LoRA)"),
    fresh: bool = typer.Option(False, "--fresh", help="ignore a resumable checkpoint and start over"),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
) -> None:
    """Rebuild an organism's artefacts from its spec (train its adapter, compute its vector)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from environments import get_builder, get_spec
    from environments.builders import build
    from nla_core.errors import NLAError

    if threads:
        torch.set_num_threads(threads)
    if steps is not None and steps < 1:
        raise NLAError(f"--steps {steps} must be at least 1.", "pass a positive number of steps.")
    spec = get_spec(organism_id, organisms)
    builder = get_builder(spec.construction.method)
    handle = _load_handles()(spec.base_model)
    opts = {}
    if spec.construction.method == "lora":
        opts = {"steps": steps, "resume": not fresh}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{spec.id}: {stage}", total=total)
            bar.update(tasks[stage], completed=done, total=total)

        written = build(spec, handle, progress=progress, **opts)
    if not written:
        out.print(escape(f"{spec.id}: method {builder.name!r} has no artefacts to build (nothing to do)."))
    for p in written:
        out.print(f"wrote {escape(str(p))}")

def measure_cmd(
    organism_id: str | None = typer.Argument(None, metavar="ID", help="organism id; omit with --all"),
    all_: bool = typer.Option(False, "--all", help="measure every organism of --suite"),
    suite: str = typer.Option("default", help="suite for --all"),
    organisms: Path | None = typer.Option(None, "--organisms", help=_DIR_HELP),
    prompts: int | None = typer.Option(None, help="use only the first N eval prompts"),
    max_new_tokens: int = typer.Option(40, help="tokens per reply"),
    write: bool = typer.Option(True, "--write/--no-write", help="store the figures in the spec file"),
    concept_only: bool = typer.Option(False, "--concept-only",
                                      help="re-measure only the concept cosine (fast; needs earlier figures)"),
    recall_only: bool = typer.Option(False, "--recall-only",
                                     help="re-measure only the NLA concept recall (needs earlier figures)"),
    recall: bool = typer.Option(True, "--recall/--no-recall",
                                help="measure NLA concept recall (needs a trained NLA: shipped or --checkpoint)"),
    checkpoint: Path | None = typer.Option(None, "--checkpoint",
                                              help="NLA checkpoint for concept recall (default: the shipped one)"),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
) -> None:
    """Behaviour rate vs base, perplexity vs base, concept presence in activations, and
    NLA concept recall (explanations that name a key concept) vs base."""
    import torch

    from environments import get_spec, load_suite, save_spec
    from environments.measure import (
        measure_concept,
        measure_organism,
        passes,
        recall_figures,
        shipped_nla,
    )
    from nla_core.errors import NLAError
    from nla_core.nla import default_layer

    if threads:
        torch.set_num_threads(threads)
    if all_ == (organism_id is not None):
        raise NLAError("Pass one organism ID or --all.", "e.g. `nla organisms measure flattery-lora`.")
    if concept_only and recall_only:
        raise NLAError("--concept-only and --recall-only exclude each other.", "pass one of them (or neither).")
    if recall_only and not recall:
        raise NLAError("--recall-only with --no-recall measures nothing.", "drop one of them.")
    specs = load_suite(suite, organisms) if all_ else [get_spec(organism_id, organisms)]
    get = _load_handles()
    nlas: dict[int, object] = {}

    def nla_for(handle):
        """The NLA for recall on `handle` (loaded once per model: loading adds adapters), or None."""
        if id(handle) not in nlas:
            if checkpoint is not None:
                from nla_core import load_nla_for

                nlas[id(handle)] = load_nla_for(handle, checkpoint)
            else:
                nlas[id(handle)] = shipped_nla(handle)
                if nlas[id(handle)] is None:
                    console.print(f"no trained NLA ships for {escape(handle.name)}: concept recall skipped "
                                  "(pass --checkpoint to measure it)")
        return nlas[id(handle)]

    for spec in specs:
        if spec.catalog:
            console.print(f"{escape(spec.id)}: catalog organism, skipped")
            continue
        handle = get(spec.base_model)
        if (concept_only or recall_only) and spec.measured is None:
            raise NLAError(f"{spec.id} has no earlier figures to update.", f"run `nla organisms measure {spec.id}` first.")
        if concept_only:
            # at the NLA's block (what an NLA could read), else where it was measured before
            nla = nla_for(handle) if recall else None
            layer = nla.layer if nla is not None else (
                spec.measured.layer if spec.measured.layer is not None else default_layer(handle.n_layers))
            cos, base_cos = measure_concept(spec, handle, layer)
            m = spec.measured.model_copy(update={"concept_cos": None if cos is None else round(cos, 4),
                                                 "base_concept_cos": None if base_cos is None else round(base_cos, 4),
                                                 "layer": layer})
        elif recall_only:
            nla = nla_for(handle)
            if nla is None:
                continue
            m = spec.measured.model_copy(update=recall_figures(spec, handle, nla, reply_tokens=max_new_tokens))
        else:
            m = measure_organism(spec, handle, n_prompts=prompts, max_new_tokens=max_new_tokens,
                                 nla=nla_for(handle) if recall else None, recall=recall)
        verdict = "control" if spec.control else ("ok" if passes(m) else "BELOW BASE: do not ship")
        ppl = "-" if m.perplexity is None else f"{m.perplexity:.2f} vs {m.base_perplexity:.2f}"
        out.print(escape(
            f"{spec.id}: behaviour {_fmt(m.behaviour_rate)} vs base {_fmt(m.base_rate)} (n={m.n_prompts}); "
            f"ordinary {_fmt(m.ordinary_rate)} vs {_fmt(m.base_ordinary_rate)}; ppl {ppl}; "
            f"concept cos {_fmt(m.concept_cos, False)} vs {_fmt(m.base_concept_cos, False)}; "
            f"NLA recall {_fmt(m.concept_recall)} vs {_fmt(m.base_concept_recall)}"
            f"{f' (n={m.recall_n})' if m.recall_n else ''}; contrast recall {_fmt(m.contrast_recall)} vs null "
            f"{_fmt(m.null_contrast_recall)}; {m.seconds or 0:.0f} s; {verdict}"
        ))
        if write and spec.path is not None:
            spec.measured = m
            save_spec(spec)


def register(app: typer.Typer) -> None:
    org = typer.Typer(help="Model organisms: planted behaviours with ground truth, and clean controls.",
                      no_args_is_help=True)
    app.add_typer(org, name="organisms")
    org.command("list")(list_cmd)
    org.command("build")(build_cmd)
    org.command("measure")(measure_cmd)
