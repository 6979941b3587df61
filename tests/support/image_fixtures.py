"""Test inputs for image to image: a tiny Stage C image encoder with random weights (in wurst's converted
layout and in the original release layout) and small image files of the awkward kinds users have."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from tools import hub_fixtures
from wurst.models import effnet
from wurst.weights.keymaps import image_encoder_keys

# Six stages as in EfficientNetV2-S (so the published strides apply), a few channels each; 16 output channels,
# as the tiny Stage C and Stage B take.
TINY_ENCODER = effnet.EfficientNetConfig(stem=8, widths=(8, 8, 16, 16, 24, 32), depths=(1, 2, 1, 2, 1, 1),
                                         expand_ratios=(1, 2, 2, 1, 2, 2), c_cond=48, c_latent=16)


def tiny_encoder(seed: int = 0, config: effnet.EfficientNetConfig = TINY_ENCODER) -> effnet.EfficientNetEncoder:
    model = effnet.EfficientNetEncoder(config).eval()
    hub_fixtures.randomize_(model, seed)
    return model.requires_grad_(False)


def original_state(model: effnet.EfficientNetEncoder) -> dict[str, torch.Tensor]:
    """The module's tensors under the original release's names, with the BatchNorm counters it also carries."""
    keys = image_encoder_keys(model.config)
    state = {keys.to_checkpoint(name): tensor.clone() for name, tensor in model.state_dict().items()}
    for name in list(state):
        if name.endswith(".running_var"):
            state[name.removesuffix("running_var") + "num_batches_tracked"] = torch.tensor(1000)
    return state


def save_stage_b_release(model: effnet.EfficientNetEncoder, path: Path) -> Path:
    """A model_v2_stage_b.pt stand-in: the encoder under effnet_state_dict beside a (dummy) Stage B state."""
    torch.save({"state_dict": {"clip_mapper.weight": torch.zeros(2, 2)}, "effnet_state_dict": original_state(model),
                "iter": 1}, path)
    return path


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG (Pillow writes none but grayscale): (H, W, C) uint16, C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA."""
    h, w, c = array.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def photo(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth uint8 RGB picture with structure at several scales (no clamp-bound flat areas)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [0.5 + 0.3 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
                for fx, fy, phase in rng.uniform(0.5, 4, size=(3, 3))]
    return (np.stack(channels, -1) * 255).round().astype(np.uint8)
