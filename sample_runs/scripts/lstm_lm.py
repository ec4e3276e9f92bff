"""A character-level LSTM language model trained with SGD and a too-hot learning rate.

The learning rate warms up to 50 over 100 steps (SGD, momentum 0.9). Without
clipping the updates overshoot, the logits run away and the hand-written softmax
overflows: the loss turns inf/NaN a few dozen steps in. `--clip-norm` clips with
clip_grad_norm_ at that threshold. CPU, seeded, a few seconds.

    gradscope run sample_runs/scripts/lstm_lm.py                           # explodes to NaN
    gradscope run sample_runs/scripts/lstm_lm.py --lr 3 --clip-norm 100    # never clips
    gradscope run sample_runs/scripts/lstm_lm.py --clip-norm 0.01          # always clips
"""
import argparse
import math

import torch
import torch.nn as nn

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of "
    "such a man may be on his first entering a neighbourhood, this truth is so well fixed "
    "in the minds of the surrounding families, that he is considered the rightful property "
    "of some one or other of their daughters. "
) * 4


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab: int, embed: int = 32, hidden: int = 128, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        h, _ = self.lstm(self.embed(x))
        return self.head(h)


def naive_cross_entropy(logits, targets):
    # Softmax written out by hand, as many research codebases do: exp() overflows to
    # inf once a logit passes ~88 (float32), and the loss and gradients turn inf/NaN.
    # F.cross_entropy would subtract the max first and never overflow.
    probs = logits.exp() / logits.exp().sum(-1, keepdim=True)
    return -probs.gather(-1, targets.unsqueeze(-1)).log().mean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=50.0, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warmup steps")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--clip-norm", type=float, default=None, help="clip_grad_norm_ max_norm (default: no clipping)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and reproducible
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT])
    model = LSTMLanguageModel(len(chars))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))

    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.ctx - 1, (args.batch,))
        x = torch.stack([data[s : s + args.ctx] for s in starts])
        y = torch.stack([data[s + 1 : s + args.ctx + 1] for s in starts])
        loss = naive_cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
        opt.step()
        warmup.step()
        value = loss.item()
        if step % 25 == 0 or step == args.steps - 1 or not math.isfinite(value):
            print(f"step {step:4d}  loss {value:.3f}", flush=True)
        if not math.isfinite(value):
            print(f"loss is {value} at step {step}: training diverged", flush=True)
            break


if __name__ == "__main__":
    main()
