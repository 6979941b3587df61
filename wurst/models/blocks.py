"""Building blocks shared by Stage C (the prior) and Stage B (the decoder). Tensors are NCHW unless a name
says otherwise; the per-pixel MLPs run channels-last, where Linear and the channel LayerNorm want them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# Inference on CPU in float32 and bfloat16 calls oneDNN's matmul directly: for the short, wide matrices of these
# models (a few hundred rows of width 1280-6144) it runs 10-30% faster in float32 than the BLAS path that F.linear
# takes, and 2-10% faster in bfloat16, on the same unpacked (memory-mapped) weights, and it fuses a following GELU
# into the matmul. The op has no backward and inductor cannot lower it on unpacked weights, so training,
# compiled graphs and every other device or dtype use F.linear.
def _onednn_linear_works(dtype: torch.dtype) -> bool:
    """The op is internal to PyTorch: use it only where this build has it and it computes a linear layer in
    `dtype` (bfloat16 needs AVX-512 at least)."""
    try:
        x, weight, bias = torch.ones(2, 3, dtype=dtype), torch.ones(4, 3, dtype=dtype), torch.zeros(4, dtype=dtype)
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
        return out.dtype == dtype and bool(torch.allclose(out.float(), F.gelu(F.linear(x, weight, bias)).float()))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_ONEDNN_DTYPES = frozenset(
    dtype for dtype in (torch.float32, torch.bfloat16)
    if torch.backends.mkldnn.is_available() and _onednn_linear_works(dtype)
)


class Linear(nn.Linear):
    """nn.Linear, optionally with the GELU (erf form) that follows it made part of the layer, so that the
    fast path can fuse the two. Same parameters, so the same checkpoint names."""

    def __init__(self, in_features: int, out_features: int, gelu: bool = False):
        super().__init__(in_features, out_features)
        self.gelu = gelu
        # LoRA (models/lora.py sets these): the unfused adapters' low-rank term, added before the GELU; and, while
        # adapters are fused into `weight`, the weight they replaced and which adapters they are.
        self.lora = None
        self.lora_base: torch.Tensor | None = None
        self.lora_fused: list = []
        # While packing is on (runtime/packing.py, around a denoising loop): the weight in oneDNN's blocked layout,
        # by the number of input features read (Stage B's fixed-term calls read the leading columns only).
        self.packed: dict[int, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor, fixed_term: torch.Tensor | None = None, *,
                tail_only: bool = False) -> torch.Tensor:
        """For an input whose last features are the same at every call (Stage B's injected embedding), the layer
        splits in two. `layer(tail, tail_only=True)`: the bias plus the weight's last tail.shape[-1] columns
        applied to `tail`, computed once. `layer(x, fixed_term=that)`: the same as the layer on cat([x, tail]),
        from one matmul over x's features accumulated onto the fixed term; a column slice of the weight is a
        strided view that the matmul reads in place, as fast as a copy of it. Both go through the module call,
        so hooks (sequential offload lends the weights from one) see them."""
        if tail_only:
            return F.linear(x, self.weight[:, -x.shape[-1]:], self.bias)
        fast = self.onednn_applies(x)
        packed = self.packed_weight(x) if fast else None
        if fixed_term is not None:
            if self.lora is not None:  # its low-rank term would need the whole input; LoRAs adapt Stage C only
                raise NotImplementedError("a fixed input term does not go with an unfused LoRA")
            if packed is not None:
                y = torch.ops.mkldnn._linear_pointwise.binary(x, fixed_term, packed, None, "add")
            else:
                weight = self.weight[:, : x.shape[-1]]
                y = torch.addmm(fixed_term.flatten(0, -2), x.flatten(0, -2), weight.t()).view(fixed_term.shape)
            return F.gelu(y) if self.gelu else y
        gelu = self.gelu and self.lora is None  # with a LoRA term, the GELU follows the sum
        if fast:
            attr, algorithm = ("gelu", "none") if gelu else ("none", "")
            weight = self.weight if packed is None else packed
            y = torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, attr, [], algorithm)
        else:
            y = F.linear(x, self.weight, self.bias)
            y = F.gelu(y) if gelu else y
        if self.lora is None:
            return y
        y = self.lora.add_to(y, x)
        return F.gelu(y) if self.gelu else y

    def onednn_applies(self, x: torch.Tensor) -> bool:
        """Whether the fast path (oneDNN's linear, see _onednn_linear_works) computes this layer on x."""
        return (x.dtype in _ONEDNN_DTYPES and x.device.type == "cpu" and self.weight.dtype == x.dtype
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling())

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """For the fast path, while packing is on: the weight's first x.shape[-1] columns in oneDNN's blocked
        layout, made at the second call (a loop of one step gains nothing from it). oneDNN otherwise reorders a
        plain weight into that layout at every call, which costs 4-5% of the time of the denoisers' linear layers
        (docs/perf-notes.md, Issue 27). Called only where onednn_applies(x), so a compiled graph never reads (nor
        guards on) self.packed."""
        packed = self.packed  # read once: another thread may end packing meanwhile
        if packed is None:
            return None
        width = x.shape[-1]
        if width not in packed:
            packed[width] = None  # seen once
        elif packed[width] is None:
            rows = x.numel() // width  # the batch the blocked layout is chosen for
            packed[width] = torch.ops.mkldnn._reorder_linear_weight(self.weight[:, :width].contiguous(), rows)
        return packed[width]


def channel_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of an NCHW tensor, without affine parameters (eps 1e-6). The models keep
    activations in channels_last memory, where both permutes are free views."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=1e-6).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN on a channels-last (B, H, W, C) tensor: scale each channel by its spatial L2 norm
    relative to the mean over channels."""

    def __init__(self, dim: int):
        super().__init__()
        # Shaped (1, 1, 1, C) as in the checkpoints.
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The L2 norm over H and W, as a sum of squares (torch.norm over two non-trailing dims is ~10x slower).
        # float16 squares go to float32 first: their sum over a large latent overflows, the known fp16 failure of
        # Stage B. bfloat16 has float32's range, so it squares and sums in place, 2-3x faster than a float32 copy
        # (the sum accumulates in float32 and rounds once, by 2^-9 at most, as torch.norm in bfloat16 does).
        squares = x.square() if x.dtype == torch.bfloat16 else x.float().square()
        spatial_norm = squares.sum(dim=(1, 2), keepdim=True).float().sqrt()
        relative = spatial_norm / (spatial_norm.mean(dim=-1, keepdim=True) + 1e-6)
        # gamma * (x * relative) + beta + x, as one pass over x: the per-channel factor is only (B, 1, 1, C).
        return torch.addcmul(self.beta, x, (1 + self.gamma * relative).to(x.dtype))


class ResBlock(nn.Module):
    """ConvNeXt block: depthwise conv, channel norm, then a channels-last MLP with GRN. Stage B's variant
    concatenates `skip` (U-Net skip and/or injected Stage C features) after the norm, so only the MLP's input
    widens (by c_skip channels)."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.mlp_in = Linear(c + c_skip, 4 * c, gelu=True)
        self.grn = GlobalResponseNorm(4 * c)
        self.mlp_out = Linear(4 * c, c)

    def fixed_skip_term(self, fixed: torch.Tensor) -> torch.Tensor:
        """mlp_in's share of the last channels of the skip, `fixed` (NCHW), where they are the same at every
        denoising step (Stage B's injected Stage C embedding). Computed once per generation and passed to
        `forward` as `fixed_term`, with `skip` then holding only the channels before them (or None); Stage B's
        ResBlocks spend 18% of its FLOPs on that share."""
        return self.mlp_in(fixed.permute(0, 2, 3, 1), tail_only=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                fixed_term: torch.Tensor | None = None) -> torch.Tensor:
        h = F.layer_norm(self.depthwise(x).permute(0, 2, 3, 1), x.shape[1:2], eps=1e-6)  # (B, H, W, C)
        if skip is not None:
            h = torch.cat([h, skip.permute(0, 2, 3, 1)], dim=-1)
        h = self.mlp_in(h, fixed_term)  # ends in GELU
        h = self.mlp_out(self.grn(h))
        return x + h.permute(0, 3, 1, 2)


class TimestepBlock(nn.Module):
    """Modulates features by the noise level: x * (1 + a) + b, with (a, b) mapped from the r-embedding."""

    def __init__(self, c: int, c_r: int):
        super().__init__()
        self.mapper = Linear(c_r, 2 * c)

    def forward(self, x: torch.Tensor, r_embed: torch.Tensor) -> torch.Tensor:
        a, b = self.mapper(r_embed)[:, :, None, None].chunk(2, dim=1)
        return torch.addcmul(b, x, 1 + a)


TextKV = tuple[torch.Tensor, torch.Tensor]  # one attention block's keys and values of the text tokens


class AttnBlock(nn.Module):
    """Attention whose keys and values are the normalised image tokens followed by the text tokens, so one
    block does both self- and cross-attention. No mask: every text token, padding included, is a key.

    The text half of the keys and values does not change between denoising steps, so `text_kv` computes it
    once per generation and `forward` takes the result."""

    def __init__(self, c: int, c_cond: int, heads: int):
        super().__init__()
        self.heads = heads
        self.cond_proj = Linear(c_cond, c)  # applied after a SiLU
        self.q_proj = Linear(c, c)
        self.k_proj = Linear(c, c)
        self.v_proj = Linear(c, c)
        self.out_proj = Linear(c, c)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, N, C) -> (B, heads, N, C / heads)

    def text_kv(self, cond: torch.Tensor) -> TextKV:
        context = self.cond_proj(F.silu(cond))
        return self.split_heads(self.k_proj(context)), self.split_heads(self.v_proj(context))

    def forward(self, x: torch.Tensor, text_kv: TextKV) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = channel_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C); contiguous for channels_last x
        q = self.split_heads(self.q_proj(tokens))
        k = torch.cat([self.split_heads(self.k_proj(tokens)), text_kv[0]], dim=2)
        v = torch.cat([self.split_heads(self.v_proj(tokens)), text_kv[1]], dim=2)
        out = attention(q, k, v).transpose(1, 2).flatten(2)
        return x + self.out_proj(out).transpose(1, 2).reshape(b, c, h, w)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v for (B, heads, N, d) queries and (B, heads, M, d) keys and values.

    In bfloat16 on the CPU, a block of queries (and, where a head's whole logits are small, several heads) at a
    time, with the block's logits (at most about 4 MB) in bfloat16 in one buffer reused by every block: at these
    models' shapes this runs 2-3x faster than SDPA's fused CPU kernel (100-150 GFLOP/s there, 310-430 here,
    where the two matmuls run near the bfloat16 matmul rate; fresh logits for every block made it 25-40%
    slower). The fused kernel keeps the logits in float32; rounding them to bfloat16 costs 2^-9 of their
    size, so one call's error is 2x the fused kernel's at logits of standard deviation 1 and up to 6x at 2. In a
    whole bfloat16 forward pass, whose error the rounding of every weight and activation sets, it did not show
    (tests/models/test_stage_b.py, test_stage_c.py). Everywhere else (float32, where the logits' precision matters;
    GPUs; autograd; compiled graphs): SDPA."""
    if q.dtype != torch.bfloat16 or q.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v)
    b, heads, n, d = q.shape
    m = k.shape[2]
    budget = 1 << 21  # logits per block (4 MB): 7-14% faster than 8 MB at the models' shapes (docs/perf-notes.md)
    rows = min(n, max(256, budget // m))
    heads_per_block = max(1, budget // (n * m)) if rows == n else 1
    out = torch.empty(b, heads, n, d, dtype=q.dtype)
    logits = torch.empty(min(heads_per_block, heads), rows, m, dtype=q.dtype)
    q = q * d**-0.5  # exact for the models' d = 64
    keys = k.transpose(-1, -2)
    for i in range(b):
        for head in range(0, heads, heads_per_block):
            hs = slice(head, min(head + heads_per_block, heads))
            for start in range(0, n, rows):
                qs = slice(start, min(start + rows, n))
                block = logits[: hs.stop - hs.start, : qs.stop - qs.start]
                torch.bmm(q[i, hs, qs], keys[i, hs], out=block)
                torch.softmax(block, dim=-1, out=block)  # in place: the CPU kernel reads a row before writing it
                torch.bmm(block, v[i, hs], out=out[i, hs, qs])
    return out


def r_embedding(r: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the noise level r in [0, 1]: sin then cos of r * 10000 at `dim // 2`
    geometrically spaced frequencies (the spacing divides by half - 1). Computed in fp32, returned in r's dtype."""
    half = dim // 2
    scaled = r * max_positions  # in r's own dtype first, as the reference does
    freqs = torch.exp(torch.arange(half, device=r.device).float() * -(math.log(max_positions) / (half - 1)))
    angles = scaled[:, None] * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(r.dtype)
