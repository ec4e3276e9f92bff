"""How long `gradscope recommend --json` takes on a 1,000,000-step run, relative to pandas parsing it.

    python benchmarks/recommend_speed.py [--steps 1000000] [--repeat 3]

Writes a gradscope run directory (steps-r0.csv in the run format, meta.json) to a temp dir,
then times, interleaved and best of --repeat: `pandas.read_csv(steps-r0.csv)` alone, and
the whole in-process path of `gradscope recommend --json` (open_run -> analyze -> JSON).
The target is a ratio of about 2 or less.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def write_run(d: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    steps = np.arange(n)
    # log-normal noise around a slowly falling level, a few spikes, a few scaler overflows
    g = np.exp(rng.normal(0.0, 0.3, n)) * (2.0 - steps / n)
    g[rng.choice(n, n // 2000, replace=False)] *= 20
    skipped = np.zeros(n, dtype=int)
    inf_at = rng.choice(n, n // 5000, replace=False)
    g[inf_at] = np.inf
    skipped[inf_at] = 1
    df = pd.DataFrame({
        "optimizer": 0, "step": steps, "grad_norm": g.astype(np.float32),
        "loss": (3.0 * np.exp(-steps / n) + rng.normal(0, 0.05, n)).astype(np.float32),
        "clip_max_norm": 1.0, "clipped": (g > 1.0).astype(int), "clip_value": np.nan, "skipped": skipped,
        "loss_scale": 65536.0, "lr": 3e-4, "time": 1.7e9 + steps * 0.25,
    })
    d.mkdir(parents=True, exist_ok=True)
    df.to_csv(d / "steps-r0.csv", index=False, float_format="%.9g", na_rep="nan")
    meta = {"format": "gradscope-run", "format_version": 1, "status": "completed", "exit_code": 0}
    (d / "meta.json").write_text(json.dumps(meta))
    return d / "steps-r0.csv"


def recommend_json(path: Path) -> str:
    from gradscope.analysis import analyze, load_config
    from gradscope.report.recommend import dumps

    try:
        from gradscope.importers import open_run
    except ImportError:  # importers not there yet: the run-directory reader is what open_run calls
        from gradscope.rundir import load_run as open_run
    cfg = load_config()
    return dumps(analyze(open_run(str(path)), cfg), cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        t = time.perf_counter()
        csv = write_run(run, args.steps)
        print(f"wrote {args.steps:,} steps ({csv.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s")
        recommend_json(run)  # warm imports and the file cache
        read, full = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            pd.read_csv(csv)
            read.append(time.perf_counter() - t)
            t = time.perf_counter()
            recommend_json(run)
            full.append(time.perf_counter() - t)
        r, f = min(read), min(full)
        print(f"pandas.read_csv              {r:.3f} s (best of {args.repeat})")
        print(f"recommend --json, in process {f:.3f} s (best of {args.repeat})")
        print(f"ratio                        {f / r:.2f}")


if __name__ == "__main__":
    main()
