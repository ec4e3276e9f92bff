"""Statistics, regimes and the clip-norm recommendation: a Run in, dataclasses out (no presentation).

    from gradscope.analysis import analyze, load_config
    result = analyze(run, load_config(), clip_norm=None, preset="transformer")
    main = result.main                       # the optimizer with the most steps
    main.regime, main.clip_fraction, main.recommendation.clip_norm, main.spikes.count

Steady state = the finite steps after warm-up (judge.warmup_length). Every figure of a
verdict, a recommendation, drift and percentiles is computed on the steady-state steps;
`whole_run` holds the same run's figures with warm-up included.
"""
from __future__ import annotations

from gradscope.analysis.analyze import analyze
from gradscope.analysis.config import AnalysisConfig, Preset, get_preset, load_config, load_presets
from gradscope.analysis.model import (
    DIVERGENCE,
    OVERFLOW_SKIPPED,
    RECOVERED,
    REGIMES,
    THRESHOLD_SOURCES,
    Drift,
    NonFinite,
    OptimizerAnalysis,
    PresetCheck,
    Recommendation,
    RunAnalysis,
    Spike,
    Spikes,
    Threshold,
    Verdict,
    WholeRun,
)

__all__ = [
    "analyze", "AnalysisConfig", "Preset", "get_preset", "load_config", "load_presets",
    "REGIMES", "THRESHOLD_SOURCES", "OVERFLOW_SKIPPED", "RECOVERED", "DIVERGENCE",
    "Drift", "NonFinite", "OptimizerAnalysis", "PresetCheck", "Recommendation", "RunAnalysis",
    "Spike", "Spikes", "Threshold", "Verdict", "WholeRun",
]
