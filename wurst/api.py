"""`wurst.generate`: one call from prompt to images, with wurst's defaults (1024x1024, the published Stage C
schedule, bfloat16 on CUDA and on CPUs that multiply bfloat16 natively), on the documented pipelines; and
`wurst.load_pipeline`, which loads the combined pipeline it runs.
"""

from __future__ import annotations

import functools
import os

import torch

from wurst.pipelines import checks
from wurst.pipelines.combined import WuerstchenCombinedPipeline
from wurst.pipelines.img2img import WuerstchenImg2ImgPipeline
from wurst.runtime import memory
from wurst.runtime.devices import default_device, default_dtype, parse_device
from wurst.sampler import DEFAULT_STAGE_C_TIMESTEPS
from wurst.weights.image_encoder import choose_image_encoder

DEFAULT_PRIOR, DEFAULT_DECODER = "warp-ai/wuerstchen-prior", "warp-ai/wuerstchen"


def load_pipeline(
    *, prior: str | os.PathLike = DEFAULT_PRIOR, decoder: str | os.PathLike = DEFAULT_DECODER,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None, low_memory: bool | None = None,
    force: bool = False,
) -> WuerstchenCombinedPipeline:
    """The combined pipeline of a prior and a decoder repository, on `device` (default: CUDA when available)
    in `dtype` (default_dtype: bfloat16 on CUDA and on CPUs with native bfloat16 matmuls, else float32).
    low_memory=True loads each model only while it runs, False keeps all five loaded; by default low-memory on the
    CPU (the weights come back from the page cache at no measurable cost) and resident elsewhere. Resident models
    that do not fit in the device's free memory are refused before they are moved there, unless force=True."""
    device = parse_device(device, allow_meta=False) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    low_memory = default_low_memory(device) if low_memory is None else low_memory
    pipe = WuerstchenCombinedPipeline.from_pretrained(decoder, prior_repo=prior, torch_dtype=dtype,
                                                      low_memory=low_memory)
    if not force and device.type != "cpu":  # on the CPU they are already where they run: mapped, not copied
        memory.check_weights_fit(pipe, device)
    return pipe.to(device)


def load_img2img_pipeline(
    *, prior: str | os.PathLike = DEFAULT_PRIOR, decoder: str | os.PathLike = DEFAULT_DECODER,
    image_encoder: str | os.PathLike | None = None, device: torch.device | str | None = None,
    dtype: torch.dtype | None = None, low_memory: bool | None = None, force: bool = False,
) -> WuerstchenImg2ImgPipeline:
    """As load_pipeline (wurst's device, dtype and memory-mode defaults), for image to image. The encoder is found
    first, so that a missing one is named before the large models load."""
    device = parse_device(device, allow_meta=False) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    encoder = choose_image_encoder(image_encoder, prior=prior, dtype=dtype)
    combined = load_pipeline(prior=prior, decoder=decoder, device=device, dtype=dtype, low_memory=low_memory,
                             force=force)
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
    **kwargs,
):
    """Images for the prompt(s): a list of PIL images, or what `output_type` asks for. Other keywords are
    WuerstchenCombinedPipeline's; Stage C runs DEFAULT_STAGE_C_TIMESTEPS unless prior_num_inference_steps or
    prior_timesteps says otherwise. low_memory is load_pipeline's (default: on the CPU only). A request whose
    estimated peak memory is over what the device has is refused before it starts (InsufficientMemoryError,
    saying what would fit), unless force=True. The loaded pipeline is kept for the next call with the same
    models, device, dtype and memory mode; `generate.cache_clear()` releases it."""
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
    pipe = _cached_pipeline(str(prior), str(decoder), device, dtype, low_memory, force)
    if not force:
        memory.check_fits(pipe, **request)
    return pipe(prompt, height=height, width=width, **kwargs).images


generate.cache_clear = _cached_pipeline.cache_clear  # type: ignore[attr-defined]
