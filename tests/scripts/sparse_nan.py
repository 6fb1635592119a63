"""A sparse embedding whose gradient turns NaN at step 3 while the loss stays finite: row 0 is
zero and first looked up (twice) at step 3, where d/dx sqrt(|x|) at 0 is NaN. A dense scale
parameter comes first in ``named_parameters()`` and always has a finite gradient."""

import torch

STEPS_BEFORE = [[1, 2, 3], [4, 5, 6]]
ONSET = [[0, 0, 7]]


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.embedding = torch.nn.Embedding(10, 2, sparse=True)
        with torch.no_grad():
            self.embedding.weight[0] = 0.0

    def forward(self, tokens):
        return self.scale * self.embedding(tokens).abs().sqrt().sum()


def build_model():
    return Model()


def batches():
    return [torch.tensor(b) for b in STEPS_BEFORE + ONSET]


def loss_fn(model, batch):
    return model(batch)
