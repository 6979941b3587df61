"""Turning prompts into images: thin glue between the tokenizers, text encoders, denoisers and the sampler.

`Prior` runs Stage C alone (prompts -> image embeddings), so it can be run or cached on its own.
`Decoder` runs Stages B and A (image embeddings + prompts -> images).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import sampler
from .clip import CLIPTextConfig, CLIPTextEncoder, load_clip_text_encoder
from .errors import ConfigError, GenerationStopped, ModelNotFoundError, NumericalError
from .loader import SAME_NAMES, config_from_dict, load_module, read_config, read_json, read_safetensors, resolve
from .stage_a import StageA, StageAConfig, load_stage_a
from .stage_b import StageB, StageBConfig, load_stage_b
from .stage_c import StageC, StageCConfig, load_stage_c
from .tokenizer import CLIPTokenizer

Generator = torch.Generator | Sequence[torch.Generator] | None
# Called after every sampler step with (stage, step index, timestep, latents): stage is "prior" or "decoder".
# Returning False stops the generation, which then raises GenerationStopped.
StepCallback = Callable[[str, int, float, torch.Tensor], bool | None]

SIZE_MULTIPLE = 128  # what both U-Nets' resampling needs of an image side
LARGEST_TRAINED = 2048


@dataclass(frozen=True)
class PriorPipelineConfig:
    """`model_index.json` of a prior repository. The prior's output is mapped to Stage B's input range with
    `x * latent_mean - latent_std` (the names are diffusers'; the map undoes training's (x + 1) / 42)."""

    latent_mean: float = 42.0
    latent_std: float = 1.0
    resolution_multiple: float = 42.67


@dataclass(frozen=True)
class DecoderPipelineConfig:
    """`model_index.json` of a decoder repository: Stage B latents are this many times the Stage C size."""

    latent_dim_scale: float = 10.67


@dataclass(frozen=True)
class SchedulerConfig:
    """`scheduler/scheduler_config.json`: the cosine schedule's offset and time scaler."""

    s: float = 0.008
    scaler: float = 1.0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# wurst's own compact layout (written by tools/convert_weights.py): one folder per repository holding
# wurst.json (every config), one safetensors file per model under wurst's module names, and tokenizer/.
CONVERTED_INDEX = "wurst.json"
MODELS = {"stage_c": (StageCConfig, StageC), "stage_b": (StageBConfig, StageB), "stage_a": (StageAConfig, StageA),
          "text_encoder": (CLIPTextConfig, CLIPTextEncoder)}  # fmt: skip


# Where each model of a hub repository lives: folder, config class, loader.
HUB_MODELS = {
    "prior": {"stage_c": ("prior", StageCConfig, load_stage_c),
              "text_encoder": ("text_encoder", CLIPTextConfig, load_clip_text_encoder)},
    "decoder": {"stage_b": ("decoder", StageBConfig, load_stage_b), "stage_a": ("vqgan", StageAConfig, load_stage_a),
                "text_encoder": ("text_encoder", CLIPTextConfig, load_clip_text_encoder)},
}  # fmt: skip
PIPELINE_CLASSES = {"prior": "WuerstchenPriorPipeline", "decoder": "WuerstchenDecoderPipeline"}


class OnDemand:
    """Low-memory mode: a model that is loaded from its checkpoint each time it is used and released right
    after, so that only the model at work is resident. Its config is at hand without loading it."""

    def __init__(self, config, load: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype):
        self.config, self.load, self.device, self.dtype = config, load, device, dtype


def placement(model: torch.nn.Module | OnDemand) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of a model's weights, loaded or not."""
    if isinstance(model, OnDemand):
        return model.device, model.dtype
    weight = next(model.parameters())
    return weight.device, weight.dtype


@contextlib.contextmanager
def resident(model):
    """The model itself, or, for an OnDemand one, a freshly loaded copy that is released on leaving."""
    if not isinstance(model, OnDemand):
        yield model
        return
    loaded = model.load()
    try:
        yield loaded
    finally:
        loaded.to("meta")  # frees the weights now, whatever still refers to the module
        if model.device.type == "cuda":
            torch.cuda.empty_cache()


def load_parts(folder: Path, kind: str, dtype: torch.dtype, device: torch.device, low_memory: bool) -> dict:
    """The models, configs, tokenizer and scheduler of a prior or decoder repository, by name, from the hub
    layout or wurst's converted one. With low_memory, models are OnDemand instead of loaded."""
    if (folder / CONVERTED_INDEX).is_file():
        parts, models = converted_parts(folder, kind, dtype, device)
    else:
        folders = [sub for sub, _, _ in HUB_MODELS[kind].values()]
        parts = {
            "pipeline": check_repo(folder, PIPELINE_CLASSES[kind], kind, [*folders, "tokenizer"]),
            "scheduler": read_scheduler(folder),
            "tokenizer": CLIPTokenizer.from_dir(folder / "tokenizer"),
            "source": str(folder / "model_index.json"),
        }
        models = {}
        for name, (sub, config_cls, load) in HUB_MODELS[kind].items():
            config = read_config(config_cls, folder / sub / "config.json")
            models[name] = (config, functools.partial(load, folder / sub, dtype, device))
    for name, (config, load) in models.items():
        parts[name] = OnDemand(config, load, device, dtype) if low_memory else load()
    return parts


def converted_parts(folder: Path, kind: str, dtype: torch.dtype, device: torch.device) -> tuple[dict, dict]:
    """load_parts for a folder written by tools/convert_weights.py."""
    index_path = folder / CONVERTED_INDEX
    index = read_json(index_path)
    if index.get("kind") != kind:
        raise ModelNotFoundError(f"{folder} holds a converted {index.get('kind')}, not the {kind}")
    try:
        parts = {
            "pipeline": index["pipeline"],
            "scheduler": config_from_dict(SchedulerConfig, index["scheduler"], str(index_path)),
            "tokenizer": CLIPTokenizer.from_dir(folder / "tokenizer"),
            "source": str(index_path),
        }
        models = {}
        for name, config in index["models"].items():
            if name not in MODELS:
                raise ConfigError(f"{index_path} names an unknown model {name!r}")
            config_cls, model_cls = MODELS[name]
            cfg = config_from_dict(config_cls, config, f"{index_path} (models.{name})")
            path = folder / f"{name}.safetensors"
            models[name] = (cfg, functools.partial(load_converted_model, model_cls, cfg, path, dtype, device))
    except KeyError as e:
        raise ConfigError(f"{index_path} lacks the field {e}") from e
    return parts, models


def load_converted_model(model_cls, cfg, path: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    return load_module(functools.partial(model_cls, cfg), read_safetensors(path), SAME_NAMES, str(path), dtype,
                       device)  # fmt: skip


def check_repo(folder: Path, expected_class: str, role: str, components: Sequence[str]) -> dict:
    """Fail early, naming what is missing, when `folder` is not the hub repository it should be. Returns
    its model_index.json."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelNotFoundError(f"{folder} is not a Würstchen {role} repository in hub layout: no model_index.json")
    index = read_json(index_path)
    found = index.get("_class_name")
    if found is None:
        raise ModelNotFoundError(f"{index_path} lacks the field '_class_name' (expected {expected_class})")
    if found != expected_class:
        other = {cls: kind for kind, cls in PIPELINE_CLASSES.items()}.get(found)
        hint = f" It is the {other} repository: pass it as the {other}." if other else ""
        raise ModelNotFoundError(f"{folder} holds a {found}, not the {role} ({expected_class}).{hint}")
    for component in components:
        if not (folder / component).is_dir():
            raise ModelNotFoundError(f"{folder} lacks the {component}/ folder of a {role} repository")
    return index


def as_prompt_list(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")


def negative_prompts(negative_prompt: str | Sequence[str] | None, count: int) -> list[str]:
    """One negative prompt per prompt: empty by default, one string for all, or a list of matching length."""
    if negative_prompt is None:
        return [""] * count
    negatives = as_prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        return negatives * count
    if len(negatives) != count:
        raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {count}")
    return negatives


class LargeSizeWarning(UserWarning):
    """An image side over 2048: allowed, but beyond what Würstchen was used at."""


def check_size(name: str, value: int, warn: bool = True) -> int:
    """Image sides are positive multiples of 128; past 2048 the model degrades, so warn there (once per
    call: only the place that uses the size warns)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value!r}")
    if value % SIZE_MULTIPLE:
        below = value // SIZE_MULTIPLE * SIZE_MULTIPLE
        nearest = f"{below} or {below + SIZE_MULTIPLE}" if below else str(SIZE_MULTIPLE)
        raise ValueError(f"{name} must be a multiple of {SIZE_MULTIPLE}, got {value}: use {nearest}")
    if value > LARGEST_TRAINED and warn:
        warnings.warn(f"{name} {value} is over {LARGEST_TRAINED}, beyond what Würstchen was used at; expect "
                      "repeated or broken structure", LargeSizeWarning, stacklevel=3)  # fmt: skip
    return value


def run_sampler(
    stage: str, denoise: sampler.Denoiser, latents: torch.Tensor, timesteps: torch.Tensor, generator: Generator,
    scheduler: SchedulerConfig, callback: StepCallback | None,
) -> torch.Tensor:  # fmt: skip
    result = latents
    for i, t, result in sampler.sample_steps(denoise, latents, timesteps, generator, scheduler.s, scheduler.scaler):
        if callback is not None and callback(stage, i, float(t), result) is False:
            raise GenerationStopped(f"generation stopped by the step callback after {stage} step {i + 1}")
    if not torch.isfinite(result).all():
        stage_name = {"prior": "Stage C", "decoder": "Stage B"}.get(stage, stage)
        raise NumericalError(f"the {stage_name} latents hold NaN or inf (in {result.dtype}; float16 overflows in "
                             "this model): use bfloat16 or float32")  # fmt: skip
    return result


def check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def read_scheduler(folder: Path) -> SchedulerConfig:
    path = folder / "scheduler" / "scheduler_config.json"
    return read_config(SchedulerConfig, path) if path.is_file() else SchedulerConfig()


def initial_latents(
    shape: tuple[int, ...], latents: torch.Tensor | None, generator: Generator, dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:  # fmt: skip
    """Fresh noise of `shape`, drawn as diffusers draws it, or the caller's latents after a shape check."""
    if latents is None:
        return sampler.randn(shape, generator, dtype, device)
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    return latents.to(device, dtype)


OUTPUT_TYPES = ("pil", "np", "pt")


def convert_images(images: torch.Tensor, output_type: str):
    """(N, 3, H, W) images in [0, 1] -> a list of PIL images ("pil"), a float32 (N, H, W, 3) numpy array
    ("np") or the float tensor itself ("pt")."""
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray(image) for image in (array * 255).round().astype(np.uint8)]


@torch.no_grad()
def encode_text(tokenizer: CLIPTokenizer, encoder: CLIPTextEncoder, prompts: list[str]) -> torch.Tensor:
    """The full last_hidden_state (padding positions included) of each prompt, in the encoder's dtype."""
    device = encoder.token_embedding.weight.device
    ids, mask = tokenizer(prompts)
    return encoder(ids.to(device), mask.to(device))


class Prior:
    """Stage C: prompts -> image embeddings (B·n, 16, ceil(H / 42.67), ceil(W / 42.67)), in Stage B's range."""

    def __init__(
        self,
        model: StageC,
        text_encoder: CLIPTextEncoder,
        tokenizer: CLIPTokenizer,
        config: PriorPipelineConfig = PriorPipelineConfig(),
        scheduler: SchedulerConfig = SchedulerConfig(),
    ):
        self.model, self.text_encoder, self.tokenizer = model, text_encoder, tokenizer
        self.config, self.scheduler = config, scheduler

    @classmethod
    def from_pretrained(
        cls,
        ref: str | Path = "warp-ai/wuerstchen-prior",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        low_memory: bool = False,
    ) -> Prior:
        """Load a prior repository (hub id or local directory in hub layout). device=None picks CUDA when
        available; dtype=None picks bfloat16 on CUDA and float32 on CPU. low_memory=True loads each model
        only while it runs (slower: the weights are read on every call)."""
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        components = ("prior", "text_encoder", "tokenizer", "scheduler")
        folder = resolve(ref, allow_patterns=["model_index.json", *(f"{c}/*" for c in components)])
        parts = load_parts(folder, "prior", dtype, device, low_memory)
        config = config_from_dict(PriorPipelineConfig, parts["pipeline"], parts["source"])
        return cls(parts["stage_c"], parts["text_encoder"], parts["tokenizer"], config, parts["scheduler"])

    @property
    def device(self) -> torch.device:
        return placement(self.model)[0]

    @property
    def dtype(self) -> torch.dtype:
        return placement(self.model)[1]

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        check_size("height", height), check_size("width", width)
        multiple = self.config.resolution_multiple
        return math.ceil(height / multiple), math.ceil(width / multiple)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        height: int = 1024,
        width: int = 1024,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float = 4.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        callback_on_step_end: StepCallback | None = None,
    ) -> torch.Tensor:
        """Image embeddings for each prompt, `num_images_per_prompt` per prompt, in prompt order. Without
        `num_inference_steps` or `timesteps`, Stage C uses DEFAULT_STAGE_C_TIMESTEPS. Guidance applies when
        guidance_scale > 1, against `negative_prompt` (empty by default)."""
        prompts = as_prompt_list(prompt)
        n = check_count("num_images_per_prompt", num_images_per_prompt)
        guidance = sampler.check_guidance("guidance_scale", guidance_scale)
        if num_inference_steps is None and timesteps is None:
            timesteps = sampler.DEFAULT_STAGE_C_TIMESTEPS
        steps = sampler.make_timesteps(num_inference_steps, timesteps, ("num_inference_steps", "timesteps"))
        use_cfg = guidance > 1
        negatives = negative_prompts(negative_prompt, len(prompts)) if use_cfg else []
        h, w = self.latent_size(height, width)

        # One text-encoder batch for prompts and negatives; rows repeated per image, prompt by prompt.
        with resident(self.text_encoder) as text_encoder:
            states = encode_text(self.tokenizer, text_encoder, prompts + negatives).to(self.dtype)
        text = states.repeat_interleave(n, dim=0)  # [cond rows; uncond rows] when guided
        shape = (len(prompts) * n, self.model.config.c_in, h, w)
        latents = initial_latents(shape, latents, generator, self.dtype, self.device)

        with resident(self.model) as stage_c:
            text_kv = stage_c.condition(text)  # once: it is the same at every step

            def model(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
                return stage_c(x, r, text_kv)

            denoise = sampler.guided(model, guidance) if use_cfg else model
            out = run_sampler("prior", denoise, latents, steps, generator, self.scheduler, callback_on_step_end)
        return out * self.config.latent_mean - self.config.latent_std


class Decoder:
    """Stages B and A: image embeddings (B, 16, h, w) and prompts -> images (B·n, 3, H, W) in [0, 1], where the
    Stage B latent is int(h · 10.67) x int(w · 10.67) and the image four times that."""

    def __init__(
        self,
        model: StageB,
        vqgan: StageA,
        text_encoder: CLIPTextEncoder,
        tokenizer: CLIPTokenizer,
        config: DecoderPipelineConfig = DecoderPipelineConfig(),
        scheduler: SchedulerConfig = SchedulerConfig(),
    ):
        self.model, self.vqgan, self.text_encoder, self.tokenizer = model, vqgan, text_encoder, tokenizer
        self.config, self.scheduler = config, scheduler

    @classmethod
    def from_pretrained(
        cls,
        ref: str | Path = "warp-ai/wuerstchen",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        low_memory: bool = False,
    ) -> Decoder:
        """Load a decoder repository (hub id or local directory in hub layout). device=None picks CUDA when
        available; dtype=None picks bfloat16 on CUDA and float32 on CPU. low_memory=True loads each model
        only while it runs (slower: the weights are read on every call)."""
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        components = ("decoder", "vqgan", "text_encoder", "tokenizer", "scheduler")
        folder = resolve(ref, allow_patterns=["model_index.json", *(f"{c}/*" for c in components)])
        parts = load_parts(folder, "decoder", dtype, device, low_memory)
        config = config_from_dict(DecoderPipelineConfig, parts["pipeline"], parts["source"])
        return cls(parts["stage_b"], parts["stage_a"], parts["text_encoder"], parts["tokenizer"], config,
                   parts["scheduler"])  # fmt: skip

    @property
    def device(self) -> torch.device:
        return placement(self.model)[0]

    @property
    def dtype(self) -> torch.dtype:
        return placement(self.model)[1]

    def latent_size(self, embedding_height: int, embedding_width: int) -> tuple[int, int]:
        scale = self.config.latent_dim_scale
        return int(embedding_height * scale), int(embedding_width * scale)

    @torch.no_grad()
    def __call__(
        self,
        image_embeddings: torch.Tensor,
        prompt: str | Sequence[str] = "",
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 12,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        callback_on_step_end: StepCallback | None = None,
    ):
        """Images for each row of `image_embeddings`, `num_images_per_prompt` per row, in row order.

        `prompt` is one string for every row, or a list whose length divides the number of rows: prompt k
        conditions the k-th consecutive group of rows (so the B·n embeddings of a Prior call with B prompts
        and n images per prompt go with those B prompts). Guidance applies when guidance_scale > 1: the
        unconditional branch sees zeroed image embeddings and the negative (by default empty) prompt.
        output_type: "pt" (N, 3, H, W) tensor, "np" (N, H, W, 3) float32 array, "pil" list of PIL images, or
        "latent" for the Stage B latents before the VQGAN."""
        embeddings = self.check_embeddings(image_embeddings)
        prompts = as_prompt_list(prompt)
        if embeddings.shape[0] % len(prompts):
            raise ValueError(f"prompt has {len(prompts)} entries, which does not divide the "
                             f"{embeddings.shape[0]} image embeddings")  # fmt: skip
        n = check_count("num_images_per_prompt", num_images_per_prompt)
        guidance = sampler.check_guidance("guidance_scale", guidance_scale)
        steps = sampler.make_timesteps(num_inference_steps, timesteps, ("num_inference_steps", "timesteps"))
        if output_type not in (*OUTPUT_TYPES, "latent"):
            raise ValueError(f"output_type must be one of pil, np, pt, latent; got {output_type!r}")
        use_cfg = guidance > 1
        negatives = negative_prompts(negative_prompt, len(prompts)) if use_cfg else []

        # Every image gets its own embedding row and the text of the prompt that row belongs to.
        rows_per_prompt = embeddings.shape[0] // len(prompts) * n
        with resident(self.text_encoder) as text_encoder:
            states = encode_text(self.tokenizer, text_encoder, prompts + negatives).to(self.dtype)
        text = states.repeat_interleave(rows_per_prompt, dim=0)  # [cond rows; uncond rows] when guided
        effnet = embeddings.repeat_interleave(n, dim=0)
        if use_cfg:
            effnet = torch.cat([effnet, torch.zeros_like(effnet)])

        shape = (effnet.shape[0] // (2 if use_cfg else 1), self.model.config.c_in,
                 *self.latent_size(*embeddings.shape[-2:]))  # fmt: skip
        latents = initial_latents(shape, latents, generator, self.dtype, self.device)
        with resident(self.model) as stage_b:
            cond = stage_b.condition(effnet, text, shape[-2:])  # once: it is the same at every step

            def model(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
                return stage_b(x, r, cond)

            denoise = sampler.guided(model, guidance) if use_cfg else model
            out = run_sampler("decoder", denoise, latents, steps, generator, self.scheduler, callback_on_step_end)
        if output_type == "latent":
            return out
        return convert_images(self.decode(out), output_type)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Stage B latents -> images clamped to [0, 1] (scaled into the VQGAN's range, not quantised)."""
        with resident(self.vqgan) as vqgan:
            images = vqgan.decode(latents.to(self.device, self.dtype) * vqgan.config.scale_factor)
        if not torch.isfinite(images).all():  # clamp would quietly turn NaN into black pixels
            raise NumericalError(f"the Stage A (VQGAN) images hold NaN or inf (in {images.dtype}): "
                                 "use bfloat16 or float32, and check the vqgan weights")  # fmt: skip
        return images.clamp(0, 1)

    def check_embeddings(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        channels = self.model.config.effnet_embd
        is_tensor = isinstance(image_embeddings, torch.Tensor)
        shape = tuple(image_embeddings.shape) if is_tensor else ()
        if len(shape) != 4 or shape[1] != channels or shape[0] == 0:
            got = f"shape {shape}" if is_tensor else type(image_embeddings).__name__
            raise ValueError(f"image_embeddings must be a (B, {channels}, h, w) tensor with B > 0, got {got}")
        return image_embeddings.to(self.device, self.dtype)


class Pipeline:
    """Text to image: Stage C (Prior), then Stages B and A (Decoder). Mirrors the call of diffusers'
    WuerstchenCombinedPipeline, so code written against it ports by changing one line."""

    def __init__(self, prior: Prior, decoder: Decoder, prior_ref: str = "", decoder_ref: str = ""):
        self.prior, self.decoder = prior, decoder
        self.prior_ref, self.decoder_ref = prior_ref, decoder_ref  # recorded in image metadata

    @classmethod
    def from_pretrained(
        cls,
        prior: str | Path = "warp-ai/wuerstchen-prior",
        decoder: str | Path = "warp-ai/wuerstchen",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        low_memory: bool = False,
    ) -> Pipeline:
        """Each of prior and decoder is a hub id or a local directory in hub layout. device=None picks CUDA
        when available; dtype=None picks bfloat16 on CUDA and float32 on CPU. low_memory=True keeps only the
        model at work in memory (each of the two text encoders, Stage C, Stage B, Stage A is loaded when it
        runs and released after), at the cost of reading the weights on every call."""
        return cls(
            Prior.from_pretrained(prior, device, dtype, low_memory),
            Decoder.from_pretrained(decoder, device, dtype, low_memory),
            str(prior),
            str(decoder),
        )

    @torch.no_grad()
    def compile(self, **options) -> Pipeline:
        """torch.compile both denoisers (Stage C and Stage B) in place, as whole graphs: their forward passes
        have no graph breaks. `options` go to torch.compile (mode="max-autotune", dynamic=False, ...). The
        first call at each image size pays the compile time. Not with low_memory, whose models come and go."""
        for part in (self.prior, self.decoder):
            if isinstance(part.model, OnDemand):
                raise ValueError("compile() needs resident models: load the pipeline without low_memory")
            part.model.compile(fullgraph=True, **options)
        return self

    def __call__(
        self,
        prompt: str | Sequence[str],
        height: int = 1024,
        width: int = 1024,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        prior_num_inference_steps: int | None = None,
        prior_timesteps: Sequence[float] | None = None,
        prior_guidance_scale: float = 4.0,
        num_inference_steps: int = 12,
        decoder_timesteps: Sequence[float] | None = None,
        decoder_guidance_scale: float = 0.0,
        generator: Generator = None,
        output_type: str = "pil",
        callback_on_step_end: StepCallback | None = None,
    ):
        """Images for each prompt, `num_images_per_prompt` per prompt, in prompt order: a list of PIL images
        ("pil"), a float32 (N, H, W, 3) array in [0, 1] ("np"), or a float (N, 3, H, W) tensor ("pt").

        Stage C uses DEFAULT_STAGE_C_TIMESTEPS unless prior_num_inference_steps or prior_timesteps is given.
        `negative_prompt` serves both stages' guidance. One generator (or one per image) drives both stages
        in turn, as in diffusers, so a seed reproduces diffusers' image."""
        # Check everything before the first model call, so a bad argument costs no compute.
        prompts = as_prompt_list(prompt)
        check_size("height", height, warn=False), check_size("width", width, warn=False)  # the prior warns
        check_count("num_images_per_prompt", num_images_per_prompt)
        sampler.check_guidance("prior_guidance_scale", prior_guidance_scale)
        sampler.check_guidance("decoder_guidance_scale", decoder_guidance_scale)
        if prior_num_inference_steps is not None or prior_timesteps is not None:
            sampler.make_timesteps(prior_num_inference_steps, prior_timesteps,
                                   ("prior_num_inference_steps", "prior_timesteps"))  # fmt: skip
        sampler.make_timesteps(num_inference_steps, decoder_timesteps, ("num_inference_steps", "decoder_timesteps"))
        negative_prompts(negative_prompt, len(prompts))
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of pil, np, pt; got {output_type!r}")

        embeddings = self.prior(
            prompts, height, width, negative_prompt, num_images_per_prompt, prior_num_inference_steps,
            prior_timesteps, prior_guidance_scale, generator, callback_on_step_end=callback_on_step_end,
        )  # fmt: skip
        return self.decoder(
            embeddings, prompts, negative_prompt, 1, num_inference_steps, decoder_timesteps,
            decoder_guidance_scale, generator, output_type=output_type, callback_on_step_end=callback_on_step_end,
        )  # fmt: skip


_cached: dict[tuple, Pipeline] = {}


def generate(
    prompt: str | Sequence[str],
    height: int = 1024,
    width: int = 1024,
    *,
    prior: str | Path = "warp-ai/wuerstchen-prior",
    decoder: str | Path = "warp-ai/wuerstchen",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    low_memory: bool = False,
    **kwargs,
):
    """One call from prompt to images, with the keywords of Pipeline.__call__. The loaded pipeline is kept
    for the next call in this process with the same models, device, dtype and memory mode."""
    key = (str(prior), str(decoder), str(device), dtype, low_memory)
    if key not in _cached:
        _cached.clear()  # one pipeline at a time: each is several GB
        _cached[key] = Pipeline.from_pretrained(prior, decoder, device, dtype, low_memory)
    return _cached[key](prompt, height, width, **kwargs)
