"""wurst.WuerstchenDecoderPipeline against diffusers' WuerstchenDecoderPipeline at the tiny config: seed parity of
whole runs for each documented argument and output type, return_dict, image embeddings as a list or a numpy
array, step callbacks, bad arguments, and the documented difference: prompt lists, which diffusers 0.42 fails on."""

import numpy as np
import pytest
import torch
from PIL import Image

import wurst
from tests.helpers import (
    OTHER,
    PROMPT,
    assert_close_images,
    assert_images_informative,
    run_both,
    seeded,
    shape_recorder,
)
from tests.support import reference

# The comparison test_stage_b.py makes for whole decoder runs: the largest pixel difference in [0, 1].
IMAGE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pair(tiny_decoder_repo):
    ours = wurst.WuerstchenDecoderPipeline.from_pretrained(tiny_decoder_repo)
    ours.set_progress_bar_config(disable=True)
    return ours, reference.decoder_pipeline(tiny_decoder_repo)




def embeddings(batch=1, h=3, w=3, seed=5):
    """Stage C sized embeddings in the prior output's range; 3x3 gives a 128x128 image."""
    return 3 * torch.randn(batch, 16, h, w, generator=seeded(seed))






def as_arrays(images):
    assert all(isinstance(image, Image.Image) and image.mode == "RGB" for image in images)
    return np.stack([np.asarray(image) for image in images]).astype(int)


# ---------------------------------------------------------------------------------------------------------
# Seed parity


def test_defaults(pair):
    """Every default: 12 steps, no guidance, PIL images (the rounding of the "pt" images, which match
    diffusers')."""
    ours, ref = pair
    images = ours(embeddings(), PROMPT, generator=seeded()).images
    assert isinstance(images, list) and len(images) == 1 and images[0].size == (128, 128)
    tensors = ours(embeddings(), PROMPT, generator=seeded(), output_type="pt").images
    expected = ref(embeddings(), PROMPT, generator=seeded(), output_type="pt").images
    assert_close_images(tensors, expected, IMAGE_TOLERANCE)
    assert_images_informative(expected)
    assert np.array_equal(as_arrays(images), (tensors.permute(0, 2, 3, 1).numpy() * 255).round().astype(int))


RUNS = {
    "guided-negative-prompt": dict(guidance_scale=2.0, negative_prompt="blurry, low quality"),
    "guided-empty-negative": dict(guidance_scale=3.0),
    "custom-timesteps": dict(timesteps=[1.0, 0.7, 0.4, 0.1, 0.0]),
    "empty-prompt": dict(prompt=""),
    "non-square": dict(image_embeddings=embeddings(1, 6, 3)),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_seed_parity(name, pair):
    kwargs = {"image_embeddings": embeddings(), "prompt": PROMPT, "num_inference_steps": 4, **RUNS[name]}
    got, expected = run_both(pair, output_type="pt", **kwargs)
    assert got.images.shape[-2:] == (4 * int(kwargs["image_embeddings"].shape[-2] * 10.67), 128)
    assert_close_images(got.images, expected.images, IMAGE_TOLERANCE)


def test_no_prompt_is_the_empty_prompt(pair):
    """prompt=None (the documented default) conditions on the empty prompt, as the combined pipeline's decoder
    call does; diffusers' decoder itself refuses None with a TypeError."""
    ours, ref = pair
    kwargs = dict(num_inference_steps=3, output_type="pt")
    default = ours(embeddings(), generator=seeded(), **kwargs).images
    assert torch.equal(default, ours(embeddings(), "", generator=seeded(), **kwargs).images)
    with pytest.raises(TypeError):
        ref(embeddings(), generator=seeded(), **kwargs)


def test_given_latents_are_used_as_they_are(pair):
    ours, _ = pair
    latents = torch.randn(1, 4, 32, 32, generator=seeded(11))
    seen = []
    hook = ours.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        got, expected = run_both(pair, embeddings(), PROMPT, num_inference_steps=3, latents=latents, output_type="pt")
    finally:
        hook.remove()
    assert torch.equal(seen[0], latents)
    assert_close_images(got.images, expected.images, IMAGE_TOLERANCE)


def test_output_types(pair):
    """pil, np, pt and latent, each the same image in diffusers' layout (np and latent compared with diffusers';
    pt is np's tensor, pil np's rounding)."""
    ours, ref = pair
    runs = {t: ours(embeddings(), PROMPT, generator=seeded(), num_inference_steps=3, output_type=t).images
            for t in ("pil", "np", "pt", "latent")}
    pil, array, pt, latent = runs["pil"], runs["np"], runs["pt"], runs["latent"]
    array_ref, latent_ref = (ref(embeddings(), PROMPT, generator=seeded(), num_inference_steps=3,
                                 output_type=t).images for t in ("np", "latent"))
    assert latent.shape == (1, 4, 32, 32)
    assert_close_images(latent, latent_ref, IMAGE_TOLERANCE)
    assert isinstance(array, np.ndarray) and array.dtype == np.float32
    assert array.shape == array_ref.shape == (1, 128, 128, 3)
    assert_close_images(torch.from_numpy(array), torch.from_numpy(array_ref), IMAGE_TOLERANCE)
    assert pt.shape == (1, 3, 128, 128) and pt.dtype == torch.float32
    assert np.array_equal(array, pt.permute(0, 2, 3, 1).numpy())
    assert isinstance(pil, list) and len(pil) == 1 and pil[0].size == (128, 128)
    assert np.array_equal(as_arrays(pil), (array * 255).round().astype(int))
    assert torch.equal(ours.decode(latent), pt)  # the images are Stage A's decoding of the latents


def test_return_dict_false_gives_a_tuple(pair):
    """wurst returns the documented tuple `(images,)`; diffusers 0.42 returns the bare images there."""
    kwargs = dict(num_inference_steps=3, output_type="pt")
    full = pair[0](embeddings(), PROMPT, generator=seeded(), **kwargs)
    plain, plain_ref = run_both(pair, embeddings(), PROMPT, return_dict=False, **kwargs)
    assert isinstance(full, wurst.ImagePipelineOutput) and full[0] is full.images
    assert isinstance(plain, tuple) and len(plain) == 1
    assert torch.equal(plain[0], full.images)
    assert isinstance(plain_ref, torch.Tensor)  # diffusers' own behaviour, which wurst deliberately differs from
    assert_close_images(plain[0], plain_ref, IMAGE_TOLERANCE)


def test_image_embeddings_as_list_and_numpy(pair):
    ours, _ = pair
    rows = embeddings(2)
    kwargs = dict(num_inference_steps=3, output_type="pt")
    tensor = ours(rows, PROMPT, generator=seeded(), **kwargs).images
    as_list, as_list_ref = run_both(pair, [rows[:1], rows[1:]], PROMPT, **kwargs)
    as_numpy, as_numpy_ref = run_both(pair, rows.numpy(), PROMPT, **kwargs)
    assert tensor.shape == (2, 3, 128, 128)
    assert torch.equal(as_list.images, tensor) and torch.equal(as_numpy.images, tensor)
    assert_close_images(as_list.images, as_list_ref.images, IMAGE_TOLERANCE)
    assert_close_images(as_numpy.images, as_numpy_ref.images, IMAGE_TOLERANCE)


# ---------------------------------------------------------------------------------------------------------
# Step callbacks


def test_callback_edits_latents(pair):
    """Returned latents replace the pipeline's from the next step on, as in diffusers."""

    def edit(pipe, step, timestep, kwargs):
        if step == 1:
            kwargs["latents"] = kwargs["latents"].flip(-1) * 0.5
        return kwargs

    kwargs = dict(num_inference_steps=4, guidance_scale=2.0, output_type="pt")
    got, expected = run_both(pair, embeddings(), PROMPT, callback_on_step_end=edit, **kwargs)
    assert_close_images(got.images, expected.images, IMAGE_TOLERANCE)
    unedited = pair[0](embeddings(), PROMPT, generator=seeded(), **kwargs).images
    assert (got.images - unedited).abs().max() > 0.01


def test_callback_edits_text_states(pair):
    """Swapping the conditional and unconditional text states after step 0 acts from step 1 on, as in diffusers."""

    def swap(pipe, step, timestep, kwargs):
        if step == 0:
            kwargs["text_encoder_hidden_states"] = kwargs["text_encoder_hidden_states"].flip(0)
        return kwargs

    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, output_type="pt",
                  callback_on_step_end_tensor_inputs=["text_encoder_hidden_states"])
    got, expected = run_both(pair, embeddings(), PROMPT, callback_on_step_end=swap, **kwargs)
    assert_close_images(got.images, expected.images, IMAGE_TOLERANCE)
    unedited = pair[0](embeddings(), PROMPT, generator=seeded(), num_inference_steps=3, guidance_scale=2.0,
                       output_type="pt").images
    assert (got.images - unedited).abs().max() > 0.01


def test_callback_edits_image_embeddings(pair):
    """Returned image embeddings replace the pipeline's too (wurst's documented rule for every returned
    tensor; diffusers 0.42 takes them back but keeps conditioning on the originals)."""
    ours, _ = pair

    def scale(pipe, step, timestep, kwargs):
        return {"image_embeddings": kwargs["image_embeddings"] * 0.1} if step == 0 else {}

    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, output_type="pt")
    plain = ours(embeddings(), PROMPT, generator=seeded(), **kwargs).images
    edited = ours(embeddings(), PROMPT, generator=seeded(), callback_on_step_end=scale,
                  callback_on_step_end_tensor_inputs=["image_embeddings"], **kwargs).images
    assert (plain - edited).abs().max() > 0.01


def test_callback_zeroing_latents_on_the_last_step(pair):
    def zero_last(pipe, step, timestep, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == 2 else {}

    for pipe in pair:
        out = pipe(embeddings(), PROMPT, num_inference_steps=3, output_type="latent", callback_on_step_end=zero_last)
        assert out.images.shape == (1, 4, 32, 32) and out.images.abs().sum() == 0


@pytest.mark.parametrize("guidance", [2.0, 0.0])
def test_callback_sees_what_diffusers_shows(guidance, pair):
    """Every allowed tensor name with diffusers' shapes and dtypes (None where diffusers has None), its step
    indices and timesteps, and the pipeline itself as the first argument."""
    ours, ref = pair
    names = list(ref._callback_tensor_inputs)
    assert ours._callback_tensor_inputs == names
    records = {}

    kwargs = dict(num_inference_steps=3, guidance_scale=guidance, output_type="latent",
                  callback_on_step_end_tensor_inputs=names)
    ours(embeddings(2), PROMPT, generator=seeded(), callback_on_step_end=shape_recorder(records, "ours"), **kwargs)
    ref(embeddings(2), PROMPT, generator=seeded(), callback_on_step_end=shape_recorder(records, "ref"), **kwargs)
    assert [r[0] for r in records["ours"]] == [ours] * 3 and [r[0] for r in records["ref"]] == [ref] * 3
    assert [r[1:] for r in records["ours"]] == [r[1:] for r in records["ref"]]
    shapes = records["ours"][0][3]
    assert shapes["latents"] == ((2, 4, 32, 32), torch.float32)
    assert shapes["image_embeddings"] == ((2, 16, 3, 3), torch.float32)
    assert shapes["text_encoder_hidden_states"][0] == ((4 if guidance > 1 else 2), 77, 24)


def test_unknown_callback_tensor_name_lists_the_allowed_ones(pair):
    ours, ref = pair
    kwargs = dict(num_inference_steps=1, callback_on_step_end=lambda *a: {},
                  callback_on_step_end_tensor_inputs=["latents", "effnet"])
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs") as info:
        ours(embeddings(), PROMPT, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "effnet" in message
    assert all(name in message for name in ours._callback_tensor_inputs)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        ref(embeddings(), PROMPT, **kwargs)


def test_unknown_keyword_is_a_type_error(pair):
    ours, _ = pair
    with pytest.raises(TypeError, match="decoder_guidance_scale"):
        ours(embeddings(), PROMPT, decoder_guidance_scale=2.0)


@pytest.mark.parametrize(
    "image_embeddings,match",
    [
        (torch.zeros(1, 8, 3, 3), r"image_embeddings must be a \(B, 16, h, w\) tensor"),
        (torch.zeros(16, 3, 3), r"image_embeddings must be a \(B, 16, h, w\) tensor"),
        ("embeddings", "image_embeddings must be"),
    ],
)
def test_bad_image_embeddings(image_embeddings, match, pair):
    ours, _ = pair
    with pytest.raises(ValueError, match=match):
        ours(image_embeddings, PROMPT, num_inference_steps=1)


# ---------------------------------------------------------------------------------------------------------
# The documented difference: prompt lists


def test_prompt_list_conditions_its_own_rows(pair):
    """B prompts with B embeddings: each row gets its own prompt, as B single diffusers runs give it. diffusers
    0.42 fails on this call (its text batch is B x B rows), which wurst deliberately does not copy."""
    ours, ref = pair
    rows, seeds = embeddings(2), [3, 4]
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, output_type="pt")
    got = ours(rows, [PROMPT, OTHER], negative_prompt=["ugly", "dark"], generator=[seeded(s) for s in seeds],
               **kwargs).images
    assert got.shape == (2, 3, 128, 128)
    for k, (prompt, negative) in enumerate([(PROMPT, "ugly"), (OTHER, "dark")]):
        expected = ref(rows[k : k + 1], prompt, negative_prompt=negative, generator=seeded(seeds[k]), **kwargs).images
        assert_close_images(got[k : k + 1], expected, IMAGE_TOLERANCE)
    with pytest.raises(RuntimeError):
        ref(rows, [PROMPT, OTHER], negative_prompt=["ugly", "dark"], generator=[seeded(s) for s in seeds], **kwargs)


def test_prompt_list_must_divide_the_rows(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="prompt has 2 entries, which does not divide the 3 image embeddings"):
        ours(embeddings(3), [PROMPT, OTHER], num_inference_steps=1)


def test_images_per_prompt_equal_single_runs(pair):
    """num_images_per_prompt > 1, which diffusers 0.42's decoder also fails on (its image embeddings are not
    repeated): with one generator per image, each image is diffusers' single run with that generator."""
    ours, ref = pair
    seeds = [3, 4]
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, output_type="pt")
    got = ours(embeddings(), PROMPT, num_images_per_prompt=2, generator=[seeded(s) for s in seeds], **kwargs).images
    assert got.shape == (2, 3, 128, 128)
    for k, seed in enumerate(seeds):
        expected = ref(embeddings(), PROMPT, generator=seeded(seed), **kwargs).images
        assert_close_images(got[k : k + 1], expected, IMAGE_TOLERANCE)
