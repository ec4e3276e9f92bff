"""`gradscope tune` on the advice benchmark, replayed offline: tune's decision rules judged in seconds.

    python benchmarks/advice/simulate.py                          # every design family, seeds 0,1
    python benchmarks/advice/simulate.py --tasks cnn,logreg --seeds 0 --jobs 2

A tune probe is `gradscope run --clip-norm TAU --max-steps N` of a seeded script, so its steps
table is exactly the first N rows of the whole training at TAU. This replays a tune with the real
orchestration (`gradscope.tune.tune`, and so the real analysis/tune.py) and a runner, SimRunner,
that serves each probe from ONE full training per (task, seed, tau), recorded in-process by the
real recorder (`gradscope.record(clip_norm=tau)` around `tasks.train`) and cached on disk:

    results/sim/<task>/s<seed>/<tau>.csv.gz   the recorder's steps-r0.csv, as written (gzip)
    results/sim/<task>/s<seed>/<tau>.json     {"final": held-out loss at the end (null: non-finite), ...}

<tau> is repr(float(tau)), or "as-is" for the script as it is (no clipping). A cached table is
parsed as `rundir.load_run` parses the file (checked against load_run when it is written). With a
warm cache a whole simulation takes seconds; the trainings of a cold one run in --jobs processes.

The table: per task and seed the tuned tau (the real `gradscope tune`'s, from
results/cache/<task>/s<seed>/tune.json, beside it when run.py has measured it), the final held-out
loss of a full training at the tuned tau over the grid-best mean loss (run.py's grid-best, from its
cache), the budget spent; per task the mean ratio (run.py's "tune" cell) and the worst over tasks.
"""
from __future__ import annotations

import argparse
import functools
import gzip
import json
import math
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import run as bench  # noqa: E402
from tasks import HELDOUT_FAMILIES, TASKS, train  # noqa: E402

from gradscope import rundir  # noqa: E402
from gradscope.launch import Target  # noqa: E402
from gradscope.tune import DEFAULT_BUDGET, ProbeRun, tune  # noqa: E402

SIM_ROOT = HERE / "results" / "sim"
BENCH_ROOT = HERE / "results"


def tau_key(tau: float | None) -> str:
    """A threshold as a cache key: exactly the float (repr); "as-is" for no clipping."""
    return "as-is" if tau is None or not math.isfinite(tau) else repr(float(tau))


def _files(root: Path, task: str, seed: int, tau: float | None) -> tuple[Path, Path]:
    d = Path(root) / task / f"s{seed}"
    k = tau_key(tau)
    return d / f"{k}.csv.gz", d / f"{k}.json"


def _parse(data: bytes):
    """A steps-r0.csv's bytes as load_run's steps table (same parser, dtypes and rank column)."""
    import io

    import pandas as pd

    df = pd.read_csv(io.BytesIO(data), dtype=rundir._STEP_DTYPES)
    # format version 2: an empty loss field is "no loss recorded" (load_run's optional column)
    raw = pd.read_csv(io.BytesIO(data), usecols=["loss"], dtype=str, keep_default_na=False, na_filter=False)["loss"]
    df[rundir.LOSS_RECORDED] = (raw.str.strip() != rundir.NO_LOSS).to_numpy()
    df.insert(0, "rank", 0)
    return rundir.normalize_steps(df)


_MEMO: dict = {}


def full_training(task: str, seed: int, tau: float | None, root: Path = SIM_ROOT):
    """(steps table, final held-out loss) of the whole training of `task` from `seed` at `tau`
    (None or inf: as it is), from the cache, else trained once under the recorder and cached."""
    key = (str(root), task, seed, tau_key(tau))
    if key in _MEMO:
        return _MEMO[key]
    gz, js = _files(root, task, seed, tau)
    try:
        meta = json.loads(js.read_text())
        steps = _parse(gzip.decompress(gz.read_bytes()))
    except (OSError, ValueError, EOFError):
        steps, meta = _train_and_store(task, seed, tau, gz, js)
    final = math.inf if meta["final"] is None else float(meta["final"])
    _MEMO[key] = (steps, final)
    return steps, final


def _train_and_store(task, seed, tau, gz: Path, js: Path):
    import pandas as pd

    import gradscope

    clip = None if tau is None or not math.isfinite(tau) else float(tau)
    own = TASKS[task].script_clip  # the script's own clip_grad_norm_ (as is); --clip-norm replaces its max_norm
    clipper = (lambda ps: torch.nn.utils.clip_grad_norm_(ps, own)) if own else None
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gradscope-sim-") as tmp:
        run_dir = Path(tmp) / "run"
        with gradscope.record(run_dir, clip_norm=clip, layer_stride=0):
            final = train(task, seed, clipper)  # inf when it went non-finite; the recorder keeps every row
        files = list(run_dir.glob("steps-r*.csv"))
        if [f.name for f in files] != ["steps-r0.csv"]:
            raise RuntimeError(f"{task} seed {seed} tau {tau_key(tau)}: expected one steps-r0.csv, got {files}")
        data = files[0].read_bytes()
        steps = _parse(data)
        pd.testing.assert_frame_equal(steps, rundir.load_run(run_dir).steps)  # the cache is load_run's table
    meta = {"final": final if math.isfinite(final) else None, "rows": len(steps),
            "seconds": round(time.time() - t0, 3)}
    gz.parent.mkdir(parents=True, exist_ok=True)
    for f, blob in ((gz, gzip.compress(data, mtime=0)), (js, json.dumps(meta).encode())):
        tmp = f.with_name(f"{f.name}.tmp{os.getpid()}")
        tmp.write_bytes(blob)
        tmp.replace(f)  # atomic: a killed run never leaves half an entry
    return steps, meta


class SimRunner:
    """gradscope.tune.Runner's interface, served from full_training: a probe of N steps is the first
    N rows of the whole training at its threshold (status "stopped" when N cut it, as --max-steps)."""

    def __init__(self, target, out, jobs, layer_stride: int = 0, on_event=None, *, task: str, seed: int,
                 root: Path = SIM_ROOT) -> None:
        self.target, self.out, self.jobs, self.layer_stride = target, out, jobs, layer_stride
        self.on_event = on_event or (lambda msg: None)
        self.task, self.seed, self.root = task, seed, root
        self.runs: dict[Path, ProbeRun] = {}

    def run(self, specs):
        for clip_norm, max_steps, run_dir in specs:
            if run_dir in self.runs:
                continue
            full, _ = full_training(self.task, self.seed, clip_norm, self.root)
            if full["optimizer"].nunique() > 1:
                raise RuntimeError("SimRunner serves single-optimizer trainings only")
            stopped = max_steps is not None and len(full) >= max_steps
            steps = full[full["step"] < max_steps].reset_index(drop=True) if stopped else full.copy()
            self.on_event(f"simulated {run_dir.name}: {len(steps)} steps")
            self.runs[run_dir] = ProbeRun(clip_norm, max_steps, run_dir, reused=False,
                                          status="stopped" if stopped else "completed", exit_code=0,
                                          steps_run=len(steps), steps=steps)
        return [self.runs[d] for _, _, d in specs]


def simulate(task: str, seed: int, root: Path = SIM_ROOT, **tune_kwargs) -> dict:
    """`gradscope tune --steps T` of the task script, probes simulated; the tuned tau and the final
    held-out loss of a whole training at it (inf when tune found none)."""
    t0 = time.time()
    target = Target("script", str(HERE / "tasks.py"), ["--task", task, "--seed", str(seed)])
    factory = functools.partial(SimRunner, task=task, seed=seed, root=root)
    kw = {"steps": TASKS[task].steps, "jobs": 1, **tune_kwargs}
    with tempfile.TemporaryDirectory(prefix="gradscope-simtune-") as out:
        res = tune(target, Path(out), runner_factory=factory, **kw)
    found = res.choice is not None and res.choice.clip_norm is not None
    tau = res.recommended_clip_norm
    final = full_training(task, seed, tau, root)[1] if found else math.inf

    def name(t):
        return None if not math.isfinite(t) else t

    return {
        "task": task, "seed": seed, "tau": tau, "found": found, "final": final,
        "choice": None if not found else ("as-is" if not math.isfinite(res.choice.clip_norm) else "clip"),
        "budget_spent": res.budget_spent,
        "candidates": [name(c.clip_norm) for c in res.candidates],
        "rungs": [{"steps": r.steps, "candidates": [name(t) for t in r.candidates],
                   "kept": [name(t) for t in r.kept]} for r in res.rungs],
        "seconds": round(time.time() - t0, 2),
    }


def _simulate_job(job):
    task, seed, root, kw = job
    return simulate(task, seed, Path(root), **kw)


def _fmt(tau) -> str:
    return "none" if tau is None else f"{tau:.3g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(t for t in bench.DEFAULT_TASKS if t not in HELDOUT_FAMILIES),
                    help="default: the design families only; name a held-out family to include it "
                         "(only once the rules are final: seeing it spends the hold-out)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--jobs", type=int, default=2, help="processes filling the cache (one task and seed each)")
    ap.add_argument("--budget", type=float, default=None, help="tune's --budget (default: tune's own)")
    ap.add_argument("--sim-cache", default=str(SIM_ROOT), help="the simulator's trainings (default %(default)s)")
    ap.add_argument("--bench", default=str(BENCH_ROOT), help="run.py's results (its cache gives the grid-best)")
    ap.add_argument("--json", default=None, help="also write every simulated tune to this file")
    a = ap.parse_args(argv)
    os.nice(19)  # a benchmark on a shared machine: everyone else's work goes first
    tasks = [t for t in a.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    seeds = [int(s) for s in a.seeds.split(",") if s]
    bench_root = Path(a.bench).resolve()
    kw = {} if a.budget is None else {"budget": a.budget}
    default_budget = a.budget is None or a.budget == DEFAULT_BUDGET  # what run.py's real tunes ran at
    t0 = time.time()

    pairs = [(t, s) for t in tasks for s in seeds]
    grid_jobs = [(bench_root, t, s, m) for t, s in pairs for m in ["untrained"] + bench.grid_methods(t)]
    with Pool(max(1, a.jobs)) as pool:
        sims = {(r["task"], r["seed"]): r for r in
                pool.imap_unordered(_simulate_job, [(t, s, a.sim_cache, kw) for t, s in pairs])}
        # run.py's grid (its cache; trained by run.py's own code where it is missing)
        grid = {(t, s, m): v for t, s, m, v in pool.imap_unordered(bench._train_job, grid_jobs)}
    init = {(t, s): grid.pop((t, s, "untrained")) for t, s in pairs}

    sets = bench.family_sets(tasks, seeds)
    picked = {"tune": {(t, s): {"tau": r["tau"], "final": r["final"], "budget_spent": r["budget_spent"]}
                       for (t, s), r in sims.items()}}
    summary = bench.summarize(sets, grid, init, picked, [])

    lines = []
    worst_all, agree, compared = 0.0, 0, 0
    for set_name, rows in summary.items():
        lines.append(f"\n{set_name}: simulated `gradscope tune --steps T` (budget "
                     f"{kw.get('budget', 'default')}); final held-out loss / grid-best mean loss\n")
        lines.append("| task | seed | tuned tau | real tune's tau (default budget) | final loss | / grid-best | "
                     "budget spent |")
        lines.append("|---|---|---|---|---|---|---|")
        worst = 0.0
        for t, row in rows.items():
            for s in seeds:
                r = sims[(t, s)]
                real = bench.cached(bench_root, t, s, f"tune-{bench._tune_fingerprint()}") if default_budget else None
                shown = "-"
                if real is not None and "tau" in real:
                    compared += 1
                    same = real["tau"] == r["tau"]
                    agree += same
                    shown = _fmt(real["tau"]) + ("" if same else " (differs)")
                ratio = bench._scored(r["final"], init[(t, s)]) / row["grid_best_loss"]
                tau = _fmt(r["tau"]) if r["found"] else "no threshold"
                lines.append(f"| {t} | {s} | {tau} | {shown} | {r['final']:.4g} | {ratio:.3f} | "
                             f"{r['budget_spent']:.2f} |")
            m = row["methods"]["tune"]
            worst = max(worst, m["ratio"])
            lines.append(f"| **{t}** (grid-best tau {row['grid_best_tau']}) | mean | | | | "
                         f"**{m['ratio']:.3f}** ({m['diverged']} diverged) | |")
        worst_all = max(worst_all, worst)
        lines.append(f"| **worst** | | | | | **{worst:.3f}** | |")
    print("\n".join(lines))
    same = (f"tuned tau equal to the real tune's on {agree} of {compared} seeds measured; " if default_budget
            else "")
    print(f"\nworst over every task: {worst_all:.3f}; {same}{len(pairs)} simulated tunes in {time.time() - t0:.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"tunes": list(sims.values()), "summary": summary}, indent=1,
                                           default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
