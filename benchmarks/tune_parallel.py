"""Wall time of a `gradscope tune` with its probes one at a time against two at once (CPU).

The same seeded tune (tests/scripts/tune_task.py, T = 60, candidates 0.5, 2, 8 and the script as
it is: the pilot and 6 probes in two rungs), each into a fresh directory:

    serial      --jobs 1                      (local executor)
    local x2    --jobs 2                      (local executor)
    ray x2      --executor ray --jobs 2       (a local Ray instance started for the run; --no-ray skips it)

It prints each tune's wall time (the `wall_seconds` of its JSON, and the whole command's as timed
here, Ray's start included), the parallelism it reached, and the ratio to the serial tune; it checks
that every tune chose the same threshold. One run of each, in that order: on a shared machine the
ratio moves with the load of the moment; say what the machine was doing with the figure.

    python benchmarks/tune_parallel.py [--no-ray] [--steps 60]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = Path(__file__).resolve().parent.parent / "tests" / "scripts" / "tune_task.py"


def tune(out: Path, steps: int, extra: list[str]) -> tuple[dict | None, float]:
    cmd = [sys.executable, "-m", "gradscope", "tune", "--steps", str(steps), "--candidates", "0.5,2,8",
           "--out", str(out), "--json", *extra, str(TASK), "--steps", str(steps)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    took = time.perf_counter() - t0
    if res.returncode != 0:  # said, and the other tunes still measured
        print(f"{out.name}: tune failed ({res.returncode}): {res.stderr.strip()[-600:]}", flush=True)
        return None, took
    return json.loads(res.stdout), took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray executor")
    args = ap.parse_args()
    runs = [("serial", ["--jobs", "1"]), ("local x2", ["--jobs", "2"])]
    if not args.no_ray:
        os.environ.pop("RAY_ADDRESS", None)  # a local instance started for the run, not a cluster near by
        runs.append(("ray x2", ["--executor", "ray", "--jobs", "2"]))
    print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the start")
    with tempfile.TemporaryDirectory(prefix="gs-tune-bench") as tmp:
        rows = []
        print(f"{'tune':<10} {'wall_seconds':>12} {'command (s)':>12} {'runs at once':>13} {'ratio to serial':>16} "
              f"{'clip norm':>10} {'runs':>5}", flush=True)
        for name, extra in runs:
            j, took = tune(Path(tmp) / name.replace(" ", "-"), args.steps, extra)
            if j is None:
                continue
            rows.append((name, j, took))
            base_wall, base_cmd = rows[0][1]["wall_seconds"], rows[0][2]
            n_runs = len({p['run_dir'] for c in j['candidates'] for p in c['probes']})
            print(f"{name:<10} {j['wall_seconds']:>12.1f} {took:>12.1f} {j['parallelism']:>13} "
                  f"{j['wall_seconds'] / base_wall:>8.2f} ({took / base_cmd:.2f}) {j['recommended_clip_norm']!s:>10} "
                  f"{n_runs:>5}", flush=True)
        chosen = {j["recommended_clip_norm"] for _, j, _ in rows}
        print("same choice in every tune: " + ("yes" if len(chosen) == 1 else f"NO: {sorted(map(str, chosen))}"))
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
