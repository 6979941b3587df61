"""Argument checks shared by the pipelines and the CLI. Each raises a one-line ValueError (or TypeError,
where diffusers raises one) that names the argument as the caller spelled it."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from wurst.errors import ArgumentError
from wurst.sampler import make_timesteps

SIZE_MULTIPLE = 128  # what both U-Nets' resampling needs of an image side
LARGEST_TRAINED = 2048
OUTPUT_TYPES = ("pil", "np", "pt")
SEEDS = 2**63  # seeds are 0 <= seed < 2**63, so that a batch's BASE + k stays a valid torch seed (< 2**64)
# CLIP reads 77 tokens, a few hundred characters; a prompt far longer is refused before the tokenizer sees it
# (100 MB of text exhausts its memory and aborts the process).
MAX_PROMPT_CHARACTERS = 10_000


class LargeSizeWarning(UserWarning):
    """An image side over 2048: allowed, but beyond what Würstchen was used at."""


def check_size(name: str, value: int, warn: bool = True) -> int:
    """Image sides are positive multiples of 128; past 2048 the model degrades, so warn there (once per
    call: only the place that uses the size warns)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ArgumentError(f"{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value!r}")
    if value % SIZE_MULTIPLE:
        below = value // SIZE_MULTIPLE * SIZE_MULTIPLE
        nearest = f"{below} or {below + SIZE_MULTIPLE}" if below else str(SIZE_MULTIPLE)
        raise ArgumentError(f"{name} must be a multiple of {SIZE_MULTIPLE}, got {value}: use {nearest}")
    if value > LARGEST_TRAINED and warn:
        warnings.warn(f"{name} {value} is over {LARGEST_TRAINED}, beyond what Würstchen was used at; expect "
                      "repeated or broken structure", LargeSizeWarning, stacklevel=3)
    return value


def check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_seed(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEEDS:
        raise ArgumentError(f"{name} must be at least 0 and below 2**63, got {value!r}")
    return value


def check_guidance(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ArgumentError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def checked_timesteps(steps_name: str, num_steps: int | None, timesteps_name: str, timesteps: Sequence[float] | None):
    """A step count or a custom schedule must be usable (checking it is building it, which the sampler does); the
    schedule wins when both are given, as in diffusers."""
    return make_timesteps(num_steps, timesteps, (steps_name, timesteps_name))


def check_output_type(value: str, allowed: Sequence[str] = OUTPUT_TYPES) -> str:
    if value not in allowed:
        raise ArgumentError(f"output_type must be one of {', '.join(allowed)}; got {value!r}")
    return value


def as_prompt_list(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    """The prompts as a list, each at most MAX_PROMPT_CHARACTERS long."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise ArgumentError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    for i, text in enumerate(prompts):
        if len(text) > MAX_PROMPT_CHARACTERS:
            which = name if isinstance(prompt, str) else f"{name}[{i}]"
            raise ArgumentError(f"{which} is {len(text)} characters, over the limit of {MAX_PROMPT_CHARACTERS} (CLIP "
                                "reads the first 77 tokens, a few hundred characters)")
    return prompts


def negative_prompts(negative_prompt: str | Sequence[str] | None, count: int) -> list[str]:
    """One negative prompt per prompt: empty by default, one string for all, or a list of matching length."""
    if negative_prompt is None:
        return [""] * count
    negatives = as_prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        return negatives * count
    if len(negatives) != count:
        raise ArgumentError(f"negative_prompt has {len(negatives)} entries but prompt has {count}")
    return negatives


def check_text_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds) -> None:
    """diffusers' rules for prompts given as text or as embeddings: one of prompt and prompt_embeds, at most
    one of negative_prompt and negative_prompt_embeds, and embeddings of one shape."""
    if prompt is not None and prompt_embeds is not None:
        raise ArgumentError("Cannot forward both `prompt` and `prompt_embeds`: give only one of the two")
    if prompt is None and prompt_embeds is None:
        raise ArgumentError("Provide either `prompt` or `prompt_embeds`; both are undefined")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ArgumentError("Cannot forward both `negative_prompt` and `negative_prompt_embeds`: give only one")
    for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if embeds is not None and (not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or not len(embeds)):
            got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ArgumentError(f"{name} must be a (batch, tokens, width) tensor, got {got}")
    if prompt_embeds is not None and negative_prompt_embeds is not None:
        if prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ArgumentError("`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed "
                                f"directly, but got {tuple(prompt_embeds.shape)} != "
                                f"{tuple(negative_prompt_embeds.shape)}")
    if prompt is not None:
        as_prompt_list(prompt)


def check_callback_inputs(names: Sequence[str] | None, allowed: Sequence[str], argument: str) -> list[str]:
    names = list(names or [])
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ArgumentError(f"{argument} has to be in {list(allowed)}, but found {unknown}")
    return names


def check_latents(latents: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if latents is not None and (not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape):
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ArgumentError(f"latents must have shape {shape}, got {got}")
