"""The gradient of ``head.weight`` becomes NaN at step 3 while the loss stays finite.

A custom autograd function is the identity on ``head.weight`` going forward; going backward it
multiplies the incoming gradient by the batch's ``poison`` value (1.0, except NaN at step 3).
"""

import torch

POISON_STEP = 3


class Poison(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, poison):
        ctx.poison = poison
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.poison, None


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(2, 2)
        self.head = torch.nn.Linear(2, 1)

    def forward(self, x, poison=1.0):
        h = torch.tanh(self.body(x))
        w = Poison.apply(self.head.weight, poison)
        return torch.nn.functional.linear(h, w, self.head.bias)


def build_model():
    return Net()


def batches():
    for i in range(1, 7):
        poison = float("nan") if i == POISON_STEP else 1.0
        yield {"x": torch.full((4, 2), 0.2 * i), "y": torch.ones(4, 1), "poison": poison}


def loss_fn(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"], batch["poison"]), batch["y"])
