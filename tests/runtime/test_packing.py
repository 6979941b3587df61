"""Packed linear weights in the denoising loops (runtime/packing.py, blocks.Linear.packed_weight): the same
results as the plain weights, packed from a layer's second call, only for the loop, and the bytes the memory
estimate counts for them."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.helpers import seeded
from wurst import WuerstchenCombinedPipeline
from wurst.models.blocks import Linear
from wurst.runtime import memory
from wurst.runtime.packing import packed_weights, packing_applies

PACKS = packing_applies(torch.device("cpu"), torch.bfloat16)
needs_packing = pytest.mark.skipif(not PACKS, reason="oneDNN computes no bfloat16 linear layer on this CPU")


@pytest.fixture(scope="module")
def bf16_pipe(tiny_prior_repo, tiny_decoder_repo):
    """The tiny combined pipeline in bfloat16 on the CPU, its models resident."""
    pipe = WuerstchenCombinedPipeline.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo,
                                                      torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def linears(model: torch.nn.Module) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear)]


def packed_now(model: torch.nn.Module) -> int:
    """The bytes of the packed weights `model`'s layers hold."""
    return sum(t.numel() * t.element_size() for layer in linears(model) for t in (layer.packed or {}).values()
               if t is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "gelu"])
@torch.no_grad()
def test_packed_layer_computes_what_the_plain_one_does(dtype, gelu):
    g = seeded(0)
    layer = Linear(48, 80, gelu=gelu).to(dtype)
    for p in layer.parameters():
        p.copy_(torch.randn(p.shape, generator=g) / 4)
    x = torch.randn(2, 6, 6, 48, generator=g).to(dtype)
    if not layer.onednn_applies(x):
        pytest.skip(f"oneDNN computes no {dtype} linear layer on this CPU")
    head, tail = x[..., :32], x[..., 32:]
    plain, plain_fixed = layer(x), layer(head, layer(tail, tail_only=True))
    layer.packed = {}
    calls = [(layer(x), layer(head, layer(tail, tail_only=True))) for _ in range(3)]
    assert set(layer.packed) == {48, 32} and all(t.is_mkldnn for t in layer.packed.values())
    # Relative to the outputs' size: summation orders differ, and in bfloat16 each path rounds its result (the
    # fixed-term path its fixed term too), 2^-8 each.
    tolerance = 1e-5 if dtype == torch.float32 else 2**-6

    def close(got, expected):
        return ((got.float() - expected.float()).abs() <= tolerance * (1 + expected.float().abs())).all()

    for full, fixed in calls:
        assert close(full, plain) and close(fixed, plain_fixed) and close(fixed, full)


@torch.no_grad()
def test_no_packing_under_autograd_or_outside_a_loop():
    layer = Linear(16, 8)
    x = torch.randn(4, 16)
    layer(x), layer(x)
    assert layer.packed is None
    layer.packed = {}
    with torch.enable_grad():
        layer(x), layer(x)
    assert layer.packed == {}


@needs_packing
@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_loop_packs_from_its_second_step_what_the_estimate_counts(bf16_pipe, stage):
    pipe = bf16_pipe
    model = pipe.prior_prior if stage == "prior" else pipe.decoder
    seen = []

    def record(_pipe, step, timestep, tensors):
        seen.append(packed_now(model))
        return {}

    if stage == "prior":
        pipe.prior_pipe("a cat", height=128, width=128, num_inference_steps=3, generator=seeded(),
                        callback_on_step_end=record)
    else:
        embeddings = torch.randn(1, 16, 3, 3, generator=seeded()).bfloat16()
        pipe.decoder_pipe(embeddings, "a cat", num_inference_steps=3, generator=seeded(), output_type="pt",
                          callback_on_step_end=record)
    assert seen[0] == 0  # after the first step every layer has been seen once
    assert seen[1] == seen[2] == memory.packed_bytes(model, torch.bfloat16) > 0
    assert all(layer.packed is None for layer in linears(model))  # freed with the loop


@needs_packing
def test_packed_and_plain_loops_make_the_same_images(bf16_pipe, monkeypatch):
    pipe = bf16_pipe

    def generate():
        return pipe("a cat", height=128, width=128, prior_num_inference_steps=3, num_inference_steps=3,
                    generator=seeded(), output_type="pt").images

    packed = generate()
    monkeypatch.setattr("wurst.pipelines.base.packed_weights", lambda model: contextlib.nullcontext())
    plain = generate()
    assert (packed.float() - plain.float()).abs().max().item() <= 1e-4


@needs_packing
def test_packed_copies_are_freed_on_an_error(bf16_pipe):
    model = bf16_pipe.decoder
    with pytest.raises(RuntimeError, match="a step failed"), packed_weights(model):
        assert all(layer.packed == {} for layer in linears(model))
        raise RuntimeError("a step failed")
    assert all(layer.packed is None for layer in linears(model))
