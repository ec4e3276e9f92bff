"""The advice benchmark: does the clip norm gradscope gives (`recommend` from one pilot, `tune` from
probes) train as well as the best fixed threshold in hindsight?

    python benchmarks/advice/run.py                       # every table (resumable: see --out)
    python benchmarks/advice/run.py --tasks cnn --seeds 0 # one task, one seed
    python benchmarks/advice/run.py --grid-only           # only the grids and baselines (no advice)

For each task family (tasks.py) and seed:
1. a grid of fixed thresholds (and none), placed around the family's norm scale, gives the family's
   grid-best tau (best mean held-out loss over the seeds);
2. an unclipped pilot (the first 25 % of the steps, same schedule) is recorded by `gradscope run`,
   `gradscope recommend --json` reads it, and a full training uses the recommended tau;
3. `gradscope tune --steps T` (when this gradscope has it) searches with its own probes, at its
   default budget, and a full training uses its tau (a task whose script reports its held-out
   loss while training, `eval_every`, is tuned with `--metric heldout_loss`, as its user would);
4. tau = 1.0, AutoClip and ZClip train the same task for comparison;
5. the grid-best tau nudged 10 % either way (x1.1 and /1.1): the yardstick's own resolution.
The table gives mean final held-out loss / grid-best's per task (inf when a seed diverged:
non-finite, or worse than the untrained model). Families in tasks.HELDOUT_FAMILIES were declared
held out before any of their recommend or tune results were seen: they are reported apart.
(gru_warmup and noisy_mlp, the fourth held-out pair, were declared for issue 22; vae and gcn,
the third, are design families now, their recommend and tune figures having been seen.
cnn and sum_mlp, the first held-out pair, are design families now: tune's blew-up candidate
placement, 25ec2ea, was changed after their tune figures had been seen; char_rnn, conv1d and
mf_rec, the second held-out set, likewise, once their recommend and tune figures had been seen.)

Every training's result is cached on disk (OUT/cache/<task>/s<seed>/<method>.json) as soon as it
ends, and pilots and tune directories are kept, so an interrupted run resumes where it stopped.
The full trainings at a recommended or tuned tau run in-process with clip_grad_norm_, which is
bit-identical to `gradscope run --clip-norm tau` (tests/test_clip_override.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baselines import AutoClip, Fixed, ZClip  # noqa: E402
from tasks import HELDOUT_FAMILIES, TASKS, train  # noqa: E402

GRID_STEPS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)  # x the family's scale; 9 with none
DEFAULT_TASKS = [t for t in TASKS if TASKS[t].benchmark]
NUDGE = 1.1  # the yardstick's resolution is measured at grid-best x NUDGE and / NUDGE
BASELINES = ["1", "autoclip", "zclip", "none"]  # "1": tau = 1.0
PILOT_FRACTION = 4  # the pilot runs the first 1/PILOT_FRACTION of the steps


def tau_name(tau: float) -> str:
    """A threshold as a method name (and cache key): 6 significant digits."""
    return f"{tau:.6g}"


def grid_methods(task: str) -> list[str]:
    """The grid of a task as method names: "none", then the thresholds, smallest first."""
    return ["none"] + [tau_name(TASKS[task].scale * x) for x in GRID_STEPS]


def _clipper(method: str):
    if method == "none":
        return None
    if method == "autoclip":
        return AutoClip(10.0)
    if method == "zclip":
        return ZClip(0.97, 2.5)
    return Fixed(float(method))


# ----------------------------------------------------------------------------- the on-disk cache


def _cache_file(root: Path, task: str, seed: int, method: str) -> Path:
    return root / "cache" / task / f"s{seed}" / f"{method}.json"


def cached(root: Path, task: str, seed: int, method: str) -> dict | None:
    try:
        return json.loads(_cache_file(root, task, seed, method).read_text())
    except (OSError, ValueError):
        return None


def store(root: Path, task: str, seed: int, method: str, value: dict) -> None:
    f = _cache_file(root, task, seed, method)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value))
    tmp.replace(f)  # atomic: a killed run never leaves half a result


def _train_job(job):
    """One training (or the untrained model's loss: method "untrained"), from the cache if done."""
    root, task, seed, method = job
    hit = cached(root, task, seed, method)
    if hit is None:
        t0 = time.time()
        if method == "untrained":
            v = train(task, seed, None, stop_at=0)
        else:
            v = train(task, seed, _clipper(method))
        hit = {"final": v if math.isfinite(v) else None, "seconds": round(time.time() - t0, 3)}
        store(root, task, seed, method, hit)
    v = hit["final"]
    return task, seed, method, (math.inf if v is None else float(v))


# ----------------------------------------------------------------------------- pilots, recommend, tune


def _gradscope(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradscope", *args], cwd=cwd, capture_output=True, text=True)


def _task_args(task: str, seed: int) -> list[str]:
    return [str(HERE / "tasks.py"), "--task", task, "--seed", str(seed)]


def _pilot_complete(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "meta.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def _recommend_job(job):
    """Record the unclipped pilot (kept: reused when already complete) and ask for a threshold."""
    root, task, seed = job
    run_dir = root / "pilots" / f"{task}-s{seed}"
    key = f"recommend-{_analysis_fingerprint()}"  # the answer of this very analysis code on this pilot
    if _pilot_complete(run_dir):
        hit = cached(root, task, seed, key)
        if hit is not None:
            return task, seed, hit
    else:
        p = _gradscope("run", "--quiet", "--force", "--out", str(run_dir), *_task_args(task, seed),
                       "--stop-at", str(TASKS[task].steps // PILOT_FRACTION), cwd=root)
        if p.returncode != 0:
            return task, seed, {"error": f"pilot failed: {p.stderr.strip()[-300:]}"}
    r = _gradscope("recommend", str(run_dir), "--json", cwd=root)
    if r.returncode != 0:
        return task, seed, {"error": f"recommend failed: {r.stderr.strip()}"}
    doc = json.loads(r.stdout)
    hit = {"tau": doc["recommended_clip_norm"], "situation": doc.get("situation"),
           "range": doc.get("recommended_range"), "confident": doc.get("confident"),
           "reasons": doc.get("confidence_reasons"), "g0": _first_norm(run_dir)}
    store(root, task, seed, key, hit)
    return task, seed, hit


def _analysis_fingerprint() -> str:
    """A digest of the analysis code and its shipped settings: a cached recommendation is reused
    only while both are unchanged."""
    import hashlib

    import gradscope.analysis
    import gradscope.configs

    h = hashlib.sha256()
    for d in (Path(gradscope.analysis.__file__).parent, Path(gradscope.configs.__file__).parent):
        for f in sorted(d.glob("*.py")) + sorted(d.glob("*.yaml")):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def _tune_fingerprint() -> str:
    """A digest of tune's code (its orchestration and its decisions): a cached tune result is
    reused only while both are unchanged."""
    import hashlib

    import gradscope.analysis.tune
    import gradscope.tune

    h = hashlib.sha256()
    for mod in (gradscope.tune, gradscope.analysis.tune):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:12]


def _first_norm(run_dir: Path) -> float | None:
    """The pilot's first gradient norm, read straight from the steps file (the task's norm scale)."""
    try:
        import csv
        with open(next(run_dir.glob("steps-r*.csv"))) as f:
            return float(next(csv.DictReader(f))["grad_norm"])
    except (StopIteration, OSError, ValueError, KeyError):
        return None


def _method(tau: float | None) -> str:
    """The training a picked threshold asks for: exactly tau, or none (tune may keep the script
    as it is, which here does not clip: recommended_clip_norm null)."""
    return "none" if tau is None else repr(float(tau))


def tune_available(root: Path) -> bool:
    return _gradscope("tune", "--help", cwd=root).returncode == 0


def _tune_job(job):
    """`gradscope tune` at its default budget; its directory is kept, so a rerun resumes it."""
    root, task, seed, jobs = job
    # a task whose script reports its held-out loss while it trains is tuned as a user would tune
    # it: ranked by that metric (issue 22's `--metric`); every other task by its training loss
    metric = ["--metric", "heldout_loss"] if TASKS[task].eval_every else []
    key = f"tune-{_tune_fingerprint()}" + ("-metric" if metric else "")  # this very tune code's result
    hit = cached(root, task, seed, key)
    if hit is not None:
        return task, seed, hit
    out = root / "tune" / f"{task}-s{seed}"
    t0 = time.time()
    p = _gradscope("tune", "--steps", str(TASKS[task].steps), "--jobs", str(jobs), "--out", str(out), "--json",
                   *metric, *_task_args(task, seed), cwd=root)
    if p.returncode != 0:
        return task, seed, {"error": f"tune failed ({p.returncode}): {p.stderr.strip()[-300:]}"}
    doc = json.loads(p.stdout)
    hit = {"tau": doc["recommended_clip_norm"], "choice": doc.get("choice"), "budget_spent": doc.get("budget_spent"),
           "seconds": round(time.time() - t0, 1)}
    store(root, task, seed, key, hit)
    return task, seed, hit


# ----------------------------------------------------------------------------- the table


def recommend_else_tune(rec: dict, tune: dict) -> dict:
    """The advice as a user would take it: recommend's number when it is confident, else what
    tune measured (the command recommend prints then). Only where both ran."""
    return {k: (r if r.get("confident") is not False else tune[k]) for k, r in rec.items() if k in tune}


def grid_best(sets, grid, init):
    """{(set, task): the grid method with the best mean loss over the set's seeds}."""
    best = {}
    for set_name, (tasks, seeds) in sets.items():
        for t in tasks:
            def mean_at(m):
                return _mean([_scored(grid[(t, s, m)], init[(t, s)]) for s in seeds])
            best[(set_name, t)] = min(grid_methods(t), key=mean_at)
    return best


def nudged(tau: str) -> list[str]:
    """The thresholds NUDGE either way of a grid-best tau ("none" has no neighbours)."""
    return [] if tau == "none" else [tau_name(float(tau) * NUDGE), tau_name(float(tau) / NUDGE)]


def neighbours(task: str, tau: str) -> list[str]:
    """The grid thresholds on either side of a grid-best tau (2-2.5x away); none for "none"."""
    taus = grid_methods(task)[1:]
    if tau not in taus:
        return []
    i = taus.index(tau)
    return taus[max(0, i - 1):i] + taus[i + 1:i + 2]


def _scored(v: float, untrained: float) -> float:
    """A final loss as the table counts it: diverged (inf) when non-finite or no better than untrained."""
    return math.inf if not math.isfinite(v) or v >= untrained else v


def summarize(sets, grid, init, picked, methods):
    """Per set (design / held-out families) and task: grid-best, and each method's mean loss ratio
    and diverged seeds. picked: {"recommend": {(task, seed): {"tau", "final", ...}}, "tune": ...};
    "nudged" is the worse of grid-best x NUDGE and / NUDGE (grid holds those runs too)."""
    bests = grid_best(sets, grid, init)
    out = {}
    for set_name, (tasks, seeds) in sets.items():
        rows = {}
        for t in tasks:
            def losses(fn):
                return [_scored(fn(s), init[(t, s)]) for s in seeds]

            def at(m):
                return losses(lambda s: grid[(t, s, m)])

            best_m = bests[(set_name, t)]
            best = _mean(at(best_m))
            row = {"grid_best_tau": best_m, "grid_best_loss": best, "methods": {}}
            for name, per in picked.items():
                if all((t, s) in per for s in seeds):
                    row["methods"][name] = row_of(losses(lambda s: per[(t, s)].get("final", math.inf)), best)
                    row[f"{name}_tau"] = [per[(t, s)].get("tau") for s in seeds]
            row["methods"].update({m: row_of(at(m), best) for m in methods})
            side = [row_of(at(m), best) for m in neighbours(t, best_m)]
            if side:  # is the task discriminating: what a threshold 2-2.5x off the best costs
                row["methods"]["neighbours"] = max(side, key=lambda r: r["ratio"])
            near = [row_of(at(m), best) for m in nudged(best_m) if all((t, s, m) in grid for s in seeds)]
            if near:  # no clipping as the grid-best has no neighbours to nudge to
                row["methods"]["nudged"] = max(near, key=lambda r: r["ratio"])
            rec = picked.get("recommend", {})
            row["situation"] = [rec.get((t, s), {}).get("situation") for s in seeds]
            row["confident"] = [rec.get((t, s), {}).get("confident") for s in seeds]
            tune = picked.get("tune", {})
            spent = [tune[(t, s)].get("budget_spent") for s in seeds if (t, s) in tune]
            row["tune_budget_spent"] = spent if len(spent) == len(seeds) else []
            rows[t] = row
        out[set_name] = rows
    return out


def row_of(vals, best):
    return {"ratio": _mean(vals) / best, "diverged": sum(1 for v in vals if not math.isfinite(v))}


def _mean(vals):
    return math.inf if any(not math.isfinite(v) for v in vals) else sum(vals) / len(vals)


PICKED = ("recommend", "tune", "recommend, else tune")  # methods that pick a tau per seed
LABEL = {"1": "tau=1.0", "autoclip": "AutoClip p10", "zclip": "ZClip", "none": "no clipping",
         "nudged": "grid-best ±10%", "neighbours": "grid-best's neighbours"}


def render(summary, methods) -> str:
    lines = []
    for set_name, rows in summary.items():
        present = {n for r in rows.values() for n in r["methods"]}
        names = ([n for n in PICKED if n in present] + methods
                 + [n for n in ("neighbours", "nudged") if n in present])
        lines.append(f"\n{set_name}: final held-out loss / grid-best (diverged seeds)\n")
        head = ("| task | grid-best tau | recommended tau (situation; seeds not confident); tuned tau | "
                + " | ".join(LABEL.get(n, n) for n in names) + (" | tune compute (runs) |" if "tune" in names else " |"))
        lines += [head, "|" + "---|" * (3 + len(names) + ("tune" in names))]
        worst = {n: 0.0 for n in names}
        div = {n: 0 for n in names}
        for t, row in rows.items():
            cells = []
            for n in names:
                m = row["methods"].get(n)
                if m is None:
                    cells.append("-")
                    continue
                worst[n] = max(worst[n], m["ratio"])
                div[n] += m["diverged"]
                cells.append(f"{m['ratio']:.3f} ({m['diverged']})")
            taus = ", ".join(f"{x:.3g}" if x is not None else "-" for x in row.get("recommend_tau", []))
            sits = sorted({s for s in row["situation"] if s})
            unsure = sum(1 for c in row["confident"] if c is False)
            note = f"; {unsure} of {len(row['confident'])}" if unsure else ""
            if "tune" in row["methods"]:
                note += "); tune " + ", ".join(f"{x:.3g}" if x is not None else "none" for x in row["tune_tau"])
            if "tune" in names:
                spent = row["tune_budget_spent"]
                cells.append(f"{max(spent):.2f}" if spent and None not in spent else "-")
            shown = f"{taus} ({', '.join(sits)}{note}" + ("" if "tune" in row["methods"] else ")")
            if not taus and not sits and "tune" not in row["methods"]:
                shown = "-"  # no advice asked for (--grid-only)
            lines.append(f"| {t} | {row['grid_best_tau']} | {shown} | " + " | ".join(cells) + " |")
        tail = " | " if "tune" in names else ""
        worst_spent = [x for r in rows.values() for x in r["tune_budget_spent"] if x is not None]
        if "tune" in names:
            tail += f"**{max(worst_spent):.2f}**" if worst_spent else "-"
        lines.append("| **worst** | | | " + " | ".join(f"**{worst[n]:.3f}** ({div[n]})" for n in names)
                     + (tail + " |" if tail else " |"))
    return "\n".join(lines)


def family_sets(tasks: list[str], seeds: list[int]) -> dict:
    """The tables' sets: {"design families": (tasks, seeds), "held-out families": (...)}, each
    only when it has a task (the held-out families, tasks.HELDOUT_FAMILIES, are reported apart:
    gru_warmup and noisy_mlp since issue 22; vae and gcn are design families now)."""
    sets = {}
    design = [t for t in tasks if t not in HELDOUT_FAMILIES]
    heldout = [t for t in tasks if t in HELDOUT_FAMILIES]
    if design:
        sets["design families"] = (design, seeds)
    if heldout:
        sets["held-out families"] = (heldout, seeds)
    return sets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel trainings")
    ap.add_argument("--out", default=str(HERE / "results"),
                    help="results, cache, pilots and tune directories (reused: a rerun resumes)")
    ap.add_argument("--no-tune", action="store_true", help="leave `gradscope tune` out")
    ap.add_argument("--tune-tasks", default=None, help="run `gradscope tune` on these tasks only (default: all)")
    ap.add_argument("--tune-jobs", type=int, default=1, help="`gradscope tune --jobs`: its probes in parallel")
    ap.add_argument("--no-nudged", action="store_true", help="leave the grid-best x1.1 and /1.1 column out")
    ap.add_argument("--grid-only", action="store_true",
                    help="only the untrained, grid and baseline trainings: no pilot, recommend or tune (a new "
                         "family's grid, checked before anything about the advice on it is known); "
                         "results.json and table.md are left as they are")
    a = ap.parse_args(argv)
    os.nice(10)  # a benchmark on a shared machine: the others' work goes first
    tasks = [t for t in a.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    seeds = [int(s) for s in a.seeds.split(",") if s]
    sets = family_sets(tasks, seeds)
    root = Path(a.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with_tune = not a.no_tune and not a.grid_only and tune_available(root)

    jobs = [(root, t, s, m) for t in tasks for s in seeds
            for m in dict.fromkeys(["untrained", "autoclip", "zclip", "1"] + grid_methods(t))]
    picked: dict[str, dict] = {"recommend": {}}
    tune_tasks = [t for t in (a.tune_tasks.split(",") if a.tune_tasks else tasks) if t in tasks]
    with ThreadPoolExecutor(1) as ex, ThreadPoolExecutor(1) as tex, Pool(max(1, a.jobs)) as pool:
        side = [] if a.grid_only else [("recommend", ex.submit(_recommend_job, (root, t, s)))
                                       for t in tasks for s in seeds]
        if with_tune:  # in a queue of its own: a tune is many short runs, the longest job here
            picked["tune"] = {}
            side += [("tune", tex.submit(_tune_job, (root, t, s, a.tune_jobs))) for t in tune_tasks for s in seeds]
        results = {(t, s, m): v for t, s, m, v in pool.imap_unordered(_train_job, jobs)}
        init = {(t, s): results.pop((t, s, "untrained")) for t in tasks for s in seeds}
        grid = results
        best = grid_best(sets, grid, init)
        extra = [] if a.no_nudged else sorted({(root, t, s, m) for (set_name, t), tau in best.items()
                                               for s in sets[set_name][1] for m in nudged(tau)})
        grid.update({(t, s, m): v for t, s, m, v in pool.imap_unordered(_train_job, extra)})
        finals = []
        for name, f in side:
            t, s, r = f.result()
            if "error" in r:
                print(f"{name} {t} seed {s}: {r['error']}", file=sys.stderr)
                r = {**r, "final": math.inf}
            else:
                finals.append((name, t, s, r))
            picked[name][(t, s)] = r
        runs = sorted({(root, t, s, _method(r["tau"])) for name, t, s, r in finals})
        done = {(t, s, m): v for t, s, m, v in pool.imap_unordered(_train_job, runs)}
        for name, t, s, r in finals:
            r["final"] = done[(t, s, _method(r["tau"]))]

    if with_tune:
        picked["recommend, else tune"] = recommend_else_tune(picked["recommend"], picked["tune"])
    summary = summarize(sets, grid, init, picked, BASELINES)
    table = render(summary, BASELINES)
    print(table)
    pilots = 0 if a.grid_only else len(tasks) * len(seeds)
    print(f"\n({len(jobs) + len(extra) + len(runs)} trainings, {pilots} pilots"
          f"{', tune' if with_tune else ''}; {time.time() - t0:.0f} s this time, cached results reused)")
    if a.grid_only:
        return 0
    (root / "results.json").write_text(json.dumps({
        "summary": summary,
        "heldout_families": sorted(HELDOUT_FAMILIES),
        "grid": [[t, s, m, v] for (t, s, m), v in sorted(grid.items())],
        "init": [[t, s, v] for (t, s), v in sorted(init.items())],
        **{name: [[t, s, r] for (t, s), r in sorted(per.items())] for name, per in picked.items()},
    }, indent=1, default=str))
    (root / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
