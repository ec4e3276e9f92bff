"""Bug under Lightning: clipping in on_after_backward runs after every micro-batch's backward,
inside the accumulation window (argv: WEIGHTS). Lightning's own gradient_clip_val is not set."""
import sys

import lightning as L
import torch


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_after_backward(self):
        torch.nn.utils.clip_grad_norm_(self.parameters(), 0.5)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


torch.manual_seed(0)
x = torch.randn(96, 8)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1] * 3), batch_size=8)
model = Tiny()
trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, loader)
torch.save(model.state_dict(), sys.argv[1])
