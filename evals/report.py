"""Reports: the terminal comparison table (one column per auditor: NLA, behavioural, the NLA
placebo, any others) and an HTML report with plots (detection by organism, budget vs success)
and links to transcripts."""

from __future__ import annotations

import html
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from .metrics import WALL_TIME, Cell, aggregate, auditor_of, cut_short_of, paired_differences, rated, wilson
from .scoring import themes_name_concept
from .store import ResultStore

__all__ = ["load_run", "comparison_table", "paired_table", "render_table_text", "write_html", "RunData", "run_warnings"]

# How a budget that ended an audit early is named in reports.
BUDGET_NAMES = {"max_tool_calls": "tool calls", "max_generated_tokens": "generated tokens",
                WALL_TIME: "wall time", "max_turns": "policy turns"}


class RunData:
    def __init__(self, run: dict, rows: list[dict], calls: dict[str, list[dict]] | None = None):
        self.run = run
        self.rows = rows
        self.calls = calls or {}  # audit id -> stored tool calls (the audit pages' fallback)
        self.cells = aggregate(rows)
        self.auditors = _auditor_order(rows)

    @cached_property
    def specs(self) -> dict[str, Any]:
        """The spec of each organism in the run, loaded once (from the built-in suites and the
        suite's own organisms folder); an organism whose spec is gone is left out."""
        from environments import get_spec

        organisms_dir = ((self.run.get("config") or {}).get("suite") or {}).get("organisms_dir")
        out: dict[str, Any] = {}
        for organism in {r["organism"] for r in self.rows}:
            try:
                out[organism] = get_spec(organism, organisms_dir=organisms_dir)
            except Exception:  # noqa: BLE001  # a spec deleted or moved since the run: no figure
                pass
        return out

    def visibility(self, row: dict) -> list[str]:
        """['rarely visible'] / ['visible'] for the row's organism ([] when its spec is gone)."""
        spec = self.specs.get(row["organism"])
        return [] if spec is None else ["rarely visible" if spec.rarely_visible else "visible"]


def _auditor_order(rows: Sequence[dict]) -> list[str]:
    """NLA first, behavioural next, the NLA placebo (control arm) third, anything else after;
    grouped by policy."""
    rank = {"nla": 0, "behavioural": 1, "nla-placebo": 2}
    auds = {(r["policy"], rank.get(r["strategy"], 3), r["strategy"]) for r in rows}
    return [f"{s}/{p}" for p, _, s in sorted(auds)]


def load_run(db_path: str | Path, run_id: str = "latest") -> RunData:
    with ResultStore(db_path, read_only=True) as store:
        if run_id == "latest":
            rid = store.latest_run_id()
            if rid is None:
                from .store import ResultsDBError

                raise ResultsDBError(f"{db_path} holds no runs.", "Run `nla bench` first.")
            run_id = rid
        run = store.run(run_id)
        rows = store.audits(run_id)
        calls: dict[str, list[dict]] = defaultdict(list)
        for c in store.tool_calls(run_id):
            calls[c["audit_id"]].append(c)
    return RunData(run, rows, dict(calls))


def _fmt_rate(c: Cell | None) -> str:
    if c is None:
        return "-"
    apart = [f"+{n} {what}" for n, what in ((c.judge_failed, "judge failed"), (c.failed, "auditor failed"),
                                             (c.timed_out, "cut short by wall time")) if n]
    if c.n == 0:
        return "n/a (0/0)" + (" " + " ".join(apart) if apart else "")
    return " ".join([f"{c.rate:.0%} [{c.low:.0%}, {c.high:.0%}] ({c.k}/{c.n})"] + apart)


def _cut_short_cell(rows: Sequence[dict]) -> str:
    """"2 (1 wall time, 1 tool calls)": audits a budget ended early, by budget."""
    by: dict[str, int] = defaultdict(int)
    for r in rows:
        cut = cut_short_of(r)
        if cut:
            by[BUDGET_NAMES.get(cut, cut)] += 1
    if not by:
        return "0"
    return f"{sum(by.values())} (" + ", ".join(f"{n} {what}" for what, n in sorted(by.items())) + ")"


def run_warnings(data: RunData) -> list[str]:
    """One line per thing about the run's numbers a reader must know: audits a wall-time cap
    cut short (left out of the rates), other budget cuts, failed auditors."""
    rows = data.rows
    out = []
    timed = [r for r in rows if cut_short_of(r) == WALL_TIME]
    if timed:
        out.append(f"{len(timed)} of {len(rows)} audits were cut short by the wall-time cap (max_seconds); their "
                   "outcome depends on machine load, so they are left out of the rates. Drop --max-seconds (or "
                   "the suite's max_seconds) to compare on tool calls and tokens only.")
    other = [r for r in rows if cut_short_of(r) not in (None, WALL_TIME)]
    if other:
        out.append(f"{len(other)} of {len(rows)} audits were cut short by a budget ({_cut_short_cell(other)}); "
                   "they are scored on the report they gave when it ran out.")
    failed = [r for r in rows if r.get("status") == "failed"]
    if failed:
        out.append(f"{len(failed)} of {len(rows)} audits failed (the auditor broke, refused or gave no valid "
                   "report); they are counted apart, not as results.")
    return out


def comparison_table(data: RunData) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per group (all organisms, each family, controls) and per
    budget figure; one column per auditor (strategy/policy)."""
    cells = {(c.auditor, c.group): c for c in data.cells}
    groups: list[str] = []
    for c in data.cells:
        if c.group not in groups:
            groups.append(c.group)
    order = {"all organisms": 0, "controls": 2}
    groups.sort(key=lambda g: (order.get(g, 1), g))
    header = ["metric"] + data.auditors
    rows: list[list[str]] = []
    for g in groups:
        label = "false positives: controls" if g == "controls" else f"detection: {g}"
        rows.append([label] + [_fmt_rate(cells.get((a, g))) for a in data.auditors])
    by_aud: dict[str, list[dict]] = defaultdict(list)
    for r in data.rows:
        by_aud[auditor_of(r)].append(r)

    def mean(a: str, key: str, fmt: str) -> str:
        xs = [float(r.get(key) or 0) for r in by_aud.get(a, [])]
        return format(sum(xs) / len(xs), fmt) if xs else "-"

    named = _themes_named(data)
    for label, keep in (("NLA themes name the planted concept", None),
                        ("NLA themes name the planted concept: rarely visible",
                         lambda r: data.visibility(r) == ["rarely visible"])):
        cells = [_share([named[r["audit_id"]] for r in by_aud.get(a, []) if keep is None or keep(r)])
                 for a in data.auditors]
        if all(c == "-" for c in cells):
            break
        rows.append([label] + cells)
    rows.append(["tool calls (mean)"] + [mean(a, "tool_calls", ".1f") for a in data.auditors])
    rows.append(["tokens generated (mean)"] + [mean(a, "tokens_generated", ".0f") for a in data.auditors])
    rows.append(["seconds per audit (mean)"] + [mean(a, "seconds", ".1f") for a in data.auditors])
    rows.append(["audits"] + [str(len(by_aud.get(a, []))) for a in data.auditors])
    failed = [str(sum(r.get("status") == "failed" for r in by_aud.get(a, []))) for a in data.auditors]
    if any(f != "0" for f in failed):
        rows.append(["auditor failed (not rated)"] + failed)
    cut = [_cut_short_cell(by_aud.get(a, [])) for a in data.auditors]
    if any(c != "0" for c in cut):
        rows.append(["cut short by a budget"] + cut)
    return header, rows


def _themes_named(data: RunData) -> dict[str, bool | None]:
    """Per audit: whether its `themes` results name the planted concept (None: a control, an arm
    without themes, or an organism whose spec is gone)."""
    return {r["audit_id"]: themes_name_concept(r.get("transcript_path"),
                                               list(data.specs[r["organism"]].ground_truth.key_concepts))
            if not r.get("control") and r["organism"] in data.specs else None for r in data.rows}


def _share(named: Sequence[bool | None]) -> str:
    """"18% [9%, 33%] (7/39)" over the audits with a figure; "-" when none has one (the
    placebo arm's share is chance)."""
    hits = [n for n in named if n is not None]
    if not hits:
        return "-"
    p, lo, hi = wilson(sum(hits), len(hits))
    return f"{p:.0%} [{lo:.0%}, {hi:.0%}] ({sum(hits)}/{len(hits)})"


def paired_table(data: RunData) -> tuple[list[str], list[list[str]]]:
    """Each strategy minus behavioural on the same organism and seed (planted organisms)."""
    header = ["pair", "organisms", "pairs", "only A / only B", "difference (95% CI)", "sign test p"]
    rows = [[f"{d.a.split('/')[0]} - {d.b.split('/')[0]}", d.group, str(d.n), f"{d.a_only} / {d.b_only}",
             f"{d.diff:+.2f} [{d.low:+.2f}, {d.high:+.2f}]", f"{d.p:.2f}"]
            for d in paired_differences(data.rows, group_of=data.visibility)]
    return header, rows


def render_table_text(data: RunData) -> str:
    """Plain-text (markdown) tables, for the README and logs: the comparison, then the paired
    differences when the run has them."""
    out = []
    for header, rows in (comparison_table(data), paired_table(data)):
        if not rows:
            continue
        out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out.append("")
    return "\n".join(out).rstrip("\n")


def rich_table(data: RunData) -> Any:
    from rich.table import Table

    header, rows = comparison_table(data)
    run = data.run
    t = Table(title=f"run {run['run_id']}  (suite {run['suite']}, code {run.get('code_version') or '?'})")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for r in rows:
        t.add_row(*r)
    return t


# ---------------------------------------------------------------------------------------------
# HTML


def _rate_bars(data: RunData, rows: list[dict], organisms: list[str], hit, ax) -> None:
    """Grouped bars, one per auditor and organism: share of rated audits (as in the table)
    where `hit(row)`, with 95% Wilson intervals."""
    auds = data.auditors
    width = 0.8 / max(1, len(auds))
    for j, a in enumerate(auds):
        rates, los, his = [], [], []
        for o in organisms:
            rs = [r for r in rows if r["organism"] == o and auditor_of(r) == a and rated(r)]
            k = sum(bool(hit(r)) for r in rs)
            p, lo, hi = wilson(k, len(rs))
            p = 0.0 if math.isnan(p) else p
            rates.append(p)
            los.append(max(0.0, p - lo))
            his.append(max(0.0, hi - p))
        xs = [i + (j - (len(auds) - 1) / 2) * width for i in range(len(organisms))]
        ax.bar(xs, rates, width, yerr=[los, his], capsize=3, label=a, color=f"C{j}")
    ax.set_xticks(range(len(organisms)))
    ax.set_xticklabels(organisms, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)


def _plot_rates(data: RunData, rows: list[dict], path: Path, hit, *, ylabel: str, title: str,
                min_width: float, height: float) -> bool:
    """One bar per organism and auditor of `rows`, the share of rated audits where `hit(row)`;
    False (nothing drawn) without rows."""
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    organisms = sorted({r["organism"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(min_width, 1.1 * len(organisms) * max(1, len(data.auditors)) / 2 + 2), height))
    _rate_bars(data, rows, organisms, hit, ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_detection(data: RunData, path: Path) -> bool:
    """Detection rate per planted organism (controls have their own plot: a different
    question). False when the run has no planted organism."""
    return _plot_rates(data, [r for r in data.rows if not r.get("control")], path, lambda r: r["success"],
                       ylabel="detection rate (95% Wilson)", title="Detection on planted organisms (higher is better)",
                       min_width=6.0, height=4.2)


def _plot_false_positives(data: RunData, path: Path) -> bool:
    """False-positive rate per clean control: something reported at or above the confidence
    threshold. False when the run has no control."""
    return _plot_rates(data, [r for r in data.rows if r.get("control")], path, lambda r: not r["success"],
                       ylabel="false-positive rate (95% Wilson)", title="False positives on clean controls (lower is better)",
                       min_width=5.0, height=3.6)


def _plot_budget(data: RunData, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for j, a in enumerate(data.auditors):
        rs = [r for r in data.rows if auditor_of(r) == a and r.get("success") is not None]
        for ok, marker in ((True, "o"), (False, "x")):
            sel = [r for r in rs if bool(r["success"]) == ok]
            if not sel:
                continue
            ax.scatter([r.get("tokens_generated") or 0 for r in sel],
                       [(r.get("tool_calls") or 0) + 0.15 * (j - (len(data.auditors) - 1) / 2) for r in sel],
                       marker=marker, color=f"C{j}", label=f"{a} {'success' if ok else 'miss'}")
    ax.set_xlabel("tokens generated by the target")
    ax.set_ylabel("tool calls")
    ax.set_title("Budget use vs success")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _link(target: str | None, base: Path) -> str:
    if not target:
        return ""
    p = Path(target)
    try:
        rel = os.path.relpath(p.resolve(), base.resolve())
    except ValueError:
        rel = p.resolve().as_uri()
    return f'<a href="{html.escape(rel)}">transcript</a>'


def _audit_links(r: dict, data: RunData, out: Path, explorer_url: str | None) -> str:
    e = html.escape
    links = [f'<a href="{e(_audit_page_name(r["audit_id"]))}">page</a>']
    ex = _explorer_link(explorer_url, data.run["run_id"], r["audit_id"])
    if ex:
        links.append(f'<a href="{e(ex)}">explorer</a>')
    t = _link(r.get("transcript_path"), out)
    if t:
        links.append(t)
    return " &middot; ".join(links)


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:12px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.ok{color:#176f2c;font-weight:600} td.bad{color:#a11;font-weight:600}
td.warn{color:#a60;font-weight:600} p.warn{color:#a60} .muted{color:#777;font-size:12px} img{max-width:100%;border:1px solid #ddd}
"""


EXPLORER_URL = "http://127.0.0.1:8765"  # where `nla explore` serves by default


def _audit_page_name(audit_id: str) -> str:
    import re

    return "audits/" + re.sub(r"[^A-Za-z0-9._-]+", "_", audit_id) + ".html"


def _explorer_link(base: str | None, run_id: str, audit_id: str) -> str | None:
    from urllib.parse import quote

    return f"{base.rstrip('/')}/runs/{quote(run_id, safe='')}/audits/{quote(audit_id, safe='')}" if base else None


def _write_audit_pages(data: RunData, out: Path, explorer_url: str | None) -> None:
    """One self-contained page per audit, by the explorer's audit renderer."""
    from .explore.data import build_detail
    from .explore.render import render_audit_static

    for r in data.rows:
        path = out / _audit_page_name(r["audit_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        d = build_detail(data.run, r, data.calls.get(r["audit_id"], []))
        path.write_text(render_audit_static(d, back="../index.html",
                                            explorer=_explorer_link(explorer_url, data.run["run_id"], r["audit_id"])))


def write_html(data: RunData, out_dir: str | Path, *, explorer_url: str | None = EXPLORER_URL) -> Path:
    """Write `index.html`, its plots and one static page per audit (`audits/`) into
    `out_dir`; returns the HTML path. Audit rows also link to `explorer_url` (`nla explore`;
    None: no such links)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    has_det = _plot_detection(data, out / "detection_by_organism.png")
    has_fp = _plot_false_positives(data, out / "false_positives_controls.png")
    _plot_budget(data, out / "budget_vs_success.png")
    _write_audit_pages(data, out, explorer_url)
    header, rows = comparison_table(data)
    run = data.run
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>nla-audit report {e(run['run_id'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Auditing benchmark: {e(run['run_id'])}</h1>",
        f"<p class='muted'>suite {e(str(run['suite']))} &middot; code {e(str(run.get('code_version') or '?'))} "
        f"&middot; started {e(str(run.get('started_at')))} &middot; elapsed {run.get('elapsed_s') or 0:.0f} s "
        f"&middot; {len(data.rows)} audits</p>",
        f"<h2>{e(' vs '.join(dict.fromkeys(a.split('/')[0] for a in data.auditors)))}</h2>",
        "<p class='muted'>Detection: share of audits on planted organisms where the judge matched a reported "
        "hypothesis to the ground truth, with 95% Wilson intervals. False positives: share of audits on clean "
        "controls that reported something at or above the confidence threshold. Judge failures are not counted "
        "as misses; failed auditors and audits cut short by a wall-time cap are counted apart, outside the "
        "rates.</p>",
        "<table id='comparison'><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>",
    ]
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>")
    parts.append("</table>")
    parts += [f"<p class='warn'>warning: {e(w)}</p>" for w in run_warnings(data)]
    p_header, p_rows = paired_table(data)
    if p_rows:
        parts += ["<h2>Paired differences</h2>",
                  "<p class='muted'>Detection of each strategy minus the behavioural one on the same planted "
                  "organism and seed: pairs where only one of them detected, the mean difference with a 95% "
                  "interval, and the exact sign test on the discordant pairs.</p>",
                  "<table id='paired'><tr>" + "".join(f"<th>{e(h)}</th>" for h in p_header) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>" for r in p_rows]
        parts.append("</table>")
    parts += [
        "<h2>Detection on planted organisms</h2>",
        "<p><img src='detection_by_organism.png' alt='detection by organism'></p>" if has_det
        else "<p class='muted'>no planted organisms in this run</p>",
        "<h2>False positives on clean controls</h2>",
        "<p><img src='false_positives_controls.png' alt='false positives on controls'></p>" if has_fp
        else "<p class='muted'>no clean controls in this run</p>",
        "<h2>Budget use</h2>",
        "<p><img src='budget_vs_success.png' alt='budget vs success'></p>",
        "<h2>Audits</h2>",
        "<table id='audits'><tr><th>organism</th><th>auditor</th><th>seed</th><th>result</th><th>judge</th>"
        "<th>hypotheses (confidence, verdict)</th><th>tool calls</th><th>tokens</th><th>s</th><th>audit</th></tr>",
    ]
    for r in sorted(data.rows, key=lambda r: (r["organism"], auditor_of(r), r["seed"])):
        if r.get("status") == "failed":
            res, cls = "auditor failed (not rated)", "warn"
        elif r.get("success") is None:
            res, cls = "judge failed", "warn"
        elif r.get("control"):
            res, cls = ("clean" if r["success"] else "false positive"), ("ok" if r["success"] else "bad")
        else:
            res, cls = ("detected" if r["success"] else "missed"), ("ok" if r["success"] else "bad")
        cut = cut_short_of(r)
        if cut:
            unrated = "; not rated" if not rated(r) and r.get("status") != "failed" else ""
            res += f" (cut short: {BUDGET_NAMES.get(cut, cut)}{unrated})"
            cls = "warn" if cut == WALL_TIME else cls
        hyps = []
        for v in r.get("verdicts") or []:
            tag = ("match" if v.get("match") else "no match") if "match" in v else (
                "above threshold" if v.get("false_positive") else "below threshold")
            hyps.append(f"{e(str(v.get('statement', '')))} "
                        f"<span class='muted'>({float(v.get('confidence', 0)):.2f}, {tag})</span>")
        if not hyps:
            hyps = ["<span class='muted'>nothing found</span>" if r.get("status") != "failed"
                    else f"<span class='muted'>{e(str(r.get('error') or 'failed'))}</span>"]
        judge = e(str(r.get("judge") or ""))
        if r.get("judge_error"):
            judge += f"<br><span class='muted'>{e(str(r['judge_error']))}</span>"
        parts.append(
            f"<tr><td>{e(r['organism'])}{' <span class=muted>(control)</span>' if r.get('control') else ''}</td>"
            f"<td>{e(auditor_of(r))}</td><td>{r['seed']}</td><td class='{cls}'>{e(res)}</td><td>{judge}</td>"
            f"<td>{'<br>'.join(hyps)}</td><td>{r.get('tool_calls') or 0}</td><td>{r.get('tokens_generated') or 0}</td>"
            f"<td>{float(r.get('seconds') or 0):.1f}</td><td>{_audit_links(r, data, out, explorer_url)}</td></tr>"
        )
    parts += ["</table>", "</body></html>"]
    path = out / "index.html"
    tmp = out / "index.html.tmp"
    tmp.write_text("\n".join(parts))
    os.replace(tmp, path)
    return path
