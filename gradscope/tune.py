"""`gradscope tune`: find the clip norm by measuring: a pilot, then probes in two rungs (every
candidate, then three finalists).

A layer above launch.py: every pilot and probe is an ordinary ``gradscope run`` started as a
subprocess (``--clip-norm TAU --max-steps N``) into its own run directory under OUT, read
back with ``load_run``; what to run and what won is decided in analysis/tune.py. A probe
directory that already holds a finished run of the same command, threshold and length
(status completed or stopped) is reused, so a tune stopped and started again with the same
OUT picks up where it was.

    OUT/pilot/                      the script as it is (T given: the first rung's length)
    OUT/probe-tau<TAU>-n<N>/        one probe (tau "as-is": the script as it is)
    OUT/logs/<run>.log              each run's own output
    OUT/tune.json, OUT/tune.png     the result and the loss curves

With ``--metric NAME`` every run gets ``--metric-name NAME`` (and ``--metric-regex``): the
values the script reports land in each run's metrics-r*.csv, a probe cut at N steps stops when
step N+1 begins (so a value reported after step N is recorded), the horizons are moved to the
steps the pilot reported NAME after (analysis/tune.py ``report_horizons``, ``align``), and
probes are ranked by NAME at their horizon (``with_metric``, in :func:`tune`'s ``judge``).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gradscope import rundir
from gradscope.analysis import tune as decide
from gradscope.errors import GradscopeError
from gradscope.executors import LocalExecutor, Probe, max_overlap
from gradscope.launch import Target
from gradscope.probe_process import without_rendezvous_port

FINISHED = ("completed", "stopped")
DEFAULT_BUDGET = 3.0


@dataclass
class ProbeRun:
    clip_norm: float  # decide.AS_IS: the script as it is
    max_steps: int | None
    run_dir: Path
    reused: bool = False
    status: str = ""
    exit_code: int | None = None
    steps_run: int = 0  # optimizer-0 steps the run made (what it cost)
    steps: object = None  # the steps table (pandas)
    metrics: Any = None  # the metrics table (pandas; rundir.Run.metrics)
    failure: str | None = None  # why it has no outcome of its own (its Ray worker died twice)


@dataclass
class Candidate:
    clip_norm: float
    label: str
    probes: list = field(default_factory=list)  # ProbeRun, shortest first
    summary: decide.ProbeSummary | None = None  # at the longest horizon it reached
    failed: str | None = None  # a probe exited with an error


@dataclass
class TuneResult:
    out: Path
    total_steps: int
    total_steps_source: str  # "option" or "pilot"
    budget: float
    plan: decide.Plan
    pilot: ProbeRun
    candidates: list  # Candidate, by threshold (as-is last)
    rungs: list  # per rung: {"steps", "candidates", "kept"}
    choice: decide.Choice
    recommended_clip_norm: float | None
    as_is_clip_norm: float | None  # the script's own max_norm, when it clips
    budget_spent: float
    steps_spent: int
    steps_reused: int
    unseeded_at: dict = field(default_factory=dict)  # probe dir -> first step differing from the pilot
    notes: list = field(default_factory=list)
    recommend_clip_norm: float | None = None  # `recommend`'s threshold on the pilot (carried into the finals)
    warmup_steps: int | None = None  # the learning rate's warm-up, from the recorded lr (None: none seen)
    figure: Path | None = None
    metric: str | None = None  # --metric NAME: what the probes were ranked by (None: the training loss)
    maximize: bool = False
    wall_seconds: float = math.nan  # this tune's wall time, start to end
    parallelism: int = 0  # the most pilot/probe runs that ran at once
    executor: str = "local"


# `python -m gradscope` would put the working directory first on sys.path, where a folder named
# gradscope (a checkout) would shadow the installed package: start the CLI without it.
_CLI = "import sys; sys.path.pop(0); sys.argv[0] = 'gradscope'; from gradscope.cli import main; main()"


def gradscope_argv(target: Target, out: Path, clip_norm: float | None, max_steps: int | None,
                   layer_stride: int, metric_name: str | None = None, metric_regex: str | None = None) -> list[str]:
    """The `gradscope run` command line of one probe."""
    argv = [sys.executable, "-c", _CLI, "run", "--quiet", "--force", "--out", str(out),
            "--layer-stride", str(layer_stride)]
    if metric_name is not None:
        argv += ["--metric-name", metric_name] + (["--metric-regex", metric_regex] if metric_regex else [])
    if clip_norm is not None and math.isfinite(clip_norm):
        argv += ["--clip-norm", repr(float(clip_norm))]
    if max_steps is not None:
        argv += ["--max-steps", str(int(max_steps))]
    if target.kind == "module":
        argv += ["-m", target.name, *target.args]
    elif target.kind == "command":
        argv += ["--", target.name, *target.args]
    else:
        argv += [target.name, *target.args]
    return argv


def probe_dir(out: Path, clip_norm: float, max_steps: int | None) -> Path:
    tau = "as-is" if not math.isfinite(clip_norm) else f"{clip_norm:.6g}"
    return out / f"probe-tau{tau}-n{max_steps if max_steps is not None else 'all'}"


def _finished(run_dir: Path, target: Target, clip_norm: float | None, max_steps: int | None,
              metric: tuple = (None, None)) -> bool:
    """A finished run of this very probe: same command, threshold, length and metric options."""
    try:
        meta = rundir.read_json(run_dir / rundir.META_FILE)
    except (OSError, ValueError):
        return False
    want_clip = clip_norm if clip_norm is not None and math.isfinite(clip_norm) else None
    return (meta.get("status") in FINISHED and meta.get("max_steps") == max_steps
            and meta.get("clip_norm_override") == want_clip
            # the rendezvous port tune gave a launcher's probe is not part of what it is
            and without_rendezvous_port(meta.get("command") or []) == without_rendezvous_port(target.argv())
            and (meta.get("metric_name"), meta.get("metric_regex")) == tuple(metric))


class Runner:
    """Runs probes through an executor (gradscope/executors.py; default: J local processes at a
    time), reusing finished ones; every run it touched is kept in ``runs``."""

    def __init__(self, target: Target, out: Path, jobs: int, layer_stride: int = 0,
                 on_event: Callable[[str], None] | None = None, executor=None) -> None:
        self.target, self.out, self.jobs, self.layer_stride = target, out, max(1, jobs), layer_stride
        self.on_event = on_event or (lambda msg: None)
        self.runs: dict[Path, ProbeRun] = {}
        self.metric: tuple = (None, None)  # (--metric-name, --metric-regex) of every run; set by tune()
        self.executor = executor or LocalExecutor(self.jobs)
        self.intervals: list[tuple[float, float]] = []  # (start, end) of every run it started

    @property
    def parallelism(self) -> int:
        return max_overlap(self.intervals)

    def run(self, specs: list[tuple[float, int | None, Path]]) -> list[ProbeRun]:
        todo = []
        for clip_norm, max_steps, run_dir in specs:
            if run_dir in self.runs:
                continue
            pr = ProbeRun(clip_norm, max_steps, run_dir)
            self.runs[run_dir] = pr
            if _finished(run_dir, self.target, clip_norm, max_steps, self.metric):
                pr.reused = True
                self.on_event(f"reusing {run_dir.name} (finished before)")
            else:
                todo.append(pr)
        if todo:
            self._launch(todo)
        for clip_norm, max_steps, run_dir in specs:
            self._load(self.runs[run_dir])
        return [self.runs[d] for _, _, d in specs]

    def _launch(self, todo: list[ProbeRun]) -> None:
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        probes = []
        for pr in todo:
            tau = "as is" if not math.isfinite(pr.clip_norm) else f"clip norm {pr.clip_norm:g}"
            probes.append(Probe(pr.run_dir.name,
                                gradscope_argv(self.target, pr.run_dir, pr.clip_norm, pr.max_steps, self.layer_stride,
                                               *self.metric),
                                logs / f"{pr.run_dir.name}.log",
                                f"running {pr.run_dir.name}: {tau}, " +
                                (f"{pr.max_steps} steps" if pr.max_steps else "to its end")))
        outcomes = self.executor.run(probes, on_start=lambda p: self.on_event(p.describe))
        for pr, o in zip(todo, outcomes):
            self.intervals.append((o.started, o.ended))
            if o.failure is not None:
                pr.failure = o.failure
                self.on_event(f"{pr.run_dir.name} failed: {o.failure}")
        for pr, o in zip(todo, outcomes):
            rc = o.returncode
            if rc is not None and (rc < 0 or rc == 130):  # interrupted (Ctrl-C reaches local probes too), or killed
                raise KeyboardInterrupt if rc in (-2, 130) else GradscopeError(
                    f"{pr.run_dir.name} was killed by signal {-rc}; see {logs / (pr.run_dir.name + '.log')}", 1)

    def _load(self, pr: ProbeRun) -> None:
        if pr.failure is not None:  # whatever its directory holds, it has no outcome of its own
            pr.status, pr.exit_code, pr.steps_run = "failed", None, 0
            pr.steps = rundir.empty_steps()
            return
        try:
            run = rundir.load_run(pr.run_dir)
        except GradscopeError:
            pr.status, pr.steps_run = "failed", 0
            pr.steps = rundir.empty_steps()
            return
        pr.status, pr.exit_code = run.meta.get("status"), run.meta.get("exit_code")
        pr.steps, pr.metrics = run.steps, run.metrics
        first = decide._first_optimizer(run.steps)
        pr.steps_run = len(first)


def _label(clip_norm: float, as_is_clip: float | None) -> str:
    if math.isfinite(clip_norm):
        return f"{clip_norm:g}"
    return f"as is ({as_is_clip:g})" if as_is_clip is not None else "as is (none)"


def _script_clip(steps) -> float | None:
    """The script's own max_norm when the pilot clipped (the as-is candidate is that threshold)."""
    s = decide._first_optimizer(steps)
    tau = s["clip_max_norm"].dropna() if len(s) else s
    return float(tau.mode().iloc[0]) if len(tau) else None


def tune(target: Target, out: Path, *, steps: int | None = None, budget: float = DEFAULT_BUDGET,
         jobs: int = 1, candidates: list[float] | None = None, include_as_is: bool = True,
         on_event: Callable[[str], None] | None = None, figure: bool = True,
         runner_factory: Callable[..., Runner] | None = None, executor=None, metric: str | None = None,
         maximize: bool = False, metric_regex: str | None = None) -> TuneResult:
    """Record a pilot, probe the candidates under the budget, choose. See the module docstring.

    ``runner_factory`` (default :class:`Runner`) is called as ``runner_factory(target, out, jobs,
    on_event=...)`` and gives what runs the probes: anything with Runner's ``run``, ``runs`` and
    ``layer_stride`` (benchmarks/advice/simulate.py serves probes from cached trainings).
    ``executor`` (gradscope/executors.py; default: ``jobs`` local processes) is where the default
    Runner runs them."""
    started = time.monotonic()
    if budget <= 0 or not math.isfinite(budget):
        raise GradscopeError(f"--budget must be a positive number of whole runs, got {budget:g}")
    if steps is not None and steps < 1:
        raise GradscopeError(f"--steps must be >= 1, got {steps}")
    out.mkdir(parents=True, exist_ok=True)
    runner = (runner_factory(target, out, jobs, on_event=on_event) if runner_factory else
              Runner(target, out, jobs, on_event=on_event, executor=executor))
    if metric is not None:
        runner.metric = (metric, metric_regex)
    say = on_event or (lambda msg: None)

    def judge(pr: ProbeRun, t: float, horizon: int) -> decide.ProbeSummary:
        """A probe's figures at ``horizon``, and what it is ranked by there: its loss, or --metric."""
        s = decide.summarize(pr.steps, t, horizon)
        return decide.with_metric(s, pr.metrics, metric, horizon, maximize) if metric is not None else s

    # Recommend's threshold joins the placed candidates, and it and the script's own go on to the
    # finals: planned for (the first plan sets the pilot's length; the rungs are re-planned later).
    auto = not candidates
    n_cand = (len(candidates) if candidates else len(decide.GRID_FACTORS) + 1) + int(include_as_is)

    # 1. The pilot: the script as it is. T given: as long as the first rung (it is the as-is
    #    candidate's first probe); otherwise to its end, which tells T. With --metric it runs the
    #    whole training (T steps when given), which tells when the script reports the metric.
    if steps is not None and metric is not None:
        runner.layer_stride = 1
        pilot = runner.run([(decide.AS_IS, steps, out / "pilot")])[0]
        runner.layer_stride = 0
        T, T_source = steps, "option"
        try:
            the_plan = decide.plan(T, budget, n_cand, pilot_steps=T, as_is_in_pilot=include_as_is)
        except ValueError as e:
            raise GradscopeError(f"{e}; with --metric the pilot runs the whole training to learn when "
                                 f"{metric} is reported") from None
    elif steps is not None:
        try:
            the_plan = decide.plan(steps, budget, n_cand, as_is_in_pilot=include_as_is)
        except ValueError as e:
            raise GradscopeError(str(e)) from None
        pilot_len = the_plan.rungs[0].steps  # never past T, even when the script would run longer
        runner.layer_stride = 1
        pilot = runner.run([(decide.AS_IS, pilot_len, out / "pilot")])[0]
        runner.layer_stride = 0
        T, T_source = steps, "option"
    else:
        runner.layer_stride = 1
        pilot = runner.run([(decide.AS_IS, None, out / "pilot")])[0]
        runner.layer_stride = 0
        if pilot.status not in FINISHED:
            raise GradscopeError(
                f"cannot learn the training's length: the pilot ended '{pilot.status}' (exit code "
                f"{pilot.exit_code}) after {pilot.steps_run} steps{_last_line(out / 'logs' / 'pilot.log')}; "
                f"see {out / 'logs' / 'pilot.log'}; "
                "give the length with --steps T", 2)
        T, T_source = pilot.steps_run, "pilot"
        if T < 1:
            raise GradscopeError("the pilot made no optimizer step: nothing to tune "
                                 f"(see {out / 'logs' / 'pilot.log'})", 2)
        why = _ended_at_blow_up(pilot.steps)
        if why is not None:  # a training may end while blowing up; a script may also stop at its blow-up
            early_note = (f"the pilot ended after {T} steps with {why}: if the script stops itself at a non-finite "
                          f"loss, {T} is where it blew up, not the training's length; give it with --steps T")
            say(early_note)
        try:
            the_plan = decide.plan(T, budget, n_cand, pilot_steps=T, as_is_in_pilot=include_as_is)
        except ValueError as e:
            raise GradscopeError(f"{e}; the pilot used 1 of them to learn T = {T} (give --steps T to "
                                 "save that)") from None
    if pilot.status not in FINISHED or pilot.steps_run == 0:
        raise GradscopeError(f"the pilot ended '{pilot.status}' (exit code {pilot.exit_code}) after "
                             f"{pilot.steps_run} steps{_last_line(out / 'logs' / 'pilot.log')}; "
                             f"see {out / 'logs' / 'pilot.log'}", 2)
    notes: list[str] = []
    if T_source == "pilot" and why is not None:
        notes.append(early_note)
    if _stopped_short(pilot, pilot.max_steps or 0):
        # A script that stops itself on a non-finite loss (`if not math.isfinite(loss): break`)
        # ends early after a blow-up: the as-is candidate diverged; any other early end means
        # --steps is not the training's length.
        why = decide.stopped_diverging(pilot.steps)
        if why is None:
            raise GradscopeError(f"the training has only {pilot.steps_run} steps, fewer than its first probe's "
                                 f"{pilot.max_steps}: --steps {steps} is not its length", 2)
        say(f"the pilot stopped itself at step {pilot.steps_run} of {pilot.max_steps} after a blow-up ({why}): "
            "the script as it is diverged")

    # A learning-rate warm-up (from the recorded lr): its norms are not those of training after
    # it. The pilot is run longer (doubling) until the warm-up is over, the candidates are placed
    # from the norms after it, and the first rung reaches past it when the budget allows.
    longest, extra_pilots = pilot, []
    warm = decide.warmup(pilot.steps)
    while (warm is not None and not warm[1] and T_source == "option" and not _stopped_short(longest, longest.max_steps or 0)):
        nxt = min(T // 2, 2 * longest.steps_run)
        spent_now = sum(p.steps_run for p in runner.runs.values())
        if nxt <= longest.steps_run or spent_now + nxt > budget * T / 3:
            break
        say(f"the learning rate still rises at step {longest.steps_run - 1} (a warm-up): running the script as it "
            f"is for {nxt} steps")
        pr = runner.run([(decide.AS_IS, nxt, probe_dir(out, decide.AS_IS, nxt))])[0]
        if pr.status not in FINISHED:
            break
        extra_pilots.append(pr)
        longest = pr
        warm = decide.warmup(pr.steps)
    warmup_steps = warm[0] + 1 if warm is not None and warm[1] else None
    if warm is not None and not warm[1]:
        notes.append(f"the learning rate still rises at step {longest.steps_run - 1}, the end of the longest pilot "
                     "the budget allows: the candidates are placed from norms inside its warm-up")

    horizons: list[int] = []
    if metric is not None:  # where the script reports it: the horizons are moved there
        horizons = decide.report_horizons(pilot.metrics, metric, pilot.steps_run, T, complete=True)
        if not horizons:
            names = sorted(set(pilot.metrics["name"])) if pilot.metrics is not None and len(pilot.metrics) else []
            raise GradscopeError(
                f"the pilot ({pilot.steps_run} steps) reported no value of '{metric}' after any step "
                f"({'it reported ' + ', '.join(names[:8]) if names else 'it reported no metric'}); "
                "check --metric" + (" and --metric-regex" if metric_regex else "") +
                "", 2)
        say(f"{metric} is reported after steps " + ", ".join(map(str, horizons[:6])) +
            (", ..." if len(horizons) > 6 else "") + "; probe horizons are moved there")
        for r in the_plan.rungs:
            r.steps = decide.align(r.steps, horizons)

    as_is_clip = _script_clip(pilot.steps)
    start = warmup_steps if warmup_steps and longest.steps_run - warmup_steps >= 3 else 0
    rec_tau = _recommended(longest) if auto else None
    first_min = math.ceil(1.25 * warmup_steps) if warmup_steps else None

    def placed(factors) -> list[float]:
        if candidates:
            return sorted(set(float(c) for c in candidates))
        horizon = None if start else the_plan.rungs[0].steps
        return decide.candidates_from_pilot(longest.steps, horizon, factors, start=start)

    def with_extras(taus: list[float]) -> tuple[list[float], float | None]:
        """The ladder plus recommend's threshold (a ladder step within 15% of it stands for it),
        less the script's own threshold (that is the as-is candidate)."""
        taus, rec = list(taus), None
        if rec_tau is not None and rec_tau != as_is_clip:
            near = [t for t in taus if abs(math.log(t / rec_tau)) <= math.log(1.15)]
            rec = near[0] if near else rec_tau
            if not near:
                taus = sorted(taus + [rec_tau])
        if include_as_is and as_is_clip is not None and as_is_clip in taus:
            taus.remove(as_is_clip)
        return taus, rec

    taus, rec = with_extras(placed(decide.GRID_FACTORS))
    if not taus and not candidates:
        raise GradscopeError("the pilot recorded no finite gradient norm to place the candidates around; "
                             "give them with --candidates", 2)
    carry = tuple(t for t in ((decide.AS_IS if include_as_is and as_is_clip is not None else None), rec)
                  if t is not None)
    sunk = sum(p.steps_run for p in runner.runs.values()) - longest.steps_run  # pilots shorter than the longest
    if first_min is not None and first_min > the_plan.rungs[0].steps:
        fits = None
        for factors in ((decide.GRID_FACTORS,) if candidates else (decide.GRID_FACTORS, decide.GRID_FACTORS[2:],
                                                                     decide.GRID_FACTORS[3:6])):
            ts, r = with_extras(placed(factors))
            try:
                fits = (ts, r, decide.plan(T, budget - sunk / T, len(ts) + int(include_as_is),
                                           pilot_steps=longest.steps_run, as_is_in_pilot=include_as_is,
                                           first_min=first_min))
                break
            except ValueError:
                continue
        if fits is not None:
            taus, rec, the_plan = fits
            carry = tuple(t for t in ((decide.AS_IS if include_as_is and as_is_clip is not None else None), rec)
                          if t is not None)
        else:
            need = _budget_for(T, len(taus) + int(include_as_is), longest.steps_run, first_min, sunk, include_as_is)
            notes.append(f"the first rung ({the_plan.rungs[0].steps} steps) ends inside the learning-rate warm-up "
                         f"({warmup_steps} steps): a first rung past it ({first_min} steps) does not fit the budget"
                         + (f" (--budget {need:.2f} would reach it)" if need else ""))
    cands = {t: Candidate(t, _label(t, None)) for t in taus}
    if include_as_is:
        cands[decide.AS_IS] = Candidate(decide.AS_IS, _label(decide.AS_IS, as_is_clip))
        cands[decide.AS_IS].probes += [pilot, *extra_pilots]
    say(f"training length T = {T} steps ({'given' if T_source == 'option' else 'from the pilot'}); candidates "
        + ", ".join(c.label for c in cands.values()) + "; rungs "
        + ", ".join(f"{r.keep} x {r.steps}" for r in the_plan.rungs)
        + (f"; the learning rate warms up for {warmup_steps} steps" if warmup_steps else ""))

    # 2. The rungs (analysis/tune.py plan: every candidate, then three finalists).
    alive = list(cands)
    rungs = []
    choice = None
    lengths = [r.steps for r in the_plan.rungs]
    counts = [r.keep for r in the_plan.rungs]
    for k in range(len(lengths)):
        if k == 0:
            alive = alive[: counts[0]]
        else:  # re-plan what is left: the budget not spent so far stretches the horizons that follow
            spent_now = sum(p.steps_run for p in runner.runs.values())

            def fitted(alive: list) -> list[int]:
                free_now = sum(1 for t in alive if t == decide.AS_IS and _pilot_covers(longest, lengths[k]))
                later = [len(alive) - free_now] + counts[k + 1:]
                return decide.stretch(lengths[k:], later, budget * T - spent_now, T)

            ls = fitted(alive)
            if ls[0] < lengths[k - 1] and len(alive) > counts[k]:
                # the thresholds carried into the finals would leave them shorter than the first rung
                dropped = alive[counts[k]:]
                alive = alive[:counts[k]]
                ls = fitted(alive)
                notes.append("not carried into the finals for want of budget: "
                             + ", ".join(cands[t].label for t in dropped))
            lengths[k:] = [max(n, lengths[k - 1]) for n in ls]
        if horizons:  # to where the metric is reported, within what the budget left affords (never past it)
            afford = lengths[k] if k == 0 else int((budget * T - spent_now) // max(1, len(alive)))
            lengths[k] = max(decide.align(min(lengths[k], afford), horizons), lengths[k - 1] if k else 0)
        rung = decide.Rung(lengths[k], len(alive) if k else counts[0])
        specs = []
        for t in alive:
            if t == decide.AS_IS and _pilot_covers(longest, rung.steps):
                for p in (pilot, *extra_pilots):
                    if p not in cands[t].probes:
                        cands[t].probes.append(p)
                continue
            n = None if rung.steps >= T and T_source == "pilot" else rung.steps
            specs.append((t, n, probe_dir(out, t, n)))
        before = sum(p.steps_run for p in runner.runs.values())
        # what the budget must be for this rung's probes to run the whole training (the note below)
        whole_budget = (before + T * sum(1 for t in alive if not (t == decide.AS_IS and _pilot_covers(longest, T)))) / T
        for pr in runner.run(specs):
            cands[pr.clip_norm].probes.append(pr)
        horizon = rung.steps
        summaries = []
        for t in alive:
            c = cands[t]
            pr = _longest(c)
            if pr.status not in FINISHED:
                c.failed = f"{pr.run_dir.name} ended '{pr.status}' (exit code {pr.exit_code})"
                summaries.append(decide.ProbeSummary(t, pr.steps_run, 0, math.nan, math.nan, math.nan, math.nan,
                                                     math.nan, math.nan, True, c.failed))
                continue
            if _stopped_short(pr, horizon):
                summaries.append(_stopped_summary(pr, t, horizon))
                continue
            summaries.append(judge(pr, t, horizon))
        full = horizon >= T or (bool(horizons) and horizon >= decide.align(T, horizons))  # the metric's last report
        last = k == len(lengths) - 1
        if last:
            choice = decide.choose(summaries, full_horizon=full, final=True,
                                   keep=decide.AS_IS if include_as_is and as_is_clip is not None else None)
            kept = [choice.clip_norm] if choice.clip_norm is not None else []
            final_horizon, final_whole_budget = horizon, whole_budget
        else:
            kept = decide.survivors(summaries, counts[k + 1], full_horizon=full, carry=carry)
        rungs.append({"steps": horizon, "candidates": [s.clip_norm for s in summaries],
                      "kept": kept, "summaries": summaries})
        say(f"rung {k + 1}: {len(summaries)} candidates at {horizon} steps; kept " +
            (", ".join(cands[t].label for t in kept) if kept else "none (every candidate diverged)"))
        if not kept:
            final_horizon, final_whole_budget = horizon, whole_budget
            choice = _after_divergence(choice, rungs, horizon, T, budget, runner, cands, say, out, T_source, judge,
                                       (lambda n: decide.align(n, horizons)) if horizons else (lambda n: n))
            break
        alive = kept

    # 3. Each candidate's figures at the longest horizon it reached (the table).
    for c in cands.values():
        pr = _longest(c)
        if pr is None:
            continue
        if pr.status in FINISHED:
            asked = max(p.max_steps or pr.steps_run for p in c.probes)
            horizon = min(pr.steps_run, asked)
            if horizons:
                horizon = decide.align(horizon, horizons)
            c.summary = (_stopped_summary(pr, c.clip_norm, asked) if _stopped_short(pr, asked) else
                         judge(pr, c.clip_norm, horizon))
        else:
            c.failed = c.failed or f"{pr.run_dir.name} ended '{pr.status}' (exit code {pr.exit_code})"

    rec = choice.clip_norm if choice is not None else None
    if rec is not None and not math.isfinite(rec):
        rec = as_is_clip  # the script as is: its own threshold, or no clipping (None)
    spent = sum(p.steps_run for p in runner.runs.values())
    reused = sum(p.steps_run for p in runner.runs.values() if p.reused)
    result = TuneResult(
        out=out, total_steps=T, total_steps_source=T_source, budget=budget, plan=the_plan, pilot=pilot,
        candidates=sorted(cands.values(), key=lambda c: c.clip_norm), rungs=rungs, choice=choice,
        recommended_clip_norm=rec, as_is_clip_norm=as_is_clip, budget_spent=spent / T, steps_spent=spent,
        steps_reused=reused, metric=metric, maximize=maximize, notes=notes, recommend_clip_norm=rec_tau,
        warmup_steps=warmup_steps,
    )
    for pr in runner.runs.values():
        if pr is pilot or pr.steps is None or pr.status not in FINISHED:
            continue
        at = decide.unseeded(pilot.steps, pr.steps)
        if at is not None:
            result.unseeded_at[str(pr.run_dir)] = at
    if result.unseeded_at:
        first = min(result.unseeded_at.values())
        result.notes.append(
            f"the probes are not comparable: {len(result.unseeded_at)} of them differ from the pilot before "
            f"any clipping (first at step {first}), so the script's randomness is not seeded; seed it "
            "(torch.manual_seed, and the data order) and tune again")
    if horizons and spent > budget * T:
        result.notes.append(f"{metric} is first reported after step {horizons[0]}, past the first rung the budget "
                            f"planned: the probes ran to it, and the tune spent {spent / T:.2f} whole runs, more "
                            f"than --budget {budget:g}")
    # final_horizon: the last planned rung's, set in its loop (a fallback after it adds rungs of its own)
    if choice is not None and choice.clip_norm is not None and final_horizon < T:
        reach = math.ceil(final_whole_budget * 100 - 1e-9) / 100
        result.notes.append(f"the finalists were compared at {final_horizon} of {T} steps, not the whole training"
                            + (f" (--budget {reach:.2f} would reach it)" if reach > budget else ""))
    result.parallelism = getattr(runner, "parallelism", 0)
    result.executor = getattr(getattr(runner, "executor", None), "name", "local")
    # connecting to the executor (a Ray cluster: seconds) included; the figure and tune.json are written after
    result.wall_seconds = time.monotonic() - started + getattr(getattr(runner, "executor", None), "setup_seconds", 0.0)
    if figure:
        from gradscope.report.tune import save_figure

        result.figure = save_figure(result, out / "tune.png")
    from gradscope.report.tune import to_json

    rundir.write_json_atomic(out / "tune.json", to_json(result))
    return result


def _after_divergence(choice, rungs, horizon, T, budget, runner, cands, say, out, T_source, judge, snap):
    """Every candidate of a rung diverged: fall back to the best one below them from an earlier
    rung, checked at this rung's horizon, or as long as the budget left allows when that is
    shorter (but longer than it was probed)."""
    earlier = [r["summaries"] for r in rungs[:-1]]
    diverged = {t for r in rungs for s in r["summaries"] for t in [s.clip_norm] if s.diverged}
    while True:
        back = decide.fallback(earlier, diverged)
        if back is None:
            return choice
        t = back.clip_norm
        spent = sum(p.steps_run for p in runner.runs.values())
        steps = min(horizon, int(budget * T) - spent)
        steps = snap(steps) if snap(steps) <= steps else steps  # --metric: where it is reported
        if steps <= back.horizon:
            back.reason = (f"every finalist diverged by {horizon} steps; {cands[t].label} is the best below them "
                           f"at {back.horizon} steps (no budget left to probe it longer)")
            return back
        n = None if steps >= T and T_source == "pilot" else steps
        say(f"every finalist diverged: probing {cands[t].label} at {steps} steps")
        pr = runner.run([(t, n, probe_dir(out, t, n))])[0]
        cands[t].probes.append(pr)
        s = (judge(pr, t, steps) if pr.status in FINISHED else
             decide.ProbeSummary(t, pr.steps_run, 0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan,
                                 True, f"ended '{pr.status}'"))
        rungs.append({"steps": steps, "candidates": [t], "kept": [] if s.diverged else [t], "summaries": [s]})
        if not s.diverged:
            got = decide.choose([s], full_horizon=steps >= T)
            got.reason = (f"every finalist diverged by {horizon} steps; {cands[t].label}, the best below them, did "
                          "not" + ("" if steps == horizon else f" in the {steps} steps the budget left"))
            return got
        diverged.add(t)


def _ended_at_blow_up(steps) -> str | None:
    """Why a pilot that ran to its end looks like one that stopped at its blow-up (its length is
    then not the training's): its last recorded step is its first non-finite one, or nothing
    went non-finite but its loss or norms ran away (a script that breaks before recording the
    non-finite step). None when it went on after a non-finite step, or shows no blow-up."""
    s = decide._first_optimizer(steps)
    if not len(s):
        return None
    skipped = s["skipped"].to_numpy(dtype=bool)
    bad = (~np.isfinite(s["loss"].to_numpy(dtype=float)) | ~np.isfinite(s["grad_norm"].to_numpy(dtype=float))) & ~skipped
    if bad.any():
        return f"its first non-finite value at its last step ({int(s['step'].to_numpy()[-1])})" if bad.argmax() == len(bad) - 1 else None
    return decide.stopped_diverging(s)


def _stopped_short(pr: ProbeRun, horizon: int) -> bool:
    """The run ended by itself (status completed) before the steps it is judged at."""
    return pr.status == "completed" and pr.steps_run < horizon


def _stopped_summary(pr: ProbeRun, clip_norm: float, horizon: int) -> decide.ProbeSummary:
    """A run that stopped itself before its horizon: diverged (a script that breaks on a
    non-finite loss stops right after its blow-up), with what its steps show."""
    s = decide.summarize(pr.steps, clip_norm)
    why = decide.stopped_diverging(pr.steps)
    reason = f"stopped itself at step {pr.steps_run} of {horizon}" + (f" ({why})" if why else "")
    return replace(s, diverged=True, diverged_reason=reason)


def _recommended(pr: ProbeRun) -> float | None:
    """`recommend`'s threshold on a pilot (rounded as it pastes it), or None when it has none."""
    from gradscope.analysis import analyze

    try:
        try:
            run = rundir.load_run(pr.run_dir)
        except GradscopeError:  # a runner that serves steps without a directory (the simulator)
            import pandas as pd

            layers = pd.DataFrame({"rank": [], "optimizer": [], "step": []}, dtype="int64")
            run = rundir.Run(pr.run_dir, pr.steps, layers, {"status": pr.status, "exit_code": pr.exit_code})
        result = analyze(run)
    except GradscopeError:
        return None
    rec = result.optimizers[0].recommendation if result.optimizers else None
    tau = getattr(rec, "clip_norm_rounded", None) if rec is not None else None
    return float(tau) if tau is not None and math.isfinite(tau) and tau > 0 else None


def _budget_for(T: int, n_cand: int, pilot_steps: int, first_min: int, sunk: int, as_is: bool) -> float | None:
    """The smallest budget (rounded up to 0.01 run, at most 100) whose plan has a first rung of
    ``first_min`` steps (a bisection: a larger budget fits whatever a smaller one does)."""
    def fits(b: float) -> bool:
        try:
            decide.plan(T, b - sunk / T, n_cand, pilot_steps=pilot_steps, as_is_in_pilot=as_is, first_min=first_min)
            return True
        except ValueError:
            return False

    lo, hi = 0, 10_000  # hundredths of a run
    if not fits(hi / 100):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid / 100):
            hi = mid
        else:
            lo = mid
    return hi / 100


def _last_line(log: Path) -> str:
    try:
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return f" ({lines[-1].strip()[:200]})" if lines else ""


def _pilot_covers(pilot: ProbeRun, steps: int) -> bool:
    """The pilot ran the as-is candidate at least this long (a longer run's first steps are the same),
    or as long as it ever will (it ended by itself: diverged, see _stopped_short)."""
    return pilot.steps_run >= steps or pilot.status == "completed"


def _longest(c: Candidate) -> ProbeRun | None:
    return max(c.probes, key=lambda p: (p.status in FINISHED, p.steps_run), default=None)
