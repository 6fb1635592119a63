"""Sibling module imported by stable_linear.py: shows a script can import files beside it."""

import torch


def regression_data(n: int = 32, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]]) + 0.3
    return x, y
