"""CLIP text encoder (the text tower only): token + position embeddings, a pre-LayerNorm causal
transformer, and a final LayerNorm. Würstchen feeds the whole `last_hidden_state`, padding positions
included, to its denoisers, so the padding mask must be applied exactly as in training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wurst.errors import ConfigError
from wurst.models.blocks import Linear
from wurst.models.validation import require_finite, require_heads_divide, require_positive


@dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a hub `text_encoder/config.json` (transformers' CLIPTextConfig) that matter here."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # transformers' default; the Würstchen encoders say "gelu"

    def __post_init__(self):
        require_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "max_position_embeddings")
        require_heads_divide("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        require_finite(self, "layer_norm_eps")
        if self.layer_norm_eps <= 0:
            raise ConfigError(f"the field 'layer_norm_eps' must be positive, got {self.layer_norm_eps}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"the field 'hidden_act' must be one of {list(ACTIVATIONS)}, got {self.hidden_act!r}")


ACTIVATIONS = ("gelu", "quick_gelu")  # exact GELU is fused into fc1 (Linear(gelu=True)), where the fast path needs it


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        width = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.norm1 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.q_proj = Linear(width, width)
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.out_proj = Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.fc1 = Linear(width, cfg.intermediate_size, gelu=cfg.hidden_act == "gelu")
        self.fc2 = Linear(cfg.intermediate_size, width)
        self.quick_gelu = cfg.hidden_act == "quick_gelu"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.out_proj(h.transpose(1, 2).reshape(b, n, -1))
        h = self.fc1(self.norm2(x))
        return x + self.fc2(quick_gelu(h) if self.quick_gelu else h)


class CLIPTextEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) token ids and an optional (B, N) 1/0 padding mask -> last_hidden_state (B, N, width)."""
        n = input_ids.shape[1]
        if n > self.config.max_position_embeddings:
            raise ValueError(f"{n} tokens exceed the encoder's {self.config.max_position_embeddings} positions")
        positions = torch.arange(n, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        # Each token sees itself and the tokens before it, minus padding. Row 0 (the start token) is never
        # padding, so no row is fully masked.
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_norm(x)


