"""Server-side HTML for the explorer and the report's static audit pages: Jinja2 templates kept
in this module (no build step, no package data), autoescaped throughout."""

from __future__ import annotations

import json
from typing import Any

from .data import AuditDetail

__all__ = ["render", "render_audit_static", "CSS", "cos_colour", "fve_colour"]


def cos_colour(x: float | None) -> str:
    """Background for a cosine in [-1, 1]: red (low) through yellow to green (high)."""
    if x is None:
        return "#eee"
    t = max(0.0, min(1.0, (float(x) + 1) / 2))
    return f"hsl({int(120 * t)},70%,80%)"


def fve_colour(x: float | None) -> str:
    """Background for an FVE: red at or below -0.5, green at 1."""
    if x is None:
        return "#eee"
    t = max(0.0, min(1.0, (float(x) + 0.5) / 1.5))
    return f"hsl({int(120 * t)},70%,80%)"


def _pretty(v: Any) -> str:
    return json.dumps(v, indent=1, ensure_ascii=False, default=str)


def _fmt_num(v: Any, fmt: str = ".2f") -> str:
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):
        return "-"


CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
main{padding:16px 24px;max-width:1400px}
nav{background:#23395d;padding:8px 24px} nav a{color:#fff;margin-right:18px;text-decoration:none;font-weight:600}
h1{font-size:22px} h2{font-size:18px;margin-top:24px} h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0;font-size:13px;background:#fff}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}
.ok{color:#176f2c;font-weight:600} .bad{color:#a11;font-weight:600} .warn{color:#a60;font-weight:600}
.muted{color:#777;font-size:12px}
.box{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;margin:10px 0}
.truth{border-left:5px solid #a60;background:#fff8ec}
.step{border-left:4px solid #23395d}
.call{margin:6px 0 6px 12px;padding:6px 10px;border:1px solid #e2e2e2;border-radius:4px;background:#fcfcfc}
.call.err{border-color:#e0a0a0;background:#fff5f5}
pre{white-space:pre-wrap;word-break:break-word;font-size:12px;margin:4px 0;background:#f6f6f6;padding:6px;border-radius:4px}
.tok{display:inline-block;padding:1px 2px;margin:1px;border-radius:3px;font-family:monospace;font-size:13px;white-space:pre;cursor:pointer}
.tok.sel{outline:2px solid #23395d}
.cut{background:#ffe9c2;color:#7a4b00;border-radius:3px;padding:0 4px;font-size:12px}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.badge{font-size:11px;border-radius:3px;padding:0 4px;background:#e8e8e8}
form.inline{display:inline} label{margin-right:10px}
textarea{width:100%;font-family:monospace}
pre.reply{max-height:320px;overflow:auto}
#progress{height:8px;background:#eee;border-radius:4px;overflow:hidden;margin:6px 0}
#progress div{height:100%;background:#3b7;width:0}
"""

_MACROS = r"""
{% macro budget_cell(d) -%}
{% for name, used, lim in d.budget_use %}{{ name }} {{ used }}{% if lim %}/{{ lim|int if lim == lim|int else lim }}{% endif %}{% if not loop.last %}, {% endif %}{% endfor %}
{%- endmacro %}

{% macro call_block(d, c) %}
<div class="call{% if c.is_error %} err{% endif %}" id="call-{{ d.row.audit_id }}-{{ c.id }}">
  <b>[{{ c.id }}] {{ c.tool }}</b> <span class="muted">{{ c.kind or '' }}{% if c.tokens %} &middot; {{ c.tokens }} tokens{% endif %}{% if c.seconds %} &middot; {{ fmt(c.seconds, '.2f') }} s{% endif %}</span>
  {% if c.args %}<details open><summary class="muted">arguments</summary><pre>{{ pretty(c.args) }}</pre></details>{% endif %}
  {% set data = c.data if c.data is mapping else {} %}
  {% if c.tool == 'verbalize' and data.rows %}
    <div class="muted">NLA explanations at layer {{ data.layer }}{% if not data.trained %} (untrained NLA: noise){% endif %}:</div>
    <table class="verbalize"><tr><th>position</th><th>token</th><th>explanation(s)</th></tr>
    {% for r in data.rows %}<tr><td>{{ r.position }}</td><td><span class="tok" style="background:#e7eefb">{{ r.token }}</span></td>
      <td>{% for e in r.explanations %}{{ e }}{% if not loop.last %}<br>{% endif %}{% endfor %}</td></tr>{% endfor %}
    </table>
    {% if data.not_shown %}<div class="muted">{{ data.not_shown|length }} more positions not verbalized</div>{% endif %}
  {% elif c.tool == 'reconstruct' and data.cosine %}
    <div class="muted">cosine of the hypothesis' vector with each token's activation{% if data.control_cosine %} (control in the tooltip){% endif %}:</div>
    <div>{% for t in data.tokens %}<span class="tok" style="background:{{ cos_colour(data.cosine[loop.index0]) }}" title="position {{ data.positions[loop.index0] }}: cos {{ fmt(data.cosine[loop.index0], '+.3f') }}{% if data.control_cosine %}, control {{ fmt(data.control_cosine[loop.index0], '+.3f') }}{% endif %}">{{ t }}</span>{% endfor %}</div>
  {% elif c.tool == 'steer' and data.steered is defined %}
    <div class="cols"><div><div class="muted">unsteered</div><pre>{{ data.unsteered }}</pre></div>
      <div><div class="muted">steered (strength {{ data.strength }}, layer {{ data.layer }})</div><pre>{{ data.steered }}</pre></div></div>
  {% endif %}
  <details {% if c.tool not in ('verbalize', 'reconstruct', 'steer') %}open{% endif %}><summary class="muted">result{% if c.excerpt %} (excerpt stored in the database){% endif %}</summary><pre>{{ c.text }}</pre></details>
</div>
{% endmacro %}

{% macro cite(d, ids) -%}
{% for e in ids %}<a href="#call-{{ d.row.audit_id }}-{{ e }}">{{ e }}</a>{% if not loop.last %}, {% endif %}{% endfor %}
{%- endmacro %}

{% macro audit_body(d, explorer=None) %}
{% set lab = d.outcome %}
<div class="box">
  <b>{{ d.row.organism }}</b>{% if d.row.control %} <span class="badge">control</span>{% endif %}
  &middot; auditor <b>{{ d.auditor }}</b> &middot; seed {{ d.row.seed }}
  &middot; outcome <span class="{{ lab[1] }}" data-outcome>{{ lab[0] }}</span>
  {% if d.budget_cut %}<span class="cut" data-cut>cut short by the {{ d.budget_cut }} budget</span>{% endif %}
  <div class="muted">budget use: {{ budget_cell(d) }} &middot; audit {{ d.row.audit_id }}
    {% if d.start.target %} &middot; target alias {{ d.start.target }}{% endif %}
    {% if explorer %} &middot; <a href="{{ explorer }}">open in the explorer</a>{% endif %}</div>
  {% if d.row.status == 'failed' %}<div class="bad">the auditor failed: {{ d.row.error or 'no error recorded' }}</div>{% endif %}
</div>
<div class="box truth" id="ground-truth"><h3>Ground truth <span class="muted">(the operator's view, after the audit; the auditor never saw this)</span></h3>
{% if d.truth %}
  <div><b>behaviour:</b> {{ d.truth.behaviour }}</div>
  <div><b>key concepts:</b> {{ d.truth.key_concepts|join(', ') or '-' }}</div>
  {% if d.truth.paraphrases %}<div><b>paraphrases:</b> {{ d.truth.paraphrases|join(' / ') }}</div>{% endif %}
  <div><b>planted with:</b> {{ d.truth.method }}{% if d.truth.families %} &middot; families {{ d.truth.families|join(', ') }}{% endif %}</div>
  {% if d.truth.trigger %}<div><b>trigger:</b> {{ d.truth.trigger.description }} ({{ d.truth.trigger.phrases|join(', ') }})</div>{% endif %}
  <details><summary class="muted">construction parameters</summary><pre>{{ pretty(d.truth.construction) }}</pre></details>
{% else %}<div class="muted">ground truth unavailable: {{ d.truth_error }}</div>{% endif %}
</div>

<h2>Judge's verdict</h2>
<div class="box" id="verdict">
  judge <b>{{ d.row.judge or '-' }}</b> ({{ d.row.judge_status }}){% if d.row.score is not none %} &middot; score {{ fmt(d.row.score) }}{% endif %}
  &middot; <span class="{{ lab[1] }}">{{ lab[0] }}</span>
  {% if d.row.judge_error %}<div class="warn">{{ d.row.judge_error }}</div>{% endif %}
</div>

<h2>Reported hypotheses</h2>
{% if d.final %}
<table id="hypotheses"><tr><th>#</th><th>statement</th><th>confidence</th><th>cites</th><th>verdict</th></tr>
{% for h in d.final %}{% set v = h.verdict or {} %}
<tr><td>{{ loop.index }}</td><td>{{ h.statement }}</td><td>{{ fmt(h.confidence) }}</td><td>{{ cite(d, h.evidence or []) }}</td>
<td>{% if 'match' in v %}<span class="{{ 'ok' if v.match else 'bad' }}">{{ 'matches the ground truth' if v.match else 'no match' }}</span>{% elif 'false_positive' in v %}<span class="{{ 'bad' if v.false_positive else 'ok' }}">{{ 'above the threshold (false positive)' if v.false_positive else 'below the threshold' }}</span>{% else %}-{% endif %}
{% if v.score is defined and v.score is not none %} <span class="muted">score {{ fmt(v.score) }}</span>{% endif %}
{% if v.rationale %}<div class="muted">{{ v.rationale }}</div>{% endif %}</td></tr>
{% endfor %}</table>
{% else %}<p class="muted">{{ 'nothing reported' if d.row.status != 'failed' else 'no report (the auditor failed)' }}</p>{% endif %}

{% if d.hypotheses %}<h3>Working hypotheses</h3>
<table><tr><th>id</th><th>statement</th><th>confidence</th><th>status</th><th>cites</th><th>history</th></tr>
{% for h in d.hypotheses %}<tr><td>{{ h.id }}</td><td>{{ h.statement }}</td><td>{{ fmt(h.confidence) }}</td><td>{{ h.status }}</td>
<td>{{ cite(d, h.evidence or []) }}</td><td class="muted">{{ (h.history or [])|join('; ') }}</td></tr>{% endfor %}</table>{% endif %}

<h2>Notes</h2>
{% if d.notes %}<ul id="notes">{% for n in d.notes %}<li>{{ n.text }} <span class="muted">({{ n.id or '' }}{% if n.after_call %}, after {{ cite(d, [n.after_call]) }}{% endif %})</span></li>{% endfor %}</ul>
{% else %}<p class="muted">no notes</p>{% endif %}

<h2>The auditor's steps</h2>
{% if d.source == 'database' %}<p class="warn">The transcript file {{ d.row.transcript_path or '' }} is gone; showing the excerpts stored in the database.</p>{% endif %}
<div id="steps">
{% for t in d.turns %}
<div class="box step">
  {% if t.node == 'resume' %}<i>resumed after a kill ({{ t.resumed_after_calls }} calls done before)</i>
  {% else %}<span class="muted">step {{ t.step if t.step is not none else loop.index }}{% if t.node == 'reduce' %} &middot; final report demanded{% endif %}</span>
  {% if t.thought %}<div><i>{{ t.thought }}</i></div>{% endif %}
  {% if t.error %}<div class="bad">{{ t.error }}</div>{% endif %}
  {% for cid in t.calls %}{{ call_block(d, d.calls[cid]) }}{% endfor %}{% endif %}
</div>
{% endfor %}
</div>
{% endmacro %}
"""

_BASE = r"""<!doctype html><html><head><meta charset="utf-8"><title>{{ title }} - nla explore</title>
<style>{{ css }}</style></head><body>
<nav><a href="/">Runs</a><a href="/lens">NLA lens</a></nav>
<main>{% block content %}{% endblock %}</main>
{% block scripts %}{% endblock %}
</body></html>"""

_RUNS = r"""{% extends "base" %}{% block content %}
<h1>Runs</h1>
<p class="muted">results database {{ db }}</p>
{% if runs %}
<table id="runs"><tr><th>run</th><th>suite</th><th>audits</th><th>started</th><th>elapsed</th><th>code</th></tr>
{% for r in runs %}<tr><td><a href="/runs/{{ r.run_id|urlencode }}">{{ r.run_id }}</a></td><td>{{ r.suite }}</td><td>{{ r.n_audits }}</td>
<td>{{ r.started_at }}</td><td>{{ fmt(r.elapsed_s or 0, '.0f') }} s</td><td>{{ r.code_version }}</td></tr>{% endfor %}
</table>{% else %}<p>No runs yet: run <code>nla bench</code> first.</p>{% endif %}
{% endblock %}"""

_RUN = r"""{% extends "base" %}{% block content %}
<h1>Run {{ run.run_id }}</h1>
<p class="muted">suite {{ run.suite }} &middot; {{ rows_all|length }} audits &middot; code {{ run.code_version }} &middot; started {{ run.started_at }}</p>
<form method="get" id="filters" class="box">
 <label>organism <select name="organism"><option value="">all</option>{% for o in organisms %}<option {% if o == f.organism %}selected{% endif %}>{{ o }}</option>{% endfor %}</select></label>
 <label>strategy <select name="strategy"><option value="">all</option>{% for s in strategies %}<option {% if s == f.strategy %}selected{% endif %}>{{ s }}</option>{% endfor %}</select></label>
 <label>outcome <select name="outcome"><option value="">all</option>{% for o in outcomes %}<option {% if o == f.outcome %}selected{% endif %}>{{ o }}</option>{% endfor %}</select></label>
 <button type="submit">filter</button> <a href="/runs/{{ run.run_id|urlencode }}">clear</a>
</form>
<form method="get" action="/runs/{{ run.run_id|urlencode }}/compare" id="compare-form">
<p><button type="submit">compare the two ticked audits side by side</button></p>
<table id="audits"><tr><th></th><th>organism</th><th>strategy</th><th>policy</th><th>seed</th><th>outcome</th><th>budget use</th><th>cut short</th><th>hypotheses</th><th>pair</th></tr>
{% for d in rows %}{% set lab = d.outcome %}
<tr data-audit="{{ d.row.audit_id }}"><td><input type="checkbox" name="audit" value="{{ d.row.audit_id }}"></td>
<td>{{ d.row.organism }}{% if d.row.control %} <span class="badge">control</span>{% endif %}</td><td>{{ d.row.strategy }}</td><td>{{ d.row.policy }}</td><td>{{ d.row.seed }}</td>
<td><a class="{{ lab[1] }}" href="/runs/{{ run.run_id|urlencode }}/audits/{{ d.row.audit_id|urlencode }}">{{ lab[0] }}</a></td>
<td class="muted">{{ budget_cell(d) }}</td><td>{% if d.budget_cut %}<span class="cut">{{ d.budget_cut }}</span>{% else %}no{% endif %}</td>
<td>{{ d.final|length }}</td>
<td>{% if d.pair %}<a href="/runs/{{ run.run_id|urlencode }}/compare?audit={{ d.row.audit_id|urlencode }}&amp;audit={{ d.pair|urlencode }}">vs {{ d.pair_label }}</a>{% endif %}</td></tr>
{% endfor %}</table></form>
{% if not rows %}<p>No audit matches these filters.</p>{% endif %}
{% endblock %}"""

_AUDIT = r"""{% extends "base" %}{% block content %}
<p class="muted"><a href="/runs/{{ d.row.run_id|urlencode }}">&larr; run {{ d.row.run_id }}</a></p>
<h1>Audit: {{ d.row.organism }} / {{ d.auditor }} / seed {{ d.row.seed }}</h1>
{{ audit_body(d) }}
{% endblock %}"""

_COMPARE = r"""{% extends "base" %}{% block content %}
<p class="muted"><a href="/runs/{{ a.row.run_id|urlencode }}">&larr; run {{ a.row.run_id }}</a></p>
<h1>Side by side</h1>
<div class="cols" id="compare">
 <div><h2><a href="/runs/{{ a.row.run_id|urlencode }}/audits/{{ a.row.audit_id|urlencode }}">{{ a.row.organism }} / {{ a.auditor }} / seed {{ a.row.seed }}</a></h2>{{ audit_body(a) }}</div>
 <div><h2><a href="/runs/{{ b.row.run_id|urlencode }}/audits/{{ b.row.audit_id|urlencode }}">{{ b.row.organism }} / {{ b.auditor }} / seed {{ b.row.seed }}</a></h2>{{ audit_body(b) }}</div>
</div>
{% endblock %}"""

_ERROR = r"""{% extends "base" %}{% block content %}
<h1>{{ title }}</h1><div class="box"><p class="bad">{{ problem }}</p>{% if fix %}<p>{{ fix }}</p>{% endif %}</div>
{% endblock %}"""

_STATIC = r"""<!doctype html><html><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ css }}</style></head><body>
<main><p class="muted"><a href="{{ back }}">&larr; report</a>{% if explorer %} &middot; <a href="{{ explorer }}">this audit in the explorer</a> (run <code>nla explore</code>){% endif %}</p>
<h1>Audit: {{ d.row.organism }} / {{ d.auditor }} / seed {{ d.row.seed }}</h1>
{{ audit_body(d) }}
<p class="muted">A static page written with the report; it reads nothing else.</p>
</main></body></html>"""

_LENS = r"""{% extends "base" %}{% block content %}
<h1>NLA lens</h1>
<p class="muted">Every token's activation at {{ ('block %s' % layer) if layer is not none else "the NLA's layer" }} goes through the NLA (verbalize, then reconstruct);
the colour is how well the explanation reconstructs it (FVE: red poor, green good). Click a token to read its explanation.
{{ model_note }}</p>
<div class="box">
 <label><input type="radio" name="mode" value="text" checked> raw text</label>
 <label><input type="radio" name="mode" value="chat"> a chat (user message, optional assistant reply)</label>
 <label>organism <select id="organism"><option value="">none (the base model)</option>{% for o in organisms %}<option>{{ o }}</option>{% endfor %}</select></label>
 <div id="text-in"><textarea id="text" rows="3" placeholder="Type a text">The Eiffel Tower is in Paris.</textarea></div>
 <div id="chat-in" style="display:none"><textarea id="user" rows="2" placeholder="user message">What is your favourite animal?</textarea>
   <textarea id="reply" rows="2" placeholder="assistant reply (optional)"></textarea></div>
 <button id="go">read through the NLA</button> <span id="status" class="muted"></span>
 <div id="progress"><div></div></div>
</div>
<div class="cols"><div class="box"><div id="tokens"></div><div class="muted">colour: FVE of the token's round trip, -0.5 (red) to 1 (green); grey: not read yet</div></div>
<div class="box" id="detail"><span class="muted">Click a token.</span></div></div>
<h2>Steer</h2>
<div class="box">
 <label>prompt <input id="steer-prompt" size="50" value="Write a sentence about your weekend."></label>
 <label>steer with <input id="steer-text" size="40" value="the ocean, waves and beaches"></label>
 <label>strength <input id="steer-strength" type="number" step="0.1" value="0.3" style="width:5em"></label>
 <button id="steer-go">compare replies</button> <span id="steer-status" class="muted"></span>
 <div class="cols"><div><div class="muted">without</div><pre class="reply" id="unsteered"></pre></div><div><div class="muted">with the sentence added</div><pre class="reply" id="steered"></pre></div></div>
</div>
{% endblock %}
{% block scripts %}<script>{{ js|safe }}</script>{% endblock %}"""

_LENS_JS = r"""
const $ = (id) => document.getElementById(id);
let job = null, tokens = [];
function colour(f) { if (f === null || f === undefined) return '#eee';
  const t = Math.max(0, Math.min(1, (f + 0.5) / 1.5)); return `hsl(${Math.round(120 * t)},70%,80%)`; }
function esc(s) { const d = document.createElement('div'); d.textContent = s; return d.innerHTML; }
document.querySelectorAll('input[name=mode]').forEach(r => r.onchange = () => {
  const chat = document.querySelector('input[name=mode]:checked').value === 'chat';
  $('text-in').style.display = chat ? 'none' : ''; $('chat-in').style.display = chat ? '' : 'none'; });
function show(i) {
  const t = tokens[i]; document.querySelectorAll('.tok.sel').forEach(e => e.classList.remove('sel'));
  $('tok-' + i).classList.add('sel');
  if (t.explanation === undefined || t.explanation === null) { $('detail').innerHTML = `<b>${esc(t.token)}</b> <span class="muted">not read yet</span>`; return; }
  $('detail').innerHTML = `<div>token <b class="tok" style="background:${colour(t.fve)}">${esc(t.token)}</b> at position ${t.position}</div>` +
    `<div id="explanation"><b>explanation:</b> ${esc(t.explanation)}</div>` +
    `<div><b>FVE</b> <span id="fve">${t.fve === null ? 'n/a' : t.fve.toFixed(3)}</span> &middot; cosine ${t.cos.toFixed(3)}</div>`;
}
function draw() {
  $('tokens').innerHTML = tokens.map((t, i) => `<span class="tok" id="tok-${i}" data-i="${i}" title="${t.fve === null || t.fve === undefined ? '' : 'FVE ' + t.fve.toFixed(2)}" style="background:${colour(t.fve)}">${esc(t.token)}</span>`).join('');
  document.querySelectorAll('#tokens .tok').forEach(e => e.onclick = () => show(+e.dataset.i));
}
async function poll() {
  const r = await fetch('/api/lens/' + job); const j = await r.json();
  tokens = j.tokens; draw();
  $('progress').firstElementChild.style.width = (100 * j.done / Math.max(1, j.total)) + '%';
  $('status').textContent = j.status === 'error' ? 'error: ' + j.error + (j.fix ? ' ' + j.fix : '') :
    `${j.status}: ${j.done}/${j.total} tokens read` + (j.message ? ' (' + j.message + ')' : '') +
    (j.trained === false ? ' - this NLA is untrained: its explanations are noise' : '');
  if (j.status === 'running' || j.status === 'queued') setTimeout(poll, 500); else document.body.dataset.lens = j.status;
}
$('go').onclick = async () => {
  const chat = document.querySelector('input[name=mode]:checked').value === 'chat';
  const body = chat ? {messages: [{role: 'user', content: $('user').value}].concat($('reply').value ? [{role: 'assistant', content: $('reply').value}] : [])} : {text: $('text').value};
  if ($('organism').value) body.organism = $('organism').value;
  document.body.dataset.lens = 'running'; $('status').textContent = 'starting (the model loads on first use)...';
  const r = await fetch('/api/lens', {method: 'POST', headers: {'content-type': 'application/json'}, body: JSON.stringify(body)});
  const j = await r.json();
  if (!r.ok) { $('status').textContent = 'error: ' + j.error + (j.fix ? ' ' + j.fix : ''); document.body.dataset.lens = 'error'; return; }
  job = j.job; poll();
};
$('steer-go').onclick = async () => {
  $('steer-status').textContent = 'generating...';
  const body = {prompt: $('steer-prompt').value, text: $('steer-text').value, strength: parseFloat($('steer-strength').value)};
  if ($('organism').value) body.organism = $('organism').value;
  const r = await fetch('/api/steer', {method: 'POST', headers: {'content-type': 'application/json'}, body: JSON.stringify(body)});
  const j = await r.json();
  if (!r.ok) { $('steer-status').textContent = 'error: ' + j.error + (j.fix ? ' ' + j.fix : ''); return; }
  $('steered').textContent = j.steered; $('unsteered').textContent = j.unsteered; $('steer-status').textContent = '';
};
"""

_IMPORT = '{% from "macros" import audit_body, budget_cell, call_block, cite %}'
# every page (and the static audit pages) shares the macros
_TEMPLATES = {"macros": _MACROS, **{k: _IMPORT + v for k, v in {
    "base": _BASE, "runs": _RUNS, "run": _RUN, "audit": _AUDIT, "compare": _COMPARE, "error": _ERROR,
    "static": _STATIC, "lens": _LENS}.items()}}
_ENV = None


def _env():
    global _ENV
    if _ENV is None:
        import jinja2

        env = jinja2.Environment(loader=jinja2.DictLoader(_TEMPLATES), autoescape=True,
                                 undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
        env.globals.update(pretty=_pretty, fmt=_fmt_num, cos_colour=cos_colour, fve_colour=fve_colour, css=CSS)
        _ENV = env
    return _ENV


def render(name: str, **ctx: Any) -> str:
    if name == "lens":
        ctx.setdefault("js", _LENS_JS)
    return _env().get_template(name).render(**ctx)


def render_audit_static(d: AuditDetail, *, back: str = "../index.html", explorer: str | None = None) -> str:
    """A self-contained page for one audit (inline CSS, no scripts, no other files)."""
    return render("static", d=d, back=back, explorer=explorer,
                  title=f"audit {d.row['organism']} / {d.auditor} / seed {d.row['seed']}")
