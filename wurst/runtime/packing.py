"""Packed weights for the denoising loops on the CPU.

oneDNN's linear computes from a weight in its own blocked layout. Given a plain weight, it reorders it into that
layout at every call; over a loop of many steps with the same weights, reordering once makes the denoisers' linear
layers 4-5% faster (docs/perf-notes.md, Issue 27). The packed copies cost memory, as much again as the running
model's linear weights (1.8 GB for the published Stage C, 1.5 GB for Stage B, in bfloat16), so they are kept only
while the loop runs, and runtime/memory.py counts them. Only bfloat16 loops pack: in float32 the copies are twice
that, and with them a low-memory run at 1024x1024 peaked at 9.78 GB instead of 6.20 (tests/runtime/test_memory.py
with float32 packing on). Layers pack at their second call in the loop (models/blocks.py,
Linear.packed_weight), and only where oneDNN's linear computes them: not under autograd or inside compiled graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from wurst.models.blocks import _ONEDNN_DTYPES, Linear


def packing_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a denoising loop on `device` in `dtype` packs its linear weights."""
    return device.type == "cpu" and dtype == torch.bfloat16 and dtype in _ONEDNN_DTYPES


@contextlib.contextmanager
def packed_weights(model: nn.Module) -> Iterator[None]:
    """For the time of the block, `model`'s linear layers keep their weights packed from their second call; the
    packed copies are freed at the end (also on an error), so that weight edits made between loops (LoRA fusing,
    loading) are always seen."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and packing_applies(m.weight.device, m.weight.dtype)]
    for layer in layers:
        layer.packed = {}
    try:
        yield
    finally:
        for layer in layers:
            layer.packed = None
