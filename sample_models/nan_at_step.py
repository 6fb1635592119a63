"""A model whose gradient turns NaN at a known step in a known parameter: a fixture for CI gates.

    step:       5  (the 5th optimizer step of every run, counting from 1)
    parameter:  head.weight
    where:      the backward pass; the loss at step 5 is finite

Every run, clipped or not, goes non-finite at exactly that step in exactly that parameter:
clipping cannot help, because a NaN gradient makes the total norm NaN. Steps 1 to 4 are an
ordinary, stable regression.

How: ``batches()`` yields ``(x, y, index)`` where ``index`` counts the batches of one pass from
1; gradclip calls ``batches()`` afresh for every run, so the batch index equals the step number
(for the first 100 steps, one full pass). The model routes ``head.weight`` through
``_NaNGradientAt``, an autograd function that is the identity in the forward pass and, for the
poisoned batch only, replaces the gradient of that weight with NaN in the backward pass. The
gradient flowing on to the earlier layers is computed from the (finite) weight itself, so
``body.weight``, ``body.bias`` and ``head.bias`` keep finite gradients: ``head.weight`` is the
first (and only) parameter with a non-finite gradient.

The step is carried by the data, not by a counter inside the model, so nothing depends on how
often the model is called or on state kept between runs.

Parameters, in ``named_parameters()`` order: ``body.weight``, ``body.bias``, ``head.weight``,
``head.bias``. No ``build_optimizer``: gradclip's default SGD with ``--lr`` (0.01) applies.
"""

import torch
from torch import nn

NAN_STEP = 5
NAN_PARAM = "head.weight"

IN_FEATURES = 8
HIDDEN = 16
BATCH = 16
N_BATCHES = 100  # one pass; batches() is called again when it runs out
DATA_SEED = 99


class _NaNGradientAt(torch.autograd.Function):
    """Identity in the forward pass; NaN gradient in the backward pass when ``poison`` is true."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, poison: bool) -> torch.Tensor:
        ctx.poison = bool(poison)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.poison:
            grad = torch.full_like(grad, float("nan"))
        return grad, None


class PoisonedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(IN_FEATURES, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor, poison: bool = False) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        weight = _NaNGradientAt.apply(self.head.weight, poison)
        return nn.functional.linear(h, weight, self.head.bias).squeeze(-1)


def build_model() -> nn.Module:
    return PoisonedMLP()


def batches():
    """``(x, y, index)`` with ``index`` = 1, 2, ...; a private generator keeps it deterministic."""
    g = torch.Generator().manual_seed(DATA_SEED)
    true_w = torch.randn(IN_FEATURES, generator=g)
    for index in range(1, N_BATCHES + 1):
        x = torch.randn(BATCH, IN_FEATURES, generator=g)
        y = torch.sin(x @ true_w)
        yield x, y, index


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y, index = batch
    return nn.functional.mse_loss(model(x, poison=int(index) == NAN_STEP), y)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step, batch in zip(range(1, 8), batches()):
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
        print(f"step {step}: loss {loss.item():.6g}, non-finite gradients: {', '.join(bad) or 'none'}")
        opt.step()
