"""`gradscope tune`'s report says only what its figures say (issue 22): every sentence of the
rendered report is checked against the JSON figures it names, on a real tune() driven by the
advice benchmark's simulator (real recorded trainings of its logreg task, no process started);
and the figure is readable: its content (axes, lines, labels), not its pixels, is checked."""
from __future__ import annotations

import functools
import importlib.util
import io
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradscope.analysis import tune as decide
from gradscope.launch import Target
from gradscope.report.tune import build_figure, render, to_json
from gradscope.rundir import normalize_steps
from gradscope.tune import Candidate, ProbeRun, TuneResult, tune

_HERE = Path(__file__).resolve().parents[1] / "benchmarks" / "advice"
sys.path.insert(0, str(_HERE))
_spec = importlib.util.spec_from_file_location("advice_simulate_report", _HERE / "simulate.py")
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-report")
    task, seed = "logreg", 0
    target = Target("script", str(_HERE / "tasks.py"), ["--task", task, "--seed", str(seed)])
    factory = functools.partial(sim.SimRunner, task=task, seed=seed, root=root / "cache")
    res = tune(target, root / "out", steps=sim.TASKS[task].steps, runner_factory=factory)
    from rich.console import Console

    buf = io.StringIO()
    render(res, Console(file=buf, width=2000, color_system=None))  # no line wrapped
    return res, to_json(res), buf.getvalue()


def test_every_sentence_matches_the_json_figures(tuned):
    res, j, text = tuned
    T = j["total_steps"]
    final = j["rungs"][-1]["steps"]
    assert j["horizon"] == final  # no fallback here: the choice was made at the last rung
    m = re.search(r"compared at (\d+) of (\d+) steps", text)
    assert m and (int(m.group(1)), int(m.group(2))) == (j["horizon"], T)
    if final < T:  # issue 22: this note read a loop variable ("5 of 40" where the finalists ran 26)
        m = re.search(r"the finalists were compared at (\d+) of (\d+) steps", text)
        assert m and (int(m.group(1)), int(m.group(2))) == (final, T)
    # the rungs line: each rung's candidate count and horizon, and what it kept
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("rungs"))
    for r in j["rungs"]:
        assert f"{len(r['candidates'])} at {r['steps']} steps" in line
    # the table: every candidate's steps probed and loss as in the JSON
    for c in j["candidates"]:
        row = next(ln for ln in text.splitlines() if ln.strip().startswith(c["label"] + (" *" if c["chosen"] else " ")))
        cells = [x.strip() for x in row.split("│")]
        assert int(cells[1]) == c["steps"]
        assert float(cells[2]) == pytest.approx(c["loss"], rel=1e-3)
    # the compute line
    assert f"compute    {j['budget_spent']:.2f} whole runs of {T} steps" in text
    assert f"{j['steps_spent']} optimizer steps" in text
    # how sure: the words name the rule that was applied, and the runner-up's margin
    sure = next(ln for ln in text.splitlines() if "how sure" in ln)
    rule = j["rule"]
    if rule in ("best", "only"):
        assert "clear" in sure and f"{j['margin']:.1f} noise units worse" in sure
    else:
        assert "tie" in sure
        words = {"all-tied": "does not matter", "middle-tied": "middle", "largest-tied": "largest"}[rule]
        assert words in sure and "the larger threshold is taken" not in sure
    assert f"why        {j['reason']}" in text
    # the recommendation line is the JSON's threshold
    rec = j["recommended_clip_norm"]
    assert (f"max_norm = {rec:g}" in text) if rec is not None else ("no clipping" in text)


def test_the_how_sure_line_names_the_rule_that_chose():
    """The middle of three ties is not called "the larger" (issue 22), nor the all-tied answer."""
    from rich.console import Console

    def said(rows, **kw):
        ch = decide.choose(rows, **kw)
        cands = [Candidate(s.clip_norm, f"{s.clip_norm:g}" if math.isfinite(s.clip_norm) else "as is (none)",
                           summary=s) for s in rows]
        res = TuneResult(out=Path("x"), total_steps=300, total_steps_source="option", budget=3.0, plan=None,
                         pilot=None, candidates=cands, rungs=[decide.RungOutcome(100, [], [])],
                         choice=ch, recommended_clip_norm=ch.clip_norm, as_is_clip_norm=None, budget_spent=3.0,
                         steps_spent=900, steps_reused=0)
        buf = io.StringIO()
        render(res, Console(file=buf, width=220, color_system=None))
        return ch, next(ln for ln in buf.getvalue().splitlines() if "how sure" in ln)

    def s(tau, loss):
        return decide.ProbeSummary(tau, 100, 20, loss, 0.01 * math.sqrt(20), 0.01, 2.0, 0.5, 0.8, False)

    ch, line = said([s(0.25, 1.0), s(0.5, 1.01), s(1.0, 1.005), s(2.0, 1.5)], full_horizon=False)
    assert ch.rule == "middle-tied" and ch.clip_norm == 0.5 and "middle" in line and "larger" not in line
    ch, line = said([s(0.25, 1.0), s(0.5, 1.01), s(1.0, 1.005)], full_horizon=False, final=True)
    assert ch.rule == "all-tied" and ch.clip_norm == 1.0 and "does not matter" in line
    ch, line = said([s(0.25, 1.0), s(0.5, 1.2)], full_horizon=False, final=True)
    assert ch.rule == "best" and line.strip().startswith("how sure   clear")


# ---------------------------------------------------------------- the figure


def _probe(loss, clip=math.nan, n=None):
    loss = np.asarray(loss, float)
    k = len(loss)
    df = pd.DataFrame({"rank": 0, "optimizer": 0, "step": np.arange(k), "loss": loss, "grad_norm": 1.0,
                       "clip_max_norm": clip, "clipped": False, "skipped": False})
    return ProbeRun(clip, n, Path("p"), status="stopped", steps_run=k, steps=normalize_steps(df))


def test_the_figure_is_readable():
    T = 300
    x = np.arange(T)
    ce = 2.3 * np.exp(-x / 80) + 0.2  # a cross-entropy: positive, from 2.5
    never = _probe(ce[:25], n=25)  # 4 and as-is never clipped: the very same curve
    cands = []
    for tau, pr in ((0.25, _probe(ce * 1.02, 0.25)), (0.5, _probe(ce, 0.5)), (1.0, _probe(ce * 0.98 + 0.01, 1.0)),
                    (2.0, _probe(np.r_[ce[:20], 2.5 * 3.0 ** np.arange(5)], 2.0, n=25)), (4.0, never),
                    (decide.AS_IS, never)):
        s = decide.summarize(pr.steps, tau)
        cands.append(Candidate(tau, "as is (none)" if tau == decide.AS_IS else f"{tau:g}", [pr], s))
    ch = decide.Choice(0.5, 300, float(ce[-60:].mean()), [0.5], 1.0, 3.0, "lowest loss", "best")
    res = TuneResult(out=Path("x"), total_steps=T, total_steps_source="option", budget=3.0, plan=None, pilot=None,
                     candidates=cands, rungs=[decide.RungOutcome(25, [], []), decide.RungOutcome(300, [], [])],
                     choice=ch, recommended_clip_norm=0.5, as_is_clip_norm=None, budget_spent=3.0,
                     steps_spent=900, steps_reused=0)
    fig = build_figure(res)
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo >= 0  # a cross-entropy never runs below 0 (issue 22: the axis ran to -1)
    assert hi == pytest.approx(1.5 * max(c.summary.start_loss for c in cands))
    assert ax.get_xscale() == "log" and ax.get_xlim() == (1, T)  # to T; the first rung is not a knot
    lines = [ln for ln in ax.get_lines() if ln.get_label() and not ln.get_label().startswith("_")]
    for ln in ax.get_lines():  # every drawn curve stays inside the frame
        y = np.asarray(ln.get_ydata(), float)
        assert (y[np.isfinite(y)] <= hi + 1e-9).all()
    div = next(ln for ln in lines if ln.get_label().startswith("2 "))
    assert "(diverged)" in div.get_label() and len(div.get_xdata()) < 25
    marker = [ln for ln in ax.get_lines() if ln.get_marker() == "^"]
    assert len(marker) == 1 and marker[0].get_ydata()[0] == pytest.approx(hi)  # cut at the top, marked
    labels = [ln.get_label() for ln in lines]
    assert "4 = as is (none) (same curve)" in labels  # identical curves: one line, both names
    assert sum("0.5 (chosen)" == lab for lab in labels) == 1
    colours = [ln.get_color() for ln in lines if "(chosen)" not in ln.get_label()]
    assert len(set(colours)) == len(colours)  # neighbouring thresholds in distinct colours
    notes = [t.get_text() for t in ax.texts]
    assert "first rung: 25 steps" in notes and "finalists: 300 steps" in notes  # the horizons, labelled
