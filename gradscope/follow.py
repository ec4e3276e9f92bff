"""Follow a run directory while it is written: each poll parses only the lines added since the last.

A steps file is appended in whole lines (rundir.py), so a reader that remembers the byte
offset of the last complete line never re-reads or misreads anything; a partial last line
waits for the next poll. A file that shrinks or is replaced (`gradscope run --force` into
the same directory) starts the series again. meta.json and process-r{R}.json are small
and replaced atomically: they are re-read whole.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradscope import rundir
from gradscope.errors import GradscopeError

COLUMNS = ("step", "grad_norm", "loss", "clip_max_norm", "skipped", "time")


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
        self.meta, self.meta_error = _read_meta(self.path / rundir.META_FILE)
        self.process = _read_json(self.path / rundir.process_file(self.rank))
        return self._read_steps()

    meta_error: str | None = None  # meta.json is there but cannot be read or parsed

    def status(self) -> str | None:
        """meta.json's status; when its supervisor is gone (same host) the training process's own
        record decides (rundir.run_status): still alive -> 'running', closed -> its status, else 'killed'."""
        if self.meta is None:
            return None
        return rundir.run_status(self.meta, [self.process] if self.process else [])[0]

    def ended(self) -> bool:
        """Nothing more will be written: the run ended, or its meta.json is damaged, or it has
        none while what it holds was written by processes that are gone."""
        if self.meta_error is not None:
            return True
        if self.meta is not None:
            return self.status() != "running"
        if self.process is not None:
            return not rundir._process_alive(self.process)
        # meta.json is claimed before anything is recorded: steps without it are a finished remnant
        return self.steps_path.is_file()

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
        try:
            with open(self.steps_path, "rb") as f:
                f.seek(self._offset)
                data = f.read(st.st_size - self._offset)
        except OSError as e:  # as every other command: bad input, exit 2
            raise GradscopeError(f"cannot read '{self.steps_path}': {e.strerror or e}") from None
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

        from gradscope import validate

        try:  # whole lines only ever reach here: a line that does not parse is damage
            df = pd.read_csv(io.BytesIO(data), names=self._header, header=None, dtype={"optimizer": "int64"})
            missing = [c for c in ("optimizer", *COLUMNS) if c not in df.columns]
            if missing:
                raise ValueError(f"no column {missing[0]}")
        except (ValueError, pd.errors.ParserError) as e:
            raise validate.steps_parse_error(self.steps_path, e) from None
        for opt, part in df.groupby("optimizer", sort=True):
            s = self.series.get(int(opt))
            if s is None:
                s = self.series[int(opt)] = SeriesData(int(opt))
            for c in COLUMNS:
                s.cols[c].extend(pd.to_numeric(part[c], errors="coerce").to_numpy(dtype=float))
        return len(df)


def _read_meta(path: Path) -> tuple[dict | None, str | None]:
    """(meta.json, None), (None, None) when it is not there (or still empty: just claimed),
    or (None, why) when it is there but cannot be read or parsed."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot read '{path}': {e.strerror or e}"
    if not data.strip():
        return None, None
    try:
        meta = json.loads(data)
    except ValueError as e:
        return None, f"cannot read '{path}': {e}"
    return (meta, None) if isinstance(meta, dict) else (None, f"'{path}' is not a JSON object")


def _read_json(path: Path) -> dict | None:
    try:
        return rundir.read_json(path)
    except (OSError, ValueError):
        return None
