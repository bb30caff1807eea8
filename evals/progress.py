"""What a person (or a script) sees while a bench runs.

- `BenchProgress`: the `on_progress` callback of `run_bench` for a person. On a terminal it is a
  live display (done / running / failed, detections on planted organisms, false positives on
  controls, elapsed time and an ETA, the audits running now) with notes and one line per
  finished audit printed above it. When the console is not a terminal (CI logs, a pipe) it
  prints plain lines instead: one per finished audit, with the running totals, and no control
  characters.
- `JsonEvents`: the callback for `nla bench --json`: every event as one JSON line on stdout,
  `{"event": ..., "t": <seconds since start>, ...}`, and a final `finished` line.
- `quiet_libraries()` keeps library warnings and per-load progress bars (transformers, PEFT,
  huggingface_hub, tqdm) out of the bench's own output; the CLI and worker processes call it
  at start. Errors still show.

The runner's events: `start` {run_id, cells, done, todo, db}, `audit` {audit_id, i, n} (an audit
began), `done` {audit_id, i, n, success, judge_status, seconds, tool_calls, status, cut_short,
control}, `note` {message}. Several audits can run at once: running = begun and not done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import IO, Any

__all__ = ["quiet_libraries", "BenchProgress", "JsonEvents", "format_duration"]


def quiet_libraries() -> None:
    """Library chatter off: transformers/PEFT/hub warnings and info logs, their tqdm bars
    (`Loading weights`, `Loading checkpoint shards`, downloads). Errors are still logged."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "peft", "huggingface_hub", "sentence_transformers", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft|torch)(\..*)?")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:  # the hub's own bars (downloads), also when the hub was imported before the variable was set
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def format_duration(seconds: float | None) -> str:
    """`0:42`, `12:05`, `1:02:03`; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class BenchProgress:
    """The bench's display for a person; use as `on_progress` and around the run:

        progress = BenchProgress(console, max_audits=...)
        progress.start()
        try:
            run_bench(..., on_progress=progress)
        finally:
            progress.stop()

    `live`: force the live display on or off (default: when `console.is_terminal`). `clock`:
    the time source (tests pass a fake one)."""

    MAX_RUNNING_SHOWN = 8

    def __init__(self, console: Any = None, *, max_audits: int | None = None, live: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, refresh_per_second: float = 2.0):
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console
        self.live = bool(console.is_terminal) if live is None else live
        self.max_audits = max_audits
        self._clock = clock
        self._t0 = clock()
        self._refresh = refresh_per_second
        self._lock = threading.RLock()  # the live display's refresh thread reads what events write
        self._live: Any = None
        self.run_id: str | None = None
        self.cells = 0  # audits in the run
        self.done_before = 0  # finished by an earlier segment of the run (resume)
        self.todo = 0  # audits this invocation will run
        self.running: dict[str, float] = {}  # audit id -> when it began
        self.peak_running = 0
        self.finished = 0
        self.failed = 0
        self.planted = 0  # planted-organism audits scored (success True or False)
        self.detections = 0
        self.controls = 0  # control audits scored
        self.false_positives = 0
        self.seconds: list[float] = []  # wall time of each finished audit

    # ---- the callback ---------------------------------------------------------------------

    def __call__(self, event: str, info: dict) -> None:
        with self._lock:
            if event == "start":
                self._on_start(info)
            elif event == "audit":
                self.running[str(info.get("audit_id"))] = self._clock()
                self.peak_running = max(self.peak_running, len(self.running))
            elif event == "done":
                self._on_done(info)
            elif event == "note":
                self._say(f"note: {info.get('message')}", style="yellow")
            if self._live is not None:  # show the event now, not at the next tick
                self._live.refresh()

    def _on_start(self, info: dict) -> None:
        self.run_id = str(info.get("run_id"))
        self.cells = int(info.get("cells") or 0)
        self.done_before = int(info.get("done") or 0)
        todo = int(info.get("todo") or 0)
        self.todo = min(todo, self.max_audits) if self.max_audits is not None else todo
        limit = f", running {self.todo} now (--max-audits)" if self.todo < todo else ""
        self._say(f"run {self.run_id}: {self.cells} audits, {self.done_before} already done{limit}, "
                  f"results in {info.get('db')}", style="bold")

    def _on_done(self, info: dict) -> None:
        self.running.pop(str(info.get("audit_id")), None)
        self.finished += 1
        secs = info.get("seconds")
        if isinstance(secs, (int, float)) and math.isfinite(secs):
            self.seconds.append(float(secs))
        auditor_failed = info.get("status") == "failed"
        judge_failed = info.get("judge_status") == "failed"
        if auditor_failed or judge_failed:
            self.failed += 1
        success, control = info.get("success"), info.get("control")
        if success is not None and not auditor_failed and control is not None:
            if control:
                self.controls += 1
                self.false_positives += success is False
            else:
                self.planted += 1
                self.detections += success is True
        line = (f"[{info.get('i')}/{info.get('n')}] {info.get('audit_id')}: {self._verdict(info)}, "
                f"{info.get('tool_calls')} tool calls, {info.get('seconds')} s")
        if not self.live:  # the totals go with each line where nothing else shows them
            line += f" | {self.status_line()}"
        self._say(line, style="red" if auditor_failed or judge_failed else None)

    @staticmethod
    def _verdict(info: dict) -> str:
        success, control = info.get("success"), info.get("control")
        if info.get("status") == "failed":
            verdict = "AUDITOR FAILED"
        elif success is None:
            verdict = "JUDGE FAILED" if info.get("judge_status") == "failed" else "not scored"
        elif control is None:  # a runner that does not say
            verdict = "success" if success else "miss/false positive"
        elif control:
            verdict = "control, no false positive" if success else "control, FALSE POSITIVE"
        else:
            verdict = "detected" if success else "missed"
        if info.get("cut_short"):
            verdict += f" (cut short: {info['cut_short']})"
        return verdict

    # ---- figures --------------------------------------------------------------------------

    def elapsed_s(self) -> float:
        return self._clock() - self._t0

    def mean_audit_s(self) -> float | None:
        return sum(self.seconds) / len(self.seconds) if self.seconds else None

    def eta_s(self) -> float | None:
        """Seconds until the audits of this invocation are done: the mean wall time of the
        finished audits times the work left (audits not begun, plus what the running ones have
        left of a mean audit), over the number that run at once (the most seen so far). None
        before the first audit finishes."""
        with self._lock:
            mean = self.mean_audit_s()
            if mean is None:
                return None
            now = self._clock()
            not_begun = max(0, self.todo - self.finished - len(self.running))
            work = not_begun * mean + sum(max(0.0, mean - (now - t)) for t in self.running.values())
            return work / max(1, self.peak_running, len(self.running))

    def status_line(self) -> str:
        """The running totals in one line of plain text."""
        with self._lock:
            before = f" (+{self.done_before} before)" if self.done_before else ""
            return (f"done {self.finished}/{self.todo}{before}, running {len(self.running)}, failed {self.failed}; "
                    f"detections {self.detections}/{self.planted} planted, "
                    f"false positives {self.false_positives}/{self.controls} controls; "
                    f"elapsed {format_duration(self.elapsed_s())}, ETA {format_duration(self.eta_s())}")

    # ---- output ---------------------------------------------------------------------------

    def _say(self, text: str, style: str | None = None) -> None:
        if self.live:  # a Text: a print's style would also colour the live region drawn with it
            from rich.text import Text

            self.console.print(Text(text, style=style or ""), highlight=False)
        else:  # plain: one unbroken line, no colour or cursor codes
            self.console.print(text, markup=False, highlight=False, soft_wrap=True, emoji=False)

    def render(self) -> Any:
        """The live region: a bar, the totals, the audits running now."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            now = self._clock()
            if self.run_id is None:
                return Text(f"starting the bench (reading the suite, opening the database) "
                            f"{format_duration(self.elapsed_s())}", style="dim")
            head = Table.grid(padding=(0, 1))
            head.add_row(ProgressBar(total=max(1, self.todo), completed=self.finished, width=30),
                         Text(f"{self.finished}/{self.todo} done", style="bold"),
                         Text(f"{len(self.running)} running"),
                         Text(f"{self.failed} failed", style="red" if self.failed else "dim"))
            lines: list[Any] = [head]
            lines.append(Text(f"detections {self.detections}/{self.planted} planted, "
                              f"false positives {self.false_positives}/{self.controls} controls"))
            mean = self.mean_audit_s()
            lines.append(Text(f"elapsed {format_duration(self.elapsed_s())}, ETA {format_duration(self.eta_s())}"
                              + (f" (mean audit {mean:.1f} s)" if mean is not None else ""), style="dim"))
            running = sorted(self.running.items(), key=lambda kv: kv[1])
            for audit_id, t in running[: self.MAX_RUNNING_SHOWN]:
                lines.append(Text(f"  running {audit_id} ({format_duration(now - t)})", style="cyan"))
            if len(running) > self.MAX_RUNNING_SHOWN:
                lines.append(Text(f"  ... and {len(running) - self.MAX_RUNNING_SHOWN} more", style="cyan"))
            return Group(*lines)

    def start(self) -> BenchProgress:
        if self.live and self._live is None:
            from rich.live import Live

            self._live = Live(get_renderable=self.render, console=self.console,
                              refresh_per_second=self._refresh, transient=False)
            self._live.start()
        return self

    def stop(self) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()

    def __enter__(self) -> BenchProgress:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class JsonEvents:
    """`nla bench --json`: each event as one JSON line, `{"event": ..., "t": seconds since
    start, ...the event's fields}`, on `stream` (default: stdout as it is now). Between
    `start()` and `stop()` anything else written to `sys.stdout` goes to stderr, so stdout
    holds the JSON lines only."""

    def __init__(self, stream: IO[str] | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self._t0 = clock()
        self._lock = threading.Lock()
        self._redirect: Any = None
        self.run_id: str | None = None

    def __call__(self, event: str, info: dict) -> None:
        if event == "start":
            self.run_id = info.get("run_id")
        self.emit(event, info)

    def emit(self, event: str, fields: dict) -> None:
        """One line; `event` and `t` are this writer's (a field of those names is dropped)."""
        rec: dict[str, Any] = {"event": event, "t": round(self._clock() - self._t0, 3)}
        rec.update((k, v) for k, v in fields.items() if k not in rec)
        line = json.dumps(rec, ensure_ascii=False, default=str)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def finished(self, **fields: Any) -> None:
        """The last line: run_id, n_run, elapsed_s, report, warnings..."""
        self.emit("finished", fields)

    def start(self) -> JsonEvents:
        if self._redirect is None and self.stream is sys.stdout:
            self._redirect = contextlib.redirect_stdout(sys.stderr)
            self._redirect.__enter__()
        return self

    def stop(self) -> None:
        if self._redirect is not None:
            redirect, self._redirect = self._redirect, None
            redirect.__exit__(None, None, None)

    def __enter__(self) -> JsonEvents:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
