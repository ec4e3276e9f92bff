"""torch.compile'd model whose forward fills and zeroes buffers (the clip audit patches Tensor.zero_/fill_),
clipped with clip_grad_norm_ at 1.0. argv: BACKEND WEIGHTS."""
import torch
import sys
torch.manual_seed(0)
class M(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.l = torch.nn.Linear(8, 8)
    def forward(s, x):
        buf = torch.empty(x.shape[0], 8).fill_(0.5)
        z = torch.empty(x.shape[0], 8)
        z.zero_()
        return s.l(x) + buf + z
m = M()
cm = torch.compile(m, backend=sys.argv[1])
opt = torch.optim.SGD(m.parameters(), lr=0.1)
for i in range(20):
    x = torch.randn(4, 8)
    loss = cm(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
torch.save(m.state_dict(), sys.argv[2])
