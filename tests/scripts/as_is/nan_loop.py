"""A plain loop whose gradient goes NaN at a given step (a poisoned hook on one layer), with the
common guard: skip the update when the clipped norm is not finite. Data come from a DataLoader
with two worker processes."""

import argparse
import math
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

parser = argparse.ArgumentParser()
parser.add_argument("--nan-at", type=int, default=4)
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--exit-at", type=int, default=None, help="call os._exit(0) after this step")
parser.add_argument("--sys-exit-at", type=int, default=None, help="call sys.exit(0) after this step")
args = parser.parse_args()

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
step = 0
model[2].weight.register_hook(lambda g: torch.full_like(g, math.nan) if step + 1 == args.nan_at else g)


def main():
    global step
    data = TensorDataset(torch.randn(512, 4), torch.randn(512, 1))
    loader = DataLoader(data, batch_size=16, shuffle=True, num_workers=2)
    while step < args.steps:
        for x, y in loader:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            step += 1
            print(f"step {step} loss {loss.item():.10g} norm {float(norm):.10g}", flush=True)
            if args.exit_at == step:
                os._exit(0)
            if args.sys_exit_at == step:
                sys.exit(0)
            if not torch.isfinite(norm):
                continue
            opt.step()
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
