"""The adversarial term of stage 1, as in VQGAN (Esser et al. 2021, "Taming Transformers for High-Resolution Image
Synthesis", https://arxiv.org/abs/2012.09841): a PatchGAN critic scores patches of the originals and of the
reconstructions, and the autoencoder is also trained to make its reconstructions score as real.

- ``PatchCritic``: strided convolutions with spectral normalisation (Miyato et al. 2018,
  https://arxiv.org/abs/1802.05957) and LeakyReLU 0.2; a grid of logits, one per patch.
- Losses: hinge (Lim & Ye 2017; VQGAN's default) or WGAN-GP (Gulrajani et al. 2017,
  https://arxiv.org/abs/1704.00028, penalty weight 10 on interpolates); the generator's term is -mean(D(x_hat)).
- ``adaptive_weight``: VQGAN's balance of the two terms at the decoder's last layer,
  ||grad L_rec|| / (||grad L_G|| + 1e-4), clamped to [0, 1e4] and detached.
- ``AdversarialVQVAE``: the VQ-VAE-2 and its critic as one module, so the shared training loop (one AdamW, one
  backward, checkpoints of one state dict) trains both. The generator's term reaches the autoencoder and never
  the critic (``generator_term``); the critic's loss sees detached reconstructions, so its gradient reaches the
  critic and never the autoencoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from pipeline.config import ADVERSARIAL_LOSSES
from pipeline.vqvae import VQVAE2, VQVAEOutput

GP_WEIGHT = 10.0  # WGAN-GP's penalty weight (Gulrajani et al. 2017)
MAX_ADAPTIVE_WEIGHT = 1e4  # VQGAN's clamp of the adaptive weight
ADAPTIVE_EPS = 1e-4  # VQGAN's guard against a vanishing generator gradient
VQVAE_PREFIX, CRITIC_PREFIX = "vqvae.", "critic."  # the two parts of an AdversarialVQVAE's state dict


class PatchCritic(nn.Module):
    def __init__(self, in_channels: int, channels: int = 64) -> None:
        """
        Args:
            in_channels: image channels (1 grey, 3 RGB).
            channels: width of the first layer (the second has twice as many).

        Two 4 x 4 stride-2 convolutions and a 3 x 3 one to a logit per position: (B, C, H, W) -> (B, 1, H/4, W/4),
        each logit seeing an 18 x 18 pixel patch (a 32 px digit's stroke, a 64 px emoji's detail).
        """
        super().__init__()
        self.layers = nn.Sequential(
            spectral_norm(nn.Conv2d(in_channels, channels, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(channels, 2 * channels, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * channels, 1, 3, 1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, 1, H/4, W/4) patch logits


def generator_term(critic: nn.Module, recon: torch.Tensor) -> torch.Tensor:
    """The generator's loss -mean D(x_hat), as a loss whose gradient reaches ``recon`` (and what made it) and never
    the critic. The critic's gradient at the reconstructions is taken with ``torch.autograd.grad`` (which fills no
    parameter's ``.grad``) and applied to ``recon`` as a linear term that carries the loss's value: the same
    gradient as the loss through a critic with detached parameters, whatever wraps the module (calling the critic
    with detached parameters through ``torch.func.functional_call`` leaks the gradient into it under FSDP)."""
    x_hat = recon.detach().requires_grad_(True)
    value = generator_loss(critic(x_hat).float())
    (grad,) = torch.autograd.grad(value, x_hat)  # (B, C, H, W)
    linear = (grad.float() * recon.float()).sum()
    return value.detach() + linear - linear.detach()


def hinge_critic_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))), VQGAN's form."""
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


def wasserstein_critic_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """mean D(x_hat) - mean D(x), without the gradient penalty (``gradient_penalty``)."""
    return fake.mean() - real.mean()


def generator_loss(fake: torch.Tensor) -> torch.Tensor:
    """-mean D(x_hat): the autoencoder's term for both losses."""
    return -fake.mean()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """mean over images of (||grad_x D(x_mix)|| - 1)^2, x_mix = e x + (1 - e) x_hat with e ~ U(0, 1) per image; D is
    the mean of the patch logits (the critic's score in the loss). ``fake`` must be detached."""
    e = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mixed = (e * real + (1 - e) * fake).requires_grad_(True)
    score = critic(mixed).flatten(1).float().mean(1)  # (B,)
    (grad,) = torch.autograd.grad(score.sum(), mixed, create_graph=True)
    return (grad.float().flatten(1).norm(dim=1) - 1).pow(2).mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||grad_w L_rec|| / (||grad_w L_G|| + 1e-4) at the decoder's last weight ``w``, clamped to [0, 1e4], detached
    (VQGAN, eq. 7). Both graphs are kept for the backward pass that follows."""
    (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_adv,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = g_rec.float().norm() / (g_adv.float().norm() + ADAPTIVE_EPS)
    return weight.clamp(0, MAX_ADAPTIVE_WEIGHT).detach()


def last_decoder_weight(vqvae: VQVAE2) -> torch.Tensor:
    """The weight of the layer that outputs pixels: the bottom decoder's final transposed convolution."""
    return vqvae.decoder[-1].weight


@dataclass
class AdversarialOutput(VQVAEOutput):
    """The VQ-VAE's output with ``loss`` = its loss + adv_weight x g_loss + d_loss (one backward trains both)."""

    adv_weight: torch.Tensor  # adversarial_weight x the adaptive weight; 0 before the generator's term starts
    g_loss: torch.Tensor  # -mean D(x_hat)
    d_loss: torch.Tensor  # the critic's loss (hinge, or Wasserstein + 10 x penalty)
    logits_real: torch.Tensor  # mean patch logit of the originals
    logits_fake: torch.Tensor  # mean patch logit of the reconstructions
    penalty: torch.Tensor  # the WGAN-GP gradient penalty (0 with the hinge loss)


class AdversarialVQVAE(nn.Module):
    def __init__(self, vqvae: VQVAE2, critic: PatchCritic, loss: str = "hinge", weight: float = 0.1) -> None:
        """
        Args:
            vqvae: the autoencoder (its state is this module's ``vqvae.*`` keys).
            critic: the patch critic (``critic.*``).
            loss: ``hinge`` or ``wgan-gp``.
            weight: the adversarial weight that multiplies the adaptive weight.

        In eval mode ``forward`` is the VQ-VAE's (validation, reconstruction grids); ``levels`` and ``cfg`` are the
        VQ-VAE's, so code that evaluates a VQVAE2 evaluates this module too.
        """
        super().__init__()
        if loss not in ADVERSARIAL_LOSSES:
            raise ValueError(f"loss={loss!r}: choose one of {', '.join(ADVERSARIAL_LOSSES)}")
        self.vqvae, self.critic, self.loss, self.weight = vqvae, critic, loss, weight

    @property
    def levels(self) -> int:
        return self.vqvae.levels

    @property
    def cfg(self):
        return self.vqvae.cfg

    def forward(self, x: torch.Tensor, generator: bool = True) -> VQVAEOutput:
        """Images (B, C, H, W) in [-1, 1]. Training mode: an ``AdversarialOutput`` whose loss trains the critic, and
        the autoencoder against it when ``generator`` (else the critic warms up alone). Eval mode: the VQ-VAE's."""
        out = self.vqvae(x)
        if not self.training:
            return out
        recon = out.reconstruction
        # originals and detached reconstructions in one batch (one power iteration of the spectral norms)
        real, fake = self.critic(torch.cat([x, recon.detach().to(x.dtype)])).chunk(2)  # (B, 1, h, w) each
        if self.loss == "hinge":
            d_loss, penalty = hinge_critic_loss(real.float(), fake.float()), torch.zeros((), device=x.device)
        else:
            penalty = gradient_penalty(self.critic, x, recon.detach())
            d_loss = wasserstein_critic_loss(real.float(), fake.float()) + GP_WEIGHT * penalty
        if generator:
            g_loss = generator_term(self.critic, recon)  # trains the autoencoder only
            adv_weight = self.weight * adaptive_weight(out.recon_loss, g_loss, last_decoder_weight(self.vqvae))
            loss = out.loss + adv_weight * g_loss + d_loss
        else:  # the same value, for the logs
            g_loss, adv_weight = generator_loss(fake.float()), torch.zeros((), device=x.device)
            loss = out.loss + d_loss
        fields = {name: getattr(out, name) for name in VQVAEOutput.__dataclass_fields__}
        return AdversarialOutput(**{**fields, "loss": loss}, adv_weight=adv_weight, g_loss=g_loss.detach(),
                                 d_loss=d_loss.detach(), logits_real=real.detach().float().mean(),
                                 logits_fake=fake.detach().float().mean(), penalty=penalty.detach())


def vqvae_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stage-1 checkpoint's VQ-VAE-2 state: an ``AdversarialVQVAE``'s ``vqvae.*`` entries named as in a ``VQVAE2``
    (the critic left out), or a ``VQVAE2``'s state as it is (none of its keys starts with ``critic.``)."""
    if not any(k.startswith(CRITIC_PREFIX) for k in state):
        return state
    return {k[len(VQVAE_PREFIX):]: v for k, v in state.items() if k.startswith(VQVAE_PREFIX)}
