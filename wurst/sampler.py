"""The Würstchen DDPM sampler (diffusers' DDPMWuerstchenScheduler) as plain functions.

Time runs continuously from r=1 (pure noise) to r=0, with a cosine schedule. The sampler draws its random
numbers in exactly diffusers' order (the initial latents, then one normal draw per step, the last step
included, where it is multiplied by zero) so a seeded torch.Generator reproduces diffusers' results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from wurst.errors import ArgumentError

# The schedule the Würstchen authors recommend for Stage C: 20 steps from 1 to 2/3, then 10 from 2/3 to 0.
DEFAULT_STAGE_C_TIMESTEPS: list[float] = [float(t) for t in np.linspace(1.0, 2 / 3, 20)] + [
    float(t) for t in np.linspace(2 / 3, 0.0, 11)[1:]
]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents, r of shape (B,)) -> predicted noise


def alpha_cumprod(t: torch.Tensor, s: float = 0.008, scaler: float = 1.0) -> torch.Tensor:
    """ᾱ(t) = cos²(((t + s) / (1 + s)) · π/2) / cos²((s / (1 + s)) · π/2), clamped to [1e-4, 0.9999]. In fp32."""
    if scaler > 1:
        t = 1 - (1 - t) ** scaler
    elif scaler < 1:
        t = t**scaler
    s_ = torch.tensor([s], dtype=torch.float32, device=t.device)
    at_zero = torch.cos(s_ / (1 + s_) * math.pi * 0.5) ** 2
    return (torch.cos((t + s_) / (1 + s_) * math.pi * 0.5) ** 2 / at_zero).clamp(1e-4, 0.9999)


def make_timesteps(
    num_steps: int | None = None,
    timesteps: Sequence[float] | None = None,
    names: tuple[str, str] = ("num_steps", "timesteps"),
) -> torch.Tensor:
    """`num_steps` evenly spaced steps (linspace(1, 0, N + 1)), or a custom list that must be strictly
    descending within [0, 1]. Returns float32; the sampler evaluates the model at all but the last point.
    `names` are the caller's names for the two arguments, so that an error names what the user passed."""
    steps_name, timesteps_name = names
    if timesteps is not None:
        values = [float(t) for t in timesteps]
        if len(values) < 2:
            raise ArgumentError(f"{timesteps_name} must hold at least two values, got {len(values)}")
        if any(not (0.0 <= t <= 1.0) for t in values):
            raise ArgumentError(f"{timesteps_name} must lie within [0, 1], got {values}")
        if any(a <= b for a, b in zip(values, values[1:], strict=False)):
            raise ArgumentError(f"{timesteps_name} must be strictly descending, got {values}")
        return torch.tensor(values, dtype=torch.float32)
    if num_steps is None:
        raise ArgumentError(f"give {steps_name} or {timesteps_name}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 0:
        raise ArgumentError(f"{steps_name} must be a positive integer, got {num_steps!r}")
    return torch.linspace(1.0, 0.0, num_steps + 1)


def randn(
    shape: Sequence[int],
    generator: torch.Generator | Sequence[torch.Generator] | None,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """Normal noise drawn as diffusers draws it: on the generator's device (then moved), and with a list of
    generators, one draw of the per-item shape from each."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ArgumentError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, dtype, device) for g in generator])
    draw_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=draw_device).to(device)


def ddpm_step(
    x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, noise: torch.Tensor, s: float = 0.008,
    scaler: float = 1.0,
) -> torch.Tensor:
    """One reverse step from time t to t_prev (both (B,) tensors) given the predicted noise `eps`."""
    view = (-1,) + (1,) * (x.dim() - 1)
    abar = alpha_cumprod(t, s, scaler).view(view)
    abar_prev = alpha_cumprod(t_prev, s, scaler).view(view)
    alpha = abar / abar_prev
    mean = (1.0 / alpha).sqrt() * (x - (1 - alpha) * eps / (1 - abar).sqrt())
    std = ((1 - alpha) * (1.0 - abar_prev) / (1.0 - abar)).sqrt()
    adds_noise = (t_prev != 0).float().view(view)  # 0 on the step that lands on t = 0, which adds none
    return (mean + std * noise * adds_noise).to(eps.dtype)


@dataclass
class Step:
    """One finished sampler step. Assigning `latents` replaces what the next step starts from."""

    index: int
    t: torch.Tensor  # the timestep the step started at
    latents: torch.Tensor  # after the step


def sample_steps(
    denoise: Denoiser,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    s: float = 0.008,
    scaler: float = 1.0,
) -> Iterator[Step]:
    """Run the reverse process from `latents` at timesteps[0] to timesteps[-1], yielding each Step so callers
    can watch, record or edit the latents."""
    batch, dtype, device = latents.shape[0], latents.dtype, latents.device
    steps = len(timesteps) - 1
    # Every step's noise is drawn up front, in the order diffusers draws it (nothing else uses the generator
    # meanwhile): no host-device copy inside the loop, so it can run ahead on a GPU.
    noises = torch.stack([randn(latents.shape, generator, dtype, device) for _ in range(steps)])
    on_device = timesteps.to(device)
    for i in range(steps):
        r = on_device[i].expand(batch).to(latents.dtype)  # the model sees r in its own dtype
        eps = denoise(latents, r)
        t_prev = on_device[i + 1].expand(batch)
        step = Step(i, timesteps[i], ddpm_step(latents, eps, r, t_prev, noises[i], s, scaler))
        yield step
        latents = step.latents


def guided(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], guidance_scale: float) -> Denoiser:
    """Classifier-free guidance around a model that takes a doubled batch [conditional; unconditional]:
    lerp(uncond, cond, w), which is uncond + w * (cond - uncond) as torch.lerp rounds it."""

    def denoise(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        cond, uncond = model(torch.cat([x, x]), torch.cat([r, r])).chunk(2)
        return torch.lerp(uncond, cond, guidance_scale)

    return denoise


# ---------------------------------------------------------------------------------------------------------
# The forward (noising) process, for starting part-way: image to image


def add_noise(latents: torch.Tensor, noise: torch.Tensor, t: float, s: float = 0.008,
              scaler: float = 1.0) -> torch.Tensor:
    """The forward process at time t: sqrt(ᾱ(t))·latents + sqrt(1 - ᾱ(t))·noise, computed in float32. ᾱ(1) is
    clamped to 1e-4, so t = 1 keeps 1% of the latents."""
    abar = alpha_cumprod(torch.tensor([t], dtype=torch.float32), s, scaler).to(latents.device)
    return (abar.sqrt() * latents.float() + (1 - abar).sqrt() * noise.float()).to(latents.dtype)


def timesteps_from(schedule: torch.Tensor, t: float) -> torch.Tensor:
    """The part of a descending schedule that a run starting at time t takes: t, then the schedule's points
    below it. From t = 1 this is the schedule itself."""
    return torch.cat([torch.tensor([t], dtype=schedule.dtype), schedule[schedule < t]])


# ---------------------------------------------------------------------------------------------------------
# Stage C's range. Training mapped the image encoder's output x to Stage C's latents as (x + 1) / 42; the prior
# pipeline's embeddings undo it, x * latent_mean - latent_std (diffusers' names, defaults 42 and 1), which is the
# range Stage B is conditioned on.


def to_stage_b_range(latents: torch.Tensor, *, latent_mean: float, latent_std: float) -> torch.Tensor:
    return latents * latent_mean - latent_std


def to_stage_c_range(embeddings: torch.Tensor, *, latent_mean: float, latent_std: float) -> torch.Tensor:
    return (embeddings + latent_std) / latent_mean
