"""Mixed precision (fp16 autocast) with a GradScaler whose first steps overflow and are skipped.

The scaler starts at 2**40: the scaled gradients overflow float16, the scaler
skips those updates and halves its scale until they fit, then training proceeds.
Skipped steps are harmless (nothing was applied); `gradscope check` passes.
A small MLP classifies points of two interleaved spirals. CPU, seeded, seconds.

    gradscope run sample_runs/scripts/amp_fp16.py
"""
import argparse
import math

import torch
import torch.nn as nn


def spirals(n: int, generator: torch.Generator):
    t = torch.rand(n, generator=generator) * 3 * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    r = t / (3 * math.pi)
    angle = t + label * math.pi
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1)
    return x + 0.02 * torch.randn(n, 2, generator=generator), label


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--init-scale", type=float, default=2.0**40)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and reproducible
    gen = torch.Generator().manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(2, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 2))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=args.init_scale)
    loss_fn = nn.CrossEntropyLoss()

    for step in range(args.steps):
        x, y = spirals(args.batch, gen)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  loss scale 2**{math.log2(scaler.get_scale()):.0f}", flush=True)


if __name__ == "__main__":
    main()
