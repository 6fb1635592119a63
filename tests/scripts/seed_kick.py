"""One weight ``w`` fitted to 1, kicked at step 2 by a gradient whose size depends on the seed
(the kick is in the gradient only: the step's loss value is unchanged).

The seed (``torch.initial_seed()`` when the model is built: gradclip seeds torch first) picks
the kick and a constant added to the loss. Unclipped, the default SGD (lr 0.01) moves ``w`` by
about ``kick / 100``: seeds 0 and 1 stay within 11x their starting level, seed 2 (``w`` near 9,
a loss near 53 against a start of 4) diverges at step 4, the first step judged against three
early losses.
Any ``max_norm`` below about 500 absorbs every kick, so such a setting is stable in every seed
and ``--max-norm 1000`` (which never binds) is stable in 2 of 3, as the control is. The offsets
(0, 1, 2) spread one setting's figures across the seeds far more than clipping moves them, so
the clipped settings are within run-to-run noise of one another. ``evaluate`` is ``-w`` (higher
is better): it prefers the setting that moved ``w`` least, the opposite of the loss's order.
"""

import torch

KICK = {0: -300.0, 1: -400.0, 2: -800.0}
OFFSET = {0: 0.0, 1: 1.0, 2: 2.0}
EVALUATE_HIGHER_IS_BETTER = True


class Weight(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("seed", torch.tensor(float(torch.initial_seed())))


def build_model():
    return Weight()


def batches():
    return [torch.tensor(float(step)) for step in range(1, 41)]  # the step, carried by the data


def loss_fn(model, step):
    seed = int(model.seed)
    loss = (model.w - 1.0).pow(2).sum() + 1.0 + OFFSET[seed]
    if int(step) == 2:
        loss = loss + KICK[seed] * (model.w - model.w.detach()).sum()
    return loss


def evaluate(model):
    return -float(model.w.detach())
