"""REINFORCE on a pole-balancing task written in torch (CartPole's dynamics, vectorised): a
policy-gradient loss with returns normalised per batch, as pytorch/examples' reinforce.py has it
(Adam, lr 1e-2, the loss summed over every step taken).

The loss, ``-log pi(a|s) * G_normalised`` summed, has no sign and no scale of its own: it starts
near 0 (the untrained policy is almost uniform and the normalised returns sum to 0) and swings
more widely as the policy sharpens and episodes lengthen, while the agent learns to balance for
the whole horizon. At step 3 it is 10x step 1's (0.28 then 2.8), which a ratio to the first loss
would call diverged. ``evaluate`` is the mean length of greedy episodes from fixed starts (higher
is better; the untrained policy falls after about 9 steps, a trained one lasts all 30).
"""

import math

import torch
from torch import nn

EPISODES = 8  # per training step
HORIZON = 30
LR = 1e-2
GAMMA = 0.99
DATA_SEED = 4
EVAL_STARTS = 8
EVALUATE_HIGHER_IS_BETTER = True


def dynamics(state, action):
    """One step of CartPole (gym's constants) for a batch of states and actions (0 or 1)."""
    x, x_dot, theta, theta_dot = state.unbind(-1)
    force = action * 20.0 - 10.0
    cos, sin = torch.cos(theta), torch.sin(theta)
    temp = (force + 0.05 * theta_dot**2 * sin) / 1.1
    theta_acc = (9.8 * sin - cos * temp) / (0.5 * (4.0 / 3.0 - 0.1 * cos**2 / 1.1))
    x_acc = temp - 0.05 * theta_acc * cos / 1.1
    new = state + 0.02 * torch.stack([x_dot, x_acc, theta_dot, theta_acc], -1)
    failed = (new[:, 0].abs() > 2.4) | (new[:, 2].abs() > 12 * 2 * math.pi / 360)
    return new, failed


def build_model():
    return nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))


def build_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=LR)


def batches():
    """The start states of each step's episodes; a private generator keeps them identical in every run.
    The actions are sampled with torch's global RNG, which a sweep restores for every run."""
    g = torch.Generator().manual_seed(DATA_SEED)
    for _ in range(200):
        yield torch.rand(EPISODES, 4, generator=g) * 0.1 - 0.05


def play(model, starts, greedy=False):
    """Roll the policy out from ``starts``: (log-probabilities, alive mask) per step, and the episode lengths."""
    state, alive = starts, torch.ones(len(starts))
    log_probs, masks = [], []
    for _ in range(HORIZON):
        logp = torch.log_softmax(model(state), -1)
        if greedy:
            action = logp.argmax(-1)
        else:
            action = (torch.rand(len(state)) < logp[:, 1].exp()).long()
        log_probs.append(logp.gather(1, action.unsqueeze(1)).squeeze(1))
        masks.append(alive)
        state, failed = dynamics(state, action)
        alive = alive * (~failed)
    mask = torch.stack(masks, 1)
    return torch.stack(log_probs, 1), mask, mask.sum(1)


def loss_fn(model, starts):
    log_probs, mask, _ = play(model, starts)
    returns = torch.zeros_like(mask)
    running = torch.zeros(len(starts))
    for t in reversed(range(HORIZON)):
        running = mask[:, t] + GAMMA * running * mask[:, t]
        returns[:, t] = running
    taken = mask.bool()
    g = returns[taken]
    g = (g - g.mean()) / (g.std() + 1e-8)
    return -(log_probs[taken] * g).sum()


def evaluate(model):
    starts = torch.linspace(-0.05, 0.05, EVAL_STARTS).unsqueeze(1).repeat(1, 4)
    _, _, lengths = play(model, starts, greedy=True)
    return lengths.mean()
