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
from dataclasses import dataclass, field
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
    rungs: list  # per rung: {"steps", "candidates", "kept"}
    choice: decide.Choice
    recommended_clip_norm: float | None
    as_is_clip_norm: float | None  # the script's own max_norm, when it clips
    budget_spent: float
    steps_spent: int
    steps_reused: int
    unseeded_at: dict = field(default_factory=dict)  # probe dir -> first step differing from the pilot
    notes: list = field(default_factory=list)
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

    n_cand = (len(candidates) if candidates else len(decide.GRID_FACTORS)) + int(include_as_is)

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
        try:
            the_plan = decide.plan(T, budget, n_cand, pilot_steps=T, as_is_in_pilot=include_as_is)
        except ValueError as e:
            raise GradscopeError(f"{e}; the pilot used 1 of them to learn T = {T} (give --steps T to "
                                 "save that)") from None
    if pilot.status not in FINISHED or pilot.steps_run == 0:
        raise GradscopeError(f"the pilot ended '{pilot.status}' (exit code {pilot.exit_code}) after "
                             f"{pilot.steps_run} steps{_last_line(out / 'logs' / 'pilot.log')}; "
                             f"see {out / 'logs' / 'pilot.log'}", 2)
    if pilot.status == "completed" and steps is not None and pilot.max_steps and pilot.steps_run < pilot.max_steps:
        raise GradscopeError(f"the training has only {pilot.steps_run} steps, fewer than its first probe's "
                             f"{pilot.max_steps}: --steps {steps} is not its length", 2)

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
    if candidates:
        taus = sorted(set(float(c) for c in candidates))
    else:
        taus = decide.candidates_from_pilot(pilot.steps, the_plan.rungs[0].steps)
        if not taus:
            raise GradscopeError("the pilot recorded no finite gradient norm to place the candidates around; "
                                 "give them with --candidates", 2)
    if include_as_is and as_is_clip is not None and as_is_clip in taus:
        taus.remove(as_is_clip)  # the script's own threshold is the as-is candidate
    cands = {t: Candidate(t, _label(t, None)) for t in taus}
    if include_as_is:
        cands[decide.AS_IS] = Candidate(decide.AS_IS, _label(decide.AS_IS, as_is_clip))
    say(f"training length T = {T} steps ({'given' if T_source == 'option' else 'from the pilot'}); candidates "
        + ", ".join(c.label for c in cands.values()) + "; rungs "
        + ", ".join(f"{r.keep} x {r.steps}" for r in the_plan.rungs))

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
            free_now = sum(1 for t in alive if t == decide.AS_IS and _pilot_covers(pilot, lengths[k]))
            later = [len(alive) - free_now] + counts[k + 1:]
            lengths[k:] = decide.stretch(lengths[k:], later, budget * T - spent_now, T)
            lengths[k:] = [max(n, lengths[k - 1]) for n in lengths[k:]]
        if horizons:  # to where the metric is reported, within what the budget left affords (never past it)
            afford = lengths[k] if k == 0 else int((budget * T - spent_now) // max(1, later[0]))
            lengths[k] = max(decide.align(min(lengths[k], afford), horizons), lengths[k - 1] if k else 0)
        rung = decide.Rung(lengths[k], counts[k])
        specs = []
        for t in alive:
            if t == decide.AS_IS and _pilot_covers(pilot, rung.steps):
                cands[t].probes.append(pilot) if pilot not in cands[t].probes else None
                continue
            n = None if rung.steps >= T and T_source == "pilot" else rung.steps
            specs.append((t, n, probe_dir(out, t, n)))
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
            summaries.append(judge(pr, t, horizon))
        full = horizon >= T or (bool(horizons) and horizon >= decide.align(T, horizons))  # the metric's last report
        last = k == len(lengths) - 1
        if last:
            choice = decide.choose(summaries, full_horizon=full)
            kept = [choice.clip_norm] if choice.clip_norm is not None else []
        else:
            kept = decide.survivors(summaries, counts[k + 1], full_horizon=full)
        rungs.append({"steps": horizon, "candidates": [s.clip_norm for s in summaries],
                      "kept": kept, "summaries": summaries})
        say(f"rung {k + 1}: {len(summaries)} candidates at {horizon} steps; kept " +
            (", ".join(cands[t].label for t in kept) if kept else "none (every candidate diverged)"))
        if not kept:
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
            horizon = min(pr.steps_run, max(p.max_steps or pr.steps_run for p in c.probes))
            if horizons:
                horizon = decide.align(horizon, horizons)
            c.summary = judge(pr, c.clip_norm, horizon)
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
        steps_reused=reused, metric=metric, maximize=maximize,
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
    final_horizon = horizon  # the last planned rung's (a fallback after it adds rungs of its own)
    if choice is not None and choice.clip_norm is not None and final_horizon < T:
        reach = math.ceil(the_plan.whole_budget * 100) / 100
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


def _last_line(log: Path) -> str:
    try:
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return f" ({lines[-1].strip()[:200]})" if lines else ""


def _pilot_covers(pilot: ProbeRun, steps: int) -> bool:
    """The pilot ran the as-is candidate at least this long (a longer run's first steps are the same)."""
    return pilot.steps_run >= steps or (pilot.max_steps is None and pilot.status == "completed")


def _longest(c: Candidate) -> ProbeRun | None:
    return max(c.probes, key=lambda p: (p.status in FINISHED, p.steps_run), default=None)
