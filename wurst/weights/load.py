"""Modules filled from checkpoint tensors: built on the meta device, then assigned the tensors.

Tensors are memory-mapped straight out of the file (no copy, no random init): the module is built on the
meta device and its parameters are assigned the mapped tensors, so peak memory stays at one copy of the
weights. A per-model `KeyMap` translates checkpoint names to module names, and every problem is reported
under the name the tensor carries in the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from wurst.errors import CheckpointError
from wurst.runtime.devices import parse_device
from wurst.weights.keymaps import KeyMap


def _shape(t: torch.Size | list[int]) -> str:
    return "(" + ", ".join(str(s) for s in t) + ")"


def _summarise(items: list[str]) -> str:
    return items[0] + (f" and {len(items) - 1} more" if len(items) > 1 else "")


def check_tensors(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, tuple[torch.dtype, list[int]]], key_map: KeyMap,
    source: str,
) -> dict[str, str]:
    """Compare what a checkpoint holds (name -> dtype and shape, as its header gives them) with a module's state
    (`expected`, meta tensors will do). Missing, unexpected, mis-shaped tensors and integer tensors where a
    floating weight belongs raise CheckpointError naming them as the file does. Returns checkpoint name ->
    module name of every tensor the module takes."""
    names: dict[str, str] = {}
    unexpected, misshaped, mistyped = [], [], []
    for ckpt_name, (dtype, shape) in found.items():
        if key_map.ignored(ckpt_name):
            continue
        name = key_map.to_module(ckpt_name)
        if name is None or name not in expected:
            unexpected.append(ckpt_name)
            continue
        want = expected[name]
        if tuple(shape) != tuple(want.shape):
            misshaped.append(f"'{ckpt_name}' has shape {_shape(shape)}, expected {_shape(want.shape)}")
        elif want.is_floating_point() and not dtype.is_floating_point:
            mistyped.append(f"'{ckpt_name}' holds {str(dtype).removeprefix('torch.')} where a floating weight "
                            "belongs")
        else:
            names[ckpt_name] = name
    if misshaped:
        raise CheckpointError(f"{source}: tensor {_summarise(misshaped)}")
    if mistyped:
        raise CheckpointError(f"{source}: tensor {_summarise(mistyped)}")
    taken = set(names.values())
    missing = [n for n in expected if n not in taken]
    if missing:
        described = [f"'{key_map.to_checkpoint(n)}' (shape {_shape(expected[n].shape)})" for n in missing]
        raise CheckpointError(f"{source}: missing tensor {_summarise(described)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {_summarise([repr(u) for u in unexpected])}")
    return names


def load_module(
    build: Callable[[], nn.Module],
    state: Mapping[str, torch.Tensor],
    key_map: KeyMap,
    source: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Build a module on the meta device and assign it the checkpoint tensors in `state`.

    Floating tensors are cast to `dtype` (when given) one at a time, then moved to `device`. Missing,
    unexpected, mis-shaped and wrongly typed tensors raise CheckpointError naming them as the file does. A device
    this machine lacks (cuda:3 on one GPU, cpu:1, to which torch would copy as to the CPU) is refused first.
    """
    device = parse_device(device) if device is not None else None
    with torch.device("meta"):
        module = build()
    expected = dict(module.state_dict(keep_vars=True))
    found = {name: (tensor.dtype, list(tensor.shape)) for name, tensor in state.items()}
    assigned: dict[str, torch.Tensor] = {}
    for ckpt_name, name in check_tensors(expected, found, key_map, source).items():
        tensor = state[ckpt_name]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        assigned[name] = tensor.to(device) if device is not None else tensor
    module.load_state_dict(assigned, strict=True, assign=True)
    return module.eval().requires_grad_(False)
