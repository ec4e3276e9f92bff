"""No optimizer: clip, then update by hand (PyTorch's word_language_model example does this)."""
import json
import sys

import torch

torch.manual_seed(0)
model = torch.nn.LSTM(4, 8)
head = torch.nn.Linear(8, 4)
params = list(model.parameters()) + list(head.parameters())
lr, clip = 5.0, 0.25
ref = {"grad_norm": [], "loss": []}
for it in range(12):
    x = torch.randn(5, 3, 4)
    out, _ = model(x)
    loss = torch.nn.functional.mse_loss(head(out), x)
    for p in params:
        p.grad = None
    loss.backward()
    ref["grad_norm"].append(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params)).item())
    ref["loss"].append(loss.item())
    torch.nn.utils.clip_grad_norm_(params, clip)
    for p in params:
        p.data.add_(p.grad, alpha=-lr)
with open(sys.argv[1], "w") as f:
    json.dump(ref, f)
