"""A small causal transformer language model on generated text: the shared-runs benchmark's
"healthy model" (benchmarks/shared_runs.py). Two pre-norm blocks of width 64, 4 heads, context 32,
AdamW at 1e-3 with a short warm-up; batches of 16 windows. Its pre-clip L2 norm stays around 1-3
in 60 steps, so the default grid's max_norm=10 cells never clip and max_norm=0.1 always does.
"""

import math
import random

import torch
from torch import nn

CONTEXT, WIDTH, HEADS, LAYERS, BATCH = 32, 64, 4, 2, 16


def _text(n: int = 400, seed: int = 5) -> str:
    rng = random.Random(seed)
    words = "the a cat dog sees likes river moon bread song old red small quiet garden road".split()
    return " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + "." for _ in range(n))


TEXT = _text()
VOCAB = sorted(set(TEXT))
IDS = torch.tensor([VOCAB.index(c) for c in TEXT])


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), WIDTH)
        self.pos = nn.Parameter(torch.randn(CONTEXT, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, len(VOCAB))
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        h = self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(self.norm(h))


def build_model():
    return TinyTransformer()


def build_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def build_scheduler(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))


def batches():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    for _ in range(200):
        starts = torch.randint(0, len(IDS) - CONTEXT - 1, (BATCH,), generator=g)
        window = torch.stack([IDS[s : s + CONTEXT + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x).reshape(-1, len(VOCAB)), y.reshape(-1))


def evaluate(model):
    x = IDS[: CONTEXT * 8].reshape(8, CONTEXT)
    y = IDS[1 : CONTEXT * 8 + 1].reshape(8, CONTEXT)
    return float(nn.functional.cross_entropy(model(x).reshape(-1, len(VOCAB)), y.reshape(-1))) / math.log(len(VOCAB))
