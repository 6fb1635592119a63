"""Embedding-bag regression with sparse gradients (``sparse=True``) and the default SGD: the
embedding is the only parameter, and its gradient is an uncoalesced sparse COO tensor (a token
that appears twice in a batch gives two entries for one row)."""

import torch

VOCAB, BAG = 40, 6
_g = torch.Generator().manual_seed(11)
TOKENS = torch.randint(0, VOCAB, (64, BAG), generator=_g)
TRUE_WEIGHTS = torch.randn(VOCAB, 1, generator=_g)
TARGETS = TRUE_WEIGHTS[TOKENS].sum(dim=1)


def build_model():
    return torch.nn.EmbeddingBag(VOCAB, 1, mode="sum", sparse=True)


def batches():
    order = torch.randperm(len(TOKENS))
    return [(TOKENS[order[i : i + 8]], TARGETS[order[i : i + 8]]) for i in range(0, len(TOKENS), 8)]


def loss_fn(model, batch):
    tokens, targets = batch
    return torch.nn.functional.mse_loss(model(tokens), targets)
