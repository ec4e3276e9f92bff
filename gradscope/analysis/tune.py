"""`gradscope tune`'s decisions, pure: candidate thresholds, the probe schedule, probe summaries, the choice.

Steps tables in (the columns of a gradscope run), dataclasses out. The orchestration
(gradscope/tune.py) runs the probes; this module decides what to run and what won.

- :func:`candidates_from_pilot`: thresholds around the scale of the pilot's norms (of its first
  norm when the pilot blew up).
- :func:`plan`: two rungs that fit the budget: every candidate probed for T/12, then three
  finalists as long as the rest of the budget allows (the whole training when it reaches that).
- :func:`summarize`: a probe's loss over its last stretch (level and spread), clip fraction (of the
  steady state, as `recommend` counts it: :func:`steady_clip_fraction`),
  mean update multiplier, divergence.
- :func:`choose`: among probes of one horizon, the best loss; candidates within the loss's
  noise of it are ties. At the whole training the largest tied threshold wins (clipping less
  is the smaller change); before it, the largest of two ties, or the middle of three or more
  (a probe that cannot tell them apart favours neither end). A diverged candidate is never
  chosen.
- :func:`survivors`: the first rung's choice and its neighbours on the ladder go on.
- :func:`with_metric`: ``tune --metric NAME``: a probe is ranked by NAME's value at its horizon
  instead of the loss (:attr:`ProbeSummary.score`, the one value every choice above compares);
  :func:`report_horizons` and :func:`align` put the horizons where the script reports NAME.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from gradscope.analysis.bad_steps import bad_steps
from gradscope.analysis.config import SituationConfig, load_config
from gradscope.analysis.judge import classify_steps, resolve_threshold, warmup_length
from gradscope.analysis.robust import clip_fraction, round_sig
from gradscope.analysis.select import split_optimizers

AS_IS = math.inf  # the candidate "the script as it is" (no --clip-norm): ranks as the largest threshold

# Candidate thresholds: the pilot's typical norm times these factors (a factor-2 ladder).
GRID_FACTORS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0)
TIE_Z = 2.0  # two losses closer than TIE_Z combined standard errors are a tie
FINALISTS = 3  # candidates continued past the first rung: its choice and the two ladder neighbours
FIRST_RUNG = 1 / 12  # the first rung's length, as a share of T, when the finalists cannot run the whole training
MIDDLE_TIES = 2  # before the whole training, more ties than this: the middle one is taken, not the largest
MIN_WINDOW = 5


@dataclass
class Rung:
    steps: int  # horizon of this rung's probes (optimizer steps of optimizer 0)
    keep: int  # candidates probed at this rung


@dataclass
class RungOutcome:
    """A rung as it ran: its horizon, the candidates probed, those kept (the next rung's, or the
    choice at the last), and each candidate's figures there (in the order probed)."""
    steps: int
    candidates: list[float]
    kept: list[float]
    summaries: list[ProbeSummary] = field(default_factory=list)


@dataclass
class Placement:
    """The candidate thresholds of a tune and those carried into the finals."""
    thresholds: list[float]  # the finite candidates (the script's own threshold is the as-is candidate)
    recommend: float | None  # recommend's threshold as probed (a ladder step within 15% stands for it)
    carry: tuple[float, ...]  # carried into the finals beyond the three: AS_IS (the script clips), recommend's


@dataclass
class Stretched:
    """The horizons left after a rung that cost less (or more) than planned, and who runs them."""
    lengths: list[int]  # every rung's horizon (those before this rung as they ran)
    alive: list[float]  # the candidates probed at this rung
    dropped: list[float]  # thresholds carried into the finals but left out for want of budget


@dataclass
class Plan:
    rungs: list[Rung]
    total_steps: int  # T, the length of the real training
    budget: float  # B, in whole runs of T steps
    pilot_steps: int  # steps of the pilot (T when it ran to its end)
    planned_steps: int  # pilot + every probe of the plan, worst case (what budget_spent can reach)
    whole_budget: float  # the budget whose last rung would run the whole training (first rung T/12)


@dataclass
class ProbeSummary:
    clip_norm: float  # AS_IS for the script as it is
    steps: int  # horizon the figures below are taken at (<= the steps the probe ran)
    window: int  # steps in the last stretch
    loss: float  # mean loss over the last stretch
    loss_spread: float  # standard deviation of the loss around its linear trend over the stretch
    loss_se: float  # loss_spread / sqrt(window): the noise of `loss`
    start_loss: float  # mean loss over the first stretch
    clip_fraction: float  # share of steady-state steps with grad_norm > clip_norm (steady_clip_fraction)
    mean_multiplier: float  # mean of min(1, clip_norm / grad_norm): how much of the update survives
    diverged: bool
    diverged_reason: str | None = None
    # What the probes are ranked by (lower is better): the loss over the last stretch and its noise,
    # or under `tune --metric` the metric at the horizon (negated with --maximize; see with_metric)
    score: float | None = None
    score_se: float | None = None
    metric_name: str | None = None  # --metric NAME
    metric: float = math.nan  # NAME's value reported after the horizon's last step (nan: none)
    unranked: str | None = None  # why a probe that did not diverge has no score ("no NAME value after step N")

    def __post_init__(self) -> None:
        if self.score is None:
            self.score, self.score_se = self.loss, self.loss_se


@dataclass
class Choice:
    clip_norm: float | None  # None: no candidate left (all diverged or failed)
    horizon: int
    best_loss: float | None  # the lowest loss at the horizon (not necessarily the chosen one's)
    ties: list[float] = field(default_factory=list)  # candidates within the noise of the best
    runner_up: float | None = None
    margin: float | None = None  # (runner-up loss - chosen loss) / combined standard error
    reason: str = ""
    # how the choice was made: "best" (clear of the others), "largest-tied" (the largest of ties with
    # the best), "middle-tied" (the middle of three or more ties, before the whole training),
    # "all-tied" (every finalist within the noise of the others: the threshold does not matter in
    # their range), "fallback" (every finalist diverged), "only" (the only candidate left)
    rule: str = "best"


# ------------------------------------------------------------------------- candidates


def warmup(steps) -> tuple[int, bool] | None:
    """The learning-rate warm-up of optimizer 0, from its recorded ``lr``: (the step at which the
    learning rate first reaches its maximum, whether a later step shows it stopped rising), or
    None when there is none (the learning rate never rises above its first value, or is not
    recorded on every step). With the maximum at the last step the warm-up may not be over."""
    s = _first_optimizer(steps)
    if len(s) < 2 or "lr" not in s.columns:
        return None
    lr = s["lr"].to_numpy(dtype=float)
    if not np.isfinite(lr).all():
        return None
    top = float(np.max(lr))
    tol = 1e-6 * abs(top)
    if top <= lr[0] + tol:
        return None
    peak = int(np.argmax(lr >= top - tol))
    return int(s["step"].to_numpy()[peak]), peak < len(lr) - 1


def stopped_diverging(steps) -> str | None:
    """Why a run that ended by itself before the steps asked of it is taken to have diverged
    (a script that stops at its first non-finite loss, ``if not math.isfinite(loss): break``,
    records the steps before it: their loss or norms ran away), or None when nothing in its
    steps says so (a training shorter than the tune thinks)."""
    s = _first_optimizer(steps)
    if not len(s):
        return "no step recorded"
    summ = summarize(s, AS_IS)
    if summ.diverged:
        return summ.diverged_reason
    if blew_up(s):
        return "its gradient norms ran away"
    loss = s["loss"].to_numpy(dtype=float)[~s["skipped"].to_numpy(dtype=bool)]
    loss = loss[np.isfinite(loss)]
    if len(loss) >= 3:
        mid = float(np.median(loss))
        if mid > 0 and loss[-1] > 2 * mid:
            return f"its last loss was {loss[-1] / mid:.2g}x its median"
    return None


def typical_norm(steps, horizon: int | None = None, start: int = 0) -> float | None:
    """The norm level the candidates are placed around, from optimizer 0's first ``horizon`` steps:
    the median of its finite, positive, not-skipped norms; but when the pilot blew up (see
    :func:`blew_up`), the first of them, the level before the blow-up (the norms of a blow-up
    grow by orders of magnitude, and their median says nothing of the scale training needs;
    `recommend`'s blew-up rule starts from the same first norm). ``start``: the steps before it
    are left out (a learning-rate warm-up, whose norms are not those of training after it)."""
    s = _first_optimizer(steps)
    if horizon is not None:
        s = s[s["step"] < horizon]
    if start:
        s = s[s["step"] >= start]
    g = s["grad_norm"].to_numpy(dtype=float)
    ok = np.isfinite(g) & (g > 0) & ~s["skipped"].to_numpy(dtype=bool)
    if not ok.any():
        return None
    return float(g[ok][0]) if blew_up(s) else float(np.median(g[ok]))


def blew_up(steps, cfg: SituationConfig = SituationConfig()) -> bool:
    """A pilot (optimizer 0's rows, in step order) that went non-finite on a step it did not skip,
    or whose norms ran away: the median of its last tenth (at least 3 steps) reached
    ``cfg.runaway_ratio`` times the median of its first ``cfg.early_steps`` finite norms (the
    rule `recommend` calls a blow-up)."""
    if bad_steps(steps).any.any():  # the one bad-step rule (a script that reports no loss is judged by its norms)
        return True
    skipped = steps["skipped"].to_numpy(dtype=bool)
    g = steps["grad_norm"].to_numpy(dtype=float)[~skipped]
    g = g[g > 0]
    if len(g) < 2:
        return False
    early = float(np.median(g[:cfg.early_steps]))
    tail = g[-max(3, len(g) // 10):]
    return float(np.median(tail)) >= cfg.runaway_ratio * early


def script_clip(steps) -> float | None:
    """The script's own max_norm when the pilot clipped (the as-is candidate is that threshold)."""
    s = _first_optimizer(steps)
    tau = s["clip_max_norm"].dropna() if len(s) else s
    return float(tau.mode().iloc[0]) if len(tau) else None


def ended_at_blow_up(steps) -> str | None:
    """Why a pilot that ran to its end looks like one that stopped at its blow-up (its length is
    then not the training's): its last recorded step is its first non-finite one, or nothing
    went non-finite but its loss or norms ran away (a script that breaks before recording the
    non-finite step). None when it went on after a non-finite step, or shows no blow-up."""
    s = _first_optimizer(steps)
    if not len(s):
        return None
    skipped = s["skipped"].to_numpy(dtype=bool)
    bad = (~np.isfinite(s["loss"].to_numpy(dtype=float)) | ~np.isfinite(s["grad_norm"].to_numpy(dtype=float))) & ~skipped
    if bad.any():
        return f"its first non-finite value at its last step ({int(s['step'].to_numpy()[-1])})" if bad.argmax() == len(bad) - 1 else None
    return stopped_diverging(s)


def placement(ladder: list[float], recommend: float | None, script: float | None, as_is: bool) -> Placement:
    """The candidates: the ``ladder`` plus ``recommend``'s threshold (a ladder step within 15% of
    it stands for it), less the ``script``'s own threshold when the script as it is is a
    candidate (``as_is``: that is the as-is candidate); carried into the finals: the script as
    it is when it clips, and recommend's threshold."""
    taus, rec = list(ladder), None
    if recommend is not None and recommend != script:
        near = [t for t in taus if abs(math.log(t / recommend)) <= math.log(1.15)]
        rec = near[0] if near else recommend
        if not near:
            taus = sorted(taus + [recommend])
    if as_is and script is not None and script in taus:
        taus.remove(script)
    carry = tuple(t for t in ((AS_IS if as_is and script is not None else None), rec) if t is not None)
    return Placement(taus, rec, carry)


def candidates_from_pilot(steps, horizon: int | None = None, factors=GRID_FACTORS, start: int = 0) -> list[float]:
    """Thresholds around the pilot's norm level (:func:`typical_norm`, from step ``start`` on),
    rounded as the report hands them out (so the probed value is the pasted one)."""
    level = typical_norm(steps, horizon, start)
    if level is None:
        return []
    return sorted({round_sig(level * f) for f in factors})


# ------------------------------------------------------------------------- schedule


def _counts(n: int, finalists: int = FINALISTS) -> list[int]:
    """Every candidate at the first rung, then three finalists (one rung when there are only three).

    Two rungs, not a halving ladder: a first rung a few steps long says nothing where every
    candidate still sits at its starting loss (a CNN at chance for its first dozens of steps).
    Three finalists, the first rung's choice and both its neighbours on the ladder: a short
    probe's bias runs either way (a small threshold is a learning-rate cut that helps early and
    hurts later; a large one can look better early and end worse), so the finalists test one
    ladder step in each direction. Three finalists at about 0.8 T ended better than two at the
    whole training (the choice and its better neighbour) in the simulator (README, "How tune's
    current rules were chosen")."""
    return [n, finalists] if n > finalists else [n]


def plan(total_steps: int, budget: float, n_candidates: int, *, pilot_steps: int | None = None,
         as_is_in_pilot: bool = True, min_steps: int | None = None, finalists: int = FINALISTS,
         first_min: int | None = None) -> Plan:
    """The rungs that fit ``budget`` whole runs of ``total_steps`` (T).

    The pilot counts against the budget: ``pilot_steps`` None means the pilot is as long as the
    first rung (T was given), otherwise it ran that many steps (T when T was learned from it).
    ``as_is_in_pilot``: the script as it is, which is what the pilot runs, is one of the
    ``n_candidates``; the pilot is then its first-rung probe for free. The worst case is
    planned (a surviving as-is candidate is probed again later), so what a tune spends is at
    most ``planned_steps``. The last rung (the finalists, or the only rung of up to three
    candidates) is the whole training when that fits the budget with a first rung of at least
    T/12 (and ``min_steps``), the first rung then as long as the budget allows, up to T/2;
    otherwise the first rung is T/12 and the last as long as the rest allows, when that is at
    least three times the first; otherwise the last rung is the longest that fits with the first
    a third (or half) of it. Raises ValueError when not even the shortest probes fit.
    ``finalists``: how many go on past the first rung (three, plus the thresholds carried into
    the finals). ``first_min``: the first rung is at least this long (past a learning-rate
    warm-up); ValueError when that does not fit.
    """
    T = int(total_steps)
    if T < 1 or n_candidates < 1:
        raise ValueError("nothing to plan")
    counts = _counts(n_candidates, finalists)
    m = len(counts) - 1
    lo = min(T, min_steps if min_steps is not None else max(5, T // 50))
    lo_first = max(lo, min(T, first_min or 0))
    allowed = budget * T

    cost = functools.partial(_cost, counts, pilot_steps, as_is_in_pilot)
    first = max(lo_first, round(T * FIRST_RUNG))
    chosen = _whole_last(T, counts, first, allowed, cost) or _shorter_last(T, m, lo, lo_first, allowed, cost)
    if chosen is None and lo_first > lo:
        raise ValueError(f"a first rung of {lo_first} steps does not fit a budget of {budget:g} whole runs")
    if chosen is None:
        need = cost(_lengths(T, m, min(T, lo * 2 ** m), 2)) / T  # the shortest schedule this search tries
        raise ValueError(f"a budget of {budget:g} whole runs is too small for {n_candidates} candidates "
                         f"over {T} steps (at least {need:.2f} needed)")
    return Plan(rungs=[Rung(n, c) for n, c in zip(chosen, counts)], total_steps=T, budget=budget,
                pilot_steps=chosen[0] if pilot_steps is None else pilot_steps, planned_steps=cost(chosen),
                whole_budget=cost([T] if m == 0 else [first, T]) / T)


def _cost(counts: list[int], pilot_steps: int | None, as_is_in_pilot: bool, ns: list[int]) -> int:
    """Steps a schedule of rungs ``ns`` costs, the pilot included (see :func:`plan`)."""
    pilot = ns[0] if pilot_steps is None else pilot_steps
    total = pilot
    for k, (c, n) in enumerate(zip(counts, ns)):
        free = as_is_in_pilot and k == 0 and n <= pilot
        total += (c - int(free)) * n
    return total


def _lengths(T: int, m: int, final: int, growth: float) -> list[int]:
    """Rungs growing by ``growth`` up to a last rung of ``final`` steps."""
    return [max(1, min(T, round(final / growth ** (m - k)))) for k in range(m + 1)]


def _whole_last(T: int, counts: list[int], first: int, allowed: float, cost) -> list[int] | None:
    """The whole training last; with two rungs, the first as long as the budget then allows (or at
    ``first``, T/12, with the finalists as long as the rest allows, when that is 3x the first)."""
    m = len(counts) - 1
    whole = [[T]] if m == 0 else ([n, T] for n in range(T // 2, first - 1, -1))
    chosen = next((ns for ns in whole if cost(ns) <= allowed), None)
    if chosen is None and m == 1:
        final = min(T, int((allowed - cost([first, 0])) // counts[1]))
        if final >= 3 * first:
            chosen = [first, final]
    return chosen


def _shorter_last(T: int, m: int, lo: int, lo_first: int, allowed: float, cost) -> list[int] | None:
    """The longest last rung (down to ``lo`` steps) that fits, growth 3 (2 for short trainings)."""
    final = T
    while final >= lo:
        for growth in (3, 2):
            ns = _lengths(T, m, final, growth)
            if ns[0] >= lo_first and cost(ns) <= allowed:
                return ns
        final = int(final * 0.95) if final > 20 else final - 1
    return None


def budget_for(total_steps: int, n_candidates: int, pilot_steps: int, first_min: int, sunk: int,
               as_is: bool) -> float | None:
    """The smallest budget (rounded up to 0.01 run, at most 100) whose plan has a first rung of
    ``first_min`` steps, ``sunk`` steps already spent on pilots the plan does not count (a
    bisection: a larger budget fits whatever a smaller one does)."""
    T = total_steps

    def fits(b: float) -> bool:
        try:
            plan(T, b - sunk / T, n_candidates, pilot_steps=pilot_steps, as_is_in_pilot=as_is, first_min=first_min)
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


def restretch(lengths: list[int], counts: list[int], k: int, alive: list[float], remaining: float,
              total_steps: int, as_is_free: bool) -> Stretched:
    """Rung ``k`` (> 0) and those after it re-planned with the ``remaining`` budget (:func:`stretch`),
    ``alive`` the candidates left for it (the script as it is costs nothing when ``as_is_free``:
    the pilot covers the horizon). When the thresholds carried beyond the finalists would leave
    the finals shorter than the rung before, they are dropped."""
    def fitted(alive: list[float]) -> list[int]:
        free = sum(1 for t in alive if t == AS_IS and as_is_free)
        return stretch(lengths[k:], [len(alive) - free] + counts[k + 1:], remaining, total_steps)

    ls, dropped = fitted(alive), []
    if ls[0] < lengths[k - 1] and len(alive) > counts[k]:
        dropped, alive = alive[counts[k]:], alive[:counts[k]]
        ls = fitted(alive)
    return Stretched(lengths[:k] + [max(n, lengths[k - 1]) for n in ls], alive, dropped)


def stretch(lengths: list[int], counts: list[int], remaining: float, total_steps: int) -> list[int]:
    """The remaining rungs made as long as the remaining budget allows (all scaled by one factor,
    at most to the whole training): a rung that cost less than planned (the as-is candidate
    came free with the pilot) lends its saving to the horizons that follow; more finalists than
    planned (thresholds carried into the finals) shorten them to fit."""
    T = int(total_steps)

    def scaled(f: float) -> list[int]:
        return [min(T, max(n, round(n * f))) for n in lengths]

    def shrunk(f: float) -> list[int]:
        return [max(1, int(n * f)) for n in lengths]

    def cost(ns: list[int]) -> float:
        return sum(c * n for c, n in zip(counts, ns))

    if cost(lengths) > remaining:
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if cost(shrunk(mid)) <= remaining:
                lo = mid
            else:
                hi = mid
        return shrunk(lo)
    lo, hi = 1.0, max(1.0, T / max(1, min(lengths)))
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost(scaled(mid)) <= remaining:
            lo = mid
        else:
            hi = mid
    return scaled(lo)


# ------------------------------------------------------------------------- summaries


def _first_optimizer(steps):
    if len(steps) == 0:
        return steps
    s = steps
    if "rank" in s.columns and s["rank"].nunique() > 1:
        s = s[s["rank"] == s["rank"].min()]
    ids = s["optimizer"].unique()
    return s[s["optimizer"] == min(ids)].sort_values("step")


def window_of(horizon: int) -> int:
    """The last stretch a probe is judged on: a fifth of it, at least MIN_WINDOW steps."""
    return max(min(MIN_WINDOW, horizon), horizon // 5)


def _level(y: np.ndarray) -> tuple[float, float]:
    """Mean, and spread around the linear trend (a falling loss is not noise)."""
    if len(y) < 3:
        return float(np.mean(y)), float(np.std(y))
    x = np.arange(len(y), dtype=float)
    slope, icept = np.polyfit(x, y, 1)
    resid = y - (slope * x + icept)
    return float(np.mean(y)), float(np.sqrt(np.sum(resid ** 2) / (len(y) - 2)))


def summarize(steps, clip_norm: float, horizon: int | None = None) -> ProbeSummary:
    """A probe at ``clip_norm`` (AS_IS: the script as is) judged over its first ``horizon`` steps."""
    s = _first_optimizer(steps)
    if horizon is not None:
        s = s[s["step"] < horizon]
    n = len(s)
    if n == 0:
        return ProbeSummary(clip_norm, 0, 0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan,
                            True, "no step recorded")
    loss = s["loss"].to_numpy(dtype=float)
    g = s["grad_norm"].to_numpy(dtype=float)
    skipped = s["skipped"].to_numpy(dtype=bool)
    w = window_of(n)
    last, first = loss[~skipped][-w:], loss[~skipped][:w]
    mean, spread = _level(last) if len(last) else (math.nan, math.nan)
    start = float(np.mean(first)) if len(first) else math.nan
    se = spread / math.sqrt(len(last)) if len(last) else math.nan
    tau = s["clip_max_norm"].to_numpy(dtype=float)
    fin = np.isfinite(g) & (g > 0) & ~skipped
    if fin.any() and np.isfinite(tau[fin]).any():
        t = tau[fin]
        has = np.isfinite(t)
        mult = np.where(has, np.minimum(1.0, np.where(has, t, 1.0) / g[fin]), 1.0)
        clip_fraction = steady_clip_fraction(s, clip_norm)
        mean_multiplier = float(np.mean(mult))
    else:
        clip_fraction, mean_multiplier = (0.0, 1.0) if fin.any() else (math.nan, math.nan)
    bad = bad_steps(s).any
    reason = None
    if bad.any():
        reason = f"non-finite, step {int(s['step'].to_numpy()[bad][0])}"
    elif not math.isfinite(mean):
        reason = "no finite loss recorded"
    elif math.isfinite(start) and mean > start + abs(start):
        reason = f"loss rose {mean / start:.2g}x" if start > 0 else f"loss rose to {mean:.3g} from {start:.3g}"
    return ProbeSummary(clip_norm, n, len(last), mean, spread, se, start, clip_fraction, mean_multiplier,
                        reason is not None, reason)


def steady_clip_fraction(steps, clip_norm: float) -> float:
    """The share of steady-state steps a probe clipped, counted as `recommend`, `compare` and `watch`
    count it: the valid steps (judge.classify_steps), less the warm-up the analysis detects
    (judge.warmup_length, default config), above the threshold (judge.resolve_threshold: the
    probe's ``clip_norm``, or for AS_IS the script's own; robust.clip_fraction). ``steps``: one
    optimizer's rows in step order."""
    s = split_optimizers(steps, None, "probe")[0]
    _, valid, _ = classify_steps(s)
    k, _ = warmup_length(s.lr[valid], s.step[valid], _config())
    override = clip_norm if math.isfinite(clip_norm) else None
    tau = resolve_threshold(s, None, {"clip_norm_override": override}).clip_norm
    return clip_fraction(s.grad_norm[valid][k:], tau) if tau is not None else 0.0


@functools.lru_cache(maxsize=1)
def _config():
    """The shipped analysis defaults (what `compare` and `recommend` judge with when not given --config)."""
    return load_config()


def unseeded(pilot_steps, probe_steps) -> int | None:
    """The first step where a probe differs from the pilot before either clipped anything
    (None: they agree). With a seeded script every probe starts exactly as the pilot: until the
    first step that clips, nothing differs, so the recorded loss and pre-clip norm are equal."""
    a, b = _first_optimizer(pilot_steps), _first_optimizer(probe_steps)
    n = min(len(a), len(b))
    if n == 0:
        return None
    ca, cb = a["clipped"].to_numpy(dtype=bool)[:n], b["clipped"].to_numpy(dtype=bool)[:n]
    clipped = np.flatnonzero(ca | cb)
    upto = int(clipped[0]) + 1 if len(clipped) else n  # the first clipping step's own values are pre-clip
    # The loss is the script's own value (exact); the norm is measured by gradscope, or reused from
    # the clip call --clip-norm makes (float32 instead of float64 arithmetic): equal to 1e-5.
    for col, rtol in (("loss", 0.0), ("grad_norm", 1e-5)):
        x, y = a[col].to_numpy(dtype=float)[:upto], b[col].to_numpy(dtype=float)[:upto]
        with np.errstate(invalid="ignore"):
            same = (np.abs(x - y) <= rtol * np.abs(x)) | (x == y) | (np.isnan(x) & np.isnan(y))
        if not same.all():
            return int(a["step"].to_numpy()[:upto][~same][0])
    return None


# ------------------------------------------------------------------------- the choice


def _tied(a: ProbeSummary, b: ProbeSummary, z: float = TIE_Z) -> bool:
    noise = math.sqrt(a.score_se ** 2 + b.score_se ** 2)
    return abs(a.score - b.score) <= z * noise


def choose(summaries: list[ProbeSummary], *, full_horizon: bool = True, z: float = TIE_Z,
           final: bool = False, keep: float | None = None) -> Choice:
    """The candidate to keep among probes judged at the same horizon.

    The best loss wins, except that among the candidates tied with it (within ``z`` combined
    standard errors) the largest threshold is taken: short probes favour small thresholds.
    The script as is (AS_IS) counts as the largest only when the horizon is the whole training
    (``full_horizon``): before that, the larger finite threshold is preferred in a tie, since
    an unclipped run that is fine so far may still blow up later. Diverged candidates are
    never chosen.

    ``final``: these are the finalists. When none of them diverged and every one is within the
    noise of the best (two or more), the threshold does not matter in their range: ``keep``
    (the script's own threshold, AS_IS when the script clips, when it is a finalist) is taken,
    else the largest of them (as above), and the reason says so (rule "all-tied").
    """
    ok = [s for s in summaries if not s.diverged and math.isfinite(s.score)]
    horizon = max((s.steps for s in summaries), default=0)
    if not ok:
        unranked = [s for s in summaries if not s.diverged and s.metric_name]
        return Choice(None, horizon, None, reason=(
            f"no candidate that did not diverge reported {unranked[0].metric_name} at its horizon" if unranked
            else "every candidate diverged" if summaries else "no candidate"), rule="none")
    best = min(ok, key=lambda s: (s.score, -s.clip_norm))
    ties = [s for s in ok if _tied(s, best, z)]

    def size(s: ProbeSummary) -> float:
        if s.clip_norm == AS_IS and not full_horizon:
            return -math.inf if len(ties) > 1 else math.inf
        return s.clip_norm

    chosen = max(ties, key=size)
    all_tied = final and len(ok) == len(summaries) and len(ok) > 1 and len(ties) == len(ok)
    kept = next((s for s in ties if s.clip_norm == keep), None) if keep is not None else None
    if all_tied and kept is not None:
        chosen = kept
    finite = sorted((s for s in ties if math.isfinite(s.clip_norm)), key=lambda s: s.clip_norm)
    middle = not all_tied and not full_horizon and len(ties) > MIDDLE_TIES and bool(finite)
    if middle:
        # A short probe that cannot tell three or more candidates apart favours neither end: the
        # middle of them goes on (the largest would bet on short-horizon bias running one way).
        chosen = finite[len(finite) // 2]
    others = [s for s in ok if s is not chosen]
    runner = min(others, key=lambda s: s.score) if others else None
    rule = "all-tied" if all_tied else "middle-tied" if middle else "largest-tied" if len(ties) > 1 else (
        "best" if runner is not None else "only")
    reason = _reason(rule, ok, ties, horizon, kept is not None, len(summaries))
    if best.metric_name:  # the words above name the loss; the ranking was by the metric (no noise estimate)
        name = best.metric_name
        reason = (reason.replace("within the loss's noise of the best", f"with {name} equal to the best")
                  if len(ties) > 1 else
                  f"best {name} at {horizon} steps (one value per probe: no noise estimate)"
                  if runner is not None else reason)
    return Choice(chosen.clip_norm, horizon, best.score, [s.clip_norm for s in ties],
                  runner.clip_norm if runner else None, _margin(chosen, runner), reason, rule)


def _margin(chosen: ProbeSummary, runner: ProbeSummary | None) -> float | None:
    """The runner-up's score minus the chosen one's, in combined standard errors (None: no runner-up)."""
    if runner is None:
        return None
    noise = math.sqrt(chosen.score_se ** 2 + runner.score_se ** 2)
    if noise > 0:
        return (runner.score - chosen.score) / noise
    return math.inf if runner.score > chosen.score else 0.0


def _reason(rule: str, ok: list[ProbeSummary], ties: list[ProbeSummary], horizon: int, kept_own: bool,
            n_summaries: int) -> str:
    """Why :func:`choose` took its candidate, in words (the loss's; ``kept_own``: the script's own
    threshold was kept among all-tied finalists)."""
    if rule == "all-tied":
        rng = _range_words(sorted(s.clip_norm for s in ok))
        return (f"all {len(ok)} finalists ({rng}) are within the loss's noise of each other at {horizon} steps: "
                "the clip norm does not matter in this range; "
                + ("the script's own threshold is kept" if kept_own else
                   "the largest of them is taken (clipping least is the smallest change to the script)"))
    if rule == "middle-tied":
        return (f"{len(ties)} candidates within the loss's noise of the best at {horizon} steps; the middle "
                "threshold among them is taken (a probe this short cannot tell them apart)")
    if rule == "largest-tied":
        return (f"{len(ties)} candidates within the loss's noise of the best; the largest threshold "
                "among them is taken (short probes favour small thresholds)")
    if rule == "best":
        return "lowest loss, clear of the others by more than the loss's noise"
    return "the only one that did not diverge" if n_summaries > 1 else "only candidate"


def _range_words(taus: list[float]) -> str:
    """'0.25 to 1 and the script as it is', for a reason line."""
    finite = [t for t in taus if math.isfinite(t)]
    words = f"{min(finite):g} to {max(finite):g}" if len(finite) > 1 else (f"{finite[0]:g}" if finite else "")
    if any(not math.isfinite(t) for t in taus):
        words = (words + " and " if words else "") + "the script as it is"
    return words


def survivors(summaries: list[ProbeSummary], keep: int, *, full_horizon: bool = False,
              carry: tuple = ()) -> list[float]:
    """The ``keep`` candidates continued to the next rung: the choice of this rung, then its
    neighbours on the ladder of candidates that did not diverge, the one with the lower loss
    first (short-horizon bias can run either way: a small threshold is a learning-rate cut that
    helps early and hurts later, and a large one can look worse early and end better), then the
    best losses; then every threshold in ``carry`` (the script's own, recommend's) that is a
    candidate here and did not diverge, beyond ``keep``."""
    ok = sorted([s for s in summaries if not s.diverged and math.isfinite(s.score)], key=lambda s: s.score)
    if not ok:
        return []
    pick = choose(summaries, full_horizon=full_horizon).clip_norm
    out = [pick]
    ladder = sorted(s.clip_norm for s in ok)
    i = ladder.index(pick)
    loss = {s.clip_norm: s.score for s in ok}
    for t in sorted((ladder[j] for j in (i - 1, i + 1) if 0 <= j < len(ladder)), key=lambda t: loss[t]):
        if len(out) < keep:
            out.append(t)
    for s in ok:
        if len(out) >= keep:
            break
        if s.clip_norm not in out:
            out.append(s.clip_norm)
    out += [t for t in dict.fromkeys(carry) if t in loss and t not in out]
    return out


def fallback(rungs: list[list[ProbeSummary]], diverged: set) -> Choice | None:
    """When every finalist diverged: the choice among an earlier rung's candidates below the
    smallest threshold that diverged anywhere (a larger threshold clips less and is taken to
    diverge too), the latest rung that has one. None: nothing is left."""
    if not diverged:
        return None
    limit = min(diverged)
    for summaries in reversed(rungs):
        left = [s for s in summaries if s.clip_norm < limit and not s.diverged and math.isfinite(s.score)]
        if left:
            back = choose(left, full_horizon=False)
            back.rule = "fallback"
            return back
    return None


# ------------------------------------------------------------------------- --metric


def metric_values(metrics, name: str):
    """(step, value) of NAME on the lowest rank, in report order (steps -1: before any step dropped)."""
    if metrics is None or not len(metrics):
        return metrics.iloc[0:0] if metrics is not None else None
    m = metrics[metrics["name"] == name]
    if len(m) and m["rank"].nunique() > 1:
        m = m[m["rank"] == m["rank"].min()]
    return m[m["step"] >= 0]


def with_metric(summary: ProbeSummary, metrics, name: str, horizon: int, maximize: bool = False) -> ProbeSummary:
    """The value a probe is ranked by under ``tune --metric NAME``: NAME's last value reported after
    the horizon's last step (step ``horizon - 1``), negated when higher is better. A probe with no
    value there keeps its loss figures but has no score (nan): it is never ranked by its loss."""
    from dataclasses import replace

    m = metric_values(metrics, name)
    at = m[m["step"] == horizon - 1]["value"].to_numpy(dtype=float) if m is not None and len(m) else np.array([])
    value = float(at[-1]) if len(at) else math.nan
    score = (-value if maximize else value) if math.isfinite(value) else math.nan
    unranked = None
    if not summary.diverged and not math.isfinite(value):
        unranked = f"no {name} value after step {horizon}" if not len(at) else f"{name} = {value:g}"
    return replace(summary, metric_name=name, metric=value, score=score, score_se=0.0, unranked=unranked)


def report_horizons(metrics, name: str, steps_run: int, total_steps: int, complete: bool) -> list[int]:
    """The horizons (steps done) after which the script reports NAME, learned from the pilot: those
    it reported at, and, when the pilot stopped before T, the last spacing continued up to T."""
    m = metric_values(metrics, name)
    seen = sorted({int(s) + 1 for s in m["step"]} if m is not None and len(m) else set())
    if not seen or complete:
        return seen
    gap = seen[-1] - seen[-2] if len(seen) > 1 else seen[0]
    out = list(seen)
    while gap > 0 and out[-1] + gap <= total_steps:
        out.append(out[-1] + gap)
    return out


def align(steps: int, horizons: list[int]) -> int:
    """A planned horizon moved to where NAME is reported: the latest report at or before it (the
    budget holds), or the first one when it comes later."""
    if not horizons:
        return steps
    before = [h for h in horizons if h <= steps]
    return before[-1] if before else horizons[0]
