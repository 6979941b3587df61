"""Checkpoint names -> module names: one short table per model."""

from __future__ import annotations

import re
from collections.abc import Iterable

from wurst.models.effnet import EfficientNetConfig


class KeyMap:
    """A short table of (checkpoint pattern, module pattern) pairs. `{}` stands for one dotted name part
    (a layer number, or weight/bias) and is carried across in order. Checkpoint names matching an
    `ignore` pattern are skipped (buffers that some exporters write and the model recomputes). When
    `optional_prefix` is set, checkpoint names may carry it or not; the patterns are written with it."""

    def __init__(self, pairs: Iterable[tuple[str, str]], ignore: Iterable[str] = (), optional_prefix: str = ""):
        self.pairs = list(pairs)
        self.prefix = optional_prefix
        self._forward = [(self._regex(c), m) for c, m in self.pairs]
        self._backward = [(self._regex(m), c) for c, m in self.pairs]
        self._ignore = [self._regex(p) for p in ignore]

    @staticmethod
    def _regex(pattern: str) -> re.Pattern[str]:
        return re.compile("^" + re.escape(pattern).replace(r"\{\}", r"([^.]+)") + "$")

    @staticmethod
    def _apply(rules: list[tuple[re.Pattern[str], str]], name: str) -> str | None:
        for regex, target in rules:
            match = regex.match(name)
            if match:
                return target.format(*match.groups())
        return None

    def _with_prefix(self, checkpoint_name: str) -> str:
        return checkpoint_name if checkpoint_name.startswith(self.prefix) else self.prefix + checkpoint_name

    def to_module(self, checkpoint_name: str) -> str | None:
        if not self.pairs:  # an empty table: the file already uses the module's names
            return checkpoint_name
        return self._apply(self._forward, self._with_prefix(checkpoint_name))

    def to_checkpoint(self, module_name: str) -> str:
        return self._apply(self._backward, module_name) or module_name

    def checkpoint_layer(self, module_name: str) -> str:
        """The checkpoint's name of a layer (its weight's, less `.weight`): the name LoRA files give it."""
        return self.to_checkpoint(f"{module_name}.weight").removesuffix(".weight")

    def ignored(self, checkpoint_name: str) -> bool:
        return any(r.match(self._with_prefix(checkpoint_name)) for r in self._ignore)


SAME_NAMES = KeyMap([])  # for files in wurst's own layout, written under the module names


# ---------------------------------------------------------------------------------------------------------
# Stage C (the prior)

# Hub (diffusers) names -> our names. `{}` is a block index or weight/bias/gamma/beta.
STAGE_C_KEYS = KeyMap(
    [
        ("projection.{}", "projection.{}"),
        ("cond_mapper.0.{}", "cond_in.{}"),
        ("cond_mapper.2.{}", "cond_out.{}"),
        ("blocks.{}.depthwise.{}", "blocks.{}.depthwise.{}"),
        ("blocks.{}.channelwise.0.{}", "blocks.{}.mlp_in.{}"),
        ("blocks.{}.channelwise.2.{}", "blocks.{}.grn.{}"),
        ("blocks.{}.channelwise.4.{}", "blocks.{}.mlp_out.{}"),
        ("blocks.{}.mapper.{}", "blocks.{}.mapper.{}"),
        ("blocks.{}.kv_mapper.1.{}", "blocks.{}.cond_proj.{}"),
        ("blocks.{}.attention.to_q.{}", "blocks.{}.q_proj.{}"),
        ("blocks.{}.attention.to_k.{}", "blocks.{}.k_proj.{}"),
        ("blocks.{}.attention.to_v.{}", "blocks.{}.v_proj.{}"),
        ("blocks.{}.attention.to_out.0.{}", "blocks.{}.out_proj.{}"),
        ("out.1.{}", "head.{}"),
    ]
)


# ---------------------------------------------------------------------------------------------------------
# Stage B (the decoder)


def _level_keys(ours: str, theirs: str) -> list[tuple[str, str]]:
    """The key pairs of one path (down or up): blocks as in Stage C, and the resampler's conv."""
    pairs = [
        ("depthwise.{}", "depthwise.{}"),
        ("channelwise.0.{}", "mlp_in.{}"),
        ("channelwise.2.{}", "grn.{}"),
        ("channelwise.4.{}", "mlp_out.{}"),
        ("mapper.{}", "mapper.{}"),
        ("kv_mapper.1.{}", "cond_proj.{}"),
        ("attention.to_q.{}", "q_proj.{}"),
        ("attention.to_k.{}", "k_proj.{}"),
        ("attention.to_v.{}", "v_proj.{}"),
        ("attention.to_out.0.{}", "out_proj.{}"),
        ("1.{}", "conv.{}"),  # the resampler: index 0 is its parameter-free norm
    ]
    return [(f"{theirs}.{{}}.{{}}.{c}", f"{ours}.{{}}.{{}}.{m}") for c, m in pairs]


# Hub (diffusers) names -> our names. `{}` is a level, a block index, or weight/bias/gamma/beta.
STAGE_B_KEYS = KeyMap(
    [
        ("clip_mapper.{}", "text_proj.{}"),
        ("effnet_mappers.{}.{}", "effnet_proj.{}.{}"),
        ("embedding.1.{}", "stem.{}"),
        *_level_keys("down_levels", "down_blocks"),
        *_level_keys("up_levels", "up_blocks"),
        ("clf.1.{}", "head.{}"),
    ]
)


# ---------------------------------------------------------------------------------------------------------
# Stage A (the VQGAN)

# Hub (diffusers) names -> our names. `{}` is a layer index or weight/bias/running_mean/...
STAGE_A_KEYS = KeyMap(
    [
        ("in_block.1.{}", "in_conv.{}"),
        ("down_blocks.{}.depthwise.1.{}", "down.{}.depthwise.{}"),
        ("down_blocks.{}.channelwise.0.{}", "down.{}.mlp_in.{}"),
        ("down_blocks.{}.channelwise.2.{}", "down.{}.mlp_out.{}"),
        ("down_blocks.{}.0.{}", "down.{}.conv.{}"),  # ToLatent
        ("down_blocks.{}.1.{}", "down.{}.norm.{}"),
        ("down_blocks.{}.{}", "down.{}.{}"),  # strided convs, and the gammas
        ("vquantizer.embedding.weight", "codebook.weight"),
        ("up_blocks.0.0.{}", "up.0.{}"),
        ("up_blocks.{}.depthwise.1.{}", "up.{}.depthwise.{}"),
        ("up_blocks.{}.channelwise.0.{}", "up.{}.mlp_in.{}"),
        ("up_blocks.{}.channelwise.2.{}", "up.{}.mlp_out.{}"),
        ("up_blocks.{}.{}", "up.{}.{}"),  # transposed convs, and the gammas
        ("out_block.0.{}", "out_conv.{}"),
    ]
)


# ---------------------------------------------------------------------------------------------------------
# The CLIP text encoder

# Hub names -> our names. `{}` is a layer number or weight/bias. The hub files (transformers 4) prefix every
# name with "text_model."; transformers 5 saves without it. Both load.
CLIP_TEXT_KEYS = KeyMap(
    [
        ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
        ("text_model.embeddings.position_embedding.weight", "position_embedding.weight"),
        ("text_model.encoder.layers.{}.layer_norm1.{}", "layers.{}.norm1.{}"),
        ("text_model.encoder.layers.{}.self_attn.q_proj.{}", "layers.{}.q_proj.{}"),
        ("text_model.encoder.layers.{}.self_attn.k_proj.{}", "layers.{}.k_proj.{}"),
        ("text_model.encoder.layers.{}.self_attn.v_proj.{}", "layers.{}.v_proj.{}"),
        ("text_model.encoder.layers.{}.self_attn.out_proj.{}", "layers.{}.out_proj.{}"),
        ("text_model.encoder.layers.{}.layer_norm2.{}", "layers.{}.norm2.{}"),
        ("text_model.encoder.layers.{}.mlp.fc1.{}", "layers.{}.fc1.{}"),
        ("text_model.encoder.layers.{}.mlp.fc2.{}", "layers.{}.fc2.{}"),
        ("text_model.final_layer_norm.{}", "final_norm.{}"),
    ],
    # Older exports write the position-id buffer; it is just arange(77).
    ignore=["text_model.embeddings.position_ids"],
    optional_prefix="text_model.",
)


# ---------------------------------------------------------------------------------------------------------
# Stage C's image encoder, in the original key layout: `backbone.` is torchvision's efficientnet_v2_s().features
# (index 0 the stem, 1..n the stages, n + 1 the head), each conv-norm pair a Sequential (0 conv, 1 BatchNorm);
# `mapper.0`/`mapper.1`. The table depends on the config: fused stages and expansion change the parts.


def image_encoder_keys(cfg: EfficientNetConfig) -> KeyMap:
    pairs, ignore = [], []

    def conv_norm(checkpoint: str, module: str) -> None:
        pairs.append((f"{checkpoint}.0.weight", f"{module}.conv.weight"))
        pairs.append((f"{checkpoint}.1.{{}}", f"{module}.norm.{{}}"))
        ignore.append(f"{checkpoint}.1.num_batches_tracked")

    conv_norm("backbone.0", "stem")
    for i, expand in enumerate(cfg.expand_ratios):
        block, ours = f"backbone.{i + 1}.{{}}.block", f"stages.{i}.{{}}"
        if i < cfg.fused_stages:
            parts = ["conv", "project"] if expand != 1 else ["conv"]
        else:
            parts = ["expand", "depthwise", "se", "project"] if expand != 1 else ["depthwise", "se", "project"]
        for k, part in enumerate(parts):
            if part == "se":
                pairs.append((f"{block}.{k}.{{}}.{{}}", f"{ours}.se.{{}}.{{}}"))  # fc1, fc2: weight, bias
            else:
                conv_norm(f"{block}.{k}", f"{ours}.{part}")
    conv_norm(f"backbone.{len(cfg.widths) + 1}", "head")
    conv_norm("mapper", "mapper")
    return KeyMap(pairs, ignore)
