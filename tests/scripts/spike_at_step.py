"""A stable MLP whose ``body.2.weight`` gradient is multiplied by 1e4 at step 6 (a backward hook).

The step is carried by the data (``batches()`` yields ``(x, y, index)`` with ``index`` counting
from 1 in every pass, and gradclip calls ``batches()`` afresh for every run), so the spike lands
at step 6 of every run. Before it, gradients are ordinary; unclipped, the huge update at step 6
makes the loss explode a step or two later. Clipping at a small max_norm absorbs it.
"""

import torch
from torch import nn

SPIKE_STEP = 6
SPIKE_PARAM = "body.2.weight"
SPIKE_FACTOR = 1e4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)
        self.poisoned = False
        self.body[2].weight.register_hook(lambda g: g * SPIKE_FACTOR if self.poisoned else g)

    def forward(self, x, index):
        self.poisoned = index == SPIKE_STEP
        return self.head(self.body(x)).squeeze(-1)


def build_model():
    return Net()


def batches():
    g = torch.Generator().manual_seed(7)
    for index in range(1, 41):
        x = torch.randn(32, 8, generator=g)
        yield x, x[:, :4].sum(dim=1) - x[:, 4:].sum(dim=1), index


def loss_fn(model, batch):
    x, y, index = batch
    return nn.functional.mse_loss(model(x, index), y)
