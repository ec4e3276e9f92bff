"""Control: Hugging Face Trainer with max_grad_norm and gradient accumulation, on a tiny
randomly initialised model. argv: OUTPUT_DIR"""
import sys

import torch
from transformers import Trainer, TrainingArguments


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 8, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.x[i, :1] * 3}


torch.manual_seed(0)
args = TrainingArguments(
    sys.argv[1], per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.5,
    num_train_epochs=1, learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
    logging_steps=1, disable_tqdm=True, seed=0,
)
model = Tiny()
Trainer(model=model, args=args, train_dataset=Data()).train()
torch.save(model.state_dict(), sys.argv[1] + "/weights.pt")
