"""Writes one process's share of a run directory (steps, layers, process metadata).

Files are created on the first flush, so processes that never step an optimizer
(DataLoader workers, the torchrun agent) leave nothing behind. Each flush is one
write() of whole lines followed by flush(): a process killed at any moment loses
at most the block being written, and readers drop a partial last line.
"""
from __future__ import annotations

import os
from typing import Sequence

from gradscope import rundir


class ProcessWriter:
    def __init__(self, run_dir: str, rank: int) -> None:
        self.run_dir = run_dir
        self.rank = rank
        self._steps = None
        self._layers: dict[int, object] = {}

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
        self._steps.write(",".join(rundir.STEP_COLUMNS) + "\n")

    def write_steps(self, rows: Sequence[Sequence[str]]) -> None:
        self.write_steps_text(rundir.csv_lines(rows))

    def write_steps_text(self, text: str) -> None:
        """Whole CSV lines, each ending in a newline."""
        if self._steps is None:
            self._claim_rank()
        self._steps.write(text)
        self._steps.flush()

    def write_layers(self, optimizer: int, names: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.write_layers_text(optimizer, names, rundir.csv_lines(rows))

    def write_layers_text(self, optimizer: int, names: Sequence[str], text: str) -> None:
        f = self._layers.get(optimizer)
        if f is None:
            if self._steps is None:
                self._claim_rank()
            path = os.path.join(self.run_dir, rundir.layers_file(self.rank, optimizer))
            f = open(path, "w", encoding="utf-8", newline="")
            f.write(",".join(["step", *names]) + "\n")
            self._layers[optimizer] = f
        f.write(text)
        f.flush()

    def write_process(self, info: dict, in_place_fallback: bool = False) -> None:
        if self._steps is None:
            return  # nothing recorded by this process: leave no file
        rundir.write_json_atomic(os.path.join(self.run_dir, rundir.process_file(self.rank)), info, in_place_fallback)

    @property
    def started(self) -> bool:
        return self._steps is not None

    def close(self) -> None:
        for f in [self._steps, *self._layers.values()]:
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
