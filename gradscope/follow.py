"""Follow a run directory while it is written: each poll parses only the lines added since the last.

A steps file is appended in whole lines (rundir.py), so a reader that remembers the byte
offset of the last complete line never re-reads or misreads anything; a partial last line
waits for the next poll. A file that shrinks or is replaced (`gradscope run --force` into
the same directory) starts the series again. meta.json and process-r{R}.json are small
and replaced atomically: they are re-read whole.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradscope import rundir

COLUMNS = ("step", "grad_norm", "loss", "clip_max_norm", "skipped", "time", "lr")


class _Grow:
    """A float64 array that grows by doubling: appending k values costs O(k), amortised."""

    def __init__(self) -> None:
        self._a = np.empty(1024)
        self.n = 0

    def extend(self, v: np.ndarray) -> None:
        need = self.n + len(v)
        if need > len(self._a):
            bigger = np.empty(max(need, 2 * len(self._a)))
            bigger[: self.n] = self._a[: self.n]
            self._a = bigger
        self._a[self.n:need] = v
        self.n = need

    @property
    def values(self) -> np.ndarray:
        return self._a[: self.n]


@dataclass
class SeriesData:
    """Everything read so far of one optimizer of the followed rank."""

    optimizer: int
    cols: dict[str, _Grow] = field(default_factory=lambda: {c: _Grow() for c in COLUMNS})

    def __len__(self) -> int:
        return self.cols["step"].n

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name].values


class RunFollower:
    """poll() reads what is new in RUN (rank `rank`'s steps file, meta.json, the process file)."""

    def __init__(self, path: str | os.PathLike, rank: int = 0) -> None:
        self.path = Path(path)
        self.rank = rank
        self.meta: dict | None = None
        self.process: dict | None = None
        self.series: dict[int, SeriesData] = {}
        self.generation = 0  # bumped when the steps file was replaced and reading started over
        self._offset = 0
        self._inode: int | None = None
        self._header: list[str] | None = None

    @property
    def steps_path(self) -> Path:
        return self.path / rundir.steps_file(self.rank)

    def poll(self) -> int:
        """Read what is new; returns the number of new step rows."""
        self.meta = _read_json(self.path / rundir.META_FILE)
        self.process = _read_json(self.path / rundir.process_file(self.rank))
        return self._read_steps()

    def status(self) -> str | None:
        """meta.json's status; a 'running' run whose supervisor is gone (same host) is 'killed'."""
        if self.meta is None:
            return None
        status = self.meta.get("status")
        if status == "running" and self.meta.get("host") == rundir.host_name():
            pid = self.meta.get("launcher_pid")
            if isinstance(pid, int) and not rundir._pid_alive(pid):
                return "killed"
        return status

    def _restart(self) -> None:
        self.series = {}
        self._offset = 0
        self._header = None
        self.generation += 1

    def _read_steps(self) -> int:
        try:
            st = os.stat(self.steps_path)
        except OSError:
            if self._inode is not None:  # the file went away (--force): start over
                self._inode = None
                self._restart()
            return 0
        if self._inode is not None and (st.st_ino != self._inode or st.st_size < self._offset):
            self._restart()
        self._inode = st.st_ino
        if st.st_size <= self._offset:
            return 0
        with open(self.steps_path, "rb") as f:
            f.seek(self._offset)
            data = f.read(st.st_size - self._offset)
        end = data.rfind(b"\n")
        if end < 0:
            return 0
        data = data[: end + 1]
        self._offset += len(data)
        if self._header is None:
            head, _, data = data.partition(b"\n")
            self._header = head.decode("utf-8").strip().split(",")
        if not data.strip():
            return 0
        return self._parse(data)

    def _parse(self, data: bytes) -> int:
        import pandas as pd

        df = pd.read_csv(io.BytesIO(data), names=self._header, header=None, dtype={"optimizer": "int64"})
        for opt, part in df.groupby("optimizer", sort=True):
            s = self.series.get(int(opt))
            if s is None:
                s = self.series[int(opt)] = SeriesData(int(opt))
            for c in COLUMNS:
                col = part[c] if c in part else pd.Series(float("nan"), index=part.index)
                s.cols[c].extend(pd.to_numeric(col, errors="coerce").to_numpy(dtype=float))
        return len(df)


def _read_json(path: Path) -> dict | None:
    try:
        return rundir.read_json(path)
    except (OSError, ValueError):
        return None
