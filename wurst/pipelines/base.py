"""What the documented pipelines share: the component registry, `.to` and offload (delegated to
runtime.placement), save_pretrained (delegated to weights.save), progress bars, and the steps every stage takes:
encoding text, drawing the first noise and the denoising loop with diffusers' step callbacks."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from wurst import sampler
from wurst.errors import ArgumentError, NumericalError
from wurst.models.tokenizer import CLIPTokenizer
from wurst.pipelines.callbacks import StepEnd
from wurst.runtime.devices import parse_device
from wurst.runtime.offload import OnDemand
from wurst.runtime.packing import packed_weights
from wurst.runtime.placement import Placement
from wurst.weights.model_card import kept_prior
from wurst.weights.repository import KINDS, Repository, SchedulerConfig
from wurst.weights.save import RepositoryContents, save_repositories

Generator = torch.Generator | Sequence[torch.Generator] | None
STAGE_NAMES = {"prior": "Stage C", "decoder": "Stage B"}


class PipelineBase:
    _component_names: tuple[str, ...] = ()  # the constructor's arguments, diffusers' component names
    _models: tuple[str, ...] = ()  # the components that are models, in the order they run
    _denoiser: str = ""  # the attribute whose weights define the pipeline's device and dtype
    _stage: str = ""  # the progress bar's label
    _callback_tensor_inputs: list[str] = []
    _card_prior: str | None = None  # the prior a decoder's saved model card names: the one it was loaded with

    def __init__(self) -> None:
        self.placement = Placement(self, self._models, self._denoiser)
        self._progress_bar_config: dict[str, Any] = {}

    # -- the components, where they are ------------------------------------------------------------------

    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._component_names}

    @property
    def device(self) -> torch.device:
        return self.placement.device_and_dtype()[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.device_and_dtype()[1]

    @property
    def _execution_device(self) -> torch.device:
        return self.placement.execution_device

    def to(self, *args, **kwargs):
        """`.to(device)`, `.to(dtype)`, `.to(device, dtype)` or keywords, as diffusers takes them; returns self."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"to() got an unexpected keyword argument '{next(iter(kwargs))}'")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif device is None:
                device = arg
            else:
                raise TypeError(f"to() takes a device and a dtype, got {args!r}")
        if device is not None:
            device = parse_device(device)
        self.placement.to(device, dtype)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep every model in CPU RAM and move each whole model to the accelerator while it runs."""
        self.placement.offload(device, gpu_id, sequential=False, method="enable_model_cpu_offload")

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None,
                                      device: torch.device | str | None = None) -> None:
        """Keep every model in CPU RAM and stream its layers to the accelerator one at a time as they run:
        the least device memory, the slowest."""
        self.placement.offload(device, gpu_id, sequential=True, method="enable_sequential_cpu_offload")

    # -- saving ------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None) -> None:
        """Write the pipeline in diffusers' hub layout, which from_pretrained (and diffusers' and transformers'
        model loaders) read back: model_index.json, each model's config.json and current weights, tokenizer/ and
        scheduler/. `variant` ("fp16", "bf16") writes `<stem>.<variant>.safetensors` files cast to that dtype.
        Atomic: the folder is replaced when the save is complete (see wurst.weights.save for what an earlier save's
        files become). Only safetensors are written: safe_serialization=False is refused."""
        save_repositories(save_directory, repositories={".": self.repository_contents()}, variant=variant,
                          safe_serialization=safe_serialization)

    def repository_contents(self, *, prior: str | None = None) -> RepositoryContents:
        """What save_pretrained writes. `prior` is the prior a decoder's model card names (by default the hub
        prior its own card named, if any)."""
        return RepositoryContents(
            kind=self._denoiser,  # a repository is named after its denoiser: "prior" or "decoder"
            pipeline_config=self.config, scheduler=self.scheduler, tokenizer=self.tokenizer,
            models={name: functools.partial(self.checkpoint_state, name) for name in self._models},
            prior=prior if prior is not None else self._card_prior,
        )

    @contextlib.contextmanager
    def checkpoint_state(self, name: str) -> Iterator[tuple[Any, dict[str, torch.Tensor]]]:
        """Model `name`'s config and state dict (registered parameters and buffers) as they are now, for the time
        of the block: an offloaded model's CPU copies; a low-memory model loaded, as it runs, and released after."""
        if name in self.placement.offloaded:
            offloaded = self.placement.offloaded[name]
            yield getattr(offloaded.module, "_orig_mod", offloaded.module).config, offloaded.state_dict()
            return
        with self.placement.running(name) as model:
            module = getattr(model, "_orig_mod", model)  # a torch.compile wrapper's module
            yield module.config, module.state_dict()

    # -- progress ----------------------------------------------------------------------------------------

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm progress bars (disable=True, leave=False, file=..., desc=...)."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable=None, total: int | None = None):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, **{"desc": self._stage, **self._progress_bar_config})

    # -- the shared steps --------------------------------------------------------------------------------

    def encode_text(self, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
        """The full last_hidden_state (padding positions included) of each prompt, in the pipeline's dtype."""
        ids, mask = tokenizer(prompts)
        device = self._execution_device
        with self.placement.running("text_encoder") as encoder:
            return encoder(ids.to(device), mask.to(device)).to(self.dtype)

    def initial_latents(self, shape: tuple[int, ...], latents: torch.Tensor | None, generator: Generator):
        """Fresh noise of `shape`, drawn as diffusers draws it, or the caller's latents."""
        device, dtype = self._execution_device, self.dtype
        if latents is None:
            return sampler.randn(shape, generator, dtype, device)
        return latents.to(device, dtype)

    def denoise(self, *, model: sampler.Denoiser, denoiser: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                generator: Generator, scheduler: SchedulerConfig, step_end: StepEnd) -> torch.Tensor:
        """The sampler's steps over `model` (which runs the module `denoiser`) with a progress bar, `step_end`
        (diffusers' step callback) after each, and the denoiser's linear weights packed for the loop."""
        result = latents
        steps = sampler.sample_steps(model, latents, timesteps, generator, scheduler.s, scheduler.scaler)
        # The bar is closed (its line ended) even on an error.
        with self.progress_bar(total=len(timesteps) - 1) as bar, packed_weights(denoiser):
            for step in steps:
                step_end(step)
                result = step.latents
                bar.update()
        if not torch.isfinite(result).all():
            raise NumericalError(f"the {STAGE_NAMES.get(self._stage, self._stage)} latents hold NaN or inf (in "
                                 f"{result.dtype}; float16 overflows in this model): use bfloat16 or float32")
        return result


def pipeline_from_repository(cls, repo: Repository, *, torch_dtype: torch.dtype | None, low_memory: bool,
                    components: dict[str, Any]):
    """Build pipeline class `cls` from a read repository, on the CPU in `torch_dtype` (float32 by default, as
    in diffusers); components passed by name replace the repository's."""
    unknown = sorted(set(components) - set(cls._component_names))
    if unknown:
        raise TypeError(f"from_pretrained() got an unexpected keyword argument '{unknown[0]}'")
    if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise ArgumentError(f"torch_dtype must be a floating torch.dtype such as torch.float16, got {torch_dtype!r}")
    dtype = torch_dtype or torch.float32
    parts: dict[str, Any] = {"tokenizer": repo.tokenizer, "scheduler": repo.scheduler}
    cpu = torch.device("cpu")
    for name in KINDS[repo.kind].components:
        if name not in components:
            if low_memory:
                parts[name] = OnDemand(repo.configs[name], functools.partial(repo.load, name), cpu, dtype)
            else:
                parts[name] = repo.load(name, dtype=dtype, device=cpu)
    parts.update(components)
    pipe = cls(**parts, **dataclasses.asdict(repo.pipeline_config))
    pipe.name_or_path = str(repo.folder)
    if repo.kind == "decoder":
        pipe._card_prior = kept_prior(repo.folder)
    return pipe
