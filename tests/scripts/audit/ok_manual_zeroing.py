"""Control: gradients reset by hand, never through zero_grad(): p.grad = None, p.grad.zero_(),
p.grad.data.zero_() and torch._foreach_zero_, one after the other."""
import sys

import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for step in range(24):
    x = torch.randn(32, 8)
    loss = torch.nn.functional.mse_loss(model(x), x[:, :1] * 3)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    way = step % 4
    for p in model.parameters():
        if way == 0:
            p.grad = None
        elif way == 1:
            p.grad.zero_()
        elif way == 2:
            p.grad.data.zero_()
    if way == 3:
        torch._foreach_zero_([p.grad for p in model.parameters()])
if len(sys.argv) > 1:
    torch.save(model.state_dict(), sys.argv[1])
