"""Stage A (the VQGAN): parity of encode, decode and quantize with diffusers' PaellaVQModel, at the tiny and
published configs."""

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

from tests.helpers import parity_bound, relative_error
from tools import hub_fixtures
from wurst import load_stage_a


def vqgan_outputs(ref, latents, images, dtype):
    ref.to(dtype)
    out = {"decode": ref.decode(latents.to(dtype)).sample, "encode": ref.encode(images.to(dtype)).latents}
    ref.float()
    return out


@torch.no_grad()
def check_vqgan_parity(vqgan_dir, latent_sizes, batch=2):
    ours = load_stage_a(vqgan_dir)
    ref = PaellaVQModel.from_pretrained(vqgan_dir).eval()
    generator = torch.Generator().manual_seed(1)
    results = []
    for h, w in latent_sizes:
        latents = 0.3 * torch.randn(batch, 4, h, w, generator=generator)
        images = torch.rand(batch, 3, 4 * h, 4 * w, generator=generator)
        ours_out = {"decode": ours.decode(latents), "encode": ours.encode(images)}
        ref32 = vqgan_outputs(ref, latents, images, torch.float32)
        ref64 = vqgan_outputs(ref, latents, images, torch.float64)
        for name, got in ours_out.items():
            error, bound = relative_error(got, ref32[name]), parity_bound(ref32[name], ref64[name])
            assert error <= bound, f"{name} {h}x{w}: relative error {error:.2e} > bound {bound:.2e}"
            results.append((name, h, w, error, bound))
        quantized, indices = ours.quantize(ours.encode(images))
        ref_quantized, _, (_, _, ref_indices) = ref.vquantizer(ref.encode(images).latents)
        assert torch.equal(indices.flatten(), ref_indices.flatten())
        # diffusers returns z + (z_q - z), which rounds; ours are the codebook entries themselves.
        assert torch.equal(quantized.permute(0, 2, 3, 1), ours.codebook.weight[indices])
        torch.testing.assert_close(quantized, ref_quantized, rtol=0, atol=1e-6)
    return results


def test_tiny_vqgan_parity(tiny_decoder_repo):
    check_vqgan_parity(tiny_decoder_repo / "vqgan", [(8, 8), (12, 8), (4, 16)])


def test_zero_initialised_parameters_are_random_in_the_fixture(tiny_decoder_repo):
    """diffusers initialises the mixing blocks' gammas to zero, which would make each block an identity."""
    state = load_stage_a(tiny_decoder_repo / "vqgan").state_dict()
    gammas = [name for name in state if name.endswith(".gammas")]
    assert len(gammas) == 5  # two encoder blocks, two bottleneck blocks and one decoder block at the tiny size
    for name in gammas:
        assert state[name].abs().min() > 0, name


# ---------------------------------------------------------------------------------------------------------
# Published size (192/384 wide, 12 bottleneck blocks)


@pytest.mark.slow
def test_published_model_parity():
    decoder_dir = hub_fixtures.ensure("published", "decoder", ("vqgan",))
    for name, h, w, error, bound in check_vqgan_parity(decoder_dir / "vqgan", [(32, 32), (24, 40)]):
        print(f"published VQGAN {name} {h}x{w}: relative error {error:.2e}, fp32-vs-fp64 {bound:.2e}")
