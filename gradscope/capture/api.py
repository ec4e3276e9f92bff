"""The Python API: ``with gradscope.record("runs/x"):`` records what `gradscope run` records."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gradscope import rundir
from gradscope.capture.boot import checked_clip_norm
from gradscope.capture.distributed import current_rank
from gradscope.capture.recorder import Recorder


@contextmanager
def record(
    run_dir: str | os.PathLike,
    *,
    force: bool = False,
    layer_stride: int = 1,
    flush_steps: int = 100,
    flush_seconds: float = 2.0,
    clip_norm: float | None = None,
    trace_nan: bool = False,
) -> Iterator[Recorder]:
    """Record every optimizer step inside the block; every hook is removed on exit.

    ``layer_stride`` 0 turns the per-layer table off; N records it every N steps.
    ``clip_norm`` clips every step at that global norm, as `gradscope run --clip-norm`.
    ``trace_nan`` records where the first non-finite value appeared, as `gradscope run --trace-nan`.
    """
    import torch

    clip_norm = checked_clip_norm(clip_norm)  # before the run directory is made
    meta = None
    if current_rank() == 0:
        path = rundir.prepare_run_dir(run_dir, force=force)
        meta = rundir.new_meta(sys.argv, target="python-api", torch_version=torch.__version__)
        meta["launcher_pid"] = os.getpid()
        meta["clip_norm_override"] = clip_norm
        rundir.write_json_atomic(path / rundir.META_FILE, meta)
    else:  # another rank of a distributed run: rank 0 owns the directory and meta.json
        path = Path(run_dir)
        path.mkdir(parents=True, exist_ok=True)
    rec = Recorder(path, layer_stride=layer_stride, flush_steps=flush_steps, flush_seconds=flush_seconds,
                   clip_norm=clip_norm, trace_nan=trace_nan)
    rec.start()
    status, code = "completed", 0
    try:
        yield rec
    except KeyboardInterrupt:
        status, code = "interrupted", 130
        raise
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        status = "completed" if code == 0 else "failed"
        raise
    except BaseException:
        status, code = "failed", 1
        raise
    finally:
        rec.stop(status)
        if meta is not None:
            try:  # in place if it must: a full disk must not leave the status 'running', nor raise here
                rundir.write_json_atomic(path / rundir.META_FILE, rundir.finish_meta(meta, status, code), True)
            except OSError as e:
                print(f"gradscope: cannot write {path / rundir.META_FILE}: {e.strerror or e}", file=sys.stderr)
