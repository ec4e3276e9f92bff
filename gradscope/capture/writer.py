"""Writes one process's share of a run directory (steps, the layer store, process metadata).

What the files hold and how their lines and rows are spelled is rundir.py's (the format's
owner); this module only puts the bytes there. Files are created on the first flush, so
processes that never step an optimizer (DataLoader workers, the torchrun agent) leave
nothing behind. Each flush is one write() of whole lines or rows followed by flush(): a
process killed at any moment loses at most the block being written, and readers drop a
partial last line or row.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from gradscope import rundir


def float32_bytes(t: torch.Tensor) -> bytes:
    """A CPU float32 tensor's values as little/native-endian bytes (numpy when torch has it)."""
    t = t.detach().contiguous()
    try:
        return t.numpy().tobytes()
    except (RuntimeError, TypeError):  # torch built without numpy
        from array import array

        return array("f", t.reshape(-1).tolist()).tobytes()


def int64_bytes(values: Sequence[int]) -> bytes:
    from array import array

    return array("q", values).tobytes()


class ProcessWriter:
    def __init__(self, run_dir: str, rank: int) -> None:
        self.run_dir = run_dir
        self.rank = rank
        self._steps: Any = None
        self._layers: dict[int, tuple[Any, Any]] = {}  # optimizer -> (steps file, norms file)
        self._metrics: Any = None

    def _claim_rank(self) -> None:
        # Two processes of one run with the same rank (a script that launches another
        # training script, say) must not interleave lines in one file: the second
        # takes the next free slot above 1000.
        os.makedirs(self.run_dir, exist_ok=True)
        rank = self.rank
        while True:
            try:
                fd = os.open(
                    os.path.join(self.run_dir, rundir.steps_file(rank)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
                )
                break
            except FileExistsError:
                rank = rank + 1000 if rank < 1000 else rank + 1
        self.rank = rank
        self._steps = os.fdopen(fd, "w", encoding="utf-8", newline="")
        self._steps.write(rundir.steps_header())

    def write_steps_text(self, text: str) -> None:
        """Whole lines, each ending in a newline (rundir.step_line)."""
        if self._steps is None:
            self._claim_rank()
        self._steps.write(text)
        self._steps.flush()

    def write_layer_rows(self, optimizer: int, names: Sequence[str], steps: Sequence[int], norms: torch.Tensor) -> None:
        """Append rows of per-parameter norms (a [len(steps), len(names)] float32 CPU tensor) to
        the layer store: the steps first, then the norms, so a reader that takes the rows both
        files hold whole never pairs a row with the wrong step."""
        files = self._layers.get(optimizer)
        if files is None:
            if self._steps is None:
                self._claim_rank()
            index = rundir.layer_index(list(names), self.rank, optimizer)
            rundir.write_json_atomic(os.path.join(self.run_dir, rundir.layers_file(self.rank, optimizer)), index)
            files = (open(os.path.join(self.run_dir, index["steps"]), "wb"),
                     open(os.path.join(self.run_dir, index["norms"]), "wb"))
            self._layers[optimizer] = files
        steps_f, norms_f = files
        steps_f.write(int64_bytes(steps))
        steps_f.flush()
        norms_f.write(float32_bytes(norms.to(torch.float32)))
        norms_f.flush()

    def write_metrics_text(self, text: str) -> None:
        """Whole lines of metrics-r{R}.csv (capture/metrics.py), after this process's first step."""
        if self._metrics is None:
            if self._steps is None:
                self._claim_rank()
            path = os.path.join(self.run_dir, rundir.metrics_file(self.rank))
            self._metrics = open(path, "w", encoding="utf-8", newline="")
            self._metrics.write(",".join(rundir.METRIC_COLUMNS) + "\n")
        self._metrics.write(text)
        self._metrics.flush()

    def write_process(self, info: dict, in_place_fallback: bool = False) -> None:
        if self._steps is None:
            return  # nothing recorded by this process: leave no file
        rundir.write_json_atomic(os.path.join(self.run_dir, rundir.process_file(self.rank)), info, in_place_fallback)

    @property
    def started(self) -> bool:
        return self._steps is not None

    def close(self) -> None:
        for f in [self._steps, *(f for pair in self._layers.values() for f in pair), self._metrics]:
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
