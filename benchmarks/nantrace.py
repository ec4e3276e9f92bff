"""`--trace-nan` cost: step time with tracing, without, and under torch.autograd.detect_anomaly.

Same process, same model, alternating blocks (as benchmarks/overhead.py does): each round
times one block of steps recorded by gradscope without tracing (the baseline), one with
`trace_nan=True`, and one without tracing inside `torch.autograd.detect_anomaly()`, and the
median of the per-round ratios to the baseline is printed. Recording starts outside the timed
region and is primed by one step and one flush. The clock is the process's CPU time with one
intra-op thread (`--threads 1`, the default), which a machine shared with other jobs disturbs far
less than wall time; `--wall` uses wall time instead.

    python benchmarks/nantrace.py            # ~5M-parameter transformer on CPU, a few minutes
    python benchmarks/nantrace.py --quick    # fewer rounds
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import make_step, transformer  # noqa: E402

import gradscope  # noqa: E402

CLOCK = time.process_time


def block(step, n: int, path: Path, trace: bool, anomaly: bool) -> float:
    with gradscope.record(path, trace_nan=trace) as rec:
        step()
        rec._flush()
        ctx = torch.autograd.detect_anomaly() if anomaly else contextlib.nullcontext()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # detect_anomaly warns that it slows training down
            with ctx:
                t0 = CLOCK()
                for _ in range(n):
                    step()
                t = CLOCK() - t0
    return t / n


def measure(name: str, step, rounds: int, n: int, tmp: Path) -> None:
    base, trace, anomaly = [], [], []
    for r in range(rounds):
        b = block(step, n, tmp / f"{name}-b{r}", False, False)
        t = block(step, n, tmp / f"{name}-t{r}", True, False)
        a = block(step, n, tmp / f"{name}-a{r}", False, True)
        base.append(b)
        trace.append(t / b)
        anomaly.append(a / b)
    med = statistics.median
    print(f"{name}: step {med(base) * 1e3:.2f} ms (recorded without tracing); "
          f"--trace-nan ratio {med(trace):.3f} (min {min(trace):.3f}, max {max(trace):.3f}); "
          f"detect_anomaly ratio {med(anomaly):.3f} (min {min(anomaly):.3f}, max {max(anomaly):.3f}); "
          f"{rounds} rounds x {n} steps", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wall", action="store_true", help="time with the wall clock, not CPU time")
    args = ap.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rounds = 3 if args.quick else 8
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{'wall' if args.wall else 'CPU'} time", flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        vocab = 2000
        model = transformer(vocab=vocab)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        n_params = sum(p.numel() for p in model.parameters())
        step = make_step(model, opt, None, batch=8, seq=64, vocab=vocab, after_backward=[None])
        measure(f"transformer {n_params / 1e6:.1f}M params (5 layers, d=256)", step, rounds, 4 if args.quick else 6, tmp)

        mlp = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(256, 256), torch.nn.GELU())])
        mopt = torch.optim.SGD(mlp.parameters(), lr=1e-3)
        x = torch.randn(64, 256)

        def mlp_step():
            loss = mlp(x).pow(2).mean()
            mopt.zero_grad(set_to_none=True)
            loss.backward()
            mopt.step()

        measure("small MLP (4 x Linear 256 + GELU, batch 64)", mlp_step, rounds, 50, tmp)


if __name__ == "__main__":
    main()
