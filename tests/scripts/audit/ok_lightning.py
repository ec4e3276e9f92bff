"""Control: PyTorch Lightning with gradient accumulation and gradient_clip_val (it clips inside
optimizer.step(closure), after the window's last backward). argv: WEIGHTS ACCUM [ALGORITHM]"""
import sys

import lightning as L
import torch

weights, accum = sys.argv[1], int(sys.argv[2])
algorithm = sys.argv[3] if len(sys.argv) > 3 else "norm"


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


torch.manual_seed(0)
x = torch.randn(96, 8)
data = torch.utils.data.TensorDataset(x, x[:, :1] * 3)
loader = torch.utils.data.DataLoader(data, batch_size=8)
model = Tiny()
trainer = L.Trainer(
    accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=accum, gradient_clip_val=0.5,
    gradient_clip_algorithm=algorithm, logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(model, loader)
torch.save(model.state_dict(), weights)
