"""A plain loop whose second layer's gradient jumps 10,000-fold at one step (a hook), as a bad
batch would make it; it clips, so training goes on."""

import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--spike-at", type=int, default=8)
parser.add_argument("--steps", type=int, default=12)
args = parser.parse_args()

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
step = 0
model[2].weight.register_hook(lambda g: g * 1e4 if step + 1 == args.spike_at else g)
for _ in range(args.steps):
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    step += 1
