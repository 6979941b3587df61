"""wurst/models/blocks.py, block by block: Linear (and its fused GELU on the oneDNN path) against F.linear then
GELU, channel_norm against a LayerNorm over the channels, GlobalResponseNorm against its formula, ResBlock,
TimestepBlock and AttnBlock against diffusers' own blocks (random weights, the same inputs), r_embedding against
diffusers' gen_r_embedding, and the blocked bfloat16 attention against exact attention."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers.pipelines.deprecated.wuerstchen import modeling_wuerstchen_common as common
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext import ResBlockStageB
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior import WuerstchenPrior

from tests.helpers import parity_bound, relative_error
from tools import hub_fixtures
from wurst.models import blocks
from wurst.models.blocks import (
    AttnBlock,
    GlobalResponseNorm,
    Linear,
    ResBlock,
    TimestepBlock,
    attention,
    channel_norm,
    r_embedding,
)


def randn(*shape, seed=0, scale=1.0, offset=0.0):
    return offset + scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def with_weights_of(ours: torch.nn.Module, ref: torch.nn.Module, table: dict[str, str]) -> torch.nn.Module:
    """`ours` with the parameters of `ref`, by a table written here (ours' module path -> ref's): every parameter
    of ours comes from ref, and every one of ref's goes to ours."""
    ref_state = ref.state_dict()
    state = {}
    for name in ours.state_dict():
        module, leaf = name.rsplit(".", 1)
        state[name] = ref_state[f"{table[module]}.{leaf}"]
    ours.load_state_dict(state, strict=True)
    assert len(state) == len(ref_state)
    return ours.eval()


def random_reference(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A diffusers block with every parameter random (GRN's gamma and beta and the mappers too, which diffusers
    initialises to zero, making a block an identity)."""
    hub_fixtures.randomize_(module, seed)
    return module.eval()


@torch.no_grad()
def assert_parity(ours, ref, inputs, ours_inputs=None):
    """ours(*ours_inputs) against ref(*inputs) in float32, within the reference's own fp32-vs-fp64 distance."""
    ref32 = ref(*inputs)
    ref64 = copy.deepcopy(ref).double()(*(t.double() for t in inputs))
    got = ours(*(ours_inputs or inputs))
    error, bound = relative_error(got, ref32), parity_bound(ref32, ref64)
    assert got.shape == ref32.shape and error <= bound, f"relative error {error:.2e} > bound {bound:.2e}"
    assert relative_error(ref32, inputs[0]) > 0.05  # the block does something: not a near-identity
    return got


# ---------------------------------------------------------------------------------------------------------
# Linear


def plain_linear(layer: Linear, x: torch.Tensor, gelu: bool, approximate: str = "none") -> torch.Tensor:
    y = F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))
    return F.gelu(y, approximate=approximate) if gelu else y


@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
def test_linear_in_float32_is_f_linear_then_erf_gelu(gelu):
    layer = Linear(48, 96, gelu=gelu)
    hub_fixtures.randomize_(layer, 1)
    x = randn(3, 7, 48, seed=2)
    exact = plain_linear(layer, x.double(), gelu)
    with torch.no_grad():  # inference: the oneDNN path, where this build has it
        fast = layer(x)
    autograd = layer(x)  # autograd: F.linear itself
    assert torch.equal(autograd.detach(), plain_linear(layer, x, gelu))
    bound = parity_bound(plain_linear(layer, x, gelu), exact)
    assert fast.dtype == torch.float32 and relative_error(fast, exact) <= bound
    if gelu:  # the bound tells GELU's erf form from its tanh approximation
        assert relative_error(plain_linear(layer, x.double(), gelu, "tanh"), exact) > 10 * bound


@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
def test_linear_in_bfloat16_is_as_accurate_as_f_linear(gelu):
    """bfloat16 (oneDNN fusing the GELU where it can): no further from the float64 result than F.linear then GELU
    in bfloat16 is (measured: the fused GELU rounds once instead of twice, and lands a little closer)."""
    layer = Linear(64, 256, gelu=gelu)
    hub_fixtures.randomize_(layer, 3)
    x = randn(5, 9, 64, seed=4)
    exact = plain_linear(layer, x.double(), gelu)
    layer = layer.bfloat16()
    with torch.no_grad():
        got = layer(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert relative_error(got, exact) <= 1.25 * relative_error(plain_linear(layer, x.bfloat16(), gelu), exact)


def test_linear_takes_f_linear_where_onednn_is_not_used(monkeypatch):
    monkeypatch.setattr(blocks, "_ONEDNN_DTYPES", frozenset())
    layer = Linear(16, 32, gelu=True)
    hub_fixtures.randomize_(layer, 5)
    x = randn(4, 16, seed=6)
    with torch.no_grad():
        assert torch.equal(layer(x), plain_linear(layer, x, gelu=True))


# ---------------------------------------------------------------------------------------------------------
# Norms


@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (3.0, 5.0), (1e-3, 0.5)],
                         ids=["standard", "shifted", "variance-near-eps"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_channel_norm_is_a_layer_norm_over_the_channels(scale, offset, memory_format):
    """Against diffusers' WuerstchenLayerNorm (nn.LayerNorm over C, no affine, eps 1e-6) and the formula written
    out in float64. At a variance of 1e-6 the eps is half of the denominator, so its value shows."""
    x = randn(2, 24, 5, 7, seed=7, scale=scale, offset=offset).contiguous(memory_format=memory_format)
    ref = common.WuerstchenLayerNorm(24, elementwise_affine=False, eps=1e-6)
    expected = ref(x)
    exact = x.double()
    exact = (exact - exact.mean(dim=1, keepdim=True)) / (exact.var(dim=1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    got = channel_norm(x)
    assert got.shape == x.shape
    assert relative_error(got, exact) <= parity_bound(expected, exact)
    torch.testing.assert_close(got, expected)


def grn_formula(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ConvNeXt-V2's GRN, written out: N(x) = ||x||₂ over H and W, divided by its mean over the channels (+ 1e-6);
    gamma · (x · N(x)) + beta + x."""
    norm = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    return gamma * (x * (norm / (norm.mean(dim=-1, keepdim=True) + 1e-6))) + beta + x


@torch.no_grad()
def test_global_response_norm_is_its_formula():
    ours = GlobalResponseNorm(32)
    hub_fixtures.randomize_(ours, 8)
    ref = common.GlobalResponseNorm(32)  # diffusers' (torch.norm), the parity test's bound
    ref.load_state_dict(ours.state_dict())
    x = randn(2, 6, 5, 32, seed=9)  # channels-last (B, H, W, C)
    exact = grn_formula(x.double(), ours.gamma.double(), ours.beta.double())
    got = ours(x)
    assert relative_error(got, exact) <= parity_bound(ref(x), exact)
    assert relative_error(exact, x.double()) > 0.05  # gamma and beta are not the identity's zeros


@torch.no_grad()
def test_grn_does_not_overflow_in_float16():
    """The sum of squares over a 128x128 latent of activations around 100 is ~1.6e8, past float16's 65504: GRN
    keeps its statistics in float32, so a float16 Stage B gets finite values close to float32's."""
    grn = GlobalResponseNorm(8)
    grn.gamma.normal_(), grn.beta.normal_()
    x = 100 * torch.randn(1, 128, 128, 8, generator=torch.Generator().manual_seed(0))
    expected = grn(x)
    got = grn.half()(x.half())
    assert torch.isfinite(got).all()
    assert relative_error(got.float(), expected) < 2e-3


def test_grn_in_bfloat16_is_as_accurate_as_float32_statistics():
    """bfloat16 GRN squares in place and sums with float32 accumulation (no float32 copy of x). Against float64 it
    is as accurate as GRN with every statistic computed from a float32 copy, written out here (measured over three
    seeds: 2.8-3.0e-3 against 2.8-2.9e-3; rounding x in and the result out alone costs 2.1e-3)."""
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        grn = GlobalResponseNorm(64)
        with torch.no_grad():
            grn.gamma.normal_(generator=generator), grn.beta.normal_(generator=generator)
            x = torch.randn(2, 64, 64, 64, generator=generator)
            exact = grn.double()(x.double())
            xb = x.bfloat16()
            norm = xb.float().square().sum(dim=(1, 2), keepdim=True).sqrt()
            factor = (1 + grn.gamma.float() * norm / (norm.mean(dim=-1, keepdim=True) + 1e-6)).bfloat16()
            float32_statistics = grn.beta.bfloat16() + xb * factor
            got = grn.bfloat16()(xb)
        assert got.dtype == torch.bfloat16
        assert relative_error(got, exact) <= 1.1 * relative_error(float32_statistics, exact), seed


# ---------------------------------------------------------------------------------------------------------
# The blocks against diffusers' blocks

RESBLOCK_TABLE = {"depthwise": "depthwise", "mlp_in": "channelwise.0", "grn": "channelwise.2",
                  "mlp_out": "channelwise.4"}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_resblock_is_diffusers_resblock(kernel_size, memory_format):
    """Without a skip: Stage C's block (diffusers' ResBlock)."""
    ref = random_reference(common.ResBlock(16, kernel_size=kernel_size), 10)
    ours = with_weights_of(ResBlock(16, kernel_size=kernel_size), ref, RESBLOCK_TABLE)
    x = randn(2, 16, 6, 5, seed=11).contiguous(memory_format=memory_format)
    assert_parity(ours, ref, (x,))


@pytest.mark.parametrize("c_skip", [8, 24])
def test_resblock_with_a_skip_is_diffusers_stage_b_resblock(c_skip):
    """With a skip: Stage B's block (diffusers' ResBlockStageB), which concatenates it after the norm."""
    ref = random_reference(ResBlockStageB(16, c_skip=c_skip), 12)
    ours = with_weights_of(ResBlock(16, c_skip=c_skip), ref, RESBLOCK_TABLE)
    x, skip = randn(2, 16, 4, 6, seed=13), randn(2, c_skip, 4, 6, seed=14)
    assert_parity(ours, ref, (x, skip))


@pytest.mark.parametrize("c_unet", [0, 8], ids=["injection-only", "unet-skip-too"])
def test_resblock_with_a_fixed_term_is_diffusers_stage_b_resblock(c_unet):
    """Stage B's path: the skip's last channels (the injected embedding) go through mlp_in once, as a fixed
    term, and each call passes only the channels before them. Same result as diffusers' block on the whole skip."""
    ref = random_reference(ResBlockStageB(16, c_skip=c_unet + 24), 16)
    ours = with_weights_of(ResBlock(16, c_skip=c_unet + 24), ref, RESBLOCK_TABLE)
    x, unet, fixed = randn(2, 16, 4, 6, seed=17), randn(2, c_unet, 4, 6, seed=18), randn(2, 24, 4, 6, seed=19)
    with torch.no_grad():
        fixed_term = ours.fixed_skip_term(fixed)
    assert_parity(lambda x, skip: ours(x, skip[:, :c_unet] if c_unet else None, fixed_term), ref,
                  (x, torch.cat([unet, fixed], dim=1)))


def test_a_fixed_input_term_refuses_an_unfused_lora():
    layer = Linear(8, 4)
    layer.lora = object()
    with pytest.raises(NotImplementedError, match="LoRA"):
        layer(torch.zeros(1, 5), torch.zeros(1, 4))


def test_timestep_block_is_diffusers_timestep_block():
    ref = random_reference(common.TimestepBlock(16, 24), 15)
    ours = with_weights_of(TimestepBlock(16, 24), ref, {"mapper": "mapper"})
    x, r_embed = randn(3, 16, 5, 5, seed=16), randn(3, 24, seed=17)
    assert_parity(ours, ref, (x, r_embed))


ATTENTION_TABLE = {"cond_proj": "kv_mapper.1", "q_proj": "attention.to_q", "k_proj": "attention.to_k",
                   "v_proj": "attention.to_v", "out_proj": "attention.to_out.0"}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("heads", [1, 4])
def test_attention_block_is_diffusers_attention_block(heads, memory_format):
    """Self- and cross-attention in one: the normalised image tokens, then the text tokens, as keys and values
    (diffusers' AttnBlock with self_attn=True, as both stages build it)."""
    ref = random_reference(common.AttnBlock(32, 24, heads, self_attn=True), 18)
    ours = with_weights_of(AttnBlock(32, 24, heads), ref, ATTENTION_TABLE)
    x, text = randn(2, 32, 4, 5, seed=19).contiguous(memory_format=memory_format), randn(2, 77, 24, seed=20)
    with torch.no_grad():
        assert_parity(lambda x, kv: ours(x, ours.text_kv(kv)), ref, (x, text))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("dim", [16, 17, 64])
def test_r_embedding_is_diffusers_gen_r_embedding(dim, dtype):
    """Bit for bit, odd widths (zero-padded) and bfloat16 r (scaled by 10000 in bfloat16 first) included."""
    r = torch.cat([torch.tensor([0.0, 1.0]), torch.rand(6, generator=torch.Generator().manual_seed(dim))]).to(dtype)
    expected = WuerstchenPrior.gen_r_embedding(types.SimpleNamespace(c_r=dim), r)
    got = r_embedding(r, dim)
    assert got.dtype == dtype and got.shape == (8, dim)
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------------------
# Attention


def attention_cases():
    """(batch, heads, queries, keys) of the models' attention at 1024x1024: Stage C, Stage B's levels 1 to 3, and
    a small odd one."""
    return [(2, 24, 576, 653), (1, 10, 4096, 4173), (1, 20, 1024, 1101), (1, 20, 256, 333), (3, 2, 5, 7)]


# The blocked attention's error over the fused kernel's, per logit standard deviation: rounding the logits to
# bfloat16 costs 2^-9 of their size, so the gap grows with them. Measured at the cases above: 1.7-2.0x at a
# standard deviation of 1, 1.7-6.0x at 2. Bounds: the largest measured ratio plus a quarter.
ATTENTION_ERROR_RATIO = {1.0: 2.5, 2.0: 7.5}


@pytest.mark.parametrize("logit_std", sorted(ATTENTION_ERROR_RATIO))
@pytest.mark.parametrize("batch, heads, n, m", attention_cases())
def test_blocked_bfloat16_attention_against_exact(batch, heads, n, m, logit_std):
    """The blocked bfloat16 attention (blocks.attention) against the exact attention of the same bfloat16 inputs,
    beside SDPA's fused kernel in bfloat16 (which keeps its logits in float32)."""
    generator = torch.Generator().manual_seed(n)
    # (B, N, heads, 64) memory seen as (B, heads, N, 64), as split_heads gives it; logits q.k/8 of std logit_std.
    q, k, v = (torch.randn(batch, length, heads, 64, generator=generator).transpose(1, 2).bfloat16()
               for length in (n, m, m))
    q = q * logit_std
    with torch.no_grad():
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        got, fused = attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert got.shape == fused.shape and got.dtype == torch.bfloat16
    error, fused_error = relative_error(got, exact), relative_error(fused, exact)
    assert error <= ATTENTION_ERROR_RATIO[logit_std] * fused_error, (error, fused_error)


@pytest.mark.parametrize("batch, heads, n, m", attention_cases())
def test_blocked_bfloat16_attention_is_softmax_of_each_head(batch, heads, n, m):
    """The blocks (several heads at once, or a head's queries in blocks with a shorter last one) and the one logits
    buffer they reuse, softmaxed in place, give what each head computed on its own in bfloat16 gives."""
    generator = torch.Generator().manual_seed(m)
    q, k, v = (torch.randn(batch, length, heads, 64, generator=generator).transpose(1, 2).bfloat16()
               for length in (n, m, m))
    with torch.no_grad():
        got = attention(q, k, v)
        each_head = torch.stack([torch.stack([torch.softmax((q[i, j] * 0.125) @ k[i, j].T, dim=-1) @ v[i, j]
                                              for j in range(heads)]) for i in range(batch)])
    torch.testing.assert_close(got, each_head)  # bfloat16's tolerances: only the summation order may differ


def test_attention_is_sdpa_outside_cpu_bfloat16():
    q, k, v = (torch.randn(1, 2, 9, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    with torch.enable_grad():  # autograd: SDPA, whose backward exists
        qb = q.bfloat16().requires_grad_()
        assert torch.equal(attention(qb, k.bfloat16(), v.bfloat16()),
                           F.scaled_dot_product_attention(qb, k.bfloat16(), v.bfloat16()))
