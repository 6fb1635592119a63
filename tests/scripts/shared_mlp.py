"""A small MLP whose gradients grow and then settle, for the shared-runs tests: with dropout (random
numbers drawn in the forward pass), a shuffling DataLoader over a dataset shorter than a sweep (so
``batches()`` starts a new pass, and draws a new order, mid-run), Adam with a step schedule, and
``evaluate``. Clipping cells first act at different steps, so some are free, some forked.

Environment knobs (read at import): ``SHARED_MLP_SCALE`` multiplies the targets (larger: larger
gradient norms), ``SHARED_MLP_SAMPLES`` sets the dataset size.
"""

import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SCALE = float(os.environ.get("SHARED_MLP_SCALE", "1.0"))
SAMPLES = int(os.environ.get("SHARED_MLP_SAMPLES", "48"))


def build_model():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))


def build_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=0.05)


def build_scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.7)


_g = torch.Generator().manual_seed(3)
_x = torch.randn(SAMPLES, 6, generator=_g)
_y = (_x[:, :1] * 2.0 - _x[:, 1:2] + 0.3 * torch.randn(SAMPLES, 1, generator=_g)) * SCALE


def batches():
    return DataLoader(TensorDataset(_x, _y), batch_size=8, shuffle=True)


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def evaluate(model):
    return float(((model(_x) - _y) ** 2).mean())
