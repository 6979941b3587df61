"""Stage B, the decoder diffusion model (diffusers' WuerstchenDiffNeXt): a U-Net over the 4-channel VQ latent,
conditioned on the Stage C image embedding (resized into every level it is injected at) and on CLIP-H text.

The level structure comes from the config: level i has width c_hidden[i] and repeats the letters of
level_config[i] (C: ResBlock, T: TimestepBlock, A: AttnBlock) blocks[i] times. The published model has four
levels (320/640/1280/1280 wide, 4/4/14/4 repeats), so 1024x1024 images run at 128², 64², 32² and 16².
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wurst.errors import ArgumentError, ConfigError
from wurst.models.blocks import AttnBlock, Linear, ResBlock, TextKV, TimestepBlock, channel_norm, r_embedding
from wurst.models.validation import check_r_width, require_heads_divide, require_positive


@dataclass(frozen=True)
class StageBConfig:
    """The fields of a hub `decoder/config.json`; the defaults are the published model's."""

    c_in: int = 4  # latent channels
    c_out: int = 4
    c_r: int = 64  # r-embedding width
    patch_size: int = 2  # pixel-unshuffle factor of the stem
    c_cond: int = 1024  # width of the mapped text states and of the injected embeddings
    c_hidden: tuple[int, ...] = (320, 640, 1280, 1280)
    nhead: tuple[int, ...] = (-1, 10, 20, 20)  # -1: a level without attention
    blocks: tuple[int, ...] = (4, 4, 14, 4)
    level_config: tuple[str, ...] = ("CT", "CTA", "CTA", "CTA")
    inject_effnet: tuple[bool, ...] = (False, True, True, True)
    effnet_embd: int = 16  # Stage C latent channels
    clip_embd: int = 1024  # CLIP-H text width
    kernel_size: int = 3

    def __post_init__(self):
        levels = len(self.c_hidden)
        per_level = {"nhead": self.nhead, "blocks": self.blocks, "level_config": self.level_config,
                     "inject_effnet": self.inject_effnet}
        for name, values in per_level.items():
            if len(values) != levels:
                raise ConfigError(f"{name} has {len(values)} entries for {levels} levels")
        for letters in self.level_config:
            if not letters or set(letters) - set("CTA"):
                raise ConfigError(f"level_config entry {letters!r} must use the letters C, T, A")
        require_positive(self, "c_in", "c_out", "c_r", "patch_size", "c_cond", "c_hidden", "blocks", "effnet_embd",
                         "clip_embd", "kernel_size")
        if not levels:
            raise ConfigError("the field 'c_hidden' must name at least one level")
        if self.kernel_size % 2 == 0:  # padding k // 2 keeps the size only for odd kernels
            raise ConfigError(f"the field 'kernel_size' must be odd, got {self.kernel_size}")
        check_r_width(self.c_r)
        for i, (width, heads, letters) in enumerate(zip(self.c_hidden, self.nhead, self.level_config, strict=True)):
            if "A" in letters:
                require_heads_divide(f"c_hidden[{i}]", width, f"nhead[{i}]", heads)


class Resample(nn.Module):
    """Channel norm, then a stride-2 conv (down) or transposed conv (up) that also changes the width."""

    def __init__(self, c_from: int, c_to: int, up: bool):
        super().__init__()
        conv = nn.ConvTranspose2d if up else nn.Conv2d
        self.conv = conv(c_from, c_to, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(channel_norm(x))


class StageB(nn.Module):
    def __init__(self, cfg: StageBConfig):
        super().__init__()
        self.config = cfg
        levels, c = len(cfg.c_hidden), cfg.c_hidden
        self.text_proj = Linear(cfg.clip_embd, cfg.c_cond)  # followed by a LayerNorm without affine
        # One 1x1 projection of the Stage C embedding per injecting level: entries 0..L-1 serve the down
        # path, L..2L-1 the up path (deepest level first); None where a level takes no injection.
        inject = list(cfg.inject_effnet) + list(reversed(cfg.inject_effnet))
        self.effnet_proj = nn.ModuleList(
            [nn.Conv2d(cfg.effnet_embd, cfg.c_cond, kernel_size=1) if on else None for on in inject]
        )
        self.stem = nn.Conv2d(cfg.c_in * cfg.patch_size**2, c[0], kernel_size=1)  # after a pixel unshuffle

        def block(letter: str, i: int, c_skip: int) -> nn.Module:
            if letter == "C":
                return ResBlock(c[i], c_skip, cfg.kernel_size)
            if letter == "T":
                return TimestepBlock(c[i], cfg.c_r)
            return AttnBlock(c[i], cfg.c_cond, cfg.nhead[i])

        # Each level is a flat list in checkpoint order: [downsampler,] blocks... / blocks... [, upsampler].
        self.down_levels = nn.ModuleList()
        for i in range(levels):
            level = nn.ModuleList([Resample(c[i - 1], c[i], up=False)] if i > 0 else [])
            effnet_width = cfg.c_cond if cfg.inject_effnet[i] else 0
            for _ in range(cfg.blocks[i]):
                level.extend(block(letter, i, effnet_width) for letter in cfg.level_config[i])
            self.down_levels.append(level)
        self.up_levels = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.ModuleList()
            for repeat in range(cfg.blocks[i]):
                for k, letter in enumerate(cfg.level_config[i]):
                    # The level's first block also takes the U-Net skip from the down path (not at the bottom).
                    unet_width = c[i] if i < levels - 1 and repeat == k == 0 else 0
                    level.append(block(letter, i, unet_width + (cfg.c_cond if cfg.inject_effnet[i] else 0)))
            if i > 0:
                level.append(Resample(c[i], c[i - 1], up=True))
            self.up_levels.append(level)
        self.head = nn.Conv2d(c[0], 2 * cfg.c_out * cfg.patch_size**2, kernel_size=1)  # then a pixel shuffle

    def level_sizes(self, latent_size: tuple[int, int]) -> list[tuple[int, int]]:
        """The spatial size of each level for a latent of `latent_size`."""
        cfg = self.config
        factor = cfg.patch_size * 2 ** (len(cfg.c_hidden) - 1)  # the U-Net's skips need exact halvings
        if latent_size[0] % factor or latent_size[1] % factor:
            raise ArgumentError(f"Stage B latent sides must be multiples of {factor}, got {tuple(latent_size)}")
        side = (latent_size[0] // cfg.patch_size, latent_size[1] // cfg.patch_size)
        return [(side[0] >> i, side[1] >> i) for i in range(len(cfg.c_hidden))]

    def condition(
        self, effnet: torch.Tensor, text: torch.Tensor | None, latent_size: tuple[int, int]
    ) -> StageBConditioning:
        """Everything the denoising steps share: the Stage C embedding resized (bicubic, antialiased, corners
        aligned, always in fp32), projected for every injecting level and taken through the part of each of the
        level's ResBlocks that sees it (ResBlock.fixed_skip_term); and the text keys and values of every attention
        block. effnet: (B, effnet_embd, h, w); text: (B, L, clip_embd) CLIP-H states."""
        cfg = self.config
        sizes = self.level_sizes(latent_size)
        sizes += list(reversed(sizes))  # the up path, deepest level first
        levels = [*self.down_levels, *self.up_levels]
        fixed_terms = []
        for proj, size, level in zip(self.effnet_proj, sizes, levels, strict=True):
            resblocks = [block for block in level if isinstance(block, ResBlock)]
            if proj is None:
                fixed_terms += [None] * len(resblocks)
                continue
            resized = F.interpolate(effnet.float(), size=size, mode="bicubic", antialias=True, align_corners=True)
            injected = proj(resized.to(effnet.dtype)).contiguous(memory_format=torch.channels_last)
            fixed_terms += [block.fixed_skip_term(injected) for block in resblocks]
        attention = [m for m in self.modules() if isinstance(m, AttnBlock)]  # in forward order
        if attention and text is None:
            raise ValueError("this decoder has attention blocks, so it needs text states")
        if attention:
            text = F.layer_norm(self.text_proj(text), (cfg.c_cond,), eps=1e-6)
        return StageBConditioning(fixed_terms, [block.text_kv(text) for block in attention])

    def forward(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        effnet: torch.Tensor | StageBConditioning,
        text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, c_in, H, W) noisy latent; r: (B,) noise level. Either `effnet` (B, effnet_embd, h, w), the
        Stage C embedding, and `text` (B, L, clip_embd), CLIP-H states, or `effnet` = condition(effnet, text,
        (H, W)) computed once for all steps. Returns the predicted noise, shaped like x."""
        cfg = self.config
        cond = effnet if isinstance(effnet, StageBConditioning) else self.condition(effnet, text, x.shape[-2:])
        r_embed = r_embedding(r, cfg.c_r)
        text_kv, fixed_terms = iter(cond.text_kv), iter(cond.fixed_terms)

        def run(block: nn.Module, h: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
            if isinstance(block, ResBlock):
                return block(h, skip, next(fixed_terms))
            if isinstance(block, TimestepBlock):
                return block(h, r_embed)
            if isinstance(block, AttnBlock):
                return block(h, next(text_kv))
            return block(h)  # a Resample

        self.level_sizes(x.shape[-2:])  # checks the size
        h = self.stem(F.pixel_unshuffle(x, cfg.patch_size)).contiguous(memory_format=torch.channels_last)
        h = channel_norm(h)
        level_outputs = []
        for level in self.down_levels:
            for block in level:
                h = run(block, h)
            level_outputs.append(h)
        for j, level in enumerate(self.up_levels):
            for k, block in enumerate(level):
                # The U-Net skip goes to the first block of every level but the deepest; the injected embedding
                # comes in through the fixed terms.
                h = run(block, h, level_outputs[-1 - j] if k == 0 and j > 0 else None)

        a, b = F.pixel_shuffle(self.head(channel_norm(h)), cfg.patch_size).chunk(2, dim=1)
        return (x - a) / (b.sigmoid() * (1 - 2e-3) + 1e-3)


@dataclass
class StageBConditioning:
    """What every denoising step of one generation shares (see StageB.condition)."""

    # Per ResBlock in forward order, mlp_in's share of the injected Stage C embedding (None where not injected).
    fixed_terms: list[torch.Tensor | None]
    text_kv: list[TextKV]  # per attention block, in forward order


