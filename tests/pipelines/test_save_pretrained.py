"""save_pretrained on the documented classes: wurst -> wurst round trips give the same outputs bit for bit (prior,
decoder, combined and image to image), and a pipeline saves its models' current weights in every memory mode
(resident, low memory, model and sequential offload), compiled, and with replaced weights: fused LoRA adapters are
saved, unfused ones are not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wurst
from tests.helpers import PROMPT, SMALL, files_in, make_prior_lora, seeded

PRIOR_RUN = dict(height=256, width=256, num_inference_steps=3, guidance_scale=4.0)


def same_state(got: nn.Module, expected: nn.Module) -> bool:
    got, expected = got.state_dict(), expected.state_dict()
    return sorted(got) == sorted(expected) and all(torch.equal(got[k], v) for k, v in expected.items())


def saved_bytes(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in files_in(folder)}


@pytest.fixture(scope="module")
def combined(tiny_prior_repo, tiny_decoder_repo):
    pipe = wurst.WuerstchenCombinedPipeline.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference_save(combined, tmp_path_factory):
    """The resident pipeline's save: what every other memory mode must write, byte for byte."""
    folder = tmp_path_factory.mktemp("reference") / "saved"
    combined.save_pretrained(folder)
    return saved_bytes(folder)


# ---------------------------------------------------------------------------------------------------------
# Round trips


def test_prior_round_trip(tiny_prior_repo, tmp_path):
    pipe = wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo)
    pipe.save_pretrained(tmp_path / "prior")
    back = wurst.WuerstchenPriorPipeline.from_pretrained(tmp_path / "prior")
    assert back.config == pipe.config and back.scheduler == pipe.scheduler
    assert same_state(back.prior, pipe.prior) and same_state(back.text_encoder, pipe.text_encoder)
    for p in (pipe, back):
        p.set_progress_bar_config(disable=True)
    got, expected = (p(PROMPT, **PRIOR_RUN, generator=seeded()).image_embeddings for p in (back, pipe))
    assert torch.equal(got, expected) and expected.std() > 1e-2


def test_decoder_round_trip(tiny_decoder_repo, tmp_path):
    pipe = wurst.WuerstchenDecoderPipeline.from_pretrained(tiny_decoder_repo)
    pipe.save_pretrained(tmp_path / "decoder")
    back = wurst.WuerstchenDecoderPipeline.from_pretrained(tmp_path / "decoder")
    assert back.config == pipe.config
    for name in ("decoder", "vqgan", "text_encoder"):
        assert same_state(getattr(back, name), getattr(pipe, name)), name
    embeddings = 3 * torch.randn(1, 16, 3, 3, generator=seeded(1))
    for p in (pipe, back):
        p.set_progress_bar_config(disable=True)
    got, expected = (p(embeddings, PROMPT, num_inference_steps=3, output_type="pt", generator=seeded()).images
                     for p in (back, pipe))
    assert torch.equal(got, expected) and expected.std() > 1e-2


def test_combined_round_trip_needs_no_arguments(combined, tmp_path):
    combined.save_pretrained(tmp_path / "combined")
    back = wurst.AutoPipelineForText2Image.from_pretrained(tmp_path / "combined")
    back.set_progress_bar_config(disable=True)
    for name in combined._component_names:
        if isinstance(getattr(combined, name), nn.Module):
            assert same_state(getattr(back, name), getattr(combined, name)), name
    got, expected = (p(PROMPT, **SMALL, generator=seeded()).images for p in (back, combined))
    assert torch.equal(got, expected) and expected.std() > 1e-2


def test_image_to_image_saves_its_text_to_image_pipeline(combined, tmp_path):
    """The image encoder is no part of diffusers' layout: what is saved is the combined pipeline's repositories."""
    encoder = wurst.models.effnet.EfficientNetEncoder(wurst.models.effnet.EfficientNetConfig(c_latent=16))
    pipe = wurst.WuerstchenImg2ImgPipeline.from_pipes(combined.prior_pipe, combined.decoder_pipe, encoder)
    pipe.save_pretrained(tmp_path / "img2img")
    back = wurst.WuerstchenImg2ImgPipeline.from_pretrained(tmp_path / "img2img", image_encoder=encoder)
    assert same_state(back.prior_prior, combined.prior_prior) and same_state(back.decoder, combined.decoder)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_pipeline_in_another_dtype_saves_it_under_the_plain_names(dtype, tiny_prior_repo, tmp_path):
    pipe = wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo, torch_dtype=dtype)
    pipe.save_pretrained(tmp_path / "p")
    back = wurst.WuerstchenPriorPipeline.from_pretrained(tmp_path / "p", torch_dtype=dtype)
    assert same_state(back.prior, pipe.prior) and back.dtype == dtype


# ---------------------------------------------------------------------------------------------------------
# The current weights, wherever they are


@pytest.mark.parametrize("mode", ["low-memory", "model-offload", "sequential-offload", "compiled"])
def test_every_memory_mode_saves_the_same_files(mode, reference_save, tiny_prior_repo, tiny_decoder_repo, tmp_path):
    pipe = wurst.WuerstchenCombinedPipeline.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo,
                                                            low_memory=mode == "low-memory")
    if mode.endswith("offload"):  # the CPU stands in for the accelerator
        offload = pipe.enable_model_cpu_offload if mode == "model-offload" else pipe.enable_sequential_cpu_offload
        offload(device="cpu")
    if mode == "compiled":
        pipe.prior_prior = torch.compile(pipe.prior_prior)
        pipe.vqgan = torch.compile(pipe.vqgan)
    pipe.save_pretrained(tmp_path / "saved")
    assert saved_bytes(tmp_path / "saved") == reference_save


def test_sequential_offload_saves_the_cpu_copies_not_the_parked_weights(tiny_prior_repo, tmp_path):
    """Between uses a sequentially offloaded model's own tensors are on the meta device."""
    pipe = wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo)
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert pipe.prior.head.weight.is_meta
    pipe.save_pretrained(tmp_path / "p")
    back = wurst.WuerstchenPriorPipeline.from_pretrained(tmp_path / "p")
    assert torch.equal(back.prior.head.weight, pipe.placement.offloaded["prior"].restore().head.weight)


def test_replaced_weights_are_saved_and_unregistered_attributes_are_not(tiny_prior_repo, tmp_path):
    """Fused LoRA replaces `weight`; adapters live in attributes that are neither parameters nor buffers."""
    pipe = wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo)
    layer = pipe.prior.blocks[2].q_proj
    fused = nn.Parameter(layer.weight + 0.5, requires_grad=False)
    layer.weight = fused
    layer.unregistered = torch.ones(3)
    pipe.save_pretrained(tmp_path / "p")
    back = wurst.WuerstchenPriorPipeline.from_pretrained(tmp_path / "p")
    assert torch.equal(back.prior.blocks[2].q_proj.weight, fused)
    assert sorted(back.prior.state_dict()) == sorted(pipe.prior.state_dict())


@pytest.mark.parametrize("low_memory", [False, True], ids=["resident", "low-memory"])
def test_fused_lora_is_saved_and_unfused_adapters_are_not(low_memory, tiny_prior_repo, tmp_path):
    base = wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo)
    pipe = wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo, low_memory=low_memory)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(make_prior_lora(3, text_encoder=True))
    pipe.save_pretrained(tmp_path / "unfused")  # the adapters are no part of the models' weights
    unfused = wurst.WuerstchenPriorPipeline.from_pretrained(tmp_path / "unfused")
    assert same_state(unfused.prior, base.prior) and same_state(unfused.text_encoder, base.text_encoder)
    pipe.fuse_lora()
    pipe.save_pretrained(tmp_path / "fused")
    fused = wurst.WuerstchenPriorPipeline.from_pretrained(tmp_path / "fused")
    fused.set_progress_bar_config(disable=True)
    assert not same_state(fused.prior, base.prior) and not same_state(fused.text_encoder, base.text_encoder)
    got, expected = (p(PROMPT, **PRIOR_RUN, generator=seeded()).image_embeddings for p in (fused, pipe))
    assert torch.equal(got, expected)
