"""What the three documented pipelines share: devices and dtypes (`.to`), where models live between uses
(resident, low-memory, model or sequential CPU offload), progress bars, the denoising loop with diffusers'
step callbacks, and the output classes."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from wurst import sampler
from wurst.errors import ArgumentError, NumericalError
from wurst.models.tokenizer import CLIPTokenizer
from wurst.runtime.devices import available_devices, parse_device
from wurst.runtime.heap import kept_heap
from wurst.runtime.offload import Offloaded, OnDemand
from wurst.weights.repository import KINDS, Repository, SchedulerConfig

Generator = torch.Generator | Sequence[torch.Generator] | None
# diffusers' form: callback(pipeline, step index, timestep, {name: tensor}) -> {name: replacement tensor}
StepCallback = Callable[[Any, int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]


class BaseOutput:
    """diffusers' outputs: fields by name, or by position as in the tuple `return_dict=False` gives."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]

    def __getitem__(self, key: int | str):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


@dataclass
class WuerstchenPriorPipelineOutput(BaseOutput):
    image_embeddings: torch.Tensor | np.ndarray


@dataclass
class ImagePipelineOutput(BaseOutput):
    images: list | np.ndarray | torch.Tensor


class PipelineBase:
    _component_names: tuple[str, ...] = ()  # the constructor's arguments, diffusers' component names
    _models: tuple[str, ...] = ()  # the components that are models, in the order they run
    _denoiser: str = ""  # the attribute whose weights define the pipeline's device and dtype
    _stage: str = ""  # the progress bar's label
    _callback_tensor_inputs: list[str] = []

    def __init__(self) -> None:
        self._offloaded: dict[str, Offloaded] = {}
        self._offload_device: torch.device | None = None
        self._progress_bar_config: dict[str, Any] = {}

    # -- devices and dtypes ------------------------------------------------------------------------------

    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._component_names}

    @property
    def device(self) -> torch.device:
        return self._placement()[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._placement()[1]

    @property
    def _execution_device(self) -> torch.device:
        """Where the models compute: the offload device when offloading, else where the weights are."""
        return self._offload_device or self.device

    def _placement(self) -> tuple[torch.device, torch.dtype]:
        model = getattr(self, self._denoiser)
        if isinstance(model, OnDemand):
            return model.device, model.dtype
        if self._denoiser in self._offloaded:
            home = next(t for h in self._offloaded[self._denoiser].home.values() for t in h.values())
            return home.device, home.dtype
        weight = next(model.parameters())
        return weight.device, weight.dtype

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
        if self._offloaded and device is not None:
            raise ArgumentError("this pipeline offloads its models to the CPU (enable_*_cpu_offload): it moves them "
                                "itself, so it cannot be moved with .to(device)")
        for name in self._models:
            model = getattr(self, name)
            if isinstance(model, OnDemand):
                model.to(device, dtype)
            elif name in self._offloaded:
                self._offloaded[name] = Offloaded(self._offloaded[name].restore().to(dtype=dtype),
                                                  self._offloaded[name].sequential)
            else:
                model.to(device=device, dtype=dtype)
        return self

    # -- offload -----------------------------------------------------------------------------------------

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep every model in CPU RAM and move each whole model to the accelerator while it runs."""
        self._enable_offload(gpu_id, device, sequential=False, method="enable_model_cpu_offload")

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None,
                                      device: torch.device | str | None = None) -> None:
        """Keep every model in CPU RAM and stream its layers to the accelerator one at a time as they run:
        the least device memory, the slowest."""
        self._enable_offload(gpu_id, device, sequential=True, method="enable_sequential_cpu_offload")

    def _enable_offload(self, gpu_id: int | None, device, sequential: bool, method: str) -> None:
        if device is None:
            if not torch.cuda.is_available():
                raise ArgumentError(f"{method} needs an accelerator and this machine has none ({available_devices()}); "
                                    "run without offload, or pass device=... to choose one")
            device = f"cuda:{gpu_id or 0}"
        self._offload_device = parse_device(device, f"{method}: device")
        for name in self._models:
            model = getattr(self, name)
            if isinstance(model, OnDemand):
                raise ArgumentError(f"{method} cannot be combined with low_memory: load the pipeline without it")
            module = self._offloaded.pop(name).restore() if name in self._offloaded else model
            self._offloaded[name] = Offloaded(module, sequential)

    @contextlib.contextmanager
    def _running(self, name: str) -> Iterator[nn.Module]:
        """Model `name` ready to compute on the execution device for the time of the block, with freed CPU memory
        kept for reuse meanwhile (heap.kept_heap)."""
        with kept_heap():
            yield from self._ready(name)

    def _ready(self, name: str) -> Iterator[nn.Module]:
        model = getattr(self, name)
        if isinstance(model, OnDemand):
            loaded = model.load(dtype=model.dtype, device=model.device)
            try:
                yield loaded
            finally:
                loaded.to("meta")  # frees the weights now, whatever still refers to the module
                if model.device.type == "cuda":
                    torch.cuda.empty_cache()
        elif name in self._offloaded:
            with self._offloaded[name].on(self._execution_device):
                yield model  # the attribute, which may be a compiled wrapper of the offloaded module
        else:
            yield model

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
        with self._running("text_encoder") as encoder:
            return encoder(ids.to(device), mask.to(device)).to(self.dtype)

    def denoise(
        self,
        *,
        model: sampler.Denoiser,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        generator: Generator,
        scheduler: SchedulerConfig,
        callback: StepCallback | None,
        callback_inputs: list[str],
        tensors: dict[str, torch.Tensor | None],
        on_edit: Callable[[dict[str, torch.Tensor]], None] = lambda edited: None,
    ) -> torch.Tensor:
        """Run the sampler with a progress bar. After each step the callback sees the latents and the named
        `tensors`; what it returns replaces them (`on_edit` gets the replaced tensors other than latents)."""
        result = latents
        steps = sampler.sample_steps(model, latents, timesteps, generator, scheduler.s, scheduler.scaler)
        with self.progress_bar(total=len(timesteps) - 1) as bar:  # closed (its line ended) even on an error
            for step in steps:
                if callback is not None:
                    offered = {"latents": step.latents, **tensors}
                    edited = dict(callback(self, step.index, step.t, {k: offered[k] for k in callback_inputs}) or {})
                    step.latents = edited.pop("latents", step.latents)
                    tensors.update(edited)
                    on_edit(edited)
                result = step.latents
                bar.update()
        if not torch.isfinite(result).all():
            raise NumericalError(f"the {self._stage_name} latents hold NaN or inf (in {result.dtype}; float16 "
                                 "overflows in this model): use bfloat16 or float32")
        return result

    @property
    def _stage_name(self) -> str:
        return {"prior": "Stage C", "decoder": "Stage B"}.get(self._stage, self._stage)

    def initial_latents(self, shape: tuple[int, ...], latents: torch.Tensor | None, generator: Generator):
        """Fresh noise of `shape`, drawn as diffusers draws it, or the caller's latents."""
        device, dtype = self._execution_device, self.dtype
        if latents is None:
            return sampler.randn(shape, generator, dtype, device)
        return latents.to(device, dtype)


def as_output(result, return_dict: bool, output_class: type[BaseOutput]):
    return output_class(result) if return_dict else (result,)


def convert_images(images: torch.Tensor, output_type: str):
    """(N, 3, H, W) images in [0, 1] -> a list of PIL images ("pil"), a float32 (N, H, W, 3) numpy array
    ("np") or the tensor itself ("pt")."""
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray(image) for image in (array * 255).round().astype(np.uint8)]


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
    return pipe
