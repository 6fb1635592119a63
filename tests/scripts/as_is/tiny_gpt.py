"""A small copy of nanoGPT's train.py pattern: configuration as module globals overridden by
``--key=value`` arguments (nanoGPT's configurator), a GPT of a few blocks, AdamW with weight
decay groups, a warm-up + cosine learning-rate schedule set by hand, a GradScaler (disabled in
float32), clipping with ``grad_clip`` after ``scaler.unscale_``. Data: a synthetic character
stream made here. Prints ``step N loss L norm G`` per iteration."""

import math
import sys

import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# default config values
max_iters = 200
batch_size = 8
block_size = 32
n_layer = 2
n_head = 2
n_embd = 64
learning_rate = 3e-3
weight_decay = 1e-1
grad_clip = 1.0
warmup_iters = 10
lr_decay_iters = 200
min_lr = 3e-4
seed = 1337
# configurator: --key=value overrides a global above
for arg in sys.argv[1:]:
    key, val = arg[2:].split("=")
    assert key in globals(), f"Unknown config key: {key}"
    globals()[key] = type(globals()[key])(eval(val)) if not isinstance(globals()[key], str) else val
# -----------------------------------------------------------------------------

torch.manual_seed(seed)
vocab_size = 65
text = torch.randint(0, vocab_size, (20000,))
text[1::3] = (text[0::3][: len(text[1::3])] * 7 + 3) % vocab_size  # some structure to learn


def get_batch():
    ix = torch.randint(len(text) - block_size, (batch_size,))
    x = torch.stack([text[i : i + block_size] for i in ix])
    y = torch.stack([text[i + 1 : i + 1 + block_size] for i in ix])
    return x, y


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = nn.MultiheadAttention(n_embd, n_head, batch_first=True)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        t = x.size(1)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block() for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1))
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95))


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


model = GPT()
optimizer = model.configure_optimizers()
scaler = torch.amp.GradScaler("cpu", enabled=False)

for iter_num in range(max_iters):
    lr = get_lr(iter_num)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    X, Y = get_batch()
    logits, loss = model(X, Y)
    scaler.scale(loss).backward()
    norm = float("nan")
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    print(f"step {iter_num + 1} loss {loss.item():.10g} norm {norm:.10g}", flush=True)
