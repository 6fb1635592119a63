"""A sparse embedding (``nn.Embedding(sparse=True)``) feeding a dense linear layer, default SGD:
one gradient set holding a sparse COO gradient and dense ones."""

import torch

VOCAB, DIM = 30, 4
_g = torch.Generator().manual_seed(5)
TOKENS = torch.randint(0, VOCAB, (48, 3), generator=_g)
TARGETS = torch.randn(48, 1, generator=_g)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCAB, DIM, sparse=True)
        self.head = torch.nn.Linear(DIM, 1)

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(dim=1))


def build_model():
    return Model()


def batches():
    order = torch.randperm(len(TOKENS))
    return [(TOKENS[order[i : i + 8]], TARGETS[order[i : i + 8]]) for i in range(0, len(TOKENS), 8)]


def loss_fn(model, batch):
    tokens, targets = batch
    return torch.nn.functional.mse_loss(model(tokens), targets)
