"""An IRNN whose gradients explode: the textbook case for gradient clipping.

Model: a vanilla ReLU RNN with the recurrent matrix initialised to the identity (the "IRNN" of
Le, Jaitly and Hinton, 2015, "A Simple Way to Initialize Recurrent Networks of Rectified Linear
Units"), 32 hidden units, and a linear read-out of the last hidden state.

Task: read a sequence of 50 random numbers and predict their scaled sum, ``sum(x) / sqrt(50)``
(unit variance). The identity recurrence can carry a running sum, so the task is learnable,
but it sits exactly on the edge of stability: the backward pass goes through 50 recurrent steps,
and as soon as an update pushes the recurrent matrix's largest eigenvalue above 1, activations
and gradients grow like ``eigenvalue ** 50``.

Behaviour with plain SGD (no ``build_optimizer``: gradclip's default SGD with ``--lr``), 100
steps, ``lr=0.01`` (the default and the recipe ``recipes/exploding_rnn.toml``), seed 0:

* unclipped: the first update is far too large (pre-clip gradient norm 66); at step 2 the loss
  is 3.5e7, millions of times the first step's 1.79: ``diverged`` at step 2 (run on, it
  overflows to NaN at step 3). Measured through gradclip, this holds for seeds 0 to 4 at every
  lr from 0.005 to 0.03;
* clipped with ``max_norm=1`` (L2): stable for seeds 0 to 4 at every lr from 0.002 to 0.03; at
  ``lr=0.01`` the final loss is 4 to 11% of the first (seed 0: 1.79 to 0.062);
* ``max_norm=10`` (L2) is not enough at ``lr=0.01``: it diverges too, at step 4; with the inf
  norm (the largest gradient entry, about 7 here) ``max_norm=10`` never clips and diverges at
  step 2 like the control.

Parameters, in ``named_parameters()`` order: ``rnn.weight_ih_l0``, ``rnn.weight_hh_l0``,
``rnn.bias_ih_l0``, ``rnn.bias_hh_l0``, ``head.weight``, ``head.bias``.

Run it alone with ``python exploding_rnn.py`` to see both behaviours.
"""

import math

import torch
from torch import nn

SEQ_LEN = 50
HIDDEN = 32
BATCH = 32
N_BATCHES = 16  # one pass over the data; batches() is called again when it runs out
DATA_SEED = 1234
LR = 0.01


class SumIRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(1, HIDDEN, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)
        with torch.no_grad():
            # Identity recurrence and zero biases (IRNN): a perfect integrator at the start,
            # one step away from exploding.
            self.rnn.weight_hh_l0.copy_(torch.eye(HIDDEN))
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


def build_model() -> nn.Module:
    return SumIRNN()


def batches():
    """The same 16 batches every time, from a private generator (the global RNG is untouched)."""
    g = torch.Generator().manual_seed(DATA_SEED)
    for _ in range(N_BATCHES):
        x = torch.randn(BATCH, SEQ_LEN, 1, generator=g)
        y = x[:, :, 0].sum(dim=1) / math.sqrt(SEQ_LEN)
        yield x, y


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _train(max_norm=None, steps=100, lr=LR, seed=0):
    """A bare training loop: what gradclip does for one run, without the bookkeeping."""
    torch.manual_seed(seed)
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    history = []
    it = iter(batches())
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(batches())
            batch = next(it)
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        # the pre-clip norm: clip_grad_norm_ returns it (inf clips nothing)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm is not None else math.inf)
        opt.step()
        history.append((loss.item(), norm.item()))
    return history


if __name__ == "__main__":
    for max_norm in (None, 1.0):
        history = _train(max_norm)
        print("unclipped:" if max_norm is None else f"clipped, max_norm={max_norm:g}:")
        for step in (1, 2, 3, 5, 10, 50, 100):
            loss, norm = history[step - 1]
            print(f"  step {step:3d}  loss {loss:12.6g}  pre-clip grad norm {norm:12.6g}")
