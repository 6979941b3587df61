"""WuerstchenCombinedPipeline (text -> image: the prior, then the decoder) and AutoPipelineForText2Image, with
diffusers' documented interface."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from wurst.models.clip import CLIPTextEncoder
from wurst.models.stage_a import StageA
from wurst.models.stage_b import StageB
from wurst.models.stage_c import StageC
from wurst.models.tokenizer import CLIPTokenizer
from wurst.pipelines import checks
from wurst.pipelines.base import Generator, pipeline_from_repository
from wurst.pipelines.callbacks import StepCallback
from wurst.pipelines.decoder import WuerstchenDecoderPipeline
from wurst.pipelines.lora import LoraLoaderMixin
from wurst.pipelines.outputs import ImagePipelineOutput
from wurst.pipelines.prior import WuerstchenPriorPipeline
from wurst.weights.model_card import prior_of
from wurst.weights.repository import SchedulerConfig, read_repository
from wurst.weights.save import PRIOR_FOLDER, save_repositories


class WuerstchenCombinedPipeline(LoraLoaderMixin):
    """Text to image: WuerstchenPriorPipeline (`prior_pipe`), then WuerstchenDecoderPipeline (`decoder_pipe`).
    The components carry diffusers' names: the decoder's plainly, the prior's with a `prior_` prefix."""

    _component_names = ("tokenizer", "text_encoder", "decoder", "scheduler", "vqgan", "prior_tokenizer",
                        "prior_text_encoder", "prior_prior", "prior_scheduler")

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextEncoder,
        decoder: StageB,
        scheduler: SchedulerConfig | None,
        vqgan: StageA,
        prior_tokenizer: CLIPTokenizer,
        prior_text_encoder: CLIPTextEncoder,
        prior_prior: StageC,
        prior_scheduler: SchedulerConfig | None,
    ) -> None:
        self.prior_pipe = WuerstchenPriorPipeline(prior_tokenizer, prior_text_encoder, prior_prior, prior_scheduler)
        self.decoder_pipe = WuerstchenDecoderPipeline(tokenizer, text_encoder, decoder, scheduler, vqgan)

    @classmethod
    def from_pipes(cls, prior_pipe: WuerstchenPriorPipeline,
                   decoder_pipe: WuerstchenDecoderPipeline) -> WuerstchenCombinedPipeline:
        """Join two loaded pipelines, keeping their configs, placement and offload state."""
        pipe = cls.__new__(cls)
        pipe.prior_pipe, pipe.decoder_pipe = prior_pipe, decoder_pipe
        return pipe

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike = "warp-ai/wuerstchen", *,
        prior_repo: str | os.PathLike | None = None, torch_dtype: torch.dtype | None = None,
        low_memory: bool = False, variant: str | None = None, **components,
    ) -> WuerstchenCombinedPipeline:
        """The decoder repository (hub id or folder) and the prior its model card names under `prior:`, as
        diffusers finds it; `prior_repo` names the prior instead. Components given by name (decoder=...,
        prior_prior=...) replace the loaded ones. `variant` ("fp16", "bf16") reads both repositories'
        `<stem>.<variant>.safetensors` weight files."""
        unknown = sorted(set(components) - set(cls._component_names))
        if unknown:
            raise TypeError(f"from_pretrained() got an unexpected keyword argument '{unknown[0]}'")
        prior_parts = {k.removeprefix("prior_"): v for k, v in components.items() if k.startswith("prior_")}
        decoder_parts = {k: v for k, v in components.items() if not k.startswith("prior_")}
        options = dict(torch_dtype=torch_dtype, low_memory=low_memory)
        # A named prior is read first (the order of the stages); otherwise the decoder's card names it.
        load_prior = functools.partial(WuerstchenPriorPipeline.from_pretrained, **options, variant=variant,
                                       **prior_parts)
        prior_pipe = None if prior_repo is None else load_prior(prior_repo)
        decoder_repo = read_repository(pretrained_model_name_or_path, "decoder", variant)
        if prior_pipe is None:
            prior_pipe = load_prior(prior_of(decoder_repo.folder))
        decoder_pipe = pipeline_from_repository(WuerstchenDecoderPipeline, decoder_repo, **options,
                                                components=decoder_parts)
        return cls.from_pipes(prior_pipe, decoder_pipe)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None) -> None:
        """The decoder repository at `save_directory`, its model card naming the prior repository saved inside it
        as `prior/` (a path from the decoder's folder, where from_pretrained looks), so that
        from_pretrained(save_directory) reads both back. One atomic save; otherwise as
        WuerstchenDecoderPipeline.save_pretrained. (Image to image's encoder is not part of the layout.)"""
        repositories = {".": self.decoder_pipe.repository_contents(prior=PRIOR_FOLDER),
                        PRIOR_FOLDER: self.prior_pipe.repository_contents()}
        save_repositories(save_directory, repositories=repositories, variant=variant,
                          safe_serialization=safe_serialization)

    def _lora_pipe(self) -> WuerstchenPriorPipeline:
        """LoRA adapts the prior and its text encoder, as through `prior_pipe` in diffusers."""
        return self.__dict__["prior_pipe"]

    def _owner(self, name: str) -> tuple[Any, str]:
        """Where component `name` lives: the prior's under their `prior_` names, the decoder's under their own."""
        if name.startswith("prior_"):
            return self.__dict__["prior_pipe"], name.removeprefix("prior_")
        return self.__dict__["decoder_pipe"], name

    def __getattr__(self, name: str) -> Any:
        """The components, under diffusers' names: `decoder`, `vqgan`, ... and `prior_prior`, `prior_text_encoder`."""
        if name in self._component_names:
            return getattr(*self._owner(name))
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._component_names:  # e.g. pipe.prior_prior = torch.compile(pipe.prior_prior)
            setattr(*self._owner(name), value)
        else:
            super().__setattr__(name, value)

    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._component_names}

    @property
    def device(self) -> torch.device:
        return self.decoder_pipe.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder_pipe.dtype

    def to(self, *args, **kwargs) -> WuerstchenCombinedPipeline:
        self.prior_pipe.to(*args, **kwargs)
        self.decoder_pipe.to(*args, **kwargs)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        self.prior_pipe.enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        self.decoder_pipe.enable_model_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None,
                                      device: torch.device | str | None = None) -> None:
        self.prior_pipe.enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        self.decoder_pipe.enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)

    def set_progress_bar_config(self, **kwargs) -> None:
        self.prior_pipe.set_progress_bar_config(**kwargs)
        self.decoder_pipe.set_progress_bar_config(**kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 512,
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
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prior_callback_on_step_end: StepCallback | None = None,
        prior_callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' signature
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006
    ) -> ImagePipelineOutput | tuple:
        """Images for each prompt, `num_images_per_prompt` per prompt, in prompt order. `latents` are the
        prior's starting noise; `negative_prompt` serves both stages' guidance; one generator (or one per
        image) drives both stages in turn, as in diffusers, so a seed reproduces diffusers' image.
        `prior_callback_on_step_end` runs after each Stage C step, `callback_on_step_end` after each Stage B step."""
        # What the prior pipeline names differently, and the decoder's arguments, are checked before the prior
        # runs, so a bad argument costs no compute and is named as given. The prior checks the rest itself.
        # Like diffusers, a prompt beside prompt_embeds is allowed: the embeddings go to the prior, the text to
        # the decoder.
        checks.check_guidance("prior_guidance_scale", prior_guidance_scale)
        checks.checked_timesteps("prior_num_inference_steps", prior_num_inference_steps, "prior_timesteps",
                                 prior_timesteps)
        checks.checked_timesteps("num_inference_steps", num_inference_steps, "decoder_timesteps", decoder_timesteps)
        checks.check_guidance("decoder_guidance_scale", decoder_guidance_scale)
        checks.check_output_type(output_type)
        checks.check_callback_inputs(prior_callback_on_step_end_tensor_inputs, self.prior_pipe._callback_tensor_inputs,
                                     "prior_callback_on_step_end_tensor_inputs")
        checks.check_callback_inputs(callback_on_step_end_tensor_inputs,
                                     self.decoder_pipe._callback_tensor_inputs, "callback_on_step_end_tensor_inputs")
        if prompt is not None:
            checks.negative_prompts(negative_prompt, len(checks.as_prompt_list(prompt)))
        embeddings = self.prior_pipe(
            prompt=prompt if prompt_embeds is None else None, height=height, width=width,
            num_inference_steps=prior_num_inference_steps, timesteps=prior_timesteps,
            guidance_scale=prior_guidance_scale,
            negative_prompt=negative_prompt if negative_prompt_embeds is None else None,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            output_type="pt", return_dict=False, callback_on_step_end=prior_callback_on_step_end,
            callback_on_step_end_tensor_inputs=prior_callback_on_step_end_tensor_inputs,
        )[0]
        return self.decoder_pipe(
            image_embeddings=embeddings, prompt=prompt if prompt is not None else "",
            num_inference_steps=num_inference_steps, timesteps=decoder_timesteps,
            guidance_scale=decoder_guidance_scale, negative_prompt=negative_prompt, generator=generator,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )


class AutoPipelineForText2Image:
    """diffusers' AutoPipelineForText2Image for Würstchen: the decoder repository gives the combined pipeline, its
    prior found through the model card. (A prior repository is refused as the combined pipeline refuses it.)"""

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("AutoPipelineForText2Image is built with AutoPipelineForText2Image.from_pretrained(...)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike,
                        **kwargs) -> WuerstchenCombinedPipeline:
        return WuerstchenCombinedPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
