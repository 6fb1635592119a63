"""A small GAN on 1-D data: two networks, two optimizers, alternating updates, each network
clipped on its own. The sample of the ``train_step`` contract.

    data:           samples of a two-component Gaussian mixture (means -2 and 2, sd 0.5)
    generator:      noise (4) -> 32 -> 1
    discriminator:  sample (1) -> 32 -> 1 logit
    optimizers:     {"discriminator": Adam, "generator": Adam}, lr 2e-3, betas (0.5, 0.999)
    per step:       one discriminator update, then one generator update (non-saturating loss)

``train_step`` calls ``clip(model.discriminator.parameters(), name="discriminator")`` before the
discriminator's step and ``clip(model.generator.parameters(), name="generator")`` before the
generator's, so a sweep clips each network with the cell's setting and ``clip_sites.csv`` holds
both pre-clip norms per step. The returned loss is the sum of the two losses (detached): a GAN's
losses oscillate rather than fall, so read ``clip_sites.csv`` and ``layers.csv`` more than the
loss. Run it as ``gradclip sweep --recipe tiny_gan`` (a few seconds).
"""

import torch
from torch import nn

NOISE = 4
HIDDEN = 32
BATCH = 64
N_BATCHES = 50  # one pass; batches() is called again when it runs out
LR = 2e-3
DATA_SEED = 5


class GAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(NOISE, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
        self.discriminator = nn.Sequential(nn.Linear(1, HIDDEN), nn.LeakyReLU(0.2), nn.Linear(HIDDEN, 1))


def build_model() -> nn.Module:
    return GAN()


def build_optimizer(model: GAN) -> dict:
    return {
        "discriminator": torch.optim.Adam(model.discriminator.parameters(), lr=LR, betas=(0.5, 0.999)),
        "generator": torch.optim.Adam(model.generator.parameters(), lr=LR, betas=(0.5, 0.999)),
    }


def batches():
    """``(real samples, noise)``; a private generator keeps the data identical in every run."""
    g = torch.Generator().manual_seed(DATA_SEED)
    for _ in range(N_BATCHES):
        sign = torch.randint(0, 2, (BATCH, 1), generator=g).float() * 2 - 1
        real = 2.0 * sign + 0.5 * torch.randn(BATCH, 1, generator=g)
        yield real, torch.randn(BATCH, NOISE, generator=g)


def train_step(model: GAN, batch, optimizers: dict, clip) -> torch.Tensor:
    real, noise = batch
    bce = nn.functional.binary_cross_entropy_with_logits
    ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)

    opt_d = optimizers["discriminator"]
    opt_d.zero_grad()
    fake = model.generator(noise).detach()
    loss_d = bce(model.discriminator(real), ones) + bce(model.discriminator(fake), zeros)
    loss_d.backward()
    clip(model.discriminator.parameters(), name="discriminator")
    opt_d.step()

    opt_g = optimizers["generator"]
    opt_g.zero_grad()
    loss_g = bce(model.discriminator(model.generator(noise)), ones)
    loss_g.backward()
    clip(model.generator.parameters(), name="generator")
    opt_g.step()
    return (loss_d + loss_g).detach()


if __name__ == "__main__":
    torch.manual_seed(0)
    model = build_model()
    optimizers = build_optimizer(model)
    for step, batch in zip(range(1, 6), batches()):
        loss = train_step(
            model, batch, optimizers, lambda params, name=None: torch.nn.utils.clip_grad_norm_(params, 1.0)
        )
        print(f"step {step}: loss {loss.item():.4f}")
