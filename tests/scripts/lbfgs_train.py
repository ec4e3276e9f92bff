"""A closure optimizer: LBFGS calls backward() inside step()."""
import json
import sys

import torch

torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
x, y = torch.randn(32, 3), torch.randn(32, 1)
ref = {"loss": []}
for _ in range(5):
    first = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        first.append(loss.item())
        return loss

    opt.step(closure)
    ref["loss"].append(first[0])
with open(sys.argv[1], "w") as f:
    json.dump(ref, f)
