"""Scale: a 1,000,000-step, 300-tensor run directory read by every command, and the recorder's
cost on that model (issue 26's targets).

1. Records a real short run of a 300-tensor model (75 blocks of Linear + LayerNorm: 4 tensors
   each) with default options (`gradscope.record`: every step, per-layer norms every step).
2. Builds a 1,000,000-step run directory in the real format from it: the recording's steps
   and layer rows repeated (with a slow drift and a few spikes so the analysis has work),
   steps renumbered, every line spelled by rundir.step_line and every layer row written by
   capture's own ProcessWriter, plus a second such run for `compare`.
3. Times `recommend`, `check`, `plot`, `watch --exit-on-end` and `compare` of the two, each
   in its own process; peak memory is that process's ru_maxrss (os.wait4), which machine
   load does not change.
4. The recorder's overhead on the model: alternating blocks with recording off and on in one
   process, the median of the paired on/off ratios (benchmarks/overhead.py's method).

    python benchmarks/scale.py                  # everything (~1.3 GB x 2 in --work)
    python benchmarks/scale.py --steps 100000   # smaller
    python benchmarks/scale.py --overhead-only  # just the recorder's cost
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"recommend": (5.0, 1024), "check": (5.0, 1024), "plot": (5.0, 1024), "watch --exit-on-end": (5.0, 1024),
           "compare": (10.0, 2048)}


def model_300(width: int = 64, blocks: int = 75):
    import torch

    layers = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(width, width), torch.nn.LayerNorm(width)]
    return torch.nn.Sequential(*layers)


def make_step(model, opt, batch: int = 32, width: int = 64):
    import torch

    x, y = torch.randn(batch, width), torch.randn(batch, width)

    def step():
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def record_short(path: Path, steps: int) -> None:
    import torch

    import gradscope

    torch.manual_seed(0)
    model = model_300()
    assert sum(1 for _ in model.parameters()) == 300
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = make_step(model, opt)
    with gradscope.record(path, force=True):
        for _ in range(steps):
            step()


def build(src: Path, out: Path, n: int, seed: int) -> None:
    """A run directory of n steps in the real format, from the short recording `src`."""
    import numpy as np
    import torch

    from gradscope import rundir
    run = rundir.load_run(src)
    s = run.steps
    store = run.layer_norms
    key = store.series()[0]
    names, lay = store.names(*key), store.rows(*key, slice(None), native=True)
    rng = np.random.default_rng(seed)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    meta = rundir.read_json(src / rundir.META_FILE)
    proc = rundir.read_json(src / rundir.process_file(0))
    k = len(s)
    g0, l0, lr0 = (s[c].to_numpy(dtype=float) for c in ("grad_norm", "loss", "lr"))
    t0 = float(s["time"].iloc[0])
    line = rundir.step_line({"optimizer": "0", **rundir.NO_CLIP_NO_SCALER})
    from gradscope.capture.writer import ProcessWriter

    w = ProcessWriter(str(out), 0)
    block = 50_000
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        idx = np.arange(lo, hi)
        drift = 1.0 + 0.5 * idx / n
        spikes = np.where(rng.random(hi - lo) < 2e-5, rng.uniform(5, 50, hi - lo), 1.0)
        scale = drift * spikes
        g = g0[idx % k] * scale
        loss = l0[idx % k] * (1.0 - 0.3 * idx / n)
        text = "".join(line % (i, gi, li, lri, t0 + 0.05 * i)
                       for i, gi, li, lri in zip(idx.tolist(), g.tolist(), loss.tolist(), lr0[idx % k].tolist()))
        w.write_steps_text(text)
        rows = lay[idx % k] * scale[:, None].astype(np.float32)
        w.write_layer_rows(0, names, idx.tolist(), torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)))
    w.close()
    proc["optimizers"][0]["steps"] = n
    proc["status"] = "completed"
    rundir.write_json_atomic(out / rundir.process_file(0), proc)
    meta.update(status="completed", exit_code=0)
    rundir.write_json_atomic(out / rundir.META_FILE, meta)


def timed(args: list[str], cwd: Path) -> dict:
    """Wall seconds, CPU seconds and peak RSS (MB) of one gradscope command in its own process,
    started from a small process of its own: Linux counts a child's peak from its fork, so a
    parent holding the benchmark's arrays would inflate it."""
    out = subprocess.run([sys.executable, __file__, "--measure", json.dumps([str(cwd), *args])],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def measure(spec: str) -> None:
    """--measure: run one gradscope command (this process imports nothing heavy) and print its figures."""
    cwd, *args = json.loads(spec)
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "gradscope", *args], cwd=cwd,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read().decode()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024,
                      "exit": code, "stderr": err.strip()[-300:] if code not in (0, 1) else ""}))


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())


def overhead(blocks: int = 7, block: int = 40) -> float:
    """Median on/off ratio of step time, recording with default options (alternating blocks)."""
    import torch

    import gradscope

    torch.manual_seed(0)
    model = model_300()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = make_step(model, opt)
    for _ in range(20):
        step()
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(blocks):
            t = time.perf_counter()
            for _ in range(block):
                step()
            off = time.perf_counter() - t
            with gradscope.record(Path(tmp) / f"r{i}") as rec:
                step()
                rec._flush()  # priming: the one-time parameter naming is not charged to the block
                t = time.perf_counter()
                for _ in range(block):
                    step()
                on = time.perf_counter() - t
            ratios.append(on / off)
    return statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--record-steps", type=int, default=200)
    ap.add_argument("--work", type=Path, default=None, help="where the run directories go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    ap.add_argument("--overhead-only", action="store_true")
    ap.add_argument("--no-overhead", action="store_true")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        return measure(a.measure)
    import torch

    torch.set_num_threads(1)  # a tiny model: more threads only spin on a shared machine
    if not a.no_overhead:
        print(f"recorder overhead, 300-tensor model, one process: {overhead():.3f}x (median on/off step time)")
    if a.overhead_only:
        return
    work = a.work or Path(tempfile.mkdtemp(prefix="gradscope-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        record_short(work / "short", a.record_steps)
        print(f"recorded {a.record_steps} steps of the 300-tensor model in {time.perf_counter() - t:.1f} s")
        for name, seed in (("big", 0), ("big2", 1)):
            t = time.perf_counter()
            build(work / "short", work / name, a.steps, seed)
            print(f"built {work / name}: {a.steps:,} steps, {dir_size(work / name) / 1e9:.2f} GB "
                  f"in {time.perf_counter() - t:.0f} s")
        big = str(work / "big")
        cmds = {
            "recommend": ["recommend", big],
            "check": ["check", big],
            "plot": ["plot", big, "-o", str(work / "big.png")],
            "watch --exit-on-end": ["watch", big, "--exit-on-end"],
            "compare": ["compare", big, str(work / "big2"), "-o", str(work / "compare.png")],
        }
        print(f"{'command':22} {'wall s':>7} {'cpu s':>6} {'peak MB':>8}  target (wall, peak)")
        results = {}
        for label, args in cmds.items():
            r = timed(args, work)
            limit_s, limit_mb = TARGETS[label]
            ok = "ok" if r["wall_s"] <= limit_s and r["peak_mb"] <= limit_mb else "OVER"
            print(f"{label:22} {r['wall_s']:7.2f} {r['cpu_s']:6.2f} {r['peak_mb']:8.0f}  <= {limit_s:g} s, "
                  f"{limit_mb} MB: {ok} (exit {r['exit']}) {r['stderr']}")
            results[label] = r
        size = dir_size(work / "big")
        print(f"run directory: {size / 1e9:.2f} GB (target <= 1.5 GB)")
        (work / "scale.json").write_text(json.dumps({"steps": a.steps, "run_dir_bytes": size, **results}, indent=2))
    finally:
        if not a.keep and a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
