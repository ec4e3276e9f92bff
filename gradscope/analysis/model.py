"""The results of an analysis: plain dataclasses, no presentation (floats may be NaN)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# How the judged clip norm treats the steady state (OptimizerAnalysis.regime); also the regime
# names `check --fail-on` accepts, in the order its messages list them.
REGIMES = ("always-clips", "never-clips", "healthy", "unclipped")

# Kinds of a non-finite step.
OVERFLOW_SKIPPED = "overflow-skipped"  # a GradScaler skipped the update: harmless
RECOVERED = "recovered"                # not flagged as skipped, but finite steps follow
DIVERGENCE = "divergence"              # non-finite from here to the end of the run (not the
                                       # loss rule of `check --fail-on divergence`: gate.LOSS_DIVERGENCE)

# Where a judged clip norm comes from (JSON clip_norm_source; null: no threshold known).
THRESHOLD_SOURCES = (
    "option",    # recommend --clip-norm: the user asked to judge this value
    "override",  # the run was recorded with `gradscope run --clip-norm`, which clipped every step
    "script",    # the max_norm the script passed to clip_grad_norm_
    "log",       # a foreign log's args file (max_grad_norm, gradient_clip_val, ...)
    "default",   # not written anywhere: the trainer's default, assumed (a log that shows it clipped)
)


@dataclass
class Threshold:
    """The clip norm being judged and where it came from."""

    clip_norm: float | None
    source: str | None                 # one of THRESHOLD_SOURCES, or None (no threshold known)
    script_values: list[float] = field(default_factory=list)  # distinct finite clip_max_norm, most used first
    changed: bool = False              # the script's max_norm changed during the run
    clip_call_fraction: float = 0.0    # share of steps with a clip_grad_norm_ call recorded
    clip_value: float | None = None    # clip_grad_value_ threshold, if the script used one
    assumed_because: str | None = None  # source "default": why the trainer's default is assumed


@dataclass
class Verdict:
    """What the judged clip norm does on the steady-state steps."""

    regime: str | None                 # one of REGIMES; None: no finite norm to judge
    clip_norm: float | None
    clip_fraction: float | None        # share of steady-state finite steps with grad_norm > clip_norm
    clipped_steps: int | None
    mean_multiplier: float | None      # mean(min(1, clip_norm / grad_norm))
    clip_norm_to_max: float | None     # clip_norm / max steady-state norm (> 1: never reached)
    clip_norm_to_p50: float | None     # clip_norm / median steady-state norm
    meaning: str                       # one sentence for the user


@dataclass
class Recommendation:
    """The data-driven clip norm and what it would have done on this run."""

    clip_norm: float                   # exact value
    clip_norm_rounded: float           # 2-3 significant digits, for humans and snippets
    clip_fraction: float               # share of steady-state steps it would clip
    clipped_steps: int
    mean_multiplier: float
    reference_level: float             # exp(level_quantile of the trailing median of log-norms)
    headroom: float                    # clip_norm / reference_level
    based_on_steps: int                # steady-state steps the statistics used
    situation: str = "stable"          # one of situation.SITUATIONS: which method applies
    evidence: str = ""                 # one sentence: what put the run in that situation
    low: float | None = None           # the range the data support (see recommend.py, situation.py)
    high: float | None = None
    basis: str | None = None           # a normalising recommendation: what it was computed from
    onset_step: int | None = None      # blew-up: where the norm left its early level


@dataclass
class WholeRun:
    """Figures of every finite, usable step, warm-up included (steady-state ones leave warm-up out)."""

    steps: int                         # rows of this optimizer
    finite_steps: int                  # finite, positive, not skipped
    min: float | None                  # None when no step is finite
    p50: float | None
    max: float | None
    max_step: int | None               # step number of the largest norm


@dataclass
class Drift:
    """Early vs late steady state (first and last third)."""

    early: dict[str, float]
    late: dict[str, float]
    early_steps: tuple[int, int]       # first and last step number of the early third
    late_steps: tuple[int, int]
    p50_ratio: float                   # late p50 / early p50
    drifting: bool                     # p50_ratio beyond drift.max_ratio either way
    recommended_clip_fraction_early: float
    recommended_clip_fraction_late: float
    warning: str | None                # set when one threshold cannot serve both


@dataclass
class Spike:
    step: int
    grad_norm: float
    level: float                       # typical norm before it (exp of the trailing median)
    ratio: float                       # grad_norm / level
    z: float                           # robust z-score of the log-norm
    in_warmup: bool
    layers: list[tuple[str, float]] = field(default_factory=list)  # (parameter, share of squared norm)


@dataclass
class Spikes:
    count: int
    listed: list[Spike]                # the first spikes.max_listed, by step
    z_threshold: float
    min_ratio: float
    layers_available: bool             # run.layers had rows for some listed spike


@dataclass
class NonFinite:
    """Steps with a non-finite grad_norm (or an infinite loss)."""

    count: int
    first_step: int | None
    first_kind: str | None             # OVERFLOW_SKIPPED, RECOVERED or DIVERGENCE
    overflow_skipped: int              # of count, skipped by the loss scaler
    recovered: int
    divergence_step: int | None        # first step of a divergence (non-finite to the end)
    steps: list[int] = field(default_factory=list)  # the first few, for display
    origin: Any = None                 # analysis.origin.Origin (gradscope run --trace-nan), or None
    first_unskipped_step: int | None = None  # first non-finite step no loss scaler skipped (its update went on)


@dataclass
class PresetCheck:
    name: str
    low: float
    high: float | None
    source: str
    position: str                      # "below", "within" or "above": where the recommendation sits
    clip_fraction_at_low: float        # what the preset's bounds would do on this run
    clip_fraction_at_high: float | None
    mean_multiplier_at_low: float
    message: str


@dataclass
class OptimizerAnalysis:
    """The full judgement of one optimizer's steps."""

    optimizer: int
    optimizer_class: str | None
    rank: int | None
    steps: int                         # rows (optimizer steps, or logged points for a sampled log)
    finite_steps: int                  # finite, positive, not skipped
    skipped_steps: int                 # the loss scaler skipped the update
    skipped_fraction: float
    warmup_steps: int                  # finite steps left out at the start
    steady_steps: int                  # finite steps judged
    steady_from_step: int | None       # step number where the steady state starts (None: no finite step)
    analysis_until_step: int | None    # set when a divergence cut the run short
    percentiles: dict[str, float]      # of the steady-state norms: p50, p90, p99, max
    threshold: Threshold
    verdict: Verdict
    recommendation: Recommendation | None  # None: no finite norm to base one on (see verdict.meaning)
    drift: Drift | None
    spikes: Spikes
    nonfinite: NonFinite
    preset: PresetCheck | None
    notes: list[str] = field(default_factory=list)
    findings: list = field(default_factory=list)  # the clip audit's findings for this optimizer (analysis/audit.py)
    whole_run: WholeRun | None = None
    caveats: list[str] = field(default_factory=list)  # what to weigh before applying the recommendation
    confidence: object = None          # confidence.Confidence: can one pilot tell? (None: not assessed)
    norm_scope: str = "global"         # "rank-local": per-rank shard norms, no regime or recommendation
    adam_family: bool = False          # the optimizer normalises its update by a second moment (advice.py)
    advice: object = None              # advice.Advice: the one line to act on (keep/change/add/tune)
    steady_optimizer_steps: int | None = None  # optimizer steps the steady state covers (a sampled log: > steady_steps)

    @property
    def regime(self) -> str:
        return self.verdict.regime

    @property
    def clip_fraction(self) -> float | None:
        return self.verdict.clip_fraction


@dataclass
class RunAnalysis:
    path: str
    source: str                        # "gradscope" or the importer's format name
    rank: int | None                   # the rank analysed
    ranks: list[int]
    sampled: bool
    optimizers: list[OptimizerAnalysis]
    notes: list[str] = field(default_factory=list)
    status: str | None = None          # meta.json's status ("running": still being recorded), or the log's
    findings: list = field(default_factory=list)  # the clip audit's (analysis/audit.py Finding), this rank
    status_line: str | None = None     # failed / interrupted / killed / still running: said first (advice.py)

    @property
    def main(self) -> OptimizerAnalysis:
        """The optimizer with the most steps (the first on a tie)."""
        return max(self.optimizers, key=lambda o: (o.steps, -o.optimizer))
