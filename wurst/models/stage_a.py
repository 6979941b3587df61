"""Stage A, the Paella VQGAN (diffusers' PaellaVQModel): a 4x down/up-sampling autoencoder between RGB images
in [0, 1] and a 4-channel latent with an 8192-entry codebook.

Text-to-image uses only the decoder, on Stage B latents times `scale_factor` and without quantising. The
encoder and the codebook are here too, for encoding images (image-to-image, reconstruction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wurst.errors import ConfigError
from wurst.models.blocks import Linear
from wurst.models.validation import require_finite, require_positive


@dataclass(frozen=True)
class StageAConfig:
    """The fields of a hub `vqgan/config.json`; the defaults are the published model's."""

    in_channels: int = 3
    out_channels: int = 3
    up_down_scale_factor: int = 2  # pixel (un)shuffle factor at the image end
    levels: int = 2  # one stride-2 resampling between consecutive levels
    bottleneck_blocks: int = 12  # mixing blocks at the latent resolution in the decoder
    embed_dim: int = 384  # width at the latent resolution; halved per level towards the image
    latent_channels: int = 4
    num_vq_embeddings: int = 8192
    scale_factor: float = 0.3764  # Stage B latents * scale_factor = this model's latents

    def __post_init__(self):
        require_positive(self, "in_channels", "out_channels", "up_down_scale_factor", "levels", "embed_dim",
                         "latent_channels", "num_vq_embeddings")
        if self.bottleneck_blocks < 0:
            raise ConfigError(f"the field 'bottleneck_blocks' must be 0 or more, got {self.bottleneck_blocks}")
        # Each level halves the width. (An absurd level count is left to the check against the weights.)
        if self.levels <= 32 and self.embed_dim % 2 ** (self.levels - 1):
            raise ConfigError(f"the field 'embed_dim' ({self.embed_dim}) must be divisible by 2 ** (levels - 1) "
                              f"(levels is {self.levels})")
        require_finite(self, "scale_factor")
        if self.scale_factor <= 0:
            raise ConfigError(f"the field 'scale_factor' must be positive, got {self.scale_factor}")

    @property
    def widths(self) -> list[int]:
        """Width per level, image end first: 192, 384 for the published model."""
        return [self.embed_dim // 2**i for i in reversed(range(self.levels))]


class MixingResidualBlock(nn.Module):
    """Paella's residual block: a depthwise conv (replication padding) then a channels-last MLP, each after
    a norm and scaled by learned scalars: gammas = (norm scale, norm shift, branch gain) for each branch."""

    def __init__(self, c: int):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=3, padding=1, padding_mode="replicate", groups=c)
        self.mlp_in = Linear(c, 4 * c, gelu=True)
        self.mlp_out = Linear(4 * c, c)
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, c = self.gammas, x.shape[1]
        # The scalar scale and shift ride in the norm's affine parameters, and each branch's gain in the residual
        # add (addcmul): one pass over the activations each instead of two.
        h = x.permute(0, 2, 3, 1)  # (B, H, W, C) for the norms and the MLP: a free view of channels_last memory
        h = F.layer_norm(h, (c,), (1 + g[0]).expand(c), g[1].expand(c), eps=1e-6)
        x = torch.addcmul(x, self.depthwise(h.permute(0, 3, 1, 2)), g[2])
        h = x.permute(0, 2, 3, 1)
        h = F.layer_norm(h, (c,), (1 + g[3]).expand(c), g[4].expand(c), eps=1e-6)
        return torch.addcmul(x, self.mlp_out(self.mlp_in(h)).permute(0, 3, 1, 2), g[5])  # mlp_in ends in GELU


class ToLatent(nn.Module):
    """The encoder's last step: a 1x1 conv to the latent channels, then BatchNorm (running statistics)."""

    def __init__(self, c: int, latent_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(c, latent_channels, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class StageA(nn.Module):
    def __init__(self, cfg: StageAConfig):
        super().__init__()
        self.config = cfg
        widths, scale = cfg.widths, cfg.up_down_scale_factor
        # Encoder: pixel unshuffle, 1x1 conv, then per level [stride-2 conv,] one mixing block; to latent.
        self.in_conv = nn.Conv2d(cfg.in_channels * scale**2, widths[0], kernel_size=1)
        self.down = nn.ModuleList()
        for i, c in enumerate(widths):
            if i > 0:
                self.down.append(nn.Conv2d(widths[i - 1], c, kernel_size=4, stride=2, padding=1))
            self.down.append(MixingResidualBlock(c))
        self.down.append(ToLatent(widths[-1], cfg.latent_channels))
        self.codebook = nn.Embedding(cfg.num_vq_embeddings, cfg.latent_channels)
        # Decoder, in checkpoint order: 1x1 conv from the latent, bottleneck_blocks mixing blocks, then per
        # finer level a stride-2 transposed conv and one mixing block; then 1x1 conv and pixel shuffle.
        self.up = nn.ModuleList([nn.Conv2d(cfg.latent_channels, widths[-1], kernel_size=1)])
        for i, c in enumerate(reversed(widths)):
            if i > 0:
                self.up.append(nn.ConvTranspose2d(widths[-i], c, kernel_size=4, stride=2, padding=1))
            self.up.extend(MixingResidualBlock(c) for _ in range(cfg.bottleneck_blocks if i == 0 else 1))
        self.out_conv = nn.Conv2d(widths[0], cfg.out_channels * scale**2, kernel_size=1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, 4, H/4, W/4) latents, not quantised."""
        h = F.pixel_unshuffle(images, self.config.up_down_scale_factor).contiguous(memory_format=torch.channels_last)
        h = self.in_conv(h)
        for layer in self.down:
            h = layer(h)
        return h

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Snap each latent pixel to its nearest codebook entry (Euclidean). Returns the quantised latents and
        the (B, h, w) codebook indices."""
        b, c, h, w = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(-1, c)
        indices = torch.cdist(flat, self.codebook.weight).argmin(dim=1)
        quantized = self.codebook(indices).view(b, h, w, c).permute(0, 3, 1, 2)
        return quantized, indices.view(b, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) latents -> (B, 3, 4h, 4w) images, roughly in [0, 1] and not clamped."""
        h = latents.contiguous(memory_format=torch.channels_last)  # the convs keep it; the blocks rely on it
        for layer in self.up:
            h = layer(h)
        return F.pixel_shuffle(self.out_conv(h), self.config.up_down_scale_factor).contiguous()


