"""How `gradscope watch` looks: one plain line per update (no TTY), or a rich live panel."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from gradscope.analysis.live import ROLLING, LiveSeries


@dataclass
class View:
    path: str
    status: str | None                  # meta.json status (None: no meta.json yet)
    waiting: str | None = None          # what the view is waiting for, when there is nothing to show
    series: list[tuple[LiveSeries, str, str]] = field(default_factory=list)  # (figures, norm spark, loss spark)
    findings: list[dict] = field(default_factory=list)
    classes: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # said once, under the figures (e.g. rank-local norms)


def _f(x: float | None, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "nan" if x != x else ("inf" if x > 0 else "-inf")
    return format(x, spec)


def alerts(s: LiveSeries) -> list[str]:
    out = []
    if s.first_bad is not None:
        out.append(f"non-finite {s.first_bad[1]} at step {s.first_bad[0]}")
    sp = s.spikes
    if sp.count:
        big = f", largest {sp.largest[1]:.3g}x its level at step {sp.largest[0]}" if sp.largest else ""
        out.append(f"{sp.count} spike{'s' if sp.count != 1 else ''} (first at step {sp.first_step}{big})")
    if s.regime_so_far == "never-clips":
        out.append(f"never-clips so far: no step after warm-up above max_norm {_f(s.clip_norm, 'g')}")
    elif s.regime_so_far == "always-clips":
        out.append(f"always-clips so far: {s.judged_fraction:.0%} of the steps after warm-up above max_norm "
                   f"{_f(s.clip_norm, 'g')}")
    return out


def finding_alerts(findings: list[dict]) -> list[str]:
    return [f"{f.get('kind')} (first at step {f.get('first_step')}, {f.get('count')} steps)"
            + (f": {f['message']}" if f.get("message") else "") for f in findings]


def _label(view: View, s: LiveSeries) -> str:
    if len(view.series) <= 1:
        return ""
    cls = view.classes.get(s.optimizer)
    return f"optimizer {s.optimizer}" + (f" {cls}" if cls else "") + ": "


def series_text(view: View, s: LiveSeries, norm: str, loss: str) -> str:
    rate = f", {s.steps_per_s:.3g} steps/s" if s.steps_per_s else ""
    parts = [f"{_label(view, s)}step {s.last_step} ({s.rows} steps{rate})",
             f"grad_norm last {_f(s.last_grad_norm)}"]
    if s.rolling:
        parts.append(f"p50 {_f(s.rolling['p50'])} p90 {_f(s.rolling['p90'])} p99 {_f(s.rolling['p99'])} "
                     f"(last {min(s.rows, ROLLING)})")
    if s.clip_norm is not None and s.rolling_clip_fraction is not None:
        parts.append(f"clips {s.rolling_clip_fraction:.1%} of steady-state steps ({s.clipped_steps} of "
                     f"{s.steady_steps}) at max_norm {_f(s.clip_norm, 'g')}")
    else:
        parts.append("no clipping")
    parts.append(f"skipped {s.skipped}")
    parts.append(f"norm {norm}")
    if loss:
        parts.append(f"loss {loss}")
    a = alerts(s)
    if a:
        parts.append("ALERT " + "; ".join(a))
    return "  ".join(parts)


def line(view: View, clock: str = "") -> str:
    """One plain line: status, then each optimizer's figures, sparklines and alerts."""
    head = (f"[{clock}] " if clock else "") + f"{view.path}: {view.status or 'not started'}"
    if view.waiting:
        return f"{head}: {view.waiting}"
    body = " | ".join(series_text(view, s, n, l) for s, n, l in view.series)
    extra = finding_alerts(view.findings)
    return (f"{head}  {body}" + (f"  FINDINGS {'; '.join(extra)}" if extra else "")
            + "".join(f"  NOTE {n}" for n in view.notes))


def panel(view: View):
    """The rich renderable of the live display."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    status = view.status or "not started"
    style = {"running": "green", "completed": "cyan"}.get(status, "red" if status else "yellow")
    parts: list = []
    if view.waiting:
        parts.append(Text(view.waiting, style="yellow"))
    for s, norm, loss in view.series:
        t = Table(box=None, show_header=False, pad_edge=False)
        t.add_column(style="bold")
        t.add_column()
        title = _label(view, s).rstrip(": ") or "steps"
        rate = f"   {s.steps_per_s:.3g} steps/s" if s.steps_per_s else ""
        t.add_row(title, f"step {s.last_step}   {s.rows} recorded{rate}")
        roll = (f"p50 {_f(s.rolling['p50'])}   p90 {_f(s.rolling['p90'])}   p99 {_f(s.rolling['p99'])}"
                f"   (last {min(s.rows, ROLLING)} steps)") if s.rolling else "-"
        t.add_row("grad norm", f"last {_f(s.last_grad_norm)}   {roll}")
        t.add_row("norm (log)", norm)
        if loss:
            t.add_row("loss", loss)
        if s.clip_norm is not None and s.rolling_clip_fraction is not None:
            t.add_row("clipping", f"{s.rolling_clip_fraction:.1%} of steady-state steps ({s.clipped_steps} of "
                                  f"{s.steady_steps}) at "
                                  f"max_norm {_f(s.clip_norm, 'g')}")
        else:
            t.add_row("clipping", "none seen")
        t.add_row("skipped", str(s.skipped))
        for a in alerts(s):
            t.add_row(Text("ALERT", style="bold red"), Text(a, style="red"))
        parts.append(t)
    for a in finding_alerts(view.findings):
        parts.append(Text(f"FINDING {a}", style="bold red"))
    for n in view.notes:
        parts.append(Text(f"note: {n}", style="yellow"))
    return Panel(Group(*parts), title=f"gradscope watch {view.path}", subtitle=status,
                 border_style=style, title_align="left")
