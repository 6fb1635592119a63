"""A plain training script as people write them: argparse, data built at import, Adam, no
clipping unless asked. Prints one line per step: step, loss, pre-clip L2 norm."""

import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser(description="regression with an MLP")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--seed", type=int, default=1234)
parser.add_argument("--clip-norm", type=float, default=None, help="clip gradients to this L2 norm")
args = parser.parse_args()

torch.manual_seed(args.seed)
X = torch.randn(256, 8)
Y = (X @ torch.randn(8, 1)).tanh() * 3 + 0.1 * torch.randn(256, 1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.body(x)


def main():
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, 256, (32,))
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X[idx]), Y[idx])
        loss.backward()
        grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
        norm = float(torch.linalg.vector_norm(grads))
        if args.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
        opt.step()
        print(f"step {step} loss {loss.item():.10g} norm {norm:.10g}", flush=True)


if __name__ == "__main__":
    main()
