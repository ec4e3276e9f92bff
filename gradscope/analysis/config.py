"""Analysis settings and clip-norm presets: YAML (configs/) in, validated dataclasses out."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from gradscope.analysis.ranks import DISAGREEMENT_RTOL
from gradscope.errors import GradscopeError

ANALYSIS_FILE = "analysis.yaml"
PRESETS_FILE = "presets.yaml"


@dataclass(frozen=True)
class WarmupConfig:
    fraction: float = 0.1
    min_steps: int = 1
    max_steps: int = 2000
    follow_lr: bool = True
    max_fraction: float = 0.5


@dataclass(frozen=True)
class RegimeConfig:
    always_fraction: float = 0.5


@dataclass(frozen=True)
class LevelConfig:
    window: int = 200
    stride: int = 100
    min_periods: int = 5


@dataclass(frozen=True)
class RecommendConfig:
    residual_quantile: float = 0.98
    level_quantile: float = 0.9
    min_headroom: float = 1.2
    spike_margin: float = 2.0


@dataclass(frozen=True)
class SpikeConfig:
    z_threshold: float = 6.0
    min_ratio: float = 2.0
    mad_floor: float = 0.02
    top_layers: int = 3
    max_listed: int = 100


@dataclass(frozen=True)
class DriftConfig:
    max_ratio: float = 2.0
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)


@dataclass(frozen=True)
class RanksConfig:
    rtol: float = DISAGREEMENT_RTOL  # `gradscope check` uses the same default


@dataclass(frozen=True)
class SituationConfig:
    """See gradscope/analysis/situation.py for what each knob means."""

    early_steps: int = 5          # the early level: median of the first finite norms
    onset_ratio: float = 30.0     # blow-up onset (reported): first norm this many times the early level
    runaway_ratio: float = 100.0  # late norms this many times the early level: a blow-up under way
    loss_rise: float = 2.0        # unstable: the loss climbed to this many times its first value
    rise_steps: int = 2           # on this many steps, or on fewer with norms that grew past the first one
    normalise_factor: float = 1.0  # blew-up/unstable: clip norm = this x (1 - momentum) x the first norm
    range_factor: float = 2.0     # those recommendations are stated as a range of this factor either way


@dataclass(frozen=True)
class ConfidenceConfig:
    """When one pilot cannot tell the threshold (see gradscope/analysis/confidence.py)."""

    early_steps: int = 2          # a normalising run that blew up within this many steps...
    early_rise: float = 3.0       # ...to this many times its first loss (or norm): not confident
    min_steady_steps: int = 50    # fewer steady-state steps: not confident
    flat_loss_z: float = 2.0      # the loss's last tenth not below its first by this many standard errors: not confident


@dataclass(frozen=True)
class AnalysisConfig:
    """Every knob of the analysis; configs/analysis.yaml holds the shipped defaults."""

    min_steps: int = 3
    few_steps: int = 30
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    level: LevelConfig = field(default_factory=LevelConfig)
    recommend: RecommendConfig = field(default_factory=RecommendConfig)
    spikes: SpikeConfig = field(default_factory=SpikeConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    ranks: RanksConfig = field(default_factory=RanksConfig)
    situation: SituationConfig = field(default_factory=SituationConfig)
    confidence: ConfidenceConfig = field(default_factory=ConfidenceConfig)


@dataclass(frozen=True)
class Preset:
    """A model family's typical clip-norm range (high None: no upper bound)."""

    name: str
    low: float
    high: float | None
    models: str
    source: str


# (lowest, highest) allowed value of numeric settings, by dotted name; both inclusive.
_BOUNDS: dict[str, tuple[float, float]] = {
    "min_steps": (2, math.inf),
    "few_steps": (0, math.inf),
    "percentiles": (0, 100),
    "warmup.fraction": (0, 0.9),
    "warmup.min_steps": (0, math.inf),
    "warmup.max_steps": (0, math.inf),
    "warmup.max_fraction": (0, 0.9),
    "regime.always_fraction": (1e-9, 1),
    "level.window": (2, math.inf),
    "level.stride": (1, math.inf),
    "level.min_periods": (1, math.inf),
    "recommend.residual_quantile": (0.5, 1),
    "recommend.level_quantile": (0, 1),
    "recommend.min_headroom": (1, math.inf),
    "spikes.z_threshold": (0, math.inf),
    "spikes.min_ratio": (1, math.inf),
    "spikes.mad_floor": (1e-9, math.inf),
    "spikes.top_layers": (0, math.inf),
    "spikes.max_listed": (0, math.inf),
    "drift.max_ratio": (1, math.inf),
    "drift.percentiles": (0, 100),
    "ranks.rtol": (0, math.inf),
}


def _read_yaml(text: str, where: str) -> Any:
    import yaml

    # libyaml's loader when present: same result, ~10x faster than the pure-Python one.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GradscopeError(f"cannot parse '{where}' as YAML: {first}") from None


def _packaged(name: str) -> tuple[str, str]:
    from importlib.resources import files

    res = files("gradscope.configs").joinpath(name)
    return res.read_text(encoding="utf-8"), f"gradscope.configs/{name}"


def read_yaml(path: str | os.PathLike | None, packaged: str) -> tuple[Any, str]:
    """(data, where) of the user's YAML file, or of the shipped configs/<packaged> when path is None.

    Every problem (missing, unreadable, not YAML) is one GradscopeError naming the file.
    """
    if path is None:
        text, where = _packaged(packaged)
        return _read_yaml(text, where), where
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise GradscopeError(f"config file '{where}' does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GradscopeError(f"cannot read config file '{where}': {e}") from None
    return _read_yaml(text, where), where


def _coerce(value: Any, default: Any, key: str, where: str) -> Any:
    bad = GradscopeError(f"'{where}': setting '{key}' must be {_kind(default)}, got {value!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        out: Any = value
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise bad
        out = int(value)
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        out = float(value)
    elif isinstance(default, tuple):
        if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
        ):
            raise bad
        out = tuple(float(v) for v in value)
    else:  # pragma: no cover - every setting has one of the kinds above
        out = value
    lo, hi = _BOUNDS.get(key, (-math.inf, math.inf))
    for v in out if isinstance(out, tuple) else (out,):
        if not isinstance(v, bool) and not (lo <= v <= hi):
            raise GradscopeError(f"'{where}': setting '{key}' = {v!r} is out of range [{lo:g}, {hi:g}]")
    return out


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    return "a list of numbers"


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    """cls(**data) with every key checked against the dataclass's fields and defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GradscopeError(f"'{where}': '{prefix or 'the file'}' must be a mapping of settings, got {data!r}")
    defaults = cls()
    names = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        at = f" under '{prefix}'" if prefix else ""
        raise GradscopeError(
            f"'{where}': unknown setting '{unknown[0]}'{at} (valid: {', '.join(names)})"
        )
    kwargs = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        default = getattr(defaults, name)
        if name not in data:
            continue
        if is_dataclass(default):
            kwargs[name] = _build(type(default), data[name], key, where)
        else:
            kwargs[name] = _coerce(data[name], default, key, where)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike | None = None) -> AnalysisConfig:
    """The shipped defaults (configs/analysis.yaml), overlaid with the user's file if given."""
    data, where = read_yaml(None, ANALYSIS_FILE)
    data = data or {}
    if path is not None:
        user, p = read_yaml(path, ANALYSIS_FILE)
        if user is None:
            user = {}
        if not isinstance(user, dict):
            raise GradscopeError(
                f"'{p}': a config file must be a mapping of settings "
                f"(valid: {', '.join(f.name for f in fields(AnalysisConfig))})"
            )
        # Validate the user's keys against the schema first, so an error names their file.
        _build(AnalysisConfig, user, "", p)
        data = _merge(data, user)
        where = p
    cfg = _build(AnalysisConfig, data, "", where)
    if cfg.warmup.min_steps > cfg.warmup.max_steps:
        raise GradscopeError(f"'{where}': warmup.min_steps must not exceed warmup.max_steps")
    return cfg


def load_presets() -> dict[str, Preset]:
    """Every preset of configs/presets.yaml, by name."""
    text, where = _packaged(PRESETS_FILE)
    data = _read_yaml(text, where) or {}
    presets = {}
    for name, d in data.items():
        try:
            low = float(d["low"])
            high = None if d.get("high") is None else float(d["high"])
            presets[str(name)] = Preset(str(name), low, high, str(d.get("models", "")), " ".join(str(d.get("source", "")).split()))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise GradscopeError(f"'{where}': preset '{name}' needs numeric 'low' and 'high' (or null)") from None
    return presets


def get_preset(name: str) -> Preset:
    presets = load_presets()
    key = name.strip().lower()
    if key not in presets:
        raise GradscopeError(f"unknown preset '{name}' (valid: {', '.join(presets)})")
    return presets[key]
