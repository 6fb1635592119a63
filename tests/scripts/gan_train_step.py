"""A small GAN on 1-D data through ``train_step``: two networks, two SGD optimizers, one
discriminator update then one generator update per step, each network clipped at its own site.

The returned loss is D's loss plus G's, and G's is computed after D's clipped update, so step 1's
loss legitimately differs between clipping settings; the pre-clip norm at step 1's first clip
call (D's gradient, before any update) cannot. The summed loss measures no quality: a sweep
judges such a script on stability alone, unless it defines ``evaluate`` (``distance`` below, the
1-D Wasserstein distance between generated and real samples, is what a test adds as one).
"""

import torch
from torch import nn

NOISE = 4
HIDDEN = 16
BATCH = 64
LR = 0.05
DATA_SEED = 5


class GAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(NOISE, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
        self.discriminator = nn.Sequential(nn.Linear(1, HIDDEN), nn.LeakyReLU(0.2), nn.Linear(HIDDEN, 1))


def build_model():
    return GAN()


def build_optimizer(model):
    return {
        "discriminator": torch.optim.SGD(model.discriminator.parameters(), lr=LR, momentum=0.5),
        "generator": torch.optim.SGD(model.generator.parameters(), lr=LR, momentum=0.5),
    }


def real_samples(n, g):
    sign = torch.randint(0, 2, (n, 1), generator=g).float() * 2 - 1
    return 2.0 * sign + 0.5 * torch.randn(n, 1, generator=g)


def batches():
    """``(real samples, noise)``; a private generator keeps the data identical in every run."""
    g = torch.Generator().manual_seed(DATA_SEED)
    for _ in range(50):
        yield real_samples(BATCH, g), torch.randn(BATCH, NOISE, generator=g)


def train_step(model, batch, optimizers, clip):
    real, noise = batch
    bce = nn.functional.binary_cross_entropy_with_logits
    ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
    opt_d, opt_g = optimizers["discriminator"], optimizers["generator"]

    opt_d.zero_grad()
    fake = model.generator(noise).detach()
    loss_d = bce(model.discriminator(real), ones) + bce(model.discriminator(fake), zeros)
    loss_d.backward()
    clip(model.discriminator.parameters(), name="discriminator")
    opt_d.step()

    opt_g.zero_grad()
    loss_g = bce(model.discriminator(model.generator(noise)), ones)
    loss_g.backward()
    clip(model.generator.parameters(), name="generator")
    opt_g.step()
    return (loss_d + loss_g).detach()


def distance(model):
    """The 1-D Wasserstein distance between 2000 generated and 2000 real samples (fixed)."""
    g = torch.Generator().manual_seed(11)
    real = real_samples(2000, g).flatten().sort().values
    fake = model.generator(torch.randn(2000, NOISE, generator=g)).flatten().sort().values
    return (fake - real).abs().mean()
