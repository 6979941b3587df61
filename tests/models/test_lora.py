"""wurst.models.lora on single layers and a tiny Stage C: the unfused term against the formula, the GELU after the
sum, fusing against the formula and back exactly, idempotence, and the CPU fast path kept with a LoRA."""

import pytest
import torch
import torch.nn.functional as F

from wurst.models.blocks import _ONEDNN_DTYPES, Linear
from wurst.models.lora import LayerLora, LoraFactors, apply_lora, lora_layers
from wurst.models.stage_c import StageC, StageCConfig


def random_linear(fan_in: int, fan_out: int, gelu: bool, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    layer = Linear(fan_in, fan_out, gelu=gelu).requires_grad_(False)
    torch.nn.init.normal_(layer.bias)
    return layer


def factors(fan_in: int, fan_out: int, rank: int, seed: int, scale: float = 0.5) -> LoraFactors:
    generator = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(rank, fan_in, generator=generator), torch.randn(fan_out, rank, generator=generator),
                       scale)


class Holder(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer


@pytest.mark.parametrize("gelu", [False, True])
@torch.no_grad()
def test_unfused_term_and_its_gelu(gelu):
    """y = act(W x + b + Σ w_i s_i B_i A_i x): the GELU of a fused-GELU layer comes after the LoRA's sum."""
    model = Holder(random_linear(16, 24, gelu))
    a, b = factors(16, 24, 2, 1), factors(16, 24, 3, 2, scale=0.25)
    x = torch.randn(5, 7, 16)
    apply_lora(model, {"layer": LayerLora(unfused=[(a, 0.7), (b, -1.5)], fused=[])})
    pre = F.linear(x, model.layer.weight, model.layer.bias) + 0.7 * 0.5 * x @ a.down.T @ a.up.T \
        - 1.5 * 0.25 * x @ b.down.T @ b.up.T
    expected = F.gelu(pre) if gelu else pre
    torch.testing.assert_close(model.layer(x), expected, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():  # the out-of-place path autograd takes
        torch.testing.assert_close(model.layer(x), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fusing_adds_the_delta_and_unfusing_restores_the_base_exactly():
    model = Holder(random_linear(16, 24, gelu=True))
    base = model.layer.weight
    a = factors(16, 24, 2, 1)
    apply_lora(model, {"layer": LayerLora(unfused=[], fused=[(a, 0.6)])})
    torch.testing.assert_close(model.layer.weight, base + 0.6 * 0.5 * a.up @ a.down)
    x = torch.randn(3, 16)
    unfused = Holder(random_linear(16, 24, gelu=True))
    apply_lora(unfused, {"layer": LayerLora(unfused=[(a, 0.6)], fused=[])})
    torch.testing.assert_close(model.layer(x), unfused.layer(x), rtol=1e-5, atol=1e-5)
    apply_lora(model, {"layer": LayerLora(unfused=[], fused=[(a, 0.6)])})  # again: nothing changes
    torch.testing.assert_close(model.layer.weight, base + 0.6 * 0.5 * a.up @ a.down)
    apply_lora(model, {})
    assert model.layer.weight.data_ptr() == base.data_ptr() and torch.equal(model.layer.weight, base)
    assert model.layer.lora is None and model.layer.lora_base is None


@torch.no_grad()
def test_fusing_never_writes_to_the_base_tensor():
    model = Holder(random_linear(8, 8, gelu=False))
    base = model.layer.weight.clone()
    apply_lora(model, {"layer": LayerLora(unfused=[], fused=[(factors(8, 8, 2, 1), 1.0)])})
    assert torch.equal(model.layer.lora_base, base)


def test_every_linear_layer_of_stage_c_is_adaptable():
    with torch.device("meta"):
        model = StageC(StageCConfig(c=32, c_cond=32, c_r=16, depth=2, nhead=2))
    names = set(lora_layers(model))
    assert {"cond_in", "cond_out", "blocks.2.q_proj", "blocks.2.cond_proj", "blocks.0.mlp_in", "blocks.1.mapper"} \
        <= names
    assert "projection" not in names and "blocks.0.depthwise" not in names


@pytest.mark.skipif(torch.bfloat16 not in _ONEDNN_DTYPES, reason="this CPU has no oneDNN bfloat16 linear")
@torch.no_grad()
def test_an_unfused_lora_keeps_the_onednn_bfloat16_path():
    """Every linear layer of a bfloat16 Stage C still runs through oneDNN's linear with a LoRA on its attention; the
    layers without one keep the GELU fused into it."""
    torch.manual_seed(0)
    model = StageC(StageCConfig(c=32, c_cond=32, c_r=16, depth=2, nhead=2)).to(torch.bfloat16).eval()
    attention = [n for n in lora_layers(model) if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    apply_lora(model, {n: LayerLora(unfused=[(factors(32, 32, 2, i), 1.0)], fused=[]) for i, n in enumerate(attention)})
    inputs = (torch.randn(2, 16, 6, 6).bfloat16(), torch.rand(2).bfloat16(), torch.randn(2, 8, 32).bfloat16())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(*inputs)
    calls = sum(e.count for e in profile.key_averages() if e.key == "mkldnn::_linear_pointwise")
    # cond_in and cond_out; per attention block its text's cond_proj, k_proj, v_proj, then q, k, v and out_proj; per
    # ResBlock mlp_in and mlp_out; per TimestepBlock its mapper.
    assert calls == 2 + 2 * 7 + 2 * 2 + 2 * 1
    gelus = sum(e.count for e in profile.key_averages() if e.key == "aten::gelu")
    assert gelus == 0  # mlp_in's GELU stays fused: no separate GELU ran
