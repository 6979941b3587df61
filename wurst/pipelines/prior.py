"""WuerstchenPriorPipeline: Stage C, prompts -> image embeddings, with diffusers' documented interface."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from wurst import sampler
from wurst.models.clip import CLIPTextEncoder
from wurst.models.stage_c import StageC
from wurst.models.tokenizer import CLIPTokenizer
from wurst.pipelines import checks
from wurst.pipelines.base import Generator, PipelineBase, pipeline_from_repository
from wurst.pipelines.callbacks import StepCallback, StepEnd
from wurst.pipelines.lora import LoraLoaderMixin
from wurst.pipelines.outputs import WuerstchenPriorPipelineOutput, as_output
from wurst.weights.repository import PriorPipelineConfig, SchedulerConfig, read_repository


class WuerstchenPriorPipeline(PipelineBase, LoraLoaderMixin):
    """Stage C: prompts -> image embeddings (B·n, 16, ceil(H / 42.67), ceil(W / 42.67)) in Stage B's range."""

    _models = ("text_encoder", "prior")
    _component_names = ("tokenizer", "text_encoder", "prior", "scheduler")
    _denoiser = _stage = "prior"
    _callback_tensor_inputs = ["latents", "text_encoder_hidden_states", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextEncoder,
        prior: StageC,
        scheduler: SchedulerConfig | None = None,
        latent_mean: float = 42.0,
        latent_std: float = 1.0,
        resolution_multiple: float = 42.67,
    ) -> None:
        super().__init__()
        self.tokenizer, self.text_encoder, self.prior = tokenizer, text_encoder, prior
        self.scheduler = scheduler or SchedulerConfig()
        self.config = PriorPipelineConfig(latent_mean, latent_std, resolution_multiple)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike = "warp-ai/wuerstchen-prior", *,
        torch_dtype: torch.dtype | None = None, low_memory: bool = False, variant: str | None = None,
        **components,
    ) -> WuerstchenPriorPipeline:
        """A prior repository: hub id (through the Hugging Face cache) or local folder, hub or converted layout.
        Components given by name (prior=..., text_encoder=...) are used instead of the repository's.
        low_memory=True loads each model only while it runs. `variant` ("fp16", "bf16") reads the
        `<stem>.<variant>.safetensors` weight files, as diffusers does."""
        repo = read_repository(pretrained_model_name_or_path, "prior", variant)
        return pipeline_from_repository(cls, repo, torch_dtype=torch_dtype, low_memory=low_memory,
                                        components=components)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        multiple = self.config.resolution_multiple
        return math.ceil(height / multiple), math.ceil(width / multiple)

    def encode_prompt(
        self, *, prompt: list[str] | None, negative_prompt: str | Sequence[str] | None,
        prompt_embeds: torch.Tensor | None, negative_prompt_embeds: torch.Tensor | None,
        num_images_per_prompt: int, guided: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt states, negative states or None), each with num_images_per_prompt rows per prompt."""
        count = len(prompt) if prompt is not None else prompt_embeds.shape[0]
        negatives = checks.negative_prompts(negative_prompt, count) if guided and negative_prompt_embeds is None else []
        texts = (prompt or []) + negatives
        states = self.encode_text(self.tokenizer, texts) if texts else None  # one batch for both
        if prompt_embeds is None:
            prompt_embeds, states = states[:count], states[count:]
        if guided and negative_prompt_embeds is None:
            negative_prompt_embeds = states
        device, dtype, n = self._execution_device, self.dtype, num_images_per_prompt
        prompt_embeds = prompt_embeds.to(device, dtype).repeat_interleave(n, dim=0)
        if not guided:
            return prompt_embeds, None
        return prompt_embeds, negative_prompt_embeds.to(device, dtype).repeat_interleave(n, dim=0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 60,
        timesteps: list[float] | None = None,
        guidance_scale: float = 8.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' signature
    ) -> WuerstchenPriorPipelineOutput | tuple:
        """Image embeddings for each prompt, `num_images_per_prompt` per prompt, in prompt order: a tensor
        ("pt") or a numpy array ("np"). Guidance applies when guidance_scale > 1, against `negative_prompt`
        (empty by default) or `negative_prompt_embeds`. `timesteps`, when given, replaces num_inference_steps."""
        checks.check_text_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        prompts = checks.as_prompt_list(prompt) if prompt is not None else None
        checks.check_size("height", height), checks.check_size("width", width)
        n = checks.check_count("num_images_per_prompt", num_images_per_prompt)
        guidance = checks.check_guidance("guidance_scale", guidance_scale)
        steps = checks.checked_timesteps("num_inference_steps", num_inference_steps, "timesteps", timesteps)
        checks.check_output_type(output_type, ("pt", "np"))
        names = checks.check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs,
                                             "callback_on_step_end_tensor_inputs")
        batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        shape = (batch * n, self.prior.config.c_in, *self.latent_size(height, width))
        checks.check_latents(latents, shape)
        if prompts is not None:
            checks.negative_prompts(negative_prompt, batch)

        guided = guidance > 1
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompts, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=n, guided=guided,
        )
        text = torch.cat([prompt_embeds, negative_prompt_embeds]) if guided else prompt_embeds
        latents = self.initial_latents(shape, latents, generator)

        with self.placement.running("prior") as prior:
            condition = {"text_kv": prior.condition(text)}  # once: it is the same at every step

            def model(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
                return prior(x, r, condition["text_kv"])

            def on_edit(edited: dict[str, torch.Tensor]) -> None:
                if "text_encoder_hidden_states" in edited:
                    condition["text_kv"] = prior.condition(edited["text_encoder_hidden_states"])

            step_end = StepEnd(self, callback_on_step_end, names,
                               {"text_encoder_hidden_states": text, "negative_prompt_embeds": negative_prompt_embeds},
                               on_edit)
            latents = self.denoise(model=sampler.guided(model, guidance) if guided else model, denoiser=prior,
                                   latents=latents, timesteps=steps, generator=generator, scheduler=self.scheduler,
                                   step_end=step_end)
        embeddings = sampler.to_stage_b_range(latents, latent_mean=self.config.latent_mean,
                                              latent_std=self.config.latent_std)
        if output_type == "np":
            embeddings = embeddings.cpu().float().numpy()
        return as_output(embeddings, return_dict, WuerstchenPriorPipelineOutput)
