"""Hugging Face Trainer with a DeepSpeed config (ZeRO 2, gradient_clipping "auto" = max_grad_norm).

Run under torchrun with 2 ranks (gloo, CPU). A tiny model with random weights; a callback keeps
the full weights at each optimizer step's beginning, the model keeps the micro-batches this rank
fed it, and at the step's end the ranks exchange their micro-batches so that each computes the
float64 global pre-clip norm, (1/world) * sum over ranks and micro-batches of grad(loss / accum).

    hf_deepspeed.py OUT   ->  OUT/ref-r<rank>.json {norms, losses, hf_norms, max_grad_norm, steps}
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

MAX_GRAD_NORM = 2.0  # within the norms (about 1.5 to 2.3): some steps clip, some do not
STEPS = 6
ACCUM = 2
BATCH = 4
D_IN, D_H, D_OUT = 10, 16, 2


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D_IN, D_H), nn.Tanh(), nn.Linear(D_H, D_OUT))
        self.fed: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, labels=None):
        if self.training and torch.is_grad_enabled():
            self.fed.append((x.detach().clone(), labels.detach().clone()))
        out = self.body(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, D_IN, generator=g)
        self.y = torch.randn(n, D_OUT, generator=g) * 2

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Reference(TrainerCallback):
    def __init__(self, model: Tiny) -> None:
        self.model = model
        self.norms: list[float] = []
        self.losses: list[float] = []
        self.weights = None

    def on_step_begin(self, args, state, control, **kw):
        self.model.fed.clear()
        self.weights = {k: v.detach().double().clone() for k, v in self.model.body.state_dict().items()}

    def on_step_end(self, args, state, control, **kw):
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, list(self.model.fed))
        ref = nn.Sequential(nn.Linear(D_IN, D_H), nn.Tanh(), nn.Linear(D_H, D_OUT)).double()
        ref.load_state_dict(self.weights)
        params = list(ref.parameters())
        total = [torch.zeros_like(p) for p in params]
        mine = 0.0
        for r, fed in enumerate(everyone):
            assert len(fed) == ACCUM, len(fed)
            for x, y in fed:
                loss = nn.functional.mse_loss(ref(x.double()), y.double()) / ACCUM
                for t, g in zip(total, torch.autograd.grad(loss, params)):
                    t += g / len(everyone)
                if r == dist.get_rank():
                    mine += float(loss)
        self.norms.append(math.sqrt(sum(float((t * t).sum()) for t in total)))
        self.losses.append(mine)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Tiny()
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",  # the Trainer fills in max_grad_norm
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    args = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
        max_steps=STEPS, learning_rate=0.05, max_grad_norm=MAX_GRAD_NORM, logging_steps=1, save_strategy="no",
        report_to=[], deepspeed=ds_config, use_cpu=True, dataloader_num_workers=0, seed=0, lr_scheduler_type="constant",
    )
    cb = Reference(model)
    trainer = Trainer(model=model, args=args, train_dataset=Data(BATCH * ACCUM * 2 * STEPS), callbacks=[cb])
    trainer.train()
    hf = [r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r]
    (out / f"ref-r{dist.get_rank()}.json").write_text(json.dumps(
        {"norms": cb.norms, "losses": cb.losses, "hf_norms": hf, "max_grad_norm": MAX_GRAD_NORM,
         "steps": STEPS}))


if __name__ == "__main__":
    main()
