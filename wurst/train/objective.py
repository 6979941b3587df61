"""What Stage C is trained to do: predict the noise that the cosine schedule mixed into an image latent at time t.

Two recipes, which differ in how t is drawn, how each sample's loss is weighted and how often the caption is left
out:
- "diffusers", as diffusers' training scripts (train_text_to_image_prior.py) do it: t uniform in [0, 1), plain MSE,
  every caption kept;
- "original", as the authors trained Stage C (dome272/Wuerstchen train_stage_C.py): t = (1 - u) · 1.08 + 0.001
  clamped to [0.001, 1] (so about 7% of samples are pure noise), each sample's MSE weighted by P2's 1 / (1 + SNR),
  and 5% of captions replaced by the empty caption (which teaches the model the unconditional prediction that
  classifier-free guidance needs).

Every random number of a sample derives from (seed, step, k), k its place in the step's global batch, so a run
gives the same result on any number of processes, and a resumed run the same as an uninterrupted one. For the same
reason the prior trains without the dropout (0.1) that both reference trainers leave on in its MLPs and attention
outputs; and caption dropout is drawn per sample, where the original drops a whole batch's captions at once."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from wurst.sampler import alpha_cumprod

LATENT_SCALE, LATENT_SHIFT = 42.0, 1.0  # Stage C's latent is (encoder output + 1) / 42; the pipelines undo it


@dataclass(frozen=True)
class Recipe:
    name: str
    stretched_t: bool  # t = clamp((1 - u) · 1.08 + 0.001, 0.001, 1) rather than u
    p2_weight: bool  # each sample's MSE times 1 / (1 + SNR(t))
    caption_dropout: float  # the share of samples trained on the empty caption


RECIPES = {
    "diffusers": Recipe("diffusers", stretched_t=False, p2_weight=False, caption_dropout=0.0),
    "original": Recipe("original", stretched_t=True, p2_weight=True, caption_dropout=0.05),
}


def image_latent(encoder_output: torch.Tensor) -> torch.Tensor:
    """The image encoder's output as Stage C's latent."""
    return (encoder_output.float() + LATENT_SHIFT) / LATENT_SCALE


@dataclass(frozen=True)
class Draw:
    """The random part of one sample's training example."""

    t: float
    drop_caption: bool
    noise: torch.Tensor  # float32, the latent's shape


def sample_seed(seed: int, step: int, k: int) -> int:
    """A seed for sample k of step `step` of a run seeded `seed`: 63 bits of a hash of the three, so that
    neighbouring (step, k) pairs get unrelated streams."""
    digest = hashlib.blake2b(f"wurst.train {seed} {step} {k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw(*, seed: int, step: int, k: int, latent_shape: tuple[int, ...], recipe: Recipe) -> Draw:
    """t, the caption dropout and the noise of sample k of step `step` (always drawn in this order, on the CPU)."""
    generator = torch.Generator().manual_seed(sample_seed(seed, step, k))
    u = torch.rand((), generator=generator, dtype=torch.float32)
    t = ((1 - u) * 1.08 + 0.001).clamp(0.001, 1.0) if recipe.stretched_t else u
    dropped = bool(torch.rand((), generator=generator) < recipe.caption_dropout)
    noise = torch.randn(tuple(latent_shape), generator=generator, dtype=torch.float32)
    return Draw(t=float(t), drop_caption=dropped, noise=noise)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, *, s: float = 0.008,
              scaler: float = 1.0) -> torch.Tensor:
    """√ᾱ(t) · latents + √(1 - ᾱ(t)) · noise, per sample (t of shape (B,)), in float32."""
    a = alpha_cumprod(t.float(), s=s, scaler=scaler).view(-1, 1, 1, 1)
    return a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()


def sample_losses(predicted: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, *, recipe: Recipe, s: float = 0.008,
                  scaler: float = 1.0) -> torch.Tensor:
    """(B,) each sample's mean squared error of the predicted noise, in float32, P2-weighted where the recipe says.
    P2's (1 + SNR)^-1 with SNR = ᾱ / (1 - ᾱ) is exactly 1 - ᾱ."""
    losses = (predicted.float() - noise.float()).square().mean(dim=(1, 2, 3))
    if recipe.p2_weight:
        losses = losses * (1 - alpha_cumprod(t.float(), s=s, scaler=scaler))
    return losses


class Objective(nn.Module):
    """The models being trained, as one module (the unit DistributedDataParallel wraps): the prior and, when its LoRA
    trains too, the text encoder. forward() maps a batch to each sample's loss."""

    def __init__(self, prior: nn.Module, text_encoder: nn.Module | None, *, recipe: Recipe, s: float = 0.008,
                 scaler: float = 1.0, autocast: torch.dtype | None = None):
        super().__init__()
        self.prior, self.text_encoder = prior, text_encoder
        self.recipe, self.s, self.scaler = recipe, s, scaler
        self.autocast = autocast  # float32 weights computing in this dtype (full fine-tuning in bfloat16)

    def forward(self, *, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, text: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) losses of latents (B, 16, h, w) noised with `noise` at times t (B,), given the caption's text states
        `text`, or its tokens where the text encoder is trained."""
        dtype = self.autocast or next(self.prior.parameters()).dtype
        t = t.to(dtype).float()  # the t the prior sees (in bfloat16, rounded) is the t of the noise and the weight
        cast = (torch.autocast(latents.device.type, dtype=self.autocast) if self.autocast
                else contextlib.nullcontext())
        with cast:
            if text is None:
                text = self.text_encoder(token_ids, token_mask)
            noisy = add_noise(latents, noise, t, s=self.s, scaler=self.scaler)
            predicted = self.prior(noisy.to(dtype), t.to(dtype), text.to(dtype))
        return sample_losses(predicted, noise, t, recipe=self.recipe, s=self.s, scaler=self.scaler)
