"""A tiny seeded training loop for `gradscope run --max-steps`: plain, GradScaler, closure,
DataLoader workers or two optimizers. Saves the weights and the number of steps it made in a
`finally` block, so a run ended by --max-steps still leaves them (and a plain run of N steps
can be compared with it)."""
import argparse
import json

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--mode", default="plain", choices=["plain", "amp", "closure", "workers", "two"])
ap.add_argument("--save", default=None)
args = ap.parse_args()

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.AdamW(model.parameters(), lr=0.01)
opt2 = torch.optim.SGD(model[2].parameters(), lr=0.01) if args.mode == "two" else None
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**18) if args.mode == "amp" else None
done = 0


def batches():
    if args.mode == "workers":
        data = torch.utils.data.TensorDataset(torch.randn(64 * args.steps, 8))
        yield from (b for (b,) in torch.utils.data.DataLoader(data, batch_size=64, num_workers=2))
    else:
        for _ in range(args.steps):
            yield torch.randn(64, 8)


try:
    for x in batches():
        y = x[:, :1] * 2 - x[:, 1:2]
        if args.mode == "closure":
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        elif args.mode == "amp":
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            opt.zero_grad()
            if opt2 is not None:
                opt2.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if opt2 is not None:
                opt2.step()  # created second: optimizer 1, stepped before optimizer 0 each iteration
            opt.step()
        done += 1
finally:
    if args.save:
        torch.save(model.state_dict(), args.save)
        with open(args.save + ".json", "w") as f:
            json.dump({"done": done}, f)
