"""Recorder overhead: step time with and without gradscope, same process, alternating blocks.

Whole-process timings on shared machines drift by several percent, so each
configuration alternates blocks of steps with recording off and on (the Python
API, `gradscope.record`) and reports the median of the paired on/off ratios.
Recording starts and stops outside the timed region, and each recording is primed
(one step and one flush) before its block, so that the one-time parameter naming is
reported apart; the regular flushes happen inside the block at their real frequency.

    python benchmarks/overhead.py              # ~5M-parameter transformer on CPU, ~3 minutes
    python benchmarks/overhead.py --quick      # fewer blocks, for a smoke test

Then the DDP case: 2 ranks under torchrun (benchmarks/overhead_ddp.py; --no-ddp skips it).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gradscope


def transformer(vocab: int = 2000, d: int = 256, layers: int = 5) -> torch.nn.Module:
    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, d)
            block = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
            self.head = torch.nn.Linear(d, vocab)

        def forward(self, x):
            return self.head(self.encoder(self.embed(x)))

    return LM()


def make_step(model, opt, clip: float | None, batch: int, seq: int, vocab: int, after_backward: list):
    """after_backward: a one-slot list; when it holds a callable, the step calls it after
    backward (the yardstick below)."""
    x = torch.randint(0, vocab, (batch, seq))
    y = torch.randint(0, vocab, (batch, seq))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward[0] is not None:
            after_backward[0]()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    return step


@contextlib.contextmanager
def recording(path: Path, step):
    """gradscope.record, primed: one step and one flush before timing, so that the one-time
    parameter naming at the first flush (measured apart below) is not charged to the block."""
    with gradscope.record(path) as rec:
        yield lambda: (step(), rec._flush())


def start_cost_ms(step, path: Path, repeats: int = 3) -> float:
    """One-time cost of a recording's first step and flush (finding the parameter names)."""
    costs = []
    for i in range(repeats):
        t_plain = timed_block(step, 1)
        with gradscope.record(path / f"start{i}") as rec:
            t0 = time.perf_counter()
            step()
            rec._flush()
            costs.append(time.perf_counter() - t0 - t_plain)
    return statistics.median(costs) * 1e3


@contextlib.contextmanager
def foreach_norm_pass(model, after_backward: list):
    """The yardstick: the same step plus one bare torch._foreach_norm pass over the gradients
    (what the recorder must at least do when the script does not clip)."""
    params = list(model.parameters())
    after_backward[0] = lambda: torch._foreach_norm([p.grad for p in params if p.grad is not None])
    try:
        yield
    finally:
        after_backward[0] = None


def timed_block(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t0


def paired_ratios(step, pairs: int, block: int, turn_on) -> list[float]:
    """turn_on(tag) is a context manager that switches the measured thing on and may yield a
    callable that pays its one-time costs before the timed block."""
    for _ in range(3):  # warm-up: allocator, thread pools, first-call paths
        step()
    ratios = []
    for i in range(pairs):
        off = timed_block(step, block)
        with turn_on(f"run{i}") as prime:
            if prime:
                prime()
            on = timed_block(step, block)
        # alternate which comes first so a slow drift cancels out
        if i % 2:
            with turn_on(f"run{i}b") as prime:
                if prime:
                    prime()
                on2 = timed_block(step, block)
            off2 = timed_block(step, block)
            ratios.append((on + on2) / (off + off2))
        else:
            ratios.append(on / off)
    return ratios


def _spread(ratios: list[float]) -> str:
    return (f"{statistics.median(ratios):.4f} (pairs {len(ratios)}, min {min(ratios):.4f}, "
            f"max {max(ratios):.4f})")


def fixed_cost_us(workdir: Path, steps: int = 2000) -> tuple[float, float]:
    """Per-step cost on a model too small to hide anything: absolute µs added."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 4)

    def step():
        loss = model(x).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(200):
        step()
    offs, ons = [], []
    for i in range(5):
        offs.append(timed_block(step, steps) / steps)
        with gradscope.record(workdir / f"tiny{i}") as rec:
            step()
            rec._flush()  # primed, as above: the one-time parameter naming is not a per-step cost
            ons.append(timed_block(step, steps) / steps)
    off, on = statistics.median(offs), statistics.median(ons)
    return off * 1e6, (on - off) * 1e6


def _print_tiny(work: Path) -> None:
    base, extra = fixed_cost_us(work)
    print(f"tiny model (Linear 4x4): {base:.0f} us/step without, +{extra:.0f} us/step with recording "
          f"({extra / base:.2f}x the bare step)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-ddp", action="store_true", help="skip the 2-process DDP case (overhead_ddp.py)")
    ap.add_argument("--tiny", action="store_true", help="only the fixed per-step cost on the tiny model")
    args = ap.parse_args()
    if args.tiny:
        with tempfile.TemporaryDirectory() as tmp:
            _print_tiny(Path(tmp))
        return
    if args.quick:
        args.pairs, args.block = 4, 5

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for clip in (None, 1.0):
            torch.manual_seed(0)
            model = transformer()
            n = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            hook = [None]
            step = make_step(model, opt, clip, args.batch, args.seq, 2000, hook)
            ratios = paired_ratios(step, args.pairs, args.block, lambda tag: recording(work / f"{clip}-{tag}", step))
            label = "script clips (clip_grad_norm_ 1.0)" if clip else "script does not clip"
            print(f"{n / 1e6:.1f}M params, {label}: median ratio with/without {_spread(ratios)}")
            if clip is None:
                print(f"{n / 1e6:.1f}M params, once per run: first step and flush (naming the parameters) "
                      f"+{start_cost_ms(step, work):.0f} ms")
                yard = paired_ratios(step, args.pairs, args.block, lambda tag: foreach_norm_pass(model, hook))
                print(f"{n / 1e6:.1f}M params, yardstick: one bare torch._foreach_norm pass per step, "
                      f"median ratio {_spread(yard)}")
        _print_tiny(work)
    if not args.no_ddp:
        # DDP: two ranks under torchrun, in their own processes (benchmarks/overhead_ddp.py).
        ddp = [sys.executable, str(Path(__file__).with_name("overhead_ddp.py"))]
        if args.quick:
            ddp += ["--blocks", "6", "--steps", "5"]
        sys.stdout.flush()
        subprocess.run(ddp, check=False)


if __name__ == "__main__":
    main()
