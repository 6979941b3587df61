"""Stage C, the text-conditional prior (diffusers' WuerstchenPrior): a flat stack of `depth` triples of
ResBlock -> TimestepBlock -> AttnBlock at one resolution, predicting the noise in a 16-channel latent."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from wurst.models.blocks import AttnBlock, Linear, ResBlock, TextKV, TimestepBlock, channel_norm, r_embedding
from wurst.models.validation import check_r_width, require_heads_divide, require_positive


@dataclass(frozen=True)
class StageCConfig:
    """The fields of a hub `prior/config.json`. The published model: c=1536, c_cond=1280, depth 32, 24 heads."""

    c_in: int = 16  # latent channels
    c: int = 1280  # width
    c_cond: int = 1024  # text-state width (CLIP-bigG: 1280)
    c_r: int = 64  # r-embedding width
    depth: int = 16
    nhead: int = 16

    def __post_init__(self):
        require_positive(self, "c_in", "c", "c_cond", "c_r", "depth")
        require_heads_divide("c", self.c, "nhead", self.nhead)
        check_r_width(self.c_r)


class StageC(nn.Module):
    def __init__(self, cfg: StageCConfig):
        super().__init__()
        self.config = cfg
        self.projection = nn.Conv2d(cfg.c_in, cfg.c, kernel_size=1)
        self.cond_in = Linear(cfg.c_cond, cfg.c)
        self.cond_out = Linear(cfg.c, cfg.c)
        # Flat, in checkpoint order: block 3i is a ResBlock, 3i+1 a TimestepBlock, 3i+2 an AttnBlock.
        self.blocks = nn.ModuleList()
        for _ in range(cfg.depth):
            self.blocks.append(ResBlock(cfg.c))
            self.blocks.append(TimestepBlock(cfg.c, cfg.c_r))
            self.blocks.append(AttnBlock(cfg.c, cfg.c, cfg.nhead))  # the text is mapped to width c first
        self.head = nn.Conv2d(cfg.c, 2 * cfg.c_in, kernel_size=1)
        # Training: recompute each block's activations in the backward pass instead of keeping them (less memory,
        # about one more forward pass of time).
        self.gradient_checkpointing = False

    def condition(self, text: torch.Tensor) -> list[TextKV]:
        """The text keys and values of every attention block, shared by all denoising steps.
        text: (B, L, c_cond) CLIP-bigG states."""
        cond = self.cond_out(F.leaky_relu(self.cond_in(text), 0.2))
        return [block.text_kv(cond) for block in self.blocks if isinstance(block, AttnBlock)]

    def forward(self, x: torch.Tensor, r: torch.Tensor, text: torch.Tensor | list[TextKV]) -> torch.Tensor:
        """x: (B, c_in, H, W) noisy latent; r: (B,) noise level in [0, 1]; text: (B, L, c_cond) CLIP-bigG
        states, or condition(text) computed once for all steps. Returns the predicted noise, shaped like x."""
        text_kv = iter(self.condition(text) if isinstance(text, torch.Tensor) else text)
        r_embed = r_embedding(r, self.config.c_r)
        h = self.projection(x).contiguous(memory_format=torch.channels_last)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if isinstance(block, ResBlock):
                inputs = (h,)
            elif isinstance(block, TimestepBlock):
                inputs = (h, r_embed)
            else:
                inputs = (h, next(text_kv))
            h = checkpoint(block, *inputs, use_reentrant=False) if checkpointed else block(*inputs)
        a, b = self.head(channel_norm(h)).chunk(2, dim=1)
        return (x - a) / ((1 - b).abs() + 1e-5)


