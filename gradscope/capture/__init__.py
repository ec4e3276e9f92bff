"""Capture: what runs inside the user's training process (hooks, norms, device-side rows, the writer).

The rule of this layer: it imports only the standard library, torch, and the run format it writes
(``gradscope.rundir``'s standard-library half, ``gradscope.errors``, ``gradscope._version``). Never
pandas, rich, matplotlib, yaml, typer, nor gradscope's analysis, report or CLI layers: they cost
start-up time inside the training and can clash with the user's environment. Its modules form no
import cycle, function-level imports included. ``tests/test_layering.py`` holds both rules.

Data flows one way: capture writes a run directory; analysis reads it back (``rundir.load_run``).
"""
