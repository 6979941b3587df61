"""Where a pipeline's models live between uses: resident, loaded on demand (low memory), or kept in CPU RAM and
put on the accelerator only while they run (diffusers' model and sequential CPU offload).

Offloading keeps each module's own tensors in CPU RAM and, for the time it runs, gives the module copies on the
execution device. Nothing is re-read from files. Sequential offload does this per leaf module from forward
hooks and parks the leaves on the meta device in between, so a module used without its hook fails loudly
instead of quietly computing on the wrong device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


class OnDemand:
    """Low-memory mode: a model loaded from its checkpoint each time it is used (`load(dtype=..., device=...)`)
    and released right after, so that only the model at work is resident. Its config is at hand without loading
    it."""

    def __init__(self, config, load: Callable[..., nn.Module], device: torch.device,
                 dtype: torch.dtype):
        self.config, self.load, self.device, self.dtype = config, load, device, dtype

    def to(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> OnDemand:
        self.device, self.dtype = device or self.device, dtype or self.dtype
        return self


def own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers a module holds itself (not those of its children)."""
    return {**module._parameters, **module._buffers}  # noqa: SLF001 - the one place that needs them


def put(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give a module these tensors in place of its own (across devices, which `.data =` cannot do)."""
    for name, tensor in tensors.items():
        if name in module._parameters:  # noqa: SLF001
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)  # noqa: SLF001
        else:
            module._buffers[name] = tensor  # noqa: SLF001


def moved(tensors: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The tensors on `device`; copies to an accelerator may run ahead, copies back to the CPU may not (the CPU
    would read them before they land)."""
    to_cpu = torch.device(device).type == "cpu"
    return {name: tensor.to(device, non_blocking=not to_cpu) for name, tensor in tensors.items()}


def lend_while_running(module: nn.Module, home: dict[str, torch.Tensor], device: torch.device) -> list:
    """Sequential offload: forward hooks that give `module` its weights on `device` for its forward and park
    them on meta after. Returns the hook handles."""

    def lend(module: nn.Module, args) -> None:
        put(module, moved(home, device))

    def take_back(module: nn.Module, args, output) -> None:
        put(module, moved(home, "meta"))

    return [module.register_forward_pre_hook(lend), module.register_forward_hook(take_back)]


class Offloaded:
    """A module whose weights stay in CPU RAM; `on(device)` lends them to the device while it runs."""

    def __init__(self, module: nn.Module, sequential: bool):
        self.module, self.sequential = module, sequential
        self.home = {sub: moved({n: t for n, t in own_tensors(sub).items() if t is not None}, "cpu")
                     for sub in module.modules()}
        self.hooks = []
        self._park()

    def _park(self) -> None:
        """Between uses: the CPU copies for model offload, the meta device for sequential offload."""
        for sub, home in self.home.items():
            put(sub, moved(home, "meta") if self.sequential else home)

    @contextlib.contextmanager
    def on(self, device: torch.device) -> Iterator[nn.Module]:
        try:
            for sub, home in self.home.items():
                if not self.sequential:
                    put(sub, moved(home, device))
                elif home:
                    self.hooks += lend_while_running(sub, home, device)
            yield self.module
        finally:
            for hook in self.hooks:
                hook.remove()
            self.hooks.clear()
            self._park()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state dict (its names: parameters and persistent buffers) in the CPU copies, wherever the
        module's own tensors are parked; a compiled module's under the names of the module it wraps."""
        module = getattr(self.module, "_orig_mod", self.module)
        modules = dict(module.named_modules(remove_duplicate=False))
        state = {}
        for name in module.state_dict(keep_vars=True):
            owner, _, leaf = name.rpartition(".")
            state[name] = self.home[modules[owner]][leaf]
        return state

    def restore(self) -> nn.Module:
        """Back to an ordinary module, its weights on the CPU."""
        for sub, home in self.home.items():
            put(sub, home)
        return self.module
