"""The sparse embedding-bag regression of sparse_embedding.py, trained with SparseAdam (which
accepts sparse gradients only)."""

import torch
from sparse_embedding import batches, build_model, loss_fn  # noqa: F401  (the script's contract)


def build_optimizer(model):
    return torch.optim.SparseAdam(model.parameters(), lr=0.05)
