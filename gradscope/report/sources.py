"""How every report names where a judged clip norm came from (analysis.model.THRESHOLD_SOURCES)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceLabel:
    text: str    # in a sentence of `recommend`: "max_norm 1 (the script's max_norm): clips 3.1% ..."
    legend: str  # in the plot's legend: "judged τ = 1 (max_norm)"


# One entry per THRESHOLD_SOURCES value (tests/test_plot.py checks that they match).
THRESHOLD_SOURCE_LABELS: dict[str, SourceLabel] = {
    "option": SourceLabel("--clip-norm", "--clip-norm"),
    "override": SourceLabel("`gradscope run --clip-norm`", "gradscope run --clip-norm"),
    "script": SourceLabel("the script's max_norm", "max_norm"),
    "log": SourceLabel("the log's settings", "the log's max_grad_norm"),
    "default": SourceLabel("the trainer's default, assumed", "the trainer's default max_grad_norm (assumed)"),
}
