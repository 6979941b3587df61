"""Small stand-ins for the model classes of the authors' code (github.com/dome272/Wuerstchen: `modules.py` with
Prior and DiffNeXt, `vqgan.py` with VQModel), written for the tests from a reading of that code.

They keep the original module tree, so `state_dict()` yields exactly the names the release files
(model_v2_stage_c*.pt, model_v2_stage_b.pt, vqgan_f4_v1_500k.pt) carry: attention is nn.MultiheadAttention under
`attention.attn` (fused `in_proj_weight`/`in_proj_bias`, then `out_proj`), and the VQGAN codebook is
`vquantizer.codebook`. Their forward passes follow the original math and serve as an independent reference for
wurst's models. Weight initialisation is left at PyTorch's defaults: the tests re-randomise every tensor anyway.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def r_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal noise-level embedding: sines then cosines of r * 10000 at c_r / 2 frequencies, spaced by
    log(10000) / (c_r / 2 - 1). The frequencies are fp32, as in the original."""
    half = c_r // 2
    freqs = torch.exp(torch.arange(half, device=r.device).float() * -(math.log(max_positions) / (half - 1)))
    angles = (r * max_positions)[:, None] * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(emb, (0, 1)) if c_r % 2 else emb


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def channel_norm(c: int) -> LayerNorm2d:
    return LayerNorm2d(c, elementwise_affine=False, eps=1e-6)


class GlobalResponseNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x is channels-last
        norms = x.norm(p=2, dim=(1, 2), keepdim=True)
        return self.gamma * (x * (norms / (norms.mean(dim=-1, keepdim=True) + 1e-6))) + self.beta + x


def mlp(c_in: int, c: int, dropout: float) -> nn.Sequential:
    # Index layout matters for the names: 0 in, 1 GELU, 2 GRN, 3 dropout, 4 out.
    return nn.Sequential(nn.Linear(c_in, 4 * c), nn.GELU(), GlobalResponseNorm(4 * c), nn.Dropout(dropout),
                         nn.Linear(4 * c, c))


class ResBlock(nn.Module):
    """Stage C's block (the prior never passes a skip, so none is modelled)."""

    def __init__(self, c: int, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = channel_norm(c)
        self.channelwise = mlp(c, c, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.depthwise(x)).permute(0, 2, 3, 1)
        return x + self.channelwise(h).permute(0, 3, 1, 2)


class ResBlockStageB(nn.Module):
    """Stage B's block: the skip joins after the depthwise conv and norm, widening only the MLP input."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = channel_norm(c)
        self.channelwise = mlp(c + c_skip, c, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(self.depthwise(x))
        if skip is not None:
            h = torch.cat([h, skip], dim=1)
        return x + self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TimestepBlock(nn.Module):
    def __init__(self, c: int, c_r: int):
        super().__init__()
        self.mapper = nn.Linear(c_r, 2 * c)

    def forward(self, x: torch.Tensor, r_embed: torch.Tensor) -> torch.Tensor:
        a, b = self.mapper(r_embed)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + a) + b


class Attention2D(nn.Module):
    def __init__(self, c: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(c, nhead, dropout=dropout, bias=True, batch_first=True)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        kv = torch.cat([tokens, kv], dim=1)  # self_attn=True in every published model: image tokens join the keys
        out = self.attn(tokens, kv, kv, need_weights=False)[0]
        return out.transpose(1, 2).reshape(b, c, h, w)


class AttnBlock(nn.Module):
    def __init__(self, c: int, c_cond: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        self.norm = channel_norm(c)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.norm(x), self.kv_mapper(kv))


def run_block(
    block: nn.Module, x: torch.Tensor, r_embed: torch.Tensor, cond: torch.Tensor, skip: torch.Tensor | None = None
) -> torch.Tensor:
    if isinstance(block, ResBlockStageB):
        return block(x, skip)
    if isinstance(block, TimestepBlock):
        return block(x, r_embed)
    if isinstance(block, AttnBlock):
        return block(x, cond)
    return block(x)  # Stage C's ResBlock, or a resampler


class Prior(nn.Module):
    """Stage C (modules.Prior)."""

    def __init__(self, c_in=16, c=1280, c_cond=1024, c_r=64, depth=16, nhead=16, dropout=0.1):
        super().__init__()
        self.c_r = c_r
        self.projection = nn.Conv2d(c_in, c, kernel_size=1)
        self.cond_mapper = nn.Sequential(nn.Linear(c_cond, c), nn.LeakyReLU(0.2), nn.Linear(c, c))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.extend([ResBlock(c, dropout=dropout), TimestepBlock(c, c_r), AttnBlock(c, c, nhead, dropout)])
        self.out = nn.Sequential(channel_norm(c), nn.Conv2d(c, 2 * c_in, kernel_size=1))

    def forward(self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        cond, r_embed = self.cond_mapper(c), r_embedding(r, self.c_r)
        h = self.projection(x)
        for block in self.blocks:
            h = run_block(block, h, r_embed, cond)
        a, b = self.out(h).chunk(2, dim=1)
        return (x - a) / ((1 - b).abs() + 1e-5)


class DiffNeXt(nn.Module):
    """Stage B (modules.DiffNeXt)."""

    def __init__(self, c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1024, c_hidden=(320, 640, 1280, 1280),
                 nhead=(-1, 10, 20, 20), blocks=(4, 4, 14, 4), level_config=("CT", "CTA", "CTA", "CTA"),
                 inject_effnet=(False, True, True, True), effnet_embd=16, clip_embd=1024, kernel_size=3, dropout=0.1):
        super().__init__()
        self.c_r = c_r
        levels = len(c_hidden)
        self.clip_mapper = nn.Linear(clip_embd, c_cond)
        inject = list(inject_effnet) + list(reversed(inject_effnet))
        self.effnet_mappers = nn.ModuleList([nn.Conv2d(effnet_embd, c_cond, 1) if on else None for on in inject])
        self.seq_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(nn.PixelUnshuffle(patch_size),
                                       nn.Conv2d(c_in * patch_size**2, c_hidden[0], kernel_size=1),
                                       channel_norm(c_hidden[0]))

        def block(letter: str, i: int, c_skip: int) -> nn.Module:
            if letter == "C":
                return ResBlockStageB(c_hidden[i], c_skip, kernel_size, dropout)
            if letter == "T":
                return TimestepBlock(c_hidden[i], c_r)
            return AttnBlock(c_hidden[i], c_cond, nhead[i], dropout)

        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            level = nn.ModuleList()
            if i > 0:
                level.append(nn.Sequential(channel_norm(c_hidden[i - 1]),
                                           nn.Conv2d(c_hidden[i - 1], c_hidden[i], kernel_size=2, stride=2)))
            for _ in range(blocks[i]):
                level.extend(block(letter, i, c_cond if inject_effnet[i] else 0) for letter in level_config[i])
            self.down_blocks.append(level)
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.ModuleList()
            for j in range(blocks[i]):
                for k, letter in enumerate(level_config[i]):
                    c_skip = c_hidden[i] if i < levels - 1 and j == k == 0 else 0
                    level.append(block(letter, i, c_skip + (c_cond if inject_effnet[i] else 0)))
            if i > 0:
                level.append(nn.Sequential(channel_norm(c_hidden[i]),
                                           nn.ConvTranspose2d(c_hidden[i], c_hidden[i - 1], kernel_size=2, stride=2)))
            self.up_blocks.append(level)
        self.clf = nn.Sequential(channel_norm(c_hidden[0]),
                                 nn.Conv2d(c_hidden[0], 2 * c_out * patch_size**2, kernel_size=1),
                                 nn.PixelShuffle(patch_size))

    def effnet_features(self, index: int, effnet: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        mapper = self.effnet_mappers[index]
        if mapper is None:
            return None
        resized = F.interpolate(effnet.float(), size=x.shape[-2:], mode="bicubic", antialias=True, align_corners=True)
        # The original feeds the fp32 result on directly; casting back changes nothing in fp32 and lets the
        # fp64 reference run.
        return mapper(resized.to(effnet.dtype))

    def forward(self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        r_embed = r_embedding(r, self.c_r)
        clip = self.seq_norm(self.clip_mapper(clip))
        h = self.embedding(x)
        level_outputs = []
        for i, level in enumerate(self.down_blocks):
            injected = None
            for block in level:
                if injected is None and isinstance(block, ResBlockStageB):
                    injected = self.effnet_features(i, effnet, h)
                h = run_block(block, h, r_embed, clip, injected)
            level_outputs.insert(0, h)  # deepest first
        for i, level in enumerate(self.up_blocks):
            injected = None
            for j, block in enumerate(level):
                if injected is None and isinstance(block, ResBlockStageB):
                    injected = self.effnet_features(len(self.down_blocks) + i, effnet, h)
                skip = level_outputs[i] if j == 0 and i > 0 else None
                if injected is not None:
                    skip = injected if skip is None else torch.cat([skip, injected], dim=1)
                h = run_block(block, h, r_embed, clip, skip)
        a, b = self.clf(h).chunk(2, dim=1)
        return (x - a) / (b.sigmoid() * (1 - 2e-3) + 1e-3)


class MixingBlock(nn.Module):
    """The VQGAN's residual block (vqgan.ResBlock): depthwise conv with replication padding, then an MLP, each
    modulated by learned scalars."""

    def __init__(self, c: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        h = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h) * g[2]
        h = self.norm2(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]
        return x + self.channelwise(h).permute(0, 3, 1, 2) * g[5]


class VectorQuantize(nn.Module):
    def __init__(self, dim: int, k: int):
        super().__init__()
        self.codebook = nn.Embedding(k, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codebook entry of each channel vector of an NCHW tensor (squared Euclidean distance)."""
        flat = x.movedim(1, -1).reshape(-1, x.shape[1])
        weight = self.codebook.weight
        distances = (flat**2).sum(1, keepdim=True) + (weight**2).sum(1) - 2 * flat @ weight.t()
        indices = distances.argmin(dim=1)
        quantized = weight[indices].view(*x.movedim(1, -1).shape).movedim(-1, 1)
        return quantized, indices.view(x.shape[0], *x.shape[2:])


class VQModel(nn.Module):
    """Stage A (vqgan.VQModel). Unlike diffusers' PaellaVQModel (and wurst's StageA), it divides its encodings by
    scale_factor and multiplies decoder inputs by it."""

    def __init__(self, levels=2, bottleneck_blocks=12, c_hidden=384, c_latent=4, codebook_size=8192,
                 scale_factor=0.3764):
        super().__init__()
        self.scale_factor = scale_factor
        widths = [c_hidden // 2**i for i in reversed(range(levels))]
        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, widths[0], kernel_size=1))
        down: list[nn.Module] = []
        for i, c in enumerate(widths):
            if i > 0:
                down.append(nn.Conv2d(widths[i - 1], c, kernel_size=4, stride=2, padding=1))
            down.append(MixingBlock(c))
        down.append(nn.Sequential(nn.Conv2d(widths[-1], c_latent, kernel_size=1, bias=False), nn.BatchNorm2d(c_latent)))
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantize(c_latent, codebook_size)
        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(c_latent, widths[-1], kernel_size=1))]
        for i in range(levels):
            c = widths[levels - 1 - i]
            up.extend(MixingBlock(c) for _ in range(bottleneck_blocks if i == 0 else 1))
            if i < levels - 1:
                up.append(nn.ConvTranspose2d(c, widths[levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(widths[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quantised latents, latents, codebook indices), the latents divided by scale_factor."""
        latents = self.down_blocks(self.in_block(images))
        quantized, indices = self.vquantizer(latents)
        return quantized / self.scale_factor, latents / self.scale_factor, indices

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.out_block(self.up_blocks(latents * self.scale_factor))
