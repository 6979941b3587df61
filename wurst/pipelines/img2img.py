"""WuerstchenImg2ImgPipeline and AutoPipelineForImage2Image: image to image, variations and reconstruction,
through Stage C's image encoder (the EfficientNet of the original release, wurst/effnet.py).

Shaped after diffusers' image-to-image pipelines: the text-to-image call of WuerstchenCombinedPipeline plus an
`image` and a `strength` in [0, 1].
- image to image: the image is encoded into Stage C's latent space, noised by the cosine schedule's forward
  process to t = strength, and Stage C runs from there with the prompt; then Stages B and A.
- strength 0 skips Stage C: the encoded latent itself goes to Stage B. That is `variations` (new seeds give new
  detail on the same layout) and `reconstruct` (the autoencoding path of the paper), which are this call.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wurst import sampler
from wurst.errors import ArgumentError, ConfigError
from wurst.pipelines import checks, preprocess
from wurst.pipelines.base import Generator
from wurst.pipelines.callbacks import StepCallback
from wurst.pipelines.combined import WuerstchenCombinedPipeline
from wurst.pipelines.decoder import WuerstchenDecoderPipeline
from wurst.pipelines.outputs import ImagePipelineOutput
from wurst.pipelines.prior import WuerstchenPriorPipeline
from wurst.weights.image_encoder import choose_image_encoder

DEFAULT_LONGEST_SIDE = 1024  # the size an image gets when height and width are not given


@dataclass(frozen=True)
class Img2ImgInputs:
    images: list[torch.Tensor]  # each (3, H, W) in [0, 1]
    prompts: list[str] | None  # one per image; None when prompt_embeds are given
    height: int
    width: int


def check_strength(strength: float, name: str = "strength") -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ArgumentError(f"{name} must be a number within [0, 1], got {strength!r}")
    return float(strength)


def default_size(image: torch.Tensor) -> tuple[int, int]:
    """An image's own aspect, its longer side at most 1024, each side rounded to the 128 grid (at least 128)."""
    h, w = image.shape[-2:]
    scale = min(1.0, DEFAULT_LONGEST_SIDE / max(h, w))
    grid = checks.SIZE_MULTIPLE
    return tuple(max(grid, round(side * scale / grid) * grid) for side in (h, w))  # type: ignore[return-value]


class WuerstchenImg2ImgPipeline(WuerstchenCombinedPipeline):
    """Image to image, variations and reconstruction: WuerstchenCombinedPipeline's components plus
    `image_encoder` (Stage C's EfficientNet encoder)."""

    _component_names = (*WuerstchenCombinedPipeline._component_names, "image_encoder")

    def __init__(self, *args, image_encoder: nn.Module, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._extra = types.SimpleNamespace(image_encoder=None)
        self.image_encoder = image_encoder
        self._check_widths()

    @classmethod
    def from_pipes(cls, prior_pipe: WuerstchenPriorPipeline, decoder_pipe: WuerstchenDecoderPipeline,
                   image_encoder: nn.Module | None = None) -> WuerstchenImg2ImgPipeline:
        """Join two loaded pipelines and an encoder (default: the published one, see from_pretrained)."""
        pipe = super().from_pipes(prior_pipe, decoder_pipe)
        pipe._extra = types.SimpleNamespace(image_encoder=None)
        folder = getattr(prior_pipe, "name_or_path", None)
        pipe.image_encoder = choose_image_encoder(image_encoder, prior=folder, dtype=prior_pipe.dtype).to(
            prior_pipe.device, prior_pipe.dtype)
        pipe._check_widths()
        return pipe

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike = "warp-ai/wuerstchen", *,
        prior_repo: str | os.PathLike | None = None, image_encoder: str | os.PathLike | nn.Module | None = None,
        torch_dtype: torch.dtype | None = None, low_memory: bool = False, variant: str | None = None,
        **components,
    ) -> WuerstchenImg2ImgPipeline:
        """As WuerstchenCombinedPipeline.from_pretrained, plus the image encoder: `image_encoder` (an original
        model_v2_stage_b.pt, a converted folder holding stage_c_encoder.safetensors, or a module); by default the
        converted prior folder's, else the published one, fetched once through the Hugging Face cache."""
        if prior_repo is not None:  # the encoder first: a missing one is found before the large models load
            image_encoder = choose_image_encoder(image_encoder, prior=prior_repo,
                                                 dtype=torch_dtype or torch.float32)
        combined = WuerstchenCombinedPipeline.from_pretrained(
            pretrained_model_name_or_path, prior_repo=prior_repo, torch_dtype=torch_dtype, low_memory=low_memory,
            variant=variant, **components)
        return cls.from_pipes(combined.prior_pipe, combined.decoder_pipe, image_encoder)

    def _owner(self, name: str) -> tuple[Any, str]:
        return (self.__dict__["_extra"], name) if name == "image_encoder" else super()._owner(name)

    def _check_widths(self) -> None:
        width = self.image_encoder.config.c_latent
        prior, decoder = self.prior_pipe.prior.config.c_in, self.decoder_pipe.decoder.config.effnet_embd
        if width != prior or width != decoder:
            raise ConfigError(f"the image encoder gives {width} channels, but Stage C takes {prior} and Stage B "
                              f"{decoder}: it belongs to another model")

    def to(self, *args, **kwargs) -> WuerstchenImg2ImgPipeline:
        super().to(*args, **kwargs)
        # Where the prior's models now live (with offload, the CPU: the encoder then visits the device to run).
        self.image_encoder.to(self.prior_pipe.device, self.prior_pipe.dtype)
        return self

    # -- the steps ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, image: Any, height: int, width: int) -> torch.Tensor:
        """Images -> their embeddings (N, 16, h, w) in Stage B's range, (h, w) the Stage C latent size of a
        height x width image. Each image is resized and center-cropped to 32·(h, w) first (wurst/preprocess.py)."""
        h, w = self.prior_pipe.latent_size(height, width)
        factor = self.image_encoder.config.downsampling
        pixels = preprocess.preprocess(preprocess.as_list(image), h * factor, w * factor)
        device, dtype = self.prior_pipe._execution_device, self.prior_pipe.dtype
        home = next(self.image_encoder.parameters()).device
        encoder = self.image_encoder.to(device)  # a no-op unless the models are offloaded to the CPU
        try:
            return encoder(pixels.to(device, dtype))
        finally:
            self.image_encoder.to(home)

    @torch.no_grad()
    def image_embeddings(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.8,
        height: int | None = None,
        width: int | None = None,
        prior_num_inference_steps: int = 60,
        prior_timesteps: list[float] | None = None,
        prior_guidance_scale: float = 4.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        prior_callback_on_step_end: StepCallback | None = None,
        prior_callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' signature
    ) -> torch.Tensor:
        """The Stage C half of __call__: image embeddings (N·n, 16, h, w) in Stage B's range. At strength 0 they
        are the encoded images themselves (each repeated n times), and no random number is drawn."""
        inputs = self._check_inputs(prompt, image, strength, height, width, prompt_embeds)
        stage_c = self._check_stage_c(num_images_per_prompt, prior_num_inference_steps, prior_timesteps,
                                      prior_guidance_scale)
        return self._image_embeddings(
            inputs, strength, *stage_c, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, generator=generator, callback=prior_callback_on_step_end,
            callback_inputs=prior_callback_on_step_end_tensor_inputs)

    @staticmethod
    def _check_stage_c(num_images_per_prompt, prior_num_inference_steps, prior_timesteps, prior_guidance_scale):
        """(images per input, Stage C's schedule, its guidance scale), checked."""
        n = checks.check_count("num_images_per_prompt", num_images_per_prompt)
        schedule = checks.checked_timesteps("prior_num_inference_steps", prior_num_inference_steps,
                                            "prior_timesteps", prior_timesteps)
        return n, schedule, checks.check_guidance("prior_guidance_scale", prior_guidance_scale)

    def _image_embeddings(self, inputs: Img2ImgInputs, strength: float, n: int, schedule: torch.Tensor,
                          guidance_scale: float, *, negative_prompt, prompt_embeds, negative_prompt_embeds, generator,
                          callback, callback_inputs) -> torch.Tensor:
        """image_embeddings on checked inputs."""
        encoded = self.encode_image(inputs.images, inputs.height, inputs.width)
        if strength == 0:
            return encoded.repeat_interleave(n, dim=0)
        config, scheduler = self.prior_pipe.config, self.prior_pipe.scheduler
        latents = sampler.to_stage_c_range(encoded, latent_mean=config.latent_mean,
                                           latent_std=config.latent_std).repeat_interleave(n, dim=0)
        noise = sampler.randn(latents.shape, generator, latents.dtype, latents.device)  # text to image's first draw
        return self.prior_pipe(
            prompt=inputs.prompts, height=inputs.height, width=inputs.width,
            timesteps=sampler.timesteps_from(schedule, strength).tolist(), guidance_scale=guidance_scale,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            num_images_per_prompt=n, generator=generator,
            latents=sampler.add_noise(latents, noise, strength, scheduler.s, scheduler.scaler), output_type="pt",
            return_dict=False, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback_inputs,
        )[0]

    def _check_inputs(self, prompt, image, strength, height, width, prompt_embeds) -> Img2ImgInputs:
        """The images, their prompts and the output size, each argument checked. Files are read here, once."""
        if image is None:
            raise ArgumentError("image is required: a PIL image, numpy array, tensor or file path, or a list of them")
        check_strength(strength)
        images = preprocess.as_list(image)
        count = len(images)
        names = [f"image {i + 1} of {count}" if count > 1 else "image" for i in range(count)]
        images = [preprocess.to_tensor(one, name) for one, name in zip(images, names, strict=True)]
        prompts = None
        if prompt_embeds is None:
            prompts = checks.as_prompt_list("" if prompt is None else prompt)
            if len(prompts) not in (1, count):
                raise ArgumentError(f"prompt has {len(prompts)} entries for {count} images: give one, or one per "
                                    "image")
            prompts = prompts * count if len(prompts) == 1 else prompts
        elif prompt is not None:
            raise ArgumentError("Cannot forward both `prompt` and `prompt_embeds`: give only one of the two")
        elif prompt_embeds.shape[0] != count:
            raise ArgumentError(f"prompt_embeds has {prompt_embeds.shape[0]} rows for {count} images")
        if height is None or width is None:
            auto_h, auto_w = default_size(images[0])
            height, width = height or auto_h, width or auto_w
        checks.check_size("height", height), checks.check_size("width", width)
        return Img2ImgInputs(images, prompts, height, width)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.8,
        height: int | None = None,
        width: int | None = None,
        prior_num_inference_steps: int = 60,
        prior_timesteps: list[float] | None = None,
        prior_guidance_scale: float = 4.0,
        num_inference_steps: int = 12,
        decoder_timesteps: list[float] | None = None,
        decoder_guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prior_callback_on_step_end: StepCallback | None = None,
        prior_callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' signature
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006
    ) -> ImagePipelineOutput | tuple:
        """Images for each input image, `num_images_per_prompt` per image, in image order. `prompt` is one for
        all images or one per image (empty by default); `strength` in [0, 1] is how far Stage C noises the
        encoded image (1: nearly text to image; 0: the image's own latent, Stage C skipped). height and width
        default to the first image's aspect with the longer side at most 1024, on the 128 grid; each image is
        resized and center-cropped to that aspect. One generator (or one per output image) drives the noising,
        Stage C and Stage B in turn, so a seed reproduces the images."""
        # Stage B's arguments are checked before anything runs.
        checks.checked_timesteps("num_inference_steps", num_inference_steps, "decoder_timesteps", decoder_timesteps)
        checks.check_guidance("decoder_guidance_scale", decoder_guidance_scale)
        checks.check_output_type(output_type, (*checks.OUTPUT_TYPES, "latent"))
        checks.check_callback_inputs(callback_on_step_end_tensor_inputs,
                                     self.decoder_pipe._callback_tensor_inputs, "callback_on_step_end_tensor_inputs")
        inputs = self._check_inputs(prompt, image, strength, height, width, prompt_embeds)
        stage_c = self._check_stage_c(num_images_per_prompt, prior_num_inference_steps, prior_timesteps,
                                      prior_guidance_scale)
        embeddings = self._image_embeddings(
            inputs, strength, *stage_c, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, generator=generator, callback=prior_callback_on_step_end,
            callback_inputs=prior_callback_on_step_end_tensor_inputs)
        return self.decoder_pipe(
            image_embeddings=embeddings, prompt=inputs.prompts if inputs.prompts is not None else "",
            num_inference_steps=num_inference_steps, timesteps=decoder_timesteps,
            guidance_scale=decoder_guidance_scale, negative_prompt=negative_prompt, generator=generator,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

    def variations(self, image: Any, prompt: str | list[str] | None = None, **kwargs) -> ImagePipelineOutput | tuple:
        """New images with each image's layout and content and new detail: its encoded Stage C latent decoded by
        Stage B, `num_images_per_prompt` per image, from the generator's seeds. No prompt is needed (Stage B's
        text conditioning is empty by default). This is __call__ at strength 0; other keywords are __call__'s."""
        return self(prompt=prompt, image=image, strength=0.0, **kwargs)

    def reconstruct(self, image: Any, **kwargs) -> ImagePipelineOutput | tuple:
        """Each image encoded and decoded again by Stages B and A, the autoencoding path the Würstchen paper
        measures: one output per image. The same computation as variations with one image per input."""
        if kwargs.get("num_images_per_prompt", 1) != 1:
            raise ArgumentError("reconstruct gives one image per input: use variations for several")
        return self.variations(image, **kwargs)


class AutoPipelineForImage2Image:
    """diffusers' AutoPipelineForImage2Image for Würstchen: the decoder repository (its prior found through the
    model card, or `prior_repo=`) gives WuerstchenImg2ImgPipeline."""

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("AutoPipelineForImage2Image is built with AutoPipelineForImage2Image.from_pretrained(...)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike,
                        **kwargs) -> WuerstchenImg2ImgPipeline:
        return WuerstchenImg2ImgPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
