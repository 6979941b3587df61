"""Stage C's image encoder, as shipped in the original release (`effnet_state_dict` of model_v2_stage_b.pt,
hub dome272/wuerstchen): the EfficientNetV2-S feature extractor, then a 1x1 conv (1280 -> 16, no bias) and a
BatchNorm, the "mapper". Inference only: BatchNorm uses its running statistics, stochastic depth is off.

An ImageNet-normalised image (B, 3, 32h, 32w) becomes (B, 16, h, w) in Stage B's conditioning range, the range
of the prior pipeline's output; Stage C's own latents are (x + 1) / 42 of it (training's map, which the
pipelines' x * 42 - 1 undoes). Its weights are read by wurst/weights/image_encoder.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wurst.errors import ConfigError


@dataclass(frozen=True)
class EfficientNetConfig:
    """EfficientNetV2-S by default. Stages run at `widths`; the first `fused_stages` are Fused-MBConv stages
    (a 3x3 conv instead of expansion, depthwise conv and squeeze-excitation), the rest MBConv stages."""

    stem: int = 24
    widths: tuple[int, ...] = (24, 48, 64, 128, 160, 256)
    depths: tuple[int, ...] = (2, 4, 4, 6, 9, 15)
    expand_ratios: tuple[int, ...] = (1, 4, 4, 4, 6, 6)
    strides: tuple[int, ...] = (1, 2, 2, 2, 1, 2)  # of each stage's first block; with the stem's 2: 32x in all
    fused_stages: int = 3
    c_cond: int = 1280  # the 1x1 head's width, the mapper's input
    c_latent: int = 16
    eps: float = 1e-3  # EfficientNet's BatchNorm
    mapper_eps: float = 1e-5  # the mapper's BatchNorm2d keeps PyTorch's default

    def __post_init__(self) -> None:
        lengths = {len(self.widths), len(self.depths), len(self.expand_ratios), len(self.strides)}
        if len(lengths) != 1:
            raise ConfigError("widths, depths, expand_ratios and strides must have one entry per stage")
        if not 0 <= self.fused_stages <= len(self.widths):
            raise ConfigError(f"fused_stages must lie within [0, {len(self.widths)}], got {self.fused_stages}")

    @property
    def downsampling(self) -> int:
        factor = 2  # the stem
        for stride in self.strides:
            factor *= stride
        return factor


class BatchNorm(nn.Module):
    """BatchNorm2d at inference: the running statistics, never updated (no num_batches_tracked)."""

    def __init__(self, c: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvNorm(nn.Module):
    """A bias-free conv ("same" padding), BatchNorm, then SiLU unless `act` is False."""

    def __init__(self, c_in: int, c_out: int, kernel: int, *, stride: int = 1, groups: int = 1, eps: float,
                 act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
        self.norm = BatchNorm(c_out, eps)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.silu(x) if self.act else x


class SqueezeExcite(nn.Module):
    """Channel gates from the spatial mean: sigmoid(fc2(silu(fc1(mean))))."""

    def __init__(self, c: int, c_squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c_squeeze, 1)
        self.fc2 = nn.Conv2d(c_squeeze, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class FusedMBConv(nn.Module):
    """A 3x3 conv to c_in·expand channels, then (when it expanded) a 1x1 projection; residual when shapes allow."""

    def __init__(self, c_in: int, c_out: int, *, expand: int, stride: int, eps: float):
        super().__init__()
        hidden = c_in * expand
        self.conv = ConvNorm(c_in, hidden if expand != 1 else c_out, 3, stride=stride, eps=eps)
        self.project = ConvNorm(hidden, c_out, 1, eps=eps, act=False) if expand != 1 else None
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.project is not None:
            h = self.project(h)
        return x + h if self.residual else h


class MBConv(nn.Module):
    """1x1 expansion, 3x3 depthwise conv, squeeze-excitation (squeezed to c_in / 4), 1x1 projection; residual
    when shapes allow."""

    def __init__(self, c_in: int, c_out: int, *, expand: int, stride: int, eps: float):
        super().__init__()
        hidden = c_in * expand
        self.expand = ConvNorm(c_in, hidden, 1, eps=eps) if expand != 1 else None
        self.depthwise = ConvNorm(hidden, hidden, 3, stride=stride, groups=hidden, eps=eps)
        self.se = SqueezeExcite(hidden, max(1, c_in // 4))
        self.project = ConvNorm(hidden, c_out, 1, eps=eps, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x) if self.expand is not None else x
        h = self.project(self.se(self.depthwise(h)))
        return x + h if self.residual else h


class EfficientNetEncoder(nn.Module):
    def __init__(self, cfg: EfficientNetConfig):
        super().__init__()
        self.config = cfg
        self.stem = ConvNorm(3, cfg.stem, 3, stride=2, eps=cfg.eps)
        self.stages = nn.ModuleList()
        c_in = cfg.stem
        for i, (width, depth, expand, stride) in enumerate(zip(cfg.widths, cfg.depths, cfg.expand_ratios,
                                                               cfg.strides, strict=True)):
            block = FusedMBConv if i < cfg.fused_stages else MBConv
            self.stages.append(nn.ModuleList(
                block(c_in if j == 0 else width, width, expand=expand, stride=stride if j == 0 else 1, eps=cfg.eps)
                for j in range(depth)
            ))
            c_in = width
        self.head = ConvNorm(c_in, cfg.c_cond, 1, eps=cfg.eps)
        self.mapper = ConvNorm(cfg.c_cond, cfg.c_latent, 1, eps=cfg.mapper_eps, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) ImageNet-normalised images -> (B, c_latent, ceil(H / 32), ceil(W / 32))."""
        x = self.stem(x)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.mapper(self.head(x))
