"""A tiny Lightning fit (random data, seeded) that logs train_loss every step and val_loss every 4
batches, and writes what Lightning handed its callbacks to argv[1] as (step after, value) pairs.
It does not import gradscope: under `gradscope run` its self.log names are recorded unchanged."""
import json
import sys
import warnings

import lightning as L
import torch

seen = {"train_loss": [], "val_loss": []}


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Watch(L.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        seen["train_loss"].append((trainer.global_step - 1, float(trainer.callback_metrics["train_loss"])))

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            seen["val_loss"].append((trainer.global_step - 1, float(trainer.callback_metrics["val_loss"])))


g = torch.Generator().manual_seed(1)
x = torch.randn(64, 8, generator=g)
y = x[:, :1] * 2 + torch.randn(64, 1, generator=g) * 0.1
def make(s):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[s], y[s]), batch_size=8)
torch.manual_seed(0)
trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, val_check_interval=4, logger=False,
                    enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                    num_sanity_val_steps=1, default_root_dir=sys.argv[2], callbacks=[Watch()])
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trainer.fit(Tiny(), make(slice(0, 64)), make(slice(0, 16)))
with open(sys.argv[1], "w") as f:
    json.dump(seen, f)
