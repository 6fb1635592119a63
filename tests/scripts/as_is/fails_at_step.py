"""Trains two steps, then raises."""

import torch
from torch import nn

model = nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(1, 10):
    opt.zero_grad()
    model(torch.randn(4, 3)).pow(2).mean().backward()
    opt.step()
    print(f"trained step {step}")
    if step == 2:
        raise ValueError("the data file ran out")
