"""Recording overhead under DeepSpeed ZeRO: 2 ranks (gloo, CPU), a small transformer, blocks on/off.

    python benchmarks/overhead_deepspeed.py [--stage 2] [--blocks 30] [--steps 10]

The engine clips (``"gradient_clipping": 1.0``) and gradscope records DeepSpeed's own global norm.

Relaunches itself under ``python -m torch.distributed.run --nproc-per-node 2``.
Inside each rank, blocks of steps alternate between recording (``with
gradscope.record(...)``) and not, so drift in machine load hits both equally;
the first step of each block is dropped. Rank 0 prints the median step time
with and without recording and their ratio.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    args, _ = ap.parse_known_args()
    if "LOCAL_RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(port), __file__, *sys.argv[1:]]
        return subprocess.call(cmd)
    return bench(args)


def bench(args) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist

    import gradscope

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    d = args.d_model
    layer = torch.nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, batch_first=True, dropout=0.0)
    model = torch.nn.Sequential(torch.nn.Embedding(1000, d), torch.nn.TransformerEncoder(layer, args.layers),
                                torch.nn.Linear(d, 1000))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": args.stage}, "steps_per_print": 10**9}
    model, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    gen = torch.Generator().manual_seed(rank)
    n_params = sum(p.numel() for p in model.parameters())

    def step():
        x = torch.randint(0, 1000, (8, 64), generator=gen)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 1000), x.roll(1, 1).reshape(-1))
        model.backward(loss)
        model.step()

    for _ in range(5):  # warm-up
        step()
    times = {False: [], True: []}
    # one path on every rank (one machine): rank 0 prepares it, each rank writes its own files
    root = os.path.join(tempfile.gettempdir(), f"gradscope-deepspeed-bench-{os.environ.get('MASTER_PORT', '0')}")
    for b in range(args.blocks):
        on = b % 2 == 1
        ctx = gradscope.record(os.path.join(root, f"block{b}"), force=True) if on else nullcontext()
        with ctx:
            dist.barrier()
            for i in range(args.steps):
                t0 = time.perf_counter()
                step()
                if i:
                    times[on].append(time.perf_counter() - t0)
        dist.barrier()
    if rank == 0:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"DeepSpeed ZeRO-{args.stage} 2 ranks (gloo, CPU), transformer d={args.d_model} x{args.layers}, {n_params / 1e6:.2f}M params, "
              f"{args.blocks} blocks x {args.steps} steps")
        print(f"median step: without {off * 1e3:.2f} ms, with gradscope {on * 1e3:.2f} ms, ratio {on / off:.3f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
