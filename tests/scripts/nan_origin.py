"""A small model that goes non-finite at --bad-step in one of several ways (--mode), for --trace-nan.

  sqrt    encoder.1.gate takes the sqrt of negative numbers from then on (forward)
  nanrow  the batch has a NaN row (input)
  l2zero  encoder.1.norm, a hand-written L2 normalisation, gets an exactly-zero row: its forward
          is finite, its gradient NaN (backward)
  l2inline the same L2 normalisation written inline in encoder.1's own forward (backward)
  fp16    encoder.1.gate computes in float16 and overflows to inf (forward)
  loss    the loss takes the log of a negative number (loss)
  none    nothing goes wrong
"""
import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--mode", default="none")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--bad-step", type=int, default=7)
parser.add_argument("--save", default=None)
args = parser.parse_args()


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.broken = False

    def forward(self, x):
        if args.mode == "sqrt":
            return torch.sqrt(x.abs() - (1e3 if self.broken else 0.0))
        if args.mode == "fp16":
            return (x.half() * (1e6 if self.broken else 1.0)).float()
        return torch.tanh(x)


class L2Normalize(nn.Module):
    def forward(self, x):
        n = torch.sqrt((x * x).sum(-1, keepdim=True))  # sqrt(0) = 0 is finite; its gradient is not
        return x / (n + 1e-3)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16, bias=False)
        self.norm = L2Normalize()
        self.gate = Gate()

    def forward(self, x):
        h = self.fc(x)
        if args.mode == "l2inline":
            h = h / (torch.sqrt((h * h).sum(-1, keepdim=True)) + 1e-3)
        else:
            h = self.norm(h)
        return self.gate(h)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16, bias=False), Block(), nn.Linear(16, 1))

    def forward(self, x):
        return self.encoder(x)


torch.manual_seed(0)
model = Net()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for step in range(args.steps):
    bad = step >= args.bad_step
    model.encoder[1].gate.broken = bad
    x = torch.randn(16, 8)
    y = x[:, :1] * 2
    if bad and args.mode == "nanrow" and step == args.bad_step:
        x[3] = float("nan")
    if bad and args.mode in ("l2zero", "l2inline") and step == args.bad_step:
        x[5] = 0.0  # no bias before the normalisation: that row is exactly zero there
    out = model(x)
    loss = nn.functional.mse_loss(out, y)
    if bad and args.mode == "loss":
        loss = torch.log(loss - 1e3)
    opt.zero_grad()
    loss.backward()
    opt.step()
if args.save:
    torch.save(model.state_dict(), args.save)
