"""A Lightning script: Trainer(gradient_clip_val=...) on a small regression module, data made
here. Prints one line per optimizer step from on_before_optimizer_step: step, loss, the
pre-clip L2 norm (Lightning clips after that hook)."""

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

parser = argparse.ArgumentParser()
parser.add_argument("--max-steps", type=int, default=20)
parser.add_argument("--clip", type=float, default=0.5)
args = parser.parse_args()


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
        self.last_loss = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.last_loss = loss.item()
        return loss

    def on_before_optimizer_step(self, optimizer):
        grads = torch.cat([p.grad.double().flatten() for p in self.parameters()])
        step = self.trainer.global_step + 1
        print(f"step {step} loss {self.last_loss:.10g} norm {float(torch.linalg.vector_norm(grads)):.10g}", flush=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main():
    L.seed_everything(3, verbose=False)
    x = torch.randn(320, 5)
    y = x.sum(dim=1, keepdim=True).sin() * 4
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    trainer = L.Trainer(
        max_steps=args.max_steps,
        gradient_clip_val=args.clip,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), loader)


if __name__ == "__main__":
    main()
