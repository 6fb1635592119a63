"""A tiny character-level LSTM language model: a realistic, well-behaved training run.

Model: embedding (24) -> one LSTM layer (64 hidden units) -> linear read-out over the
characters of the text; trained with next-character cross-entropy by Adam (``lr=3e-3``,
from ``build_optimizer``; gradclip's ``--lr``, when given, replaces it) with a linear warm-up
over the first ``WARMUP`` steps (``build_scheduler``).

Data: a small English text generated in this file from a fixed grammar and a private random
generator (about 8,000 characters, 29 distinct ones, no downloads); batches of 16 windows of
48 characters.

Behaviour, 100 steps, seed 0, well under a second per run on a CPU: the loss falls from about
ln(29) = 3.4 to about 1.3, unclipped and under every clipping setting of the recipe
(``recipes/tiny_lm.toml``); no run diverges or goes non-finite. Pre-clip L2 gradient norms stay
between about 0.2 and 0.6, so only ``max_norm=0.1`` actually clips (and, with Adam, barely
changes the result). This is the "control is healthy" case: clipping is not needed here, and
gradclip should say so.

Parameters, in ``named_parameters()`` order: ``embed.weight``, ``lstm.weight_ih_l0``,
``lstm.weight_hh_l0``, ``lstm.bias_ih_l0``, ``lstm.bias_hh_l0``, ``head.weight``,
``head.bias``.
"""

import random

import torch
from torch import nn

SEQ_LEN = 48
BATCH = 16
N_BATCHES = 50  # one pass; batches() is called again when it runs out
EMBED = 24
HIDDEN = 64
LR = 3e-3
WARMUP = 10  # steps of linear learning-rate warm-up
TEXT_SEED = 7
DATA_SEED = 11

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the baker", "a small bird", "the river", "our teacher"]
_VERBS = ["sees", "likes", "follows", "paints", "finds", "carries", "hears", "remembers"]
_OBJECTS = [
    "the moon",
    "a red apple",
    "the green door",
    "some bread",
    "the long road",
    "a quiet song",
    "the garden",
    "an old book",
]
_ENDINGS = ["", " every morning", " in the rain", " at night", " with great care", " near the sea", " again and again"]


def make_text(n_sentences: int = 200, seed: int = TEXT_SEED) -> str:
    """Sentences from a small grammar: enough structure for a character model to learn fast."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}."
        sentences.append(s[0].upper() + s[1:])
    return " ".join(sentences)


TEXT = make_text()
VOCAB = sorted(set(TEXT))
_INDEX = {c: i for i, c in enumerate(VOCAB)}
DATA = torch.tensor([_INDEX[c] for c in TEXT], dtype=torch.long)


class CharLSTM(nn.Module):
    def __init__(self, vocab_size: int = len(VOCAB)) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, EMBED)
        self.lstm = nn.LSTM(EMBED, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


def build_model() -> nn.Module:
    return CharLSTM()


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=LR)


def build_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up: lr/WARMUP at the first step, the full lr from step WARMUP on."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP))


def batches():
    """Random windows of the text (inputs, next-character targets); the same ones every pass."""
    g = torch.Generator().manual_seed(DATA_SEED)
    for _ in range(N_BATCHES):
        starts = torch.randint(0, len(DATA) - SEQ_LEN - 1, (BATCH,), generator=g)
        window = torch.stack([DATA[s : s + SEQ_LEN + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    tokens, targets = batch
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def sample(model: nn.Module, prompt: str = "The ", length: int = 80) -> str:
    """Greedy continuation of ``prompt``: a quick look at what the model learned."""
    model.eval()
    tokens = torch.tensor([[_INDEX[c] for c in prompt]])
    out = prompt
    for _ in range(length):
        nxt = int(model(tokens)[0, -1].argmax())
        out += VOCAB[nxt]
        tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
    model.train()
    return out


if __name__ == "__main__":
    torch.manual_seed(0)
    model = build_model()
    opt = build_optimizer(model)
    sched = build_scheduler(opt)
    it = iter(batches())
    for step in range(1, 301):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(batches())
            batch = next(it)
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        sched.step()
        if step in (1, 10, 50, 100, 200, 300):
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(sample(model))
