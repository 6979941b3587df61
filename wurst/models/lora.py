"""LoRA on the models' linear layers: W x + Σ scale_i · B_i A_i x over the adapters applied to a layer.

A layer carries its adapters in one of two forms, which `apply_lora` sets from a description of the whole model:
- unfused: `Linear.lora` holds every applied adapter's factors stacked into one low-rank pair, so that a forward
  pass adds two thin matmuls to the layer's own (which keeps its fast path: the same oneDNN matmul, and the GELU
  of `mlp_in`/`fc1` applied after the sum);
- fused: the layer's `weight` is replaced by a new tensor W + Σ scale_i · B_i A_i, computed in float32, and the
  tensor it replaced is kept to be put back. The base weights are never written to (they are often mapped from
  the checkpoint file), so unfusing restores them exactly.

No file I/O here: weights/lora_files.py reads and writes LoRA files, pipelines/lora.py keeps the adapters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wurst.models.blocks import Linear


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's factors for one linear layer: down (rank, in) and up (out, rank), with the scale the adapter
    file gives them (alpha / rank)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    def delta(self, weight: float = 1.0) -> torch.Tensor:
        """(weight · scale) · up @ down in float32: what this adapter adds to the layer's weight."""
        return (self.up.float() * (self.scale * weight)) @ self.down.float()


class LowRank:
    """The unfused adapters of one layer, stacked: y += up @ (down @ x), one pair of matmuls for all of them."""

    def __init__(self, terms: list[tuple[LoraFactors, float]], *, dtype: torch.dtype, device: torch.device):
        # The adapter weights and scales are folded into `up` (in float32, then rounded once to the layer's dtype).
        self.down = torch.cat([f.down.float() for f, _ in terms]).to(device, dtype)
        self.up = torch.cat([f.up.float() * (f.scale * w) for f, w in terms], dim=1).to(device, dtype)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + up @ down @ x over the last dimension, in place where no gradient is wanted."""
        down, up = self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype)  # no-ops unless offloaded
        low = F.linear(x, down)
        if torch.is_grad_enabled() or not y.is_contiguous():
            return y + F.linear(low, up)
        y2d = y.view(-1, y.shape[-1])
        y2d.addmm_(low.reshape(-1, low.shape[-1]), up.t())
        return y


@dataclass
class LayerLora:
    """What `apply_lora` asks of one layer: adapters to add at run time and adapters fused into its weight, each
    with its adapter weight."""

    unfused: list[tuple[LoraFactors, float]]
    fused: list[tuple[LoraFactors, float]]


def lora_layers(model: nn.Module) -> dict[str, Linear]:
    """The layers LoRA can adapt: every Linear, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def apply_lora(model: nn.Module, wanted: dict[str, LayerLora]) -> None:
    """Make every linear layer of `model` carry exactly what `wanted` names for it (nothing where it names nothing):
    its unfused adapters, and a weight that is its base weight plus its fused adapters. Idempotent: applying the
    same description twice changes nothing. The layers keep their device and dtype."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: its module
    for name, layer in lora_layers(model).items():
        want = wanted.get(name, LayerLora([], []))
        current = layer.weight
        if [(id(f), w) for f, w in want.fused] != [(id(f), w) for f, w in layer.lora_fused]:
            base = layer.lora_base if layer.lora_base is not None else current.detach()
            if want.fused:
                delta = sum(f.delta(w) for f, w in want.fused)
                weight = (base.float() + delta.to(base.device)).to(current.device, current.dtype)
                layer.lora_base = base
            else:
                weight, layer.lora_base = base.to(current.device, current.dtype), None
            layer.weight = nn.Parameter(weight, requires_grad=False)
            layer.lora_fused = list(want.fused)
        layer.lora = LowRank(want.unfused, dtype=current.dtype, device=current.device) if want.unfused else None


class TrainableLora(nn.Module):
    """A LoRA being trained on one linear layer: float32 factors whose gradients the optimizer steps, added as
    scale · up(down(x)). Initialised as peft initialises it (down Kaiming-uniform, up zero), so training starts
    from the base model. Set as `Linear.lora`, where it registers as the submodule `lora`."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, device=None):
        super().__init__()
        self.scale = alpha / rank
        self.down = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.up = nn.Parameter(torch.zeros(out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.down, a=5**0.5)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # The factors stay in float32 (a bfloat16 base model included): the input goes up to float32 and the term
        # comes back in the layer's dtype, as peft computes it.
        low = F.linear(F.linear(x.to(self.down.dtype), self.down), self.up) * self.scale
        return y + low.to(y.dtype)


def attach_trainable_lora(layers: dict[str, Linear], *, rank: int, alpha: float) -> dict[str, TrainableLora]:
    """A fresh TrainableLora on each of `layers` (by module name), on the layer's device; returns them by name."""
    attached = {}
    for name, layer in layers.items():
        layer.lora = TrainableLora(layer.in_features, layer.out_features, rank=rank, alpha=alpha,
                                   device=layer.weight.device)
        attached[name] = layer.lora
    return attached
