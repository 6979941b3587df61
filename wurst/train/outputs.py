"""What a training run leaves in its output folder, in the formats the pipelines (wurst's and diffusers') load:
- LoRA: pytorch_lora_weights.safetensors in diffusers' format (`prior.` and `text_encoder.` keys, lora_A / lora_B
  under diffusers' module names, the alpha / rank scale folded into lora_B);
- full fine-tuning: prior/, a whole prior repository in the hub layout (the trained prior beside the base
  repository's text encoder, tokenizer and scheduler);
- validation images: validation/step-NNNNNN-P.png, drawn by wurst's pipeline with the weights being trained."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from wurst.files import png_metadata, write_png_atomically
from wurst.models.lora import LoraFactors, TrainableLora
from wurst.weights.lora_files import peft_state_dict

PRIOR_FOLDER, VALIDATION_FOLDER = "prior", "validation"


def trained_factors(model: nn.Module, weights: dict[str, torch.Tensor] | None = None) -> dict[str, LoraFactors]:
    """The LoRAs trained on `model`, by layer name, as float32 factors on the CPU. `weights` (parameter name ->
    tensor, the EMA's) replaces the factors' current values where given."""
    weights = weights or {}
    return {name.removesuffix(".lora"): LoraFactors(
                down=weights.get(f"{name}.down", module.down).detach().float().cpu().contiguous(),
                up=weights.get(f"{name}.up", module.up).detach().float().cpu().contiguous(), scale=module.scale)
            for name, module in model.named_modules() if isinstance(module, TrainableLora)}


def write_lora_output(out: Path, *, prior: nn.Module, text_encoder: nn.Module | None,
                      ema: dict[str, torch.Tensor] | None) -> Path:
    from wurst.pipelines.prior import WuerstchenPriorPipeline

    def part(prefix: str, model: nn.Module | None):
        if model is None:
            return None
        weights = {k.removeprefix(prefix): v for k, v in ema.items() if k.startswith(prefix)} if ema else None
        return peft_state_dict(prefix.rstrip("."), trained_factors(model, weights)) or None

    WuerstchenPriorPipeline.save_lora_weights(out, unet_lora_layers=part("prior.", prior),
                                              text_encoder_lora_layers=part("text_encoder.", text_encoder))
    return out / "pytorch_lora_weights.safetensors"


@contextlib.contextmanager
def weights_swapped(model: nn.Module, weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """`model` holding `weights` (parameter name -> tensor) for the time of the block, its own weights after."""
    if not weights:
        yield
        return
    params = dict(model.named_parameters())
    kept = {name: params[name].data for name in weights}
    try:
        for name, tensor in weights.items():
            params[name].data = tensor
        yield
    finally:
        for name, tensor in kept.items():
            params[name].data = tensor


def write_full_output(out: Path, *, pipe, ema: dict[str, torch.Tensor] | None) -> Path:
    """The prior pipeline `pipe` (its prior the trained one) saved as a hub-layout repository, with the EMA
    weights in place of the trained ones where there are EMA weights."""
    prior_ema = {k.removeprefix("prior."): v for k, v in ema.items() if k.startswith("prior.")} if ema else None
    with weights_swapped(pipe.prior, prior_ema):
        pipe.save_pretrained(out / PRIOR_FOLDER)
    return out / PRIOR_FOLDER


def write_validation_images(out: Path, *, pipe, prompts: list[str], step: int, resolution: int, seed: int) -> None:
    """One image per prompt from the combined pipeline `pipe`, whose prior is the one being trained, seeded so that
    the images of two steps differ only by what training changed."""
    folder = out / VALIDATION_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for number, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed)
        image = pipe(prompt, height=resolution, width=resolution, generator=generator).images[0]
        settings = {"prompt": prompt, "seed": seed, "height": resolution, "width": resolution, "training_step": step}
        write_png_atomically(image, folder / f"step-{step:06d}-{number}.png",
                             png_metadata(settings, image_index=0, command=[]))
