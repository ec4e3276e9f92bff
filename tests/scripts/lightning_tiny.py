"""A tiny PyTorch Lightning training (AdamW, accumulate_grad_batches=2, 6 optimizer steps).

argv: CLIP MAX_STEPS WEIGHTS. CLIP is Lightning's gradient_clip_val ("none" for no clipping);
MAX_STEPS is Trainer(max_steps=...) (-1: the whole epoch); the final weights are saved to
WEIGHTS, also when the training is stopped from outside (gradscope run --max-steps).
"""
import sys
import warnings

import lightning as L
import torch

warnings.simplefilter("ignore")
clip = None if sys.argv[1] == "none" else float(sys.argv[1])
max_steps, save = int(sys.argv[2]), sys.argv[3]


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)


g = torch.Generator().manual_seed(1)
x = torch.randn(96, 8, generator=g)
y = x[:, :1] * 3
torch.manual_seed(0)
model = Tiny()
trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, max_steps=max_steps, accumulate_grad_batches=2,
                    gradient_clip_val=clip, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                    enable_model_summary=False)
try:
    trainer.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8))
finally:
    torch.save(model.state_dict(), save)
