"""Test inputs for image to image: a tiny Stage C image encoder with random weights (wurst's module, and the
original release's model as torchvision builds it, whose state dict is the release layout) and small image files
of the awkward kinds users have."""

from __future__ import annotations

import functools
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tools import hub_fixtures  # first: it lets torchvision import beside the CPU torch (tools/__init__.py)
from wurst.models import effnet

# Six stages as in EfficientNetV2-S (so the published strides apply), a few channels each; 16 output channels,
# as the tiny Stage C and Stage B take.
PUBLISHED_ENCODER = effnet.EfficientNetConfig()  # EfficientNetV2-S, 16 output channels
TINY_ENCODER = effnet.EfficientNetConfig(stem=8, widths=(8, 8, 16, 16, 24, 32), depths=(1, 2, 1, 2, 1, 1),
                                         expand_ratios=(1, 2, 2, 1, 2, 2), c_cond=48, c_latent=16)


def tiny_encoder(seed: int = 0, config: effnet.EfficientNetConfig = TINY_ENCODER) -> effnet.EfficientNetEncoder:
    model = effnet.EfficientNetEncoder(config).eval()
    hub_fixtures.randomize_(model, seed)
    return model.requires_grad_(False)


def torchvision_features(config: effnet.EfficientNetConfig) -> nn.Sequential:
    """torchvision's EfficientNet feature extractor with `config`'s stages, built by torchvision's own EfficientNet
    from Fused-MBConv and MBConv stage configs, as its efficientnet_v2_s builds the published one (3x3 kernels,
    BatchNorm eps 1e-3, a head of c_cond channels)."""
    pytest.importorskip("torchvision", reason="a test extra: pip install -e '.[test]'")
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    setting, c_in = [], config.stem
    for i, (width, depth, expand, stride) in enumerate(zip(config.widths, config.depths, config.expand_ratios,
                                                           config.strides, strict=True)):
        stage = FusedMBConvConfig if i < config.fused_stages else MBConvConfig
        setting.append(stage(expand, 3, stride, c_in, width, depth))
        c_in = width
    norm = functools.partial(nn.BatchNorm2d, eps=config.eps)
    return EfficientNet(setting, dropout=0.2, norm_layer=norm, last_channel=config.c_cond).features


class OriginalEncoder(nn.Module):
    """The original EfficientNetEncoder (Würstchen v2's Stage C image encoder), as the release's key layout has
    it: `backbone` is torchvision's efficientnet_v2_s().features (at another config, torchvision_features), and
    `mapper` a 1x1 conv without bias and a BatchNorm2d."""

    def __init__(self, config: effnet.EfficientNetConfig = PUBLISHED_ENCODER):
        super().__init__()
        if config == PUBLISHED_ENCODER:
            torchvision = pytest.importorskip("torchvision", reason="a test extra: pip install -e '.[test]'")
            self.backbone = torchvision.models.efficientnet_v2_s().features
        else:
            self.backbone = torchvision_features(config)
        self.mapper = nn.Sequential(nn.Conv2d(config.c_cond, config.c_latent, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(config.c_latent))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.backbone(x))


@torch.no_grad()
def randomize_batch_norms_(model: nn.Module, seed: int) -> None:
    """Running statistics at a random offset from the statistics the layers really see. Drawn blindly, they would
    leave each channel's mean far from zero, and the encoder's output would be mostly the mapper's shift, the
    same for every image; a trained network's are near the real ones. So: measure each BatchNorm's input
    statistics on random images (a train-mode pass with a cumulative average), then move every mean by
    N(0, 0.1²)·std and scale every variance by U(0.8, 1.25)."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    model(torch.randn(4, 3, 128, 128, generator=generator))
    model.eval()
    for norm in norms:
        std = norm.running_var.sqrt()
        norm.running_mean += 0.1 * std * torch.randn(std.shape, generator=generator)
        norm.running_var *= torch.empty(std.shape).uniform_(0.8, 1.25, generator=generator)
        norm.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=generator)))


def original_encoder(config: effnet.EfficientNetConfig = TINY_ENCODER, seed: int = 0) -> OriginalEncoder:
    """The original encoder at `config` with every tensor random (hub_fixtures.randomize_), its BatchNorm running
    statistics near those of random images (randomize_batch_norms_) and their counters random."""
    model = OriginalEncoder(config).eval()
    hub_fixtures.randomize_(model, seed)
    randomize_batch_norms_(model, seed + 1)
    return model.requires_grad_(False)


def tiny_original(seed: int = 0) -> OriginalEncoder:
    """original_encoder at the tiny config."""
    return original_encoder(TINY_ENCODER, seed)


def original_state(original: OriginalEncoder) -> dict[str, torch.Tensor]:
    """What a release file holds under effnet_state_dict: the original model's state dict, torchvision's names."""
    return {name: tensor.clone() for name, tensor in original.state_dict().items()}


def save_stage_b_release(original: OriginalEncoder, path: Path) -> Path:
    """A model_v2_stage_b.pt stand-in: the original encoder's state under effnet_state_dict beside a (dummy) Stage
    B state."""
    torch.save({"state_dict": {"clip_mapper.weight": torch.zeros(2, 2)}, "effnet_state_dict": original_state(original),
                "iter": 1}, path)
    return path


def write_png(path: Path, width: int, height: int, depth: int, color_type: int, rows: bytes) -> Path:
    """A PNG written chunk by chunk: its header says `width` x `height`, whatever `rows` (filter bytes and pixels,
    compressed here) hold."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG (Pillow writes none but grayscale): (H, W, C) uint16, C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA."""
    h, w, c = array.shape
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))
    return write_png(path, w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], rows)


def decompression_bomb(path: Path, width: int, height: int) -> Path:
    """An 8-bit RGB PNG whose header claims `width` x `height` pixels, and whose data holds a few: all that a
    decompression bomb needs to be refused from its header."""
    return write_png(path, width, height, 8, 2, bytes(64))


def photo(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth uint8 RGB picture with structure at several scales (no clamp-bound flat areas)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [0.5 + 0.3 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
                for fx, fy, phase in rng.uniform(0.5, 4, size=(3, 3))]
    return (np.stack(channels, -1) * 255).round().astype(np.uint8)
