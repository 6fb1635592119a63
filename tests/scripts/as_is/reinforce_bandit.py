"""REINFORCE as pytorch/examples writes it (returns normalised per episode, loss = -sum(log_prob *
return)), on a contextual bandit made here instead of gym's CartPole. The loss has no scale and
no sign to compare with its first step; the policy learns (the printed reward rises)."""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Categorical

parser = argparse.ArgumentParser(description="PyTorch REINFORCE example")
parser.add_argument("--gamma", type=float, default=0.99)
parser.add_argument("--seed", type=int, default=543)
parser.add_argument("--episodes", type=int, default=60)
args = parser.parse_args()

torch.manual_seed(args.seed)
eps = 1e-6


class Policy(nn.Module):
    def __init__(self):
        super().__init__()
        self.affine1 = nn.Linear(4, 64)
        self.affine2 = nn.Linear(64, 2)

    def forward(self, x):
        return F.softmax(self.affine2(F.relu(self.affine1(x))), dim=1)


policy = Policy()
optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)


def main():
    for episode in range(1, args.episodes + 1):
        states = torch.randn(32, 4)
        m = Categorical(policy(states))
        actions = m.sample()
        rewards = (actions == (states[:, 0] + states[:, 1] > 0).long()).float()
        returns, R = [], 0.0
        for r in reversed(rewards.tolist()):
            R = r + args.gamma * R
            returns.insert(0, R)
        returns = torch.tensor(returns)
        returns = (returns - returns.mean()) / (returns.std() + eps)
        loss = (-m.log_prob(actions) * returns).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {episode} loss {loss.item():.10g} norm nan reward {rewards.mean().item():.3f}", flush=True)


if __name__ == "__main__":
    main()
