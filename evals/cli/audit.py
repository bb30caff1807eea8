"""`nla audit`: audit one organism with one strategy and policy, with a live view of the steps."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from nla_core.errors import NLAError

from .common import Interrupted, console, escape, out, print_json

__all__ = ["register", "AuditCLIError", "parse_budget"]


class AuditCLIError(NLAError):
    """Bad input to `nla audit`."""


def parse_budget(text: str | None, calls: int | None, tokens: int | None, seconds: float | None
                 ) -> dict[str, float] | None:
    """`--budget calls=30,tokens=4000,seconds=600` (or a bare number of tool calls) plus the
    explicit --max-* options. None: the strategy's default for the policy."""
    keys = {"calls": "max_tool_calls", "tool_calls": "max_tool_calls", "max_tool_calls": "max_tool_calls",
            "tokens": "max_generated_tokens", "max_generated_tokens": "max_generated_tokens",
            "seconds": "max_seconds", "s": "max_seconds", "max_seconds": "max_seconds"}
    budget: dict[str, float] = {}
    if text:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        for p in parts:
            k, _, v = p.partition("=")
            if not _:
                k, v = "calls", k
            key = keys.get(k.strip().lower())
            try:
                val = float(v)
            except ValueError:
                key = None
            if key is None:
                raise AuditCLIError(f"Cannot read the budget item {p!r}.",
                                    "write --budget calls=30,tokens=4000,seconds=600 (any subset), or a number of calls.")
            budget[key] = val
    for key, val in (("max_tool_calls", calls), ("max_generated_tokens", tokens), ("max_seconds", seconds)):
        if val is not None:
            budget[key] = float(val)
    for key, val in budget.items():
        if not val > 0:
            raise AuditCLIError(f"The budget's {key} must be positive, got {val:g}.", "pass a number above 0.")
    return budget or None


_ERROR_MARK = "\x00error "  # marks a failed call's row; rendered as a red "error"


class LiveView:
    """A rich live table of the audit's steps (policy turns, tool calls, the report)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.rows: list[tuple[str, str, str, str]] = []
        self.live: Any = None
        self.header = ""

    def __enter__(self) -> LiveView:
        if not self.quiet:
            from rich.live import Live

            self.live = Live(self._render(), console=console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(*exc)

    def _render(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(self.header or "audit"), expand=True, show_lines=False)
        # min_width + no_wrap: a long result must not squeeze step and node to nothing
        table.add_column("step", justify="right", min_width=4, no_wrap=True)
        table.add_column("node", min_width=7, no_wrap=True)
        table.add_column("action", min_width=10, max_width=24, overflow="fold")
        table.add_column("result", ratio=1, overflow="ellipsis", no_wrap=True)
        for row in self.rows[-25:]:
            # cells are Text, never markup: tool output and model text may hold "[/x]"
            cells = [Text(str(c)) for c in row]
            if row[3].startswith(_ERROR_MARK):
                cells[3] = Text.assemble(("error", "red"), row[3][len(_ERROR_MARK) - 1:])
            table.add_row(*cells)
        return table

    def __call__(self, ev: dict) -> None:
        node = ev.get("node", "")
        if node == "start":
            self.header = (f"auditing {ev.get('target')} · strategy {ev.get('strategy')} · policy {ev.get('policy')} · "
                           f"budget {int(ev['limits']['max_tool_calls'])} calls / "
                           f"{int(ev['limits']['max_generated_tokens'])} tokens"
                           + (f" / {int(ev['limits']['max_seconds'])} s" if ev["limits"].get("max_seconds") else ""))
            row = ("", "start", ev.get("run_id", ""), f"tools: {', '.join(ev.get('tools', []))}")
        elif node == "resume":
            row = (str(ev.get("step")), "resume", "", f"resumed after {ev.get('resumed_after_calls')} recorded calls")
        elif node == "policy":
            acts = ", ".join(a.get("tool") or "?" for a in ev.get("actions") or []) or "(no action)"
            row = (str(ev.get("step")), "policy", acts, " ".join(str(ev.get("thought") or ev.get("error") or "").split())[:200])
        elif node in ("tools", "reduce"):
            call = ev.get("call") or {}
            mark = _ERROR_MARK if call.get("is_error") else ""
            text = " ".join(str(call.get("text", "")).split())[:200]
            row = (str(ev.get("step")), node, f"{call.get('id', '')} {call.get('tool', '')}", mark + text)
        elif node == "report":
            what = ("failed: " + str(ev.get("error"))) if ev.get("status") == "failed" else (
                "nothing found" if ev.get("nothing_found") else f"{len(ev.get('hypotheses') or [])} hypotheses")
            row = (str(ev.get("step")), "report", "", what)
        else:
            row = (str(ev.get("step", "")), node, "", "")
        self.rows.append(row)
        if self.live is not None:
            self.live.update(self._render())


def register(app: typer.Typer) -> None:
    @app.command("audit")
    def audit(
        organism: str = typer.Option(..., "--organism", "-o", help="Organism id (see `nla organisms list`)."),
        strategy: str = typer.Option("nla", "--strategy", "-s",
                                     help="nla | behavioural | nla-placebo (or a registered strategy)."),
        policy: str = typer.Option("offline", "--policy", "-p", help="offline | claude | local | scripted."),
        budget: str | None = typer.Option(None, "--budget", "-b",
                                             help="calls=30,tokens=4000,seconds=600 (any subset; default: the strategy's)."),
        max_calls: int | None = typer.Option(None, "--max-calls", help="Tool-call budget."),
        max_tokens: int | None = typer.Option(None, "--max-tokens", help="Budget of tokens generated by the target."),
        max_seconds: float | None = typer.Option(None, "--max-seconds", help="Wall-time budget."),
        max_hypotheses: int = typer.Option(5, "--max-hypotheses", "-n", help="Report at most this many hypotheses."),
        run_id: str | None = typer.Option(None, "--run-id", help="Resume this run (default: a new id)."),
        workdir: Path = typer.Option(Path("runs/audits"), "--workdir", help="Where checkpoints and transcripts go."),
        organisms_dir: Path | None = typer.Option(None, "--organisms-dir", help="Folder with your own organism specs."),
        model: str | None = typer.Option(None, "--model", "-m", help="Override the organism's base model."),
        checkpoint: Path | None = typer.Option(None, "--nla", help="NLA checkpoint folder (default: the shipped one)."),
        critic: Path | None = typer.Option(None, "--critic", help="AR folder of a released NLA pair."),
        policy_model: str | None = typer.Option(None, "--policy-model",
                                                   help="Model of the claude / local policy (e.g. claude-sonnet-4-5)."),
        seed: int = typer.Option(0, "--seed"),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No live view of the steps."),
    ) -> None:
        """Audit ORGANISM: investigate with the strategy's tools, then report at most N ranked
        hypotheses (or nothing found). Runs are resumable: pass the same --run-id again."""
        from agents import get_policy, get_strategy, run_audit
        from environments import build_target, get_spec
        from nla_core import load_model
        from nla_core.models import is_embedded

        from .model import load_nla_for_cli

        strat = get_strategy(strategy)  # unknown names fail here, before anything loads
        opts: dict[str, Any] = {}
        if policy_model and policy in ("claude", "local"):
            opts["model"] = policy_model
        pol = get_policy(policy, **opts)  # a missing API key fails here too
        limits = parse_budget(budget, max_calls, max_tokens, max_seconds)
        if max_hypotheses < 1:
            raise AuditCLIError(f"--max-hypotheses must be at least 1, got {max_hypotheses}.", "pass 1 or more.")
        spec = get_spec(organism, organisms_dir)
        base = model or (None if spec.base_model == "*" or is_embedded(spec.base_model) else spec.base_model)
        handle = load_model(base)
        nla = load_nla_for_cli(handle, checkpoint, critic, None)
        if strat.tool_set != "behavioural" and not nla.trained and not quiet:
            console.print("[yellow]warning:[/] no trained NLA checkpoint: the NLA tools will say they are untrained.")
        rid = run_id or f"audit-{time.strftime('%Y%m%d-%H%M%S')}-{strategy}-{policy}"
        # the auditor sees an opaque alias, never the organism id: keyed with a random salt kept
        # in the run's folder, so a resume (same --run-id) keeps it
        from agents.graph import _safe_id
        from environments.target import alias_for, run_alias_salt

        alias = alias_for(run_alias_salt(Path(workdir) / _safe_id(rid) / "alias_salt"), organism)
        target = build_target(spec, handle, alias=alias, layer=nla.layer, seed=seed)
        try:
            with LiveView(quiet or as_json) as view:
                report = run_audit(target, nla, strategy=strat, policy=pol, budget=limits, run_id=rid, workdir=workdir,
                                   seed=seed, max_hypotheses=max_hypotheses, on_event=view)
        except KeyboardInterrupt:
            # every finished step is checkpointed: the same command with this run id continues
            raise Interrupted(f"resume the audit: run the same command again with --run-id {rid}") from None
        if as_json:
            print_json(report.model_dump(mode="json"))
            return
        out.print(f"[bold]run[/] {escape(rid)} · {report.status} · {report.tool_calls} tool calls, "
                  f"{report.tokens_generated} tokens, {report.seconds:.0f} s")
        if report.status == "failed":
            out.print(f"[bold red]audit failed:[/] {escape(str(report.error))}")
        elif report.nothing_found:
            out.print("[bold]nothing found[/]")
        for i, h in enumerate(report.hypotheses, 1):
            evidence = ", ".join(h.evidence) or "none"
            out.print(escape(f"{i}. [{h.confidence:.2f}] {h.statement}") + f"  [dim]{escape(f'(evidence: {evidence})')}[/]")
        out.print(f"transcript: {escape(str(report.transcript_path))}")
        if report.status == "failed":
            raise typer.Exit(1)
