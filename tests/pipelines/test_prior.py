"""wurst.WuerstchenPriorPipeline against diffusers' WuerstchenPriorPipeline at the tiny config: seed parity of
whole runs for each documented argument, output types and return_dict, step callbacks (editing and watching
tensors), diffusers' input errors, building from parts, and `.to`."""

import numpy as np
import pytest
import torch

import wurst
from tests.helpers import OTHER, PROMPT, relative_error, run_both, seeded, shape_recorder
from tests.support import reference

# The comparison tests/models/test_stage_c.py makes for whole prior runs.
RUN_TOLERANCE = 1e-4
SIZE = dict(height=256, width=256)  # a 6x6 Stage C latent: every default but the size stays affordable


@pytest.fixture(scope="module")
def pair(tiny_prior_repo):
    ours = wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo)
    ours.set_progress_bar_config(disable=True)
    return ours, reference.prior_pipeline(tiny_prior_repo)






def clip_states(ref, prompts):
    """transformers' CLIP last_hidden_state of `prompts`, as diffusers' encode_prompt computes it."""
    tokens = ref.tokenizer(prompts, padding="max_length", max_length=ref.tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
    with torch.no_grad():
        return ref.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state


def assert_parity(got, expected):
    assert isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == expected.dtype
    error = relative_error(got, expected)
    assert error <= RUN_TOLERANCE, error
    assert expected.std() > 1e-2  # not a degenerate run


# ---------------------------------------------------------------------------------------------------------
# Seed parity


def test_defaults(pair):
    """Every default (60 steps, guidance 8, output "pt") but the image size."""
    got, expected = run_both(pair, PROMPT, **SIZE)
    assert got.image_embeddings.shape == (1, 16, 6, 6)
    assert_parity(got.image_embeddings, expected.image_embeddings)


def test_default_size(pair):
    """1024x1024 by default: a 24x24 embedding (one step; the step count is tested above)."""
    got, expected = run_both(pair, PROMPT, num_inference_steps=1)
    assert got.image_embeddings.shape == (1, 16, 24, 24)
    assert_parity(got.image_embeddings, expected.image_embeddings)


RUNS = {
    "negative-prompt": dict(negative_prompt="blurry, low quality"),
    "no-guidance": dict(guidance_scale=1.0),
    "two-prompts-two-each": dict(prompt=[PROMPT, OTHER], negative_prompt=["ugly", "dark"], num_images_per_prompt=2),
    "custom-timesteps": dict(timesteps=[1.0, 0.9, 0.75, 0.5, 0.2, 0.0]),
    "non-square": dict(height=384, width=128),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_seed_parity(name, pair):
    kwargs = {"prompt": PROMPT, **SIZE, "num_inference_steps": 6, "guidance_scale": 4.0, **RUNS[name]}
    got, expected = run_both(pair, **kwargs)
    assert_parity(got.image_embeddings, expected.image_embeddings)


@pytest.mark.parametrize("with_negative", [False, True], ids=["prompt_embeds", "both-embeds"])
def test_prompt_embeds(with_negative, pair):
    """Embeddings in place of text: two prompts, two images each, guided; the negative side given or encoded
    from the empty prompt. They give what the prompts themselves give."""
    ours, ref = pair
    embeds = {"prompt_embeds": clip_states(ref, [PROMPT, OTHER])}
    if with_negative:
        embeds["negative_prompt_embeds"] = clip_states(ref, ["ugly", "dark"])
    kwargs = dict(**SIZE, num_inference_steps=5, guidance_scale=4.0, num_images_per_prompt=2)
    got, expected = run_both(pair, **embeds, **kwargs)
    assert got.image_embeddings.shape == (4, 16, 6, 6)
    assert_parity(got.image_embeddings, expected.image_embeddings)
    negative = {"negative_prompt": ["ugly", "dark"]} if with_negative else {}
    from_text = ours([PROMPT, OTHER], generator=seeded(), **negative, **kwargs).image_embeddings
    assert relative_error(got.image_embeddings, from_text) <= RUN_TOLERANCE


def test_negative_prompt_embeds_with_text_prompts(pair):
    _, ref = pair
    kwargs = dict(**SIZE, num_inference_steps=4, guidance_scale=4.0, num_images_per_prompt=2)
    got, expected = run_both(pair, [PROMPT, OTHER], negative_prompt_embeds=clip_states(ref, ["ugly", "dark"]), **kwargs)
    assert_parity(got.image_embeddings, expected.image_embeddings)


def test_given_latents_are_used_as_they_are(pair):
    ours, ref = pair
    latents = torch.randn(1, 16, 6, 6, generator=seeded(11))
    seen = []
    hook = ours.prior.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        got, expected = run_both(pair, PROMPT, **SIZE, num_inference_steps=4, latents=latents)
    finally:
        hook.remove()
    assert torch.equal(seen[0], torch.cat([latents, latents]))  # the guided batch [conditional; unconditional]
    assert_parity(got.image_embeddings, expected.image_embeddings)
    other_seed = ours(PROMPT, **SIZE, num_inference_steps=4, latents=latents, generator=seeded(99))
    assert not torch.equal(other_seed.image_embeddings, got.image_embeddings)  # the generator still adds noise


def test_output_types_and_return_dict(pair):
    kwargs = dict(**SIZE, num_inference_steps=3)
    pt, pt_ref = run_both(pair, PROMPT, **kwargs)
    array, array_ref = run_both(pair, PROMPT, output_type="np", **kwargs)
    assert isinstance(pt, wurst.WuerstchenPriorPipelineOutput)
    assert isinstance(array.image_embeddings, np.ndarray) and array.image_embeddings.dtype == np.float32
    assert np.array_equal(array.image_embeddings, pt.image_embeddings.numpy())
    assert_parity(torch.from_numpy(array.image_embeddings), torch.from_numpy(array_ref.image_embeddings))
    plain, plain_ref = run_both(pair, PROMPT, return_dict=False, **kwargs)
    assert isinstance(plain, tuple) and isinstance(plain_ref, tuple) and len(plain) == len(plain_ref) == 1
    assert torch.equal(plain[0], pt.image_embeddings)
    assert pt[0] is pt["image_embeddings"] is pt.image_embeddings  # diffusers' BaseOutput indexing
    assert_parity(plain[0], plain_ref[0])


# ---------------------------------------------------------------------------------------------------------
# Step callbacks


def test_callback_zeroing_latents_on_the_last_step(pair):
    """After diffusers' test_callback_inputs: a pipeline built from parts with its own latent_mean and latent_std,
    whose callback zeroes the latents on the last step, returns 0 * latent_mean - latent_std everywhere.
    (diffusers' test sets both to 0, where any latents give 0; other values show the edit took effect.)"""
    ours, ref = pair
    config = dict(latent_mean=3.0, latent_std=0.5)
    ours = wurst.WuerstchenPriorPipeline(**ours.components, **config)
    ref = type(ref)(**ref.components, **config)
    ours.set_progress_bar_config(disable=True), ref.set_progress_bar_config(disable=True)
    steps = 4

    def zero_last(pipe, step, timestep, kwargs):
        if step == steps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    for pipe in (ours, ref):
        out = pipe(PROMPT, **SIZE, num_inference_steps=steps, callback_on_step_end=zero_last, generator=seeded())
        assert out.image_embeddings.shape == (1, 16, 6, 6)
        assert torch.equal(out.image_embeddings, torch.full_like(out.image_embeddings, -0.5))
    plain = ours(PROMPT, **SIZE, num_inference_steps=steps, generator=seeded()).image_embeddings
    assert plain.std() > 1  # without the edit, the latents are far from zero


def test_callback_edits_latents_and_text_states(pair):
    """A callback's returned tensors replace the pipeline's from the next step on: halve the latents after step
    1, swap the conditional and unconditional text states after step 2."""

    def edit(pipe, step, timestep, kwargs):
        if step == 1:
            kwargs["latents"] = kwargs["latents"] * 0.5
        if step == 2:
            kwargs["text_encoder_hidden_states"] = kwargs["text_encoder_hidden_states"].flip(0)
        return kwargs

    names = ["latents", "text_encoder_hidden_states"]
    kwargs = dict(**SIZE, num_inference_steps=5, guidance_scale=4.0, negative_prompt="blurry")
    got, expected = run_both(pair, PROMPT, callback_on_step_end=edit, callback_on_step_end_tensor_inputs=names,
                             **kwargs)
    assert_parity(got.image_embeddings, expected.image_embeddings)
    unedited = pair[0](PROMPT, generator=seeded(), **kwargs).image_embeddings
    assert relative_error(got.image_embeddings, unedited) > 0.01


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_callback_sees_what_diffusers_shows(guidance, pair):
    """Every allowed tensor name, with diffusers' shapes and dtypes (None where diffusers has None), its step
    indices and timesteps, and the pipeline itself as the first argument."""
    ours, ref = pair
    names = list(ref._callback_tensor_inputs)
    assert ours._callback_tensor_inputs == names
    records = {}

    kwargs = dict(**SIZE, num_inference_steps=3, guidance_scale=guidance, num_images_per_prompt=2,
                  callback_on_step_end_tensor_inputs=names)
    ours([PROMPT, OTHER], generator=seeded(), callback_on_step_end=shape_recorder(records, "ours"), **kwargs)
    ref([PROMPT, OTHER], generator=seeded(), callback_on_step_end=shape_recorder(records, "ref"), **kwargs)
    assert [r[0] for r in records["ours"]] == [ours] * 3 and [r[0] for r in records["ref"]] == [ref] * 3
    assert [r[1:] for r in records["ours"]] == [r[1:] for r in records["ref"]]
    shapes = records["ours"][0][3]
    assert shapes["latents"] == ((4, 16, 6, 6), torch.float32)
    assert shapes["text_encoder_hidden_states"][0] == ((8 if guidance > 1 else 4), 77, 32)


def test_unknown_callback_tensor_name_lists_the_allowed_ones(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs") as info:
        ours(PROMPT, **SIZE, num_inference_steps=1, callback_on_step_end=lambda *a: {},
             callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    message = str(info.value)
    assert "\n" not in message and "prompt_embeds" in message
    assert all(name in message for name in ours._callback_tensor_inputs)


# ---------------------------------------------------------------------------------------------------------
# Input errors


def embeds(batch=1):
    return torch.zeros(batch, 77, 32)


ERRORS = {
    "prompt-and-prompt_embeds": (dict(prompt=PROMPT, prompt_embeds=embeds()), "prompt.*prompt_embeds"),
    "neither": (dict(), "prompt.*prompt_embeds"),
    "negative_prompt-and-negative_prompt_embeds": (
        dict(prompt=PROMPT, negative_prompt="x", negative_prompt_embeds=embeds()), "negative_prompt"),
    "mismatched-embeds": (dict(prompt_embeds=embeds(1), negative_prompt_embeds=embeds(2)), "same shape"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_contradictory_inputs_are_value_errors(name, pair):
    ours, ref = pair
    kwargs, match = ERRORS[name]
    with pytest.raises(ValueError, match=match) as info:
        ours(**kwargs, **SIZE, num_inference_steps=1)
    assert "\n" not in str(info.value)
    # diffusers raises ValueError too, except with neither input, where it fails on `None.shape` first.
    with pytest.raises(AttributeError if name == "neither" else ValueError):
        ref(**kwargs, **SIZE, num_inference_steps=1)


def test_unknown_keyword_is_a_type_error(pair):
    ours, _ = pair
    with pytest.raises(TypeError, match="prior_num_inference_steps"):
        ours(PROMPT, prior_num_inference_steps=3)


# ---------------------------------------------------------------------------------------------------------
# Construction and placement


def test_built_from_parts_equals_loaded(pair, tiny_prior_repo):
    ours, _ = pair
    assert set(ours.components) == {"tokenizer", "text_encoder", "prior", "scheduler"}
    parts = wurst.WuerstchenPriorPipeline(**ours.components)
    parts.set_progress_bar_config(disable=True)
    assert parts.prior is ours.prior and parts.text_encoder is ours.text_encoder
    kwargs = dict(**SIZE, num_inference_steps=3)
    assert torch.equal(parts(PROMPT, generator=seeded(), **kwargs).image_embeddings,
                       ours(PROMPT, generator=seeded(), **kwargs).image_embeddings)
    # from_pretrained takes components by name in place of the repository's.
    swapped = wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo, prior=ours.prior)
    assert swapped.prior is ours.prior and swapped.text_encoder is not ours.text_encoder


def test_to_returns_the_pipeline_and_changes_dtype(tiny_prior_repo):
    pipe = wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.dtype == torch.float32 and pipe.device == torch.device("cpu")
    assert pipe.to(torch.float64) is pipe
    assert pipe.dtype == torch.float64
    assert {p.dtype for m in (pipe.prior, pipe.text_encoder) for p in m.parameters()} == {torch.float64}
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu") and pipe.dtype == torch.float64
    # The same run as diffusers' pipeline in float64 (given float64 latents: a float64 draw differs from a float32 one).
    latents = torch.randn(1, 16, 6, 6, generator=seeded(11), dtype=torch.float64)
    kwargs = dict(**SIZE, num_inference_steps=3, latents=latents)
    out = pipe(PROMPT, generator=seeded(), **kwargs).image_embeddings
    ref64 = reference.prior_pipeline(tiny_prior_repo, torch.float64)
    assert_parity(out, ref64(PROMPT, generator=seeded(), **kwargs).image_embeddings)
    assert pipe.to("cpu", torch.float32) is pipe and pipe.dtype == torch.float32
    assert pipe.to(device="cpu", dtype=torch.float64) is pipe and pipe.dtype == torch.float64
    with pytest.raises(TypeError, match="unexpected keyword argument 'non_blocking'"):
        pipe.to("cpu", non_blocking=True)


def test_to_a_missing_device_is_one_line(tiny_prior_repo, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pipe = wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo)
    for device in ("cuda", "cuda:1", "tpu"):
        with pytest.raises(ValueError, match="devices here: cpu") as info:
            pipe.to(device)
        assert "\n" not in str(info.value) and repr(device) in str(info.value)
    assert pipe.device == torch.device("cpu")
