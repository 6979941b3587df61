"""`wurst.generate`: one call from prompt to images, with wurst's defaults (1024x1024, the published Stage C
schedule, bfloat16 on CUDA and on CPUs that multiply bfloat16 natively), on the documented pipelines; and
`wurst.load_pipeline`, which loads the combined pipeline it runs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

from wurst.pipelines import checks
from wurst.pipelines.combined import WuerstchenCombinedPipeline
from wurst.pipelines.img2img import WuerstchenImg2ImgPipeline
from wurst.runtime import memory
from wurst.runtime.devices import default_device, default_dtype, parse_device
from wurst.sampler import DEFAULT_STAGE_C_TIMESTEPS
from wurst.weights.image_encoder import choose_image_encoder
from wurst.weights.lora_refs import ChosenLora, LoraSpec, choose_loras

DEFAULT_PRIOR, DEFAULT_DECODER = "warp-ai/wuerstchen-prior", "warp-ai/wuerstchen"


def load_pipeline(
    *, prior: str | os.PathLike = DEFAULT_PRIOR, decoder: str | os.PathLike = DEFAULT_DECODER,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None, low_memory: bool | None = None,
    force: bool = False, loras: Sequence[LoraSpec] = (),
) -> WuerstchenCombinedPipeline:
    """The combined pipeline of a prior and a decoder repository, on `device` (default: CUDA when available)
    in `dtype` (default_dtype: bfloat16 on CUDA and on CPUs with native bfloat16 matmuls, else float32).
    low_memory=True loads each model only while it runs, False keeps all five loaded; by default low-memory on the
    CPU (the weights come back from the page cache at no measurable cost) and resident elsewhere. Resident models
    that do not fit in the device's free memory are refused before they are moved there, unless force=True.
    `loras` (see generate) are checked against the prior before any model loads, then loaded and made active."""
    device = parse_device(device, allow_meta=False) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    low_memory = default_low_memory(device) if low_memory is None else low_memory
    chosen = choose_loras(loras, prior=prior)
    pipe = WuerstchenCombinedPipeline.from_pretrained(decoder, prior_repo=prior, torch_dtype=dtype,
                                                      low_memory=low_memory)
    if not force and device.type != "cpu":  # on the CPU they are already where they run: mapped, not copied
        memory.check_weights_fit(pipe, device)
    pipe = pipe.to(device)
    use_loras(pipe, chosen)  # on the device: the adapters' factors go where their layers are
    return pipe


def use_loras(pipe: WuerstchenCombinedPipeline, loras: Sequence[ChosenLora]) -> None:
    """Make `loras` the pipeline's adapters, and the only ones: each loaded as its own (lora_0, lora_1, ...), all
    active with their weights."""
    if pipe.get_list_adapters():
        pipe.unload_lora_weights()
    names = [f"lora_{i}" for i in range(len(loras))]
    for name, lora in zip(names, loras, strict=True):
        pipe.load_lora_weights(lora.file, adapter_name=name)
    if names:
        pipe.set_adapters(names, [lora.weight for lora in loras])


def load_img2img_pipeline(
    *, prior: str | os.PathLike = DEFAULT_PRIOR, decoder: str | os.PathLike = DEFAULT_DECODER,
    image_encoder: str | os.PathLike | None = None, device: torch.device | str | None = None,
    dtype: torch.dtype | None = None, low_memory: bool | None = None, force: bool = False,
    loras: Sequence[LoraSpec] = (),
) -> WuerstchenImg2ImgPipeline:
    """As load_pipeline (wurst's device, dtype and memory-mode defaults, `loras`), for image to image. The encoder is
    found first, so that a missing one is named before the large models load."""
    device = parse_device(device, allow_meta=False) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    encoder = choose_image_encoder(image_encoder, prior=prior, dtype=dtype)
    combined = load_pipeline(prior=prior, decoder=decoder, device=device, dtype=dtype, low_memory=low_memory,
                             force=force, loras=loras)
    return WuerstchenImg2ImgPipeline.from_pipes(combined.prior_pipe, combined.decoder_pipe, encoder)


def default_low_memory(device: torch.device) -> bool:
    return device.type == "cpu"


def prior_schedule(steps: int | None = None, timesteps: list[float] | None = None) -> dict:
    """wurst's Stage C default, as combined-pipeline keywords: the published schedule, unless a step count or
    timesteps are given."""
    if steps is None and timesteps is None:
        return {"prior_timesteps": DEFAULT_STAGE_C_TIMESTEPS}
    return {"prior_num_inference_steps": steps, "prior_timesteps": timesteps}


@functools.lru_cache(maxsize=1)  # one pipeline at a time: each holds several GB
def _cached_pipeline(prior: str, decoder: str, device: torch.device, dtype: torch.dtype | None, low_memory: bool,
                     force: bool) -> WuerstchenCombinedPipeline:
    return load_pipeline(prior=prior, decoder=decoder, device=device, dtype=dtype, low_memory=low_memory, force=force)


def generate(
    prompt: str | list[str],
    height: int = 1024,
    width: int = 1024,
    *,
    prior: str | os.PathLike = DEFAULT_PRIOR,
    decoder: str | os.PathLike = DEFAULT_DECODER,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    low_memory: bool | None = None,
    force: bool = False,
    loras: Sequence[LoraSpec] = (),
    **kwargs,
):
    """Images for the prompt(s): a list of PIL images, or what `output_type` asks for. Other keywords are
    WuerstchenCombinedPipeline's; Stage C runs DEFAULT_STAGE_C_TIMESTEPS unless prior_num_inference_steps or
    prior_timesteps says otherwise. low_memory is load_pipeline's (default: on the CPU only). A request whose
    estimated peak memory is over what the device has is refused before it starts (InsufficientMemoryError,
    saying what would fit), unless force=True. The loaded pipeline is kept for the next call with the same
    models, device, dtype and memory mode; `generate.cache_clear()` releases it.

    `loras` are LoRAs for the prior and its text encoder, each a reference (weight 1.0) or a (reference, weight)
    pair: `loras=["style.safetensors", ("user/repo", 0.8)]`. A reference is a .safetensors file, a folder holding
    one (diffusers' pytorch_lora_weights.safetensors, else its only .safetensors file), a hub id `user/repo`
    (its pytorch_lora_weights.safetensors, through the Hugging Face cache) or `user/repo/<file>.safetensors`. They
    are checked before any model loads, and each call applies exactly its own (none by default)."""
    kwargs.update(prior_schedule(kwargs.pop("prior_num_inference_steps", None), kwargs.pop("prior_timesteps", None)))
    device = parse_device(device, allow_meta=False) if device is not None else default_device()
    low_memory = default_low_memory(device) if low_memory is None else low_memory
    # The checks the memory estimate relies on, before anything loads; the pipeline repeats them.
    embeds = kwargs.get("prompt_embeds")
    prompts = len(checks.as_prompt_list(prompt)) if prompt is not None or embeds is None else len(embeds)
    request = dict(height=checks.check_size("height", height, warn=False),
                   width=checks.check_size("width", width, warn=False), prompts=prompts,
                   images_per_prompt=checks.check_count("num_images_per_prompt",
                                                        kwargs.get("num_images_per_prompt", 1)),
                   prior_guidance_scale=checks.check_guidance("prior_guidance_scale",
                                                              kwargs.get("prior_guidance_scale", 4.0)),
                   decoder_guidance_scale=checks.check_guidance("decoder_guidance_scale",
                                                                kwargs.get("decoder_guidance_scale", 0.0)))
    chosen = choose_loras(loras, prior=prior)
    pipe = _cached_pipeline(str(prior), str(decoder), device, dtype, low_memory, force)
    if not force:
        memory.check_fits(pipe, **request)
    use_loras(pipe, chosen)
    return pipe(prompt, height=height, width=width, **kwargs).images


generate.cache_clear = _cached_pipeline.cache_clear  # type: ignore[attr-defined]
