"""`gradscope watch RUN`: a live view of a run directory while it is recorded (or after)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from gradscope.cli.app import app

WATCH_HELP = """Watch a run while it is recorded: steps and steps/s, the last and rolling
grad-norm percentiles, sparklines of norm and loss, the rolling clip fraction, skipped
steps and alerts (first non-finite step, spikes, never-/always-clips so far, clip-audit
findings). Read from the run directory as it is flushed.

\b
  gradscope watch runs/exp1                   (Ctrl-C to stop watching)
  gradscope watch runs/exp1 --exit-on-end     exit when the run ends, with `check`'s code

RUN may not exist yet: watch waits for it. A damaged or unreadable steps file is exit 2,
as in every command; --exit-on-end also ends on a meta.json that cannot be read (exit 2) or
that is missing once no recording process is alive. Without a terminal (a pipe, a CI log) it
prints one plain line per update instead of the live display.
"""


@app.command("watch", help=WATCH_HELP)
def watch_command(
    run: Path = typer.Argument(..., metavar="RUN", help="A gradscope run directory (it may not exist yet)."),
    exit_on_end: bool = typer.Option(
        False, "--exit-on-end", help="Exit when the run ends, with the exit code `gradscope check RUN` gives."
    ),
    interval: float = typer.Option(1.0, "--interval", min=0.05, help="Seconds between reads of the run directory."),
    rank: int = typer.Option(0, "--rank", min=0, help="Follow this rank's steps."),
    config: Optional[Path] = typer.Option(None, "--config", help="Check policy for --exit-on-end (as `check --config`)."),
) -> int:
    from gradscope.analysis import gate
    from gradscope.errors import GradscopeError

    if run.is_file():
        raise GradscopeError(f"'{run}' is a file: watch follows gradscope run directories "
                             "(use `gradscope check` or `recommend` for a trainer's log)")
    policy = gate.load_policy(config) if exit_on_end else None  # a bad config fails now, not at the end
    watcher = _Watcher(run, rank)
    tty = sys.stdout.isatty()
    try:
        if tty:
            from rich.live import Live

            watcher.poll()  # the first frame shows what is there, not a placeholder
            with Live(watcher.panel(), refresh_per_second=4, transient=False) as live:
                while True:
                    live.update(watcher.step_panel())
                    if exit_on_end and watcher.ended:
                        break
                    time.sleep(interval)
        else:
            last = None
            while True:
                watcher.poll()
                text = watcher.line()
                if text != last:
                    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)
                    last = text
                if exit_on_end and watcher.ended:
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    from gradscope.cli.check import verdict_for
    from gradscope.report import ci

    loaded, verdict = verdict_for(run, policy)
    print("\n".join(ci.lines(verdict, str(run), github=ci.in_github_actions(),
                             curves=ci.curve_lines(loaded, verdict))), flush=True)
    return verdict.exit_code


class _Watcher:
    """The follower, the incremental spike trackers, and the view built from them."""

    def __init__(self, run: Path, rank: int) -> None:
        from gradscope.analysis import load_config
        from gradscope.follow import RunFollower

        self.run = run
        self.follower = RunFollower(run, rank)
        self.cfg = load_config()
        self.trackers: dict = {}
        self.generation = 0
        self.ended = False

    def poll(self) -> None:
        self.follower.poll()
        self.ended = self.follower.ended()

    def view(self):
        import numpy as np

        from gradscope.analysis.live import SpikeTracker, findings, summarize
        from gradscope.report.spark import sparkline
        from gradscope.report.watch import View

        f = self.follower
        if f.generation != self.generation:  # the run was recorded again into the same directory
            self.trackers, self.generation = {}, f.generation
        view = View(path=str(self.run), status=f.status())
        if not self.run.exists():
            view.waiting = f"waiting for {self.run} to appear"
            return view
        if not f.series:
            view.waiting = ("waiting for the recording to start" if f.meta is None else
                            "no optimizer step recorded yet" if view.status == "running" else
                            "the run recorded no optimizer step")
            return view
        override = (f.meta or {}).get("clip_norm_override")
        for o in (f.process or {}).get("optimizers", []) or []:
            if isinstance(o, dict) and "id" in o:
                view.classes[o["id"]] = o.get("class")
        for opt, s in sorted(f.series.items()):
            tr = self.trackers.setdefault(opt, SpikeTracker())
            step, g, loss = s["step"], s["grad_norm"], s["loss"]
            skipped = s["skipped"] > 0
            tr.update(step, g, skipped, self.cfg)
            live = summarize(opt, step, g, loss, s["clip_max_norm"], skipped, s["time"], override, tr)
            mark = live.first_bad[0] if live.first_bad else None
            norm = sparkline(step, g, log=True, mark_step=mark)
            has_loss = bool(np.isfinite(loss).any())
            view.series.append((live, norm, sparkline(step, loss, mark_step=mark) if has_loss else ""))
        view.findings = findings(f.process)
        return view

    def line(self) -> str:
        from gradscope.report.watch import line

        return line(self.view())

    def panel(self):
        from gradscope.report.watch import panel

        return panel(self.view())

    def step_panel(self):
        self.poll()
        return self.panel()



