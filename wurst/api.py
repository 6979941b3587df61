"""`wurst.generate`: one call from prompt to images, with wurst's defaults (1024x1024, the published Stage C
schedule, bfloat16 on CUDA and on CPUs that multiply bfloat16 natively), on the documented pipelines.

Also the names wurst 0.1 used, `Pipeline`, `Prior` and `Decoder`, kept working for one release as thin
wrappers of WuerstchenCombinedPipeline, WuerstchenPriorPipeline and WuerstchenDecoderPipeline. New code should
use those.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from wurst.errors import GenerationStopped
from wurst.pipelines import checks
from wurst.pipelines.combined import WuerstchenCombinedPipeline
from wurst.pipelines.decoder import WuerstchenDecoderPipeline
from wurst.pipelines.prior import WuerstchenPriorPipeline
from wurst.runtime import memory
from wurst.runtime.devices import default_device, default_dtype, parse_device
from wurst.sampler import DEFAULT_STAGE_C_TIMESTEPS

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


# ---------------------------------------------------------------------------------------------------------
# wurst 0.1's names, for one release

OldStepCallback = Callable[[str, int, float, torch.Tensor], bool | None]  # (stage, step, t, latents); False stops


def step_callback(callback: OldStepCallback | None, stage: str):
    """A wurst 0.1 step callback in diffusers' form."""
    if callback is None:
        return None

    def adapted(pipe, step: int, t: torch.Tensor, tensors: dict) -> dict:
        if callback(stage, step, float(t), tensors["latents"]) is False:
            raise GenerationStopped(f"generation stopped by the step callback after {stage} step {step + 1}")
        return {}

    return adapted


class _Stage:
    """A documented pipeline under its wurst 0.1 name: `model` is its denoiser, and the rest is the pipeline's."""

    _model_attribute = ""
    _pipeline_class: type = object
    _default_ref = ""

    def __init__(self, pipe):
        object.__setattr__(self, "pipe", pipe)

    @classmethod
    def from_pretrained(cls, ref: str | os.PathLike | None = None, device=None, dtype=None, low_memory: bool = False):
        device = parse_device(device) if device is not None else default_device()
        # wurst 0.1's default, kept for these names: bfloat16 on CUDA, float32 on every CPU.
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        pipe = cls._pipeline_class.from_pretrained(ref or cls._default_ref, torch_dtype=dtype, low_memory=low_memory)
        pipe.set_progress_bar_config(disable=True)  # wurst 0.1 showed no bars
        return cls(pipe.to(device))

    def __getattr__(self, name: str):
        return getattr(self.pipe, self._model_attribute if name == "model" else name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.pipe, self._model_attribute if name == "model" else name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.pipe, self._model_attribute if name == "model" else name)


class Prior(_Stage):
    """Deprecated: use WuerstchenPriorPipeline. Calls return the image embeddings tensor."""

    _model_attribute, _pipeline_class, _default_ref = "prior", WuerstchenPriorPipeline, DEFAULT_PRIOR

    def __call__(self, prompt, height=1024, width=1024, negative_prompt=None, num_images_per_prompt=1,
                 num_inference_steps=None, timesteps=None, guidance_scale=4.0, generator=None, latents=None,
                 callback_on_step_end: OldStepCallback | None = None) -> torch.Tensor:
        if num_inference_steps is None and timesteps is None:
            timesteps = DEFAULT_STAGE_C_TIMESTEPS
        return self.pipe(
            prompt=prompt, height=height, width=width, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps,
            timesteps=timesteps, guidance_scale=guidance_scale, generator=generator, latents=latents,
            callback_on_step_end=step_callback(callback_on_step_end, "prior"),
        ).image_embeddings


class Decoder(_Stage):
    """Deprecated: use WuerstchenDecoderPipeline. Calls return the images (a tensor by default)."""

    _model_attribute, _pipeline_class, _default_ref = "decoder", WuerstchenDecoderPipeline, DEFAULT_DECODER

    def __call__(self, image_embeddings, prompt="", negative_prompt=None, num_images_per_prompt=1,
                 num_inference_steps=12, timesteps=None, guidance_scale=0.0, generator=None, latents=None,
                 output_type="pt", callback_on_step_end: OldStepCallback | None = None):
        return self.pipe(
            image_embeddings, prompt=prompt, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps,
            timesteps=timesteps, guidance_scale=guidance_scale, generator=generator, latents=latents,
            output_type=output_type, callback_on_step_end=step_callback(callback_on_step_end, "decoder"),
        ).images


class Pipeline:
    """Deprecated: use WuerstchenCombinedPipeline (or wurst.generate). `prior` and `decoder` are the two
    stages under their wurst 0.1 names; calls default to 1024x1024 and the published Stage C schedule."""

    def __init__(self, prior: Prior, decoder: Decoder, prior_ref: str = "", decoder_ref: str = ""):
        self.prior, self.decoder = prior, decoder
        self.prior_ref, self.decoder_ref = prior_ref, decoder_ref

    @classmethod
    def from_pretrained(cls, prior: str | os.PathLike = DEFAULT_PRIOR, decoder: str | os.PathLike = DEFAULT_DECODER,
                        device=None, dtype=None, low_memory: bool = False) -> Pipeline:
        return cls(Prior.from_pretrained(prior, device, dtype, low_memory),
                   Decoder.from_pretrained(decoder, device, dtype, low_memory), str(prior), str(decoder))

    def compile(self, **options) -> Pipeline:
        """torch.compile both denoisers in place (fullgraph=True; `options` go to torch.compile)."""
        for stage in (self.prior, self.decoder):
            if stage.pipe._models and not isinstance(stage.model, torch.nn.Module):
                raise ValueError("compile() needs resident models: load the pipeline without low_memory")
            stage.model.compile(fullgraph=True, **options)
        return self

    def __call__(self, prompt, height=1024, width=1024, negative_prompt=None, num_images_per_prompt=1,
                 prior_num_inference_steps=None, prior_timesteps=None, prior_guidance_scale=4.0,
                 num_inference_steps=12, decoder_timesteps=None, decoder_guidance_scale=0.0, generator=None,
                 output_type="pil", callback_on_step_end: OldStepCallback | None = None):
        combined = WuerstchenCombinedPipeline.from_pipes(self.prior.pipe, self.decoder.pipe)
        return combined(
            prompt, height=height, width=width, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, prior_guidance_scale=prior_guidance_scale,
            **prior_schedule(prior_num_inference_steps, prior_timesteps),
            num_inference_steps=num_inference_steps, decoder_timesteps=decoder_timesteps,
            decoder_guidance_scale=decoder_guidance_scale, generator=generator, output_type=output_type,
            prior_callback_on_step_end=step_callback(callback_on_step_end, "prior"),
            callback_on_step_end=step_callback(callback_on_step_end, "decoder"),
        ).images
