"""WuerstchenDecoderPipeline: Stages B and A, image embeddings + prompts -> images, with diffusers' documented
interface."""

from __future__ import annotations

import os

import numpy as np
import torch

from wurst import sampler
from wurst.errors import ArgumentError, NumericalError
from wurst.models.clip import CLIPTextEncoder
from wurst.models.stage_a import StageA
from wurst.models.stage_b import StageB
from wurst.models.tokenizer import CLIPTokenizer
from wurst.pipelines import checks
from wurst.pipelines.base import Generator, PipelineBase, pipeline_from_repository
from wurst.pipelines.callbacks import StepCallback, StepEnd
from wurst.pipelines.outputs import ImagePipelineOutput, as_output, convert_images
from wurst.weights.repository import DecoderPipelineConfig, SchedulerConfig, read_repository


class WuerstchenDecoderPipeline(PipelineBase):
    """Stages B and A: image embeddings (B, 16, h, w) and prompts -> images (B·n, 3, H, W), where the Stage B
    latent is int(h · 10.67) x int(w · 10.67) and the image four times that."""

    _models = ("text_encoder", "decoder", "vqgan")
    _component_names = ("tokenizer", "text_encoder", "decoder", "scheduler", "vqgan")
    _denoiser = _stage = "decoder"
    _callback_tensor_inputs = ["latents", "text_encoder_hidden_states", "negative_prompt_embeds", "image_embeddings"]

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextEncoder,
        decoder: StageB,
        scheduler: SchedulerConfig | None,
        vqgan: StageA,
        latent_dim_scale: float = 10.67,
    ) -> None:
        super().__init__()
        self.tokenizer, self.text_encoder, self.decoder, self.vqgan = tokenizer, text_encoder, decoder, vqgan
        self.scheduler = scheduler or SchedulerConfig()
        self.config = DecoderPipelineConfig(latent_dim_scale)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike = "warp-ai/wuerstchen", *,
        torch_dtype: torch.dtype | None = None, low_memory: bool = False, variant: str | None = None,
        **components,
    ) -> WuerstchenDecoderPipeline:
        """A decoder repository: hub id (through the Hugging Face cache) or local folder, hub or converted
        layout. Components given by name (decoder=..., vqgan=...) are used instead of the repository's.
        low_memory=True loads each model only while it runs. `variant` ("fp16", "bf16") reads the
        `<stem>.<variant>.safetensors` weight files, as diffusers does."""
        repo = read_repository(pretrained_model_name_or_path, "decoder", variant)
        return pipeline_from_repository(cls, repo, torch_dtype=torch_dtype, low_memory=low_memory,
                                        components=components)

    def latent_size(self, embedding_height: int, embedding_width: int) -> tuple[int, int]:
        scale = self.config.latent_dim_scale
        return int(embedding_height * scale), int(embedding_width * scale)

    def check_embeddings(self, image_embeddings) -> torch.Tensor:
        """A (B, 16, h, w) tensor, a list of them, or a numpy array."""
        if isinstance(image_embeddings, (list, tuple)) and all(isinstance(e, torch.Tensor) for e in image_embeddings):
            image_embeddings = torch.cat(list(image_embeddings)) if image_embeddings else None
        if isinstance(image_embeddings, np.ndarray):
            image_embeddings = torch.from_numpy(image_embeddings)
        channels = self.decoder.config.effnet_embd
        shape = tuple(image_embeddings.shape) if isinstance(image_embeddings, torch.Tensor) else ()
        if len(shape) != 4 or shape[1] != channels or shape[0] == 0:
            got = f"shape {shape}" if shape else type(image_embeddings).__name__
            raise ArgumentError(f"image_embeddings must be a (B, {channels}, h, w) tensor with B > 0, got {got}")
        return image_embeddings.to(self._execution_device, self.dtype)

    @torch.no_grad()
    def __call__(
        self,
        image_embeddings: torch.Tensor | list[torch.Tensor],
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 12,
        timesteps: list[float] | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' signature
    ) -> ImagePipelineOutput | tuple:
        """Images for each row of `image_embeddings`, `num_images_per_prompt` per row, in row order.

        `prompt` (empty by default) is one string for every row, or a list whose length divides the number of
        rows: prompt k conditions the k-th consecutive group of rows, so the B·n embeddings of a prior call with
        B prompts go with those B prompts. Guidance applies when guidance_scale > 1: the unconditional branch
        sees zeroed image embeddings and the negative (by default empty) prompt. output_type: "pil", "np",
        "pt", or "latent" for the Stage B latents. return_dict=False gives a tuple `(images,)`, as documented
        (diffusers 0.42 returns the bare images there)."""
        embeddings = self.check_embeddings(image_embeddings)
        prompts = checks.as_prompt_list("" if prompt is None else prompt)
        if embeddings.shape[0] % len(prompts):
            raise ArgumentError(f"prompt has {len(prompts)} entries, which does not divide the "
                                f"{embeddings.shape[0]} image embeddings")
        n = checks.check_count("num_images_per_prompt", num_images_per_prompt)
        guidance = checks.check_guidance("guidance_scale", guidance_scale)
        steps = checks.checked_timesteps("num_inference_steps", num_inference_steps, "timesteps", timesteps)
        checks.check_output_type(output_type, (*checks.OUTPUT_TYPES, "latent"))
        names = checks.check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs,
                                             "callback_on_step_end_tensor_inputs")
        shape = (embeddings.shape[0] * n, self.decoder.config.c_in, *self.latent_size(*embeddings.shape[-2:]))
        checks.check_latents(latents, shape)
        guided = guidance > 1
        negatives = checks.negative_prompts(negative_prompt, len(prompts)) if guided else []

        # Every image gets its own embedding row and the text of the prompt that row belongs to.
        rows_per_prompt = shape[0] // len(prompts)
        text = self.encode_text(self.tokenizer, prompts + negatives).repeat_interleave(rows_per_prompt, dim=0)
        tensors = {"text_encoder_hidden_states": text,  # [prompt rows; negative rows] when guided
                   "image_embeddings": embeddings, "negative_prompt_embeds": text[len(text) // 2:] if guided else None}
        latents = self.initial_latents(shape, latents, generator)

        with self.placement.running("decoder") as decoder:

            def conditioning():
                """What every step shares, from the current tensors: the image embeddings per image (zeroed for
                the unconditional half when guided) and the text."""
                effnet = tensors["image_embeddings"].to(embeddings).repeat_interleave(n, dim=0)
                effnet = torch.cat([effnet, torch.zeros_like(effnet)]) if guided else effnet
                return decoder.condition(effnet, tensors["text_encoder_hidden_states"], shape[-2:])

            condition = {"cond": conditioning()}  # once, unless a step callback edits what it depends on

            def model(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
                return decoder(x, r, condition["cond"])

            def on_edit(edited: dict[str, torch.Tensor]) -> None:
                if "text_encoder_hidden_states" in edited or "image_embeddings" in edited:
                    condition["cond"] = conditioning()

            step_end = StepEnd(self, callback_on_step_end, names, tensors, on_edit)
            latents = self.denoise(model=sampler.guided(model, guidance) if guided else model, denoiser=decoder,
                                   latents=latents, timesteps=steps, generator=generator, scheduler=self.scheduler,
                                   step_end=step_end)
        if output_type == "latent":
            return as_output(latents, return_dict, ImagePipelineOutput)
        return as_output(convert_images(self.decode(latents), output_type), return_dict, ImagePipelineOutput)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Stage B latents -> images clamped to [0, 1] (scaled into the VQGAN's range, not quantised)."""
        with self.placement.running("vqgan") as vqgan:
            images = vqgan.decode(latents.to(self._execution_device, self.dtype) * vqgan.config.scale_factor)
        if not torch.isfinite(images).all():  # clamp would quietly turn NaN into black pixels
            raise NumericalError(f"the Stage A (VQGAN) images hold NaN or inf (in {images.dtype}): "
                                 "use bfloat16 or float32, and check the vqgan weights")
        return images.clamp(0, 1)
