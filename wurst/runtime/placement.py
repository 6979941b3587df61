"""Where a pipeline's models live between uses and where they compute: resident (wherever `.to` put them), loaded
on demand (low memory: runtime.offload.OnDemand), or kept in CPU RAM and lent to an accelerator while they run
(diffusers' model and sequential CPU offload: runtime.offload.Offloaded). While a model runs, freed CPU memory is
kept for reuse (runtime.heap.kept_heap)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from wurst.errors import ArgumentError
from wurst.runtime.devices import available_devices, parse_device
from wurst.runtime.heap import kept_heap
from wurst.runtime.offload import Offloaded, OnDemand


class Placement:
    """The placement of the models that are attributes `names` of `owner` (a pipeline). The attribute `denoiser`
    says where the pipeline is and in which dtype."""

    def __init__(self, owner: object, names: tuple[str, ...], denoiser: str) -> None:
        self.owner, self.names, self.denoiser = owner, names, denoiser
        self.offloaded: dict[str, Offloaded] = {}
        self.offload_device: torch.device | None = None
        # Edits that every copy of a model must carry (its LoRA adapters): applied to the model now, and again to
        # each fresh load in low-memory mode and after each move.
        self.preparers: dict[str, Callable[[nn.Module], None]] = {}

    def _model(self, name: str):
        return getattr(self.owner, name)

    def device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where the denoiser's weights are, and their dtype."""
        model = self._model(self.denoiser)
        if isinstance(model, OnDemand):
            return model.device, model.dtype
        if self.denoiser in self.offloaded:
            home = next(t for h in self.offloaded[self.denoiser].home.values() for t in h.values())
            return home.device, home.dtype
        weight = next(model.parameters())
        return weight.device, weight.dtype

    @property
    def execution_device(self) -> torch.device:
        """Where the models compute: the offload device when offloading, else where the weights are."""
        return self.offload_device or self.device_and_dtype()[0]

    def to(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        if self.offloaded and device is not None:
            raise ArgumentError("this pipeline offloads its models to the CPU (enable_*_cpu_offload): it moves them "
                                "itself, so it cannot be moved with .to(device)")
        for name in self.names:
            model = self._model(name)
            if isinstance(model, OnDemand):
                model.to(device, dtype)
            elif name in self.offloaded:
                self.offloaded[name] = Offloaded(self.offloaded[name].restore().to(dtype=dtype),
                                                 self.offloaded[name].sequential)
            else:
                model.to(device=device, dtype=dtype)
        for name, prepare in self.preparers.items():
            self.prepare(name, prepare)

    def prepare(self, name: str, prepare: Callable[[nn.Module], None]) -> None:
        """Make `prepare` part of model `name`: applied now where the model is in memory (an offloaded model is
        restored for it, then offloaded again) and to every load of it in low-memory mode."""
        self.preparers[name] = prepare
        model = self._model(name)
        if isinstance(model, OnDemand):
            return
        if name in self.offloaded:
            offloaded = self.offloaded.pop(name)
            module = offloaded.restore()
            prepare(module)
            self.offloaded[name] = Offloaded(module, offloaded.sequential)
        else:
            prepare(model)

    def offload(self, device: torch.device | str | None, gpu_id: int | None, *, sequential: bool, method: str) -> None:
        """Keep every model in CPU RAM and lend it (whole, or layer by layer when `sequential`) to `device` (by
        default GPU `gpu_id`, else the first) while it runs. `method` names the caller in errors."""
        if device is None:
            if not torch.cuda.is_available():
                raise ArgumentError(f"{method} needs an accelerator and this machine has none ({available_devices()}); "
                                    "run without offload, or pass device=... to choose one")
            device = f"cuda:{gpu_id or 0}"
        self.offload_device = parse_device(device, f"{method}: device")
        for name in self.names:
            model = self._model(name)
            if isinstance(model, OnDemand):
                raise ArgumentError(f"{method} cannot be combined with low_memory: load the pipeline without it")
            module = self.offloaded.pop(name).restore() if name in self.offloaded else model
            self.offloaded[name] = Offloaded(module, sequential)

    @contextlib.contextmanager
    def running(self, name: str) -> Iterator[nn.Module]:
        """Model `name` ready to compute on the execution device for the time of the block."""
        with kept_heap():
            model = self._model(name)
            if isinstance(model, OnDemand):
                loaded = model.load(dtype=model.dtype, device=model.device)
                if name in self.preparers:
                    self.preparers[name](loaded)
                try:
                    yield loaded
                finally:
                    loaded.to("meta")  # frees the weights now, whatever still refers to the module
                    if model.device.type == "cuda":
                        torch.cuda.empty_cache()
            elif name in self.offloaded:
                with self.offloaded[name].on(self.execution_device):
                    yield model  # the attribute, which may be a compiled wrapper of the offloaded module
            else:
                yield model
