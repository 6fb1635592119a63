"""A loop with a GradScaler (mixed precision on the CPU, bfloat16 autocast) and gradient
accumulation over two micro-batches, clipping after unscale_ as torch's AMP recipe says.
Prints one line per optimizer step: step, the summed loss, the pre-clip norm."""

import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--accumulate", type=int, default=2)
parser.add_argument("--max-norm", type=float, default=1.0)
parser.add_argument("--no-unscale", action="store_true", help="clip before unscale_ (a bug)")
args = parser.parse_args()

torch.manual_seed(7)
model = nn.Sequential(nn.Linear(6, 24), nn.GELU(), nn.Linear(24, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
data = [(torch.randn(16, 6), torch.randn(16, 1)) for _ in range(args.steps * args.accumulate)]

for step in range(1, args.steps + 1):
    opt.zero_grad()
    total = 0.0
    for x, y in data[(step - 1) * args.accumulate : step * args.accumulate]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y) / args.accumulate
        scaler.scale(loss).backward()
        total += loss.item()
    if not args.no_unscale:
        scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_norm)
    scaler.step(opt)
    scaler.update()
    print(f"step {step} loss {total:.10g} norm {float(norm):.10g}", flush=True)
