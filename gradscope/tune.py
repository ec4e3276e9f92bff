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
    OUT/tune.json, OUT/tune.png     the result and the loss curves (written by the CLI: report/tune.py save)

With ``--metric NAME`` every run gets ``--metric-name NAME`` (and ``--metric-regex``): the
values the script reports land in each run's metrics-r*.csv, a probe cut at N steps stops when
step N+1 begins (so a value reported after step N is recorded), the horizons are moved to the
steps the pilot reported NAME after (analysis/tune.py ``report_horizons``, ``align``), and
probes are ranked by NAME at their horizon (``with_metric``, in :meth:`Tuner.judge`).

:func:`tune` builds a :class:`Tuner`, whose methods are the phases (the pilot, the candidates,
each rung, the fall back, the result), and returns its :class:`TuneResult`.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

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
    rungs: list  # decide.RungOutcome per rung as it ran (a fall back adds one per candidate it probed)
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
    figure: Path | None = None  # tune.png, once written (report/tune.py save)
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




def tune(target: Target, out: Path, *, steps: int | None = None, budget: float = DEFAULT_BUDGET,
         jobs: int = 1, candidates: list[float] | None = None, include_as_is: bool = True,
         on_event: Callable[[str], None] | None = None, runner_factory: Callable[..., Runner] | None = None,
         executor=None, metric: str | None = None, maximize: bool = False,
         metric_regex: str | None = None) -> TuneResult:
    """Record a pilot, probe the candidates under the budget, choose (:class:`Tuner`). Writes the
    run directories under ``out``; the caller writes the result (report/tune.py ``save``).

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
    tuner = Tuner(out, runner, steps=steps, budget=budget, candidates=candidates, include_as_is=include_as_is,
                  on_event=on_event, metric=metric, maximize=maximize, metric_regex=metric_regex)
    return tuner.run(started)


class Tuner:
    """One tune, phase by phase: the pilot (:meth:`run_pilot`, and longer ones past a learning-rate
    warm-up), the candidates placed from it, the rungs (:meth:`rung`), a fall back when every
    finalist diverged (:meth:`fall_back`), the result (:meth:`result`). What each phase decides
    (candidates, schedule, finalists, the choice) is analysis/tune.py's."""

    def __init__(self, out: Path, runner, *, steps: int | None, budget: float, candidates: list[float] | None,
                 include_as_is: bool, on_event: Callable[[str], None] | None, metric: str | None,
                 maximize: bool, metric_regex: str | None) -> None:
        self.out, self.runner, self.steps, self.budget = out, runner, steps, budget
        self.given = candidates  # --candidates; None: placed around the pilot's norms
        self.include_as_is = include_as_is
        self.say: Callable[[str], None] = on_event or (lambda msg: None)
        self.metric, self.maximize, self.metric_regex = metric, maximize, metric_regex
        # Recommend's threshold joins the placed candidates, and it and the script's own go on to the
        # finals: planned for (the first plan sets the pilot's length; the rungs are re-planned later).
        self.n_cand = (len(candidates) if candidates else len(decide.GRID_FACTORS) + 1) + int(include_as_is)
        self.notes: list[str] = []
        self.extra_pilots: list[ProbeRun] = []  # the script as it is, run longer past a warm-up
        self.warmup_steps: int | None = None
        self.horizons: list[int] = []  # --metric: the steps after which the script reports it
        self.cands: dict[float, Candidate] = {}
        self.rungs: list[decide.RungOutcome] = []
        self.choice: decide.Choice | None = None
        self.final_horizon, self.final_whole_budget = 0, 0.0  # the last planned rung's (the note on it)

    def run(self, started: float) -> TuneResult:
        self.run_pilot()
        self.check_pilot()
        self.run_past_warmup()
        self.find_horizons()
        self.place_candidates()
        self.run_rungs()
        self.summarize_candidates()
        return self.result(started)

    # ------------------------------------------------------------------ the pilot

    def spent(self) -> int:
        return sum(p.steps_run for p in self.runner.runs.values())

    def judge(self, pr: ProbeRun, t: float, horizon: int) -> decide.ProbeSummary:
        """A probe's figures at ``horizon``, and what it is ranked by there: its loss, or --metric."""
        s = decide.summarize(pr.steps, t, horizon)
        if self.metric is None:
            return s
        return decide.with_metric(s, pr.metrics, self.metric, horizon, self.maximize)

    def _pilot(self, max_steps: int | None) -> ProbeRun:
        self.runner.layer_stride = 1
        pilot = self.runner.run([(decide.AS_IS, max_steps, self.out / "pilot")])[0]
        self.runner.layer_stride = 0
        return pilot

    def _plan(self, pilot_steps: int | None, why: str = "") -> decide.Plan:
        try:
            return decide.plan(self.T, self.budget, self.n_cand, pilot_steps=pilot_steps,
                               as_is_in_pilot=self.include_as_is)
        except ValueError as e:
            raise GradscopeError(f"{e}{why}") from None

    def run_pilot(self) -> None:
        """The script as it is. T given: as long as the first rung (it is the as-is candidate's
        first probe); otherwise to its end, which tells T. With --metric it runs the whole
        training (T steps when given), which tells when the script reports the metric."""
        if self.steps is not None:
            self.T, self.T_source = self.steps, "option"
        if self.steps is not None and self.metric is not None:
            self.pilot = self._pilot(self.steps)
            self.plan = self._plan(self.T, f"; with --metric the pilot runs the whole training to learn when "
                                            f"{self.metric} is reported")
        elif self.steps is not None:
            self.plan = self._plan(None)
            self.pilot = self._pilot(self.plan.rungs[0].steps)  # never past T, even when the script runs longer
        else:
            self.learn_length()

    def learn_length(self) -> None:
        """The pilot run to its end: its length is T (unless it looks stopped at a blow-up: a note)."""
        log = self.out / "logs" / "pilot.log"
        pilot = self.pilot = self._pilot(None)
        if pilot.status not in FINISHED:
            raise GradscopeError(
                f"cannot learn the training's length: the pilot ended '{pilot.status}' (exit code "
                f"{pilot.exit_code}) after {pilot.steps_run} steps{_last_line(log)}; see {log}; "
                "give the length with --steps T", 2)
        self.T, self.T_source = pilot.steps_run, "pilot"
        if self.T < 1:
            raise GradscopeError(f"the pilot made no optimizer step: nothing to tune (see {log})", 2)
        why = decide.ended_at_blow_up(pilot.steps)
        if why is not None:  # a training may end while blowing up; a script may also stop at its blow-up
            note = (f"the pilot ended after {self.T} steps with {why}: if the script stops itself at a non-finite "
                    f"loss, {self.T} is where it blew up, not the training's length; give it with --steps T")
            self.say(note)
            self.notes.append(note)
        self.plan = self._plan(self.T, f"; the pilot used 1 of them to learn T = {self.T} (give --steps T to "
                                       "save that)")

    def check_pilot(self) -> None:
        pilot, log = self.pilot, self.out / "logs" / "pilot.log"
        if pilot.status not in FINISHED or pilot.steps_run == 0:
            raise GradscopeError(f"the pilot ended '{pilot.status}' (exit code {pilot.exit_code}) after "
                                 f"{pilot.steps_run} steps{_last_line(log)}; see {log}", 2)
        if _stopped_short(pilot, pilot.max_steps or 0):
            # A script that stops itself on a non-finite loss (`if not math.isfinite(loss): break`)
            # ends early after a blow-up: the as-is candidate diverged; any other early end means
            # --steps is not the training's length.
            why = decide.stopped_diverging(pilot.steps)
            if why is None:
                raise GradscopeError(f"the training has only {pilot.steps_run} steps, fewer than its first probe's "
                                     f"{pilot.max_steps}: --steps {self.steps} is not its length", 2)
            self.say(f"the pilot stopped itself at step {pilot.steps_run} of {pilot.max_steps} after a blow-up "
                     f"({why}): the script as it is diverged")

    def run_past_warmup(self) -> None:
        """A learning-rate warm-up (from the recorded lr): its norms are not those of training after
        it. The pilot is run longer (doubling) until the warm-up is over, the candidates are placed
        from the norms after it, and the first rung reaches past it when the budget allows."""
        T, longest = self.T, self.pilot
        warm = decide.warmup(longest.steps)
        while (warm is not None and not warm[1] and self.T_source == "option"
               and not _stopped_short(longest, longest.max_steps or 0)):
            nxt = min(T // 2, 2 * longest.steps_run)
            if nxt <= longest.steps_run or self.spent() + nxt > self.budget * T / 3:
                break
            self.say(f"the learning rate still rises at step {longest.steps_run - 1} (a warm-up): running the "
                     f"script as it is for {nxt} steps")
            pr = self.runner.run([(decide.AS_IS, nxt, probe_dir(self.out, decide.AS_IS, nxt))])[0]
            if pr.status not in FINISHED:
                break
            self.extra_pilots.append(pr)
            longest = pr
            warm = decide.warmup(pr.steps)
        self.longest = longest
        self.warmup_steps = warm[0] + 1 if warm is not None and warm[1] else None
        if warm is not None and not warm[1]:
            self.notes.append(f"the learning rate still rises at step {longest.steps_run - 1}, the end of the "
                              "longest pilot the budget allows: the candidates are placed from norms inside its "
                              "warm-up")

    def find_horizons(self) -> None:
        """--metric: where the script reports it, learned from the pilot; the horizons are moved there."""
        if self.metric is None:
            return
        pilot, metric = self.pilot, self.metric
        self.horizons = decide.report_horizons(pilot.metrics, metric, pilot.steps_run, self.T, complete=True)
        if not self.horizons:
            names = sorted(set(pilot.metrics["name"])) if pilot.metrics is not None and len(pilot.metrics) else []
            raise GradscopeError(
                f"the pilot ({pilot.steps_run} steps) reported no value of '{metric}' after any step "
                f"({'it reported ' + ', '.join(names[:8]) if names else 'it reported no metric'}); "
                "check --metric" + (" and --metric-regex" if self.metric_regex else ""), 2)
        self.say(f"{metric} is reported after steps " + ", ".join(map(str, self.horizons[:6])) +
                 (", ..." if len(self.horizons) > 6 else "") + "; probe horizons are moved there")
        for r in self.plan.rungs:
            r.steps = decide.align(r.steps, self.horizons)

    # ------------------------------------------------------------------ the candidates

    def _placed(self, factors) -> decide.Placement:
        if self.given:
            ladder = sorted(set(float(c) for c in self.given))
        else:
            horizon = None if self.start else self.plan.rungs[0].steps
            ladder = decide.candidates_from_pilot(self.longest.steps, horizon, factors, start=self.start)
        return decide.placement(ladder, self.rec_tau, self.as_is_clip, self.include_as_is)

    def place_candidates(self) -> None:
        """The candidates around the norms of the longest pilot (after its warm-up), recommend's
        threshold among them; the first rung past the warm-up when a plan of fewer candidates fits."""
        ws, longest = self.warmup_steps, self.longest
        self.as_is_clip = decide.script_clip(self.pilot.steps)
        self.start = ws if ws and longest.steps_run - ws >= 3 else 0
        self.rec_tau = _recommended(longest) if not self.given else None
        self.placement = self._placed(decide.GRID_FACTORS)
        if not self.placement.thresholds and not self.given:
            raise GradscopeError("the pilot recorded no finite gradient norm to place the candidates around; "
                                 "give them with --candidates", 2)
        first_min = math.ceil(1.25 * ws) if ws else None
        if first_min is not None and first_min > self.plan.rungs[0].steps:
            self.reach_past_warmup(first_min)
        self.cands = {t: Candidate(t, _label(t, None)) for t in self.placement.thresholds}
        if self.include_as_is:
            self.cands[decide.AS_IS] = Candidate(decide.AS_IS, _label(decide.AS_IS, self.as_is_clip))
            self.cands[decide.AS_IS].probes += [self.pilot, *self.extra_pilots]
        self.say(f"training length T = {self.T} steps ({'given' if self.T_source == 'option' else 'from the pilot'}); "
                 "candidates " + ", ".join(c.label for c in self.cands.values()) + "; rungs "
                 + ", ".join(f"{r.keep} x {r.steps}" for r in self.plan.rungs)
                 + (f"; the learning rate warms up for {ws} steps" if ws else ""))

    def reach_past_warmup(self, first_min: int) -> None:
        """A first rung of ``first_min`` steps, with fewer ladder steps when all of them do not fit
        (given candidates: all or none); a note with the budget that would reach it otherwise."""
        T, longest, as_is = self.T, self.longest, self.include_as_is
        sunk = self.spent() - longest.steps_run  # pilots shorter than the longest
        g = decide.GRID_FACTORS
        for factors in ((g,) if self.given else (g, g[2:], g[3:6])):
            p = self._placed(factors)
            try:
                plan = decide.plan(T, self.budget - sunk / T, len(p.thresholds) + int(as_is),
                                   pilot_steps=longest.steps_run, as_is_in_pilot=as_is, first_min=first_min)
            except ValueError:
                continue
            self.placement, self.plan = p, plan
            return
        need = decide.budget_for(T, len(self.placement.thresholds) + int(as_is), longest.steps_run, first_min,
                                 sunk, as_is)
        self.notes.append(f"the first rung ({self.plan.rungs[0].steps} steps) ends inside the learning-rate warm-up "
                          f"({self.warmup_steps} steps): a first rung past it ({first_min} steps) does not fit the "
                          "budget" + (f" (--budget {need:.2f} would reach it)" if need else ""))

    # ------------------------------------------------------------------ the rungs

    def run_rungs(self) -> None:
        """Every candidate, then the finalists (analysis/tune.py ``plan``); the horizons after the
        first re-planned with the budget left. Every finalist diverged: :meth:`fall_back`."""
        alive = list(self.cands)
        lengths = [r.steps for r in self.plan.rungs]
        counts = [r.keep for r in self.plan.rungs]
        for k in range(len(lengths)):
            alive = self._horizon(k, alive, lengths, counts)
            last = k == len(lengths) - 1
            outcome = self.rung(lengths[k], alive, None if last else counts[k + 1])
            if not outcome.kept:
                self.choice = self.fall_back(outcome.steps)
                return
            alive = outcome.kept

    def _horizon(self, k: int, alive: list[float], lengths: list[int], counts: list[int]) -> list[float]:
        """Rung k's horizon (set in ``lengths``) and the candidates probed there."""
        spent_now = self.spent()
        if k == 0:
            alive = alive[: counts[0]]
        else:  # re-plan what is left: the budget not spent so far stretches the horizons that follow
            st = decide.restretch(lengths, counts, k, alive, self.budget * self.T - spent_now, self.T,
                                  _pilot_covers(self.longest, lengths[k]))
            if st.dropped:  # the thresholds carried into the finals would leave them shorter than the first rung
                self.notes.append("not carried into the finals for want of budget: "
                                  + ", ".join(self.cands[t].label for t in st.dropped))
            lengths[:], alive = st.lengths, st.alive
        if self.horizons:  # to where the metric is reported, within what the budget left affords (never past it)
            afford = lengths[k] if k == 0 else int((self.budget * self.T - spent_now) // max(1, len(alive)))
            lengths[k] = max(decide.align(min(lengths[k], afford), self.horizons), lengths[k - 1] if k else 0)
        return alive

    def rung(self, steps: int, alive: list[float], keep_next: int | None) -> decide.RungOutcome:
        """The probes of one rung, ``steps`` long, judged there; ``keep_next``: how many go on (None:
        the finalists, whose choice this is)."""
        T, covers = self.T, _pilot_covers
        specs = []
        for t in alive:
            if t == decide.AS_IS and covers(self.longest, steps):
                self.cands[t].probes += [p for p in (self.pilot, *self.extra_pilots) if p not in self.cands[t].probes]
                continue
            n = None if steps >= T and self.T_source == "pilot" else steps
            specs.append((t, n, probe_dir(self.out, t, n)))
        # what the budget must be for this rung's probes to run the whole training (the finalists' note)
        whole = (self.spent() + T * sum(1 for t in alive if not (t == decide.AS_IS and covers(self.longest, T)))) / T
        for pr in self.runner.run(specs):
            self.cands[pr.clip_norm].probes.append(pr)
        summaries = [self._judged(self.cands[t], steps) for t in alive]
        full = steps >= T or (bool(self.horizons) and steps >= decide.align(T, self.horizons))  # the metric's last
        if keep_next is None:
            keep = decide.AS_IS if self.include_as_is and self.as_is_clip is not None else None
            self.choice = decide.choose(summaries, full_horizon=full, final=True, keep=keep)
            kept = [self.choice.clip_norm] if self.choice.clip_norm is not None else []
        else:
            kept = decide.survivors(summaries, keep_next, full_horizon=full, carry=self.placement.carry)
        if keep_next is None or not kept:
            self.final_horizon, self.final_whole_budget = steps, whole
        outcome = decide.RungOutcome(steps, [s.clip_norm for s in summaries], kept, summaries)
        self.rungs.append(outcome)
        self.say(f"rung {len(self.rungs)}: {len(summaries)} candidates at {steps} steps; kept " +
                 (", ".join(self.cands[t].label for t in kept) if kept else "none (every candidate diverged)"))
        return outcome

    def _judged(self, c: Candidate, horizon: int) -> decide.ProbeSummary:
        """A candidate's figures at a rung's horizon, from its longest probe."""
        pr = _longest(c)
        if pr.status not in FINISHED:
            c.failed = f"{pr.run_dir.name} ended '{pr.status}' (exit code {pr.exit_code})"
            return _failed_summary(c.clip_norm, pr, c.failed)
        if _stopped_short(pr, horizon):
            return _stopped_summary(pr, c.clip_norm, horizon)
        return self.judge(pr, c.clip_norm, horizon)

    def fall_back(self, horizon: int) -> decide.Choice | None:
        """Every candidate of a rung diverged: fall back to the best one below them from an earlier
        rung, checked at this rung's horizon, or as long as the budget left allows when that is
        shorter (but longer than it was probed)."""
        earlier = [r.summaries for r in self.rungs[:-1]]
        diverged = {s.clip_norm for r in self.rungs for s in r.summaries if s.diverged}
        T = self.T
        while True:
            back = decide.fallback(earlier, diverged)
            if back is None:
                return self.choice
            t, label = back.clip_norm, self.cands[back.clip_norm].label
            steps = min(horizon, int(self.budget * T) - self.spent())
            if self.horizons and decide.align(steps, self.horizons) <= steps:  # --metric: where it is reported
                steps = decide.align(steps, self.horizons)
            if steps <= back.horizon:
                back.reason = (f"every finalist diverged by {horizon} steps; {label} is the best below them "
                               f"at {back.horizon} steps (no budget left to probe it longer)")
                return back
            n = None if steps >= T and self.T_source == "pilot" else steps
            self.say(f"every finalist diverged: probing {label} at {steps} steps")
            pr = self.runner.run([(t, n, probe_dir(self.out, t, n))])[0]
            self.cands[t].probes.append(pr)
            s = self.judge(pr, t, steps) if pr.status in FINISHED else _failed_summary(t, pr, f"ended '{pr.status}'")
            self.rungs.append(decide.RungOutcome(steps, [t], [] if s.diverged else [t], [s]))
            if not s.diverged:
                got = decide.choose([s], full_horizon=steps >= T)
                got.reason = (f"every finalist diverged by {horizon} steps; {label}, the best below them, did "
                              "not" + ("" if steps == horizon else f" in the {steps} steps the budget left"))
                return got
            diverged.add(t)

    # ------------------------------------------------------------------ the result

    def summarize_candidates(self) -> None:
        """Each candidate's figures at the longest horizon it reached (the table)."""
        for c in self.cands.values():
            pr = _longest(c)
            if pr is None:
                continue
            if pr.status not in FINISHED:
                c.failed = c.failed or f"{pr.run_dir.name} ended '{pr.status}' (exit code {pr.exit_code})"
                continue
            asked = max(p.max_steps or pr.steps_run for p in c.probes)
            horizon = min(pr.steps_run, asked)
            if self.horizons:
                horizon = decide.align(horizon, self.horizons)
            c.summary = (_stopped_summary(pr, c.clip_norm, asked) if _stopped_short(pr, asked) else
                         self.judge(pr, c.clip_norm, horizon))

    def result(self, started: float) -> TuneResult:
        choice, T, runner = self.choice, self.T, self.runner
        rec = choice.clip_norm if choice is not None else None
        if rec is not None and not math.isfinite(rec):
            rec = self.as_is_clip  # the script as is: its own threshold, or no clipping (None)
        spent = self.spent()
        result = TuneResult(
            out=self.out, total_steps=T, total_steps_source=self.T_source, budget=self.budget, plan=self.plan,
            pilot=self.pilot, candidates=sorted(self.cands.values(), key=lambda c: c.clip_norm), rungs=self.rungs,
            choice=choice, recommended_clip_norm=rec, as_is_clip_norm=self.as_is_clip, budget_spent=spent / T,
            steps_spent=spent, steps_reused=sum(p.steps_run for p in runner.runs.values() if p.reused),
            metric=self.metric, maximize=self.maximize, notes=self.notes, recommend_clip_norm=self.rec_tau,
            warmup_steps=self.warmup_steps,
        )
        self._check_seeded(result)
        self._closing_notes(result, spent)
        result.parallelism = getattr(runner, "parallelism", 0)
        executor = getattr(runner, "executor", None)
        result.executor = getattr(executor, "name", "local")
        # connecting to the executor (a Ray cluster: seconds) included; the figure and tune.json are written after
        result.wall_seconds = time.monotonic() - started + getattr(executor, "setup_seconds", 0.0)
        return result

    def _check_seeded(self, result: TuneResult) -> None:
        """Probes that differ from the pilot before anything was clipped: the script is not seeded."""
        for pr in self.runner.runs.values():
            if pr is self.pilot or pr.steps is None or pr.status not in FINISHED:
                continue
            at = decide.unseeded(self.pilot.steps, pr.steps)
            if at is not None:
                result.unseeded_at[str(pr.run_dir)] = at
        if result.unseeded_at:
            first = min(result.unseeded_at.values())
            result.notes.append(
                f"the probes are not comparable: {len(result.unseeded_at)} of them differ from the pilot before "
                f"any clipping (first at step {first}), so the script's randomness is not seeded; seed it "
                "(torch.manual_seed, and the data order) and tune again")

    def _closing_notes(self, result: TuneResult, spent: int) -> None:
        T, budget, choice = self.T, self.budget, self.choice
        if self.horizons and spent > budget * T:
            result.notes.append(f"{self.metric} is first reported after step {self.horizons[0]}, past the first rung "
                                f"the budget planned: the probes ran to it, and the tune spent {spent / T:.2f} whole "
                                f"runs, more than --budget {budget:g}")
        # final_horizon: the last planned rung's (a fallback after it adds rungs of its own)
        if choice is not None and choice.clip_norm is not None and self.final_horizon < T:
            reach = math.ceil(self.final_whole_budget * 100 - 1e-9) / 100
            result.notes.append(f"the finalists were compared at {self.final_horizon} of {T} steps, not the whole "
                                "training" + (f" (--budget {reach:.2f} would reach it)" if reach > budget else ""))


def _failed_summary(clip_norm: float, pr: ProbeRun, why: str) -> decide.ProbeSummary:
    """A probe that did not finish: no figures, counted as diverged (it is never chosen)."""
    nan = math.nan
    return decide.ProbeSummary(clip_norm, pr.steps_run, 0, nan, nan, nan, nan, nan, nan, True, why)


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
