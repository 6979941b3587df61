"""wurst.WuerstchenCombinedPipeline against diffusers' WuerstchenCombinedPipeline at the tiny config: the
documented signatures and defaults of all three pipelines, seed parity (defaults, prompt embeddings, latents,
both step callbacks), return_dict, the components under diffusers' names, and the progress bars."""

import inspect

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import wurst
from tests.helpers import OTHER, PROMPT, assert_close_images, assert_images_informative, record_shapes, run_both, seeded
from tests.support import reference

# The comparison test_pipeline.py makes for whole text-to-image runs: the largest pixel difference in [0, 1].
IMAGE_TOLERANCE = 1e-3
SMALL = dict(height=128, width=128, prior_num_inference_steps=4, num_inference_steps=3, output_type="pt")
CLASSES = ["WuerstchenPriorPipeline", "WuerstchenDecoderPipeline", "WuerstchenCombinedPipeline"]


@pytest.fixture(scope="module")
def pair(tiny_prior_repo, tiny_decoder_repo):
    ours = wurst.WuerstchenCombinedPipeline.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo)
    ours.set_progress_bar_config(disable=True)
    return ours, reference.combined_pipeline(tiny_prior_repo, tiny_decoder_repo)








# ---------------------------------------------------------------------------------------------------------
# Signatures

# The defaults diffusers' documentation page (/work/shared/reference/diffusers-wuerstchen-docs.md) gives.
DOCUMENTED = {
    "WuerstchenPriorPipeline": dict(height=1024, width=1024, num_inference_steps=60, timesteps=None, guidance_scale=8.0,
                                    num_images_per_prompt=1, output_type="pt", return_dict=True),
    "WuerstchenDecoderPipeline": dict(prompt=None, num_inference_steps=12, timesteps=None, guidance_scale=0.0,
                                      num_images_per_prompt=1, output_type="pil", return_dict=True),
    "WuerstchenCombinedPipeline": dict(
        height=512, width=512, prior_num_inference_steps=60, prior_timesteps=None, prior_guidance_scale=4.0,
        num_inference_steps=12, decoder_timesteps=None, decoder_guidance_scale=0.0, num_images_per_prompt=1,
        output_type="pil", return_dict=True, prior_callback_on_step_end_tensor_inputs=["latents"],
        callback_on_step_end_tensor_inputs=["latents"],
    ),
}


def parameters(function) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(function).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


@pytest.mark.parametrize("method", ["__init__", "__call__", "enable_model_cpu_offload",
                                    "enable_sequential_cpu_offload"])
@pytest.mark.parametrize("name", CLASSES)
def test_signature_matches_diffusers(name, method):
    """Every argument of diffusers' method, in diffusers' order (so positional calls mean the same), with
    diffusers' default wherever diffusers has one. (diffusers' **kwargs is not copied: wurst refuses unknown
    keywords.)"""
    theirs = parameters(getattr(getattr(diffusers, name), method))
    ours = parameters(getattr(getattr(wurst, name), method))
    assert list(ours) == list(theirs)
    for argument, parameter in theirs.items():
        if parameter.default is not inspect.Parameter.empty:
            assert ours[argument].default == parameter.default, argument
    if method == "__call__":
        for argument, default in DOCUMENTED[name].items():
            assert ours[argument].default == default, argument


# ---------------------------------------------------------------------------------------------------------
# Seed parity


def test_defaults(pair):
    """Every default: 512x512, 60 prior steps at guidance 4, 12 decoder steps, PIL images. The PIL image is the
    rounding of the decoded final latents, which decode to diffusers' image."""
    ours, ref = pair
    final = {}

    def keep_latents(pipe, step, timestep, kwargs):
        final["latents"] = kwargs["latents"]
        return {}

    images = ours(PROMPT, generator=seeded(), callback_on_step_end=keep_latents).images
    expected = ref(PROMPT, generator=seeded(), output_type="pt").images
    assert isinstance(images, list) and len(images) == 1 and isinstance(images[0], Image.Image)
    assert images[0].size == (512, 512) and images[0].mode == "RGB"
    tensors = ours.decoder_pipe.decode(final["latents"])
    assert_close_images(tensors, expected, IMAGE_TOLERANCE)
    assert_images_informative(expected)
    pixels = (tensors.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(images[0]), pixels[0])


def clip_states(ref, prompts):
    """transformers' CLIP last_hidden_state of `prompts` from the prior's text encoder, as diffusers computes it."""
    tokenizer, encoder = ref.prior_tokenizer, ref.prior_text_encoder
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        return encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state


@pytest.mark.parametrize("with_negative", [False, True], ids=["prompt_embeds", "both-embeds"])
def test_prompt_embeds(with_negative, pair):
    """Embeddings for the prior; the decoder then sees the empty prompt, as in diffusers."""
    _, ref = pair
    embeds = {"prompt_embeds": clip_states(ref, [PROMPT])}
    if with_negative:
        embeds["negative_prompt_embeds"] = clip_states(ref, ["blurry"])
    got, expected = run_both(pair, **embeds, **SMALL)
    assert got.images.shape == (1, 3, 128, 128)
    assert_close_images(got.images, expected.images, IMAGE_TOLERANCE)


def test_prompt_beside_prompt_embeds_goes_to_the_decoder(pair):
    """As in diffusers' combined pipeline: the embeddings condition the prior, the prompt the decoder."""
    _, ref = pair
    kwargs = {**SMALL, "decoder_guidance_scale": 2.0}
    got, expected = run_both(pair, OTHER, prompt_embeds=clip_states(ref, [PROMPT]), **kwargs)
    assert_close_images(got.images, expected.images, IMAGE_TOLERANCE)
    without_prompt, _ = run_both(pair, prompt_embeds=clip_states(ref, [PROMPT]), **kwargs)
    assert (got.images - without_prompt.images).abs().max() > 0.01


def test_given_latents_are_the_priors(pair):
    ours, _ = pair
    latents = torch.randn(1, 16, 3, 3, generator=seeded(11))
    seen = []
    hook = ours.prior_prior.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        got, expected = run_both(pair, PROMPT, latents=latents, **SMALL)
    finally:
        hook.remove()
    assert torch.equal(seen[0], torch.cat([latents, latents]))
    assert_close_images(got.images, expected.images, IMAGE_TOLERANCE)


def test_guided_decoder_with_negative_prompt_and_two_images(pair):
    kwargs = {**SMALL, "negative_prompt": "blurry", "decoder_guidance_scale": 2.0, "num_images_per_prompt": 2}
    got, expected = run_both(pair, PROMPT, **kwargs)
    assert got.images.shape == (2, 3, 128, 128)
    assert_close_images(got.images, expected.images, IMAGE_TOLERANCE)


def test_return_dict_false_gives_a_tuple(pair):
    """wurst returns the documented tuple `(images,)`; diffusers 0.42 returns the decoder's bare images."""
    full = pair[0](PROMPT, generator=seeded(), **SMALL)
    plain, plain_ref = run_both(pair, PROMPT, return_dict=False, **SMALL)
    assert isinstance(full, wurst.ImagePipelineOutput)
    assert isinstance(plain, tuple) and len(plain) == 1 and torch.equal(plain[0], full.images)
    assert isinstance(plain_ref, torch.Tensor)
    assert_close_images(plain[0], plain_ref, IMAGE_TOLERANCE)


# ---------------------------------------------------------------------------------------------------------
# The two step callbacks


def recorder(records, key):
    """A callback that records (pipeline, step, timestep, {name: (shape, dtype)}) and edits the latents: halved
    after step 1 of Stage C, flipped after step 0 of Stage B."""
    records[key] = []

    def record(pipe, step, timestep, kwargs):
        record_shapes(records[key], pipe, step, timestep, kwargs)
        if key.endswith("prior") and step == 1:
            return {"latents": kwargs["latents"] * 0.5}
        if key.endswith("decoder") and step == 0:
            return {"latents": kwargs["latents"].flip(-1)}
        return {}

    return record


def test_each_callback_sees_its_own_stage(pair):
    ours, ref = pair
    records = {}
    results = {}
    kwargs = {**SMALL, "negative_prompt": "blurry", "decoder_guidance_scale": 2.0,
              "prior_callback_on_step_end_tensor_inputs": list(ref.prior_pipe._callback_tensor_inputs),
              "callback_on_step_end_tensor_inputs": list(ref.decoder_pipe._callback_tensor_inputs)}
    for key, pipe in (("ours", ours), ("ref", ref)):
        results[key] = pipe(PROMPT, generator=seeded(), prior_callback_on_step_end=recorder(records, f"{key} prior"),
                            callback_on_step_end=recorder(records, f"{key} decoder"), **kwargs).images
    for key, pipe in (("ours", ours), ("ref", ref)):
        assert [r[0] for r in records[f"{key} prior"]] == [pipe.prior_pipe] * 4
        assert [r[0] for r in records[f"{key} decoder"]] == [pipe.decoder_pipe] * 3
    for stage in ("prior", "decoder"):
        assert [r[1:] for r in records[f"ours {stage}"]] == [r[1:] for r in records[f"ref {stage}"]]
    assert [r[1] for r in records["ours prior"]] == [0, 1, 2, 3]
    assert [r[2] for r in records["ours prior"]] == [1.0, 0.75, 0.5, 0.25]
    assert records["ours prior"][0][3]["latents"] == ((1, 16, 3, 3), torch.float32)
    assert records["ours decoder"][0][3]["latents"] == ((1, 4, 32, 32), torch.float32)
    assert records["ours decoder"][0][3]["image_embeddings"] == ((1, 16, 3, 3), torch.float32)
    assert_close_images(results["ours"], results["ref"], IMAGE_TOLERANCE)
    unedited = ours(PROMPT, generator=seeded(), **SMALL).images
    assert (results["ours"] - unedited).abs().max() > 0.01


@pytest.mark.parametrize(
    "kwargs,culprit",
    [
        (dict(callback_on_step_end_tensor_inputs=["effnet"]), "callback_on_step_end_tensor_inputs has to be in"),
        (dict(prior_num_inference_steps=0), "prior_num_inference_steps must be a positive integer"),
        (dict(prior_timesteps=[0.5, 0.7, 0.0]), "prior_timesteps must be strictly descending"),
        (dict(prior_guidance_scale=-1.0), "prior_guidance_scale must be a finite number >= 0"),
        (dict(prior_callback_on_step_end_tensor_inputs=["image_embeddings"]),
         "prior_callback_on_step_end_tensor_inputs has to be in"),
    ],
)
def test_bad_arguments_are_named_as_given_before_any_model_runs(kwargs, culprit, pair, monkeypatch):
    ours, _ = pair

    def no_model_may_run(*args, **kw):
        raise AssertionError("a model ran before the arguments were checked")

    monkeypatch.setattr(ours.prior_pipe, "encode_text", no_model_may_run)
    monkeypatch.setattr(ours.decoder_pipe, "encode_text", no_model_may_run)
    with pytest.raises(ValueError) as info:
        ours(PROMPT, **{**SMALL, **kwargs})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(culprit), message


def test_unknown_keyword_is_a_type_error(pair):
    ours, _ = pair
    with pytest.raises(TypeError, match="decoder_num_inference_steps"):
        ours(PROMPT, decoder_num_inference_steps=3)


# ---------------------------------------------------------------------------------------------------------
# Components


def test_components_under_diffusers_names(pair):
    ours, ref = pair
    assert sorted(ours.components) == sorted(ref.components)
    prior, decoder = ours.prior_pipe, ours.decoder_pipe
    assert isinstance(prior, wurst.WuerstchenPriorPipeline) and isinstance(decoder, wurst.WuerstchenDecoderPipeline)
    for name in ("tokenizer", "text_encoder", "prior", "scheduler"):
        assert getattr(ours, f"prior_{name}") is getattr(prior, name) is ours.components[f"prior_{name}"]
    for name in ("tokenizer", "text_encoder", "decoder", "scheduler", "vqgan"):
        assert getattr(ours, name) is getattr(decoder, name) is ours.components[name]
    assert ours.device == torch.device("cpu") and ours.dtype == torch.float32
    with pytest.raises(AttributeError, match="prior_vqgan"):
        ours.prior_vqgan  # noqa: B018


def test_to_moves_both_pipes(tiny_prior_repo, tiny_decoder_repo):
    pipe = wurst.WuerstchenCombinedPipeline.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo)
    assert pipe.to(torch.float64) is pipe
    assert pipe.dtype == pipe.prior_pipe.dtype == pipe.decoder_pipe.dtype == torch.float64
    assert {p.dtype for name in ("prior_prior", "prior_text_encoder", "decoder", "text_encoder", "vqgan")
            for p in getattr(pipe, name).parameters()} == {torch.float64}
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu")


def test_built_from_components_and_from_pipes(pair):
    ours, _ = pair
    rebuilt = wurst.WuerstchenCombinedPipeline(**ours.components)
    joined = wurst.WuerstchenCombinedPipeline.from_pipes(ours.prior_pipe, ours.decoder_pipe)
    assert joined.prior_pipe is ours.prior_pipe and joined.decoder_pipe is ours.decoder_pipe
    assert rebuilt.prior_prior is ours.prior_prior and rebuilt.vqgan is ours.vqgan
    rebuilt.set_progress_bar_config(disable=True)
    expected = ours(PROMPT, generator=seeded(), **SMALL).images
    assert torch.equal(rebuilt(PROMPT, generator=seeded(), **SMALL).images, expected)
    assert torch.equal(joined(PROMPT, generator=seeded(), **SMALL).images, expected)


def test_reassigned_components_reach_the_pipes(pair):
    """`pipe.prior_prior = torch.compile(pipe.prior_prior)` as the documentation does: the new module is the
    one that runs."""
    ours, _ = pair
    calls = {"prior": 0, "decoder": 0}

    class Counting(torch.nn.Module):
        def __init__(self, inner, key):
            super().__init__()
            self.inner, self.key = inner, key

        def forward(self, *args, **kwargs):
            calls[self.key] += 1
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):  # config, condition(), ... as the wrapped model has them
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    prior, decoder = ours.prior_prior, ours.decoder
    try:
        ours.prior_prior = Counting(prior, "prior")
        ours.decoder = Counting(decoder, "decoder")
        assert ours.prior_pipe.prior is ours.prior_prior and ours.decoder_pipe.decoder is ours.decoder
        assert "prior_prior" not in vars(ours) and "decoder" not in vars(ours)
        ours(PROMPT, **SMALL)
    finally:
        ours.prior_prior, ours.decoder = prior, decoder
    assert calls == {"prior": 4, "decoder": 3}
    assert ours.prior_pipe.prior is prior and ours.decoder_pipe.decoder is decoder


# ---------------------------------------------------------------------------------------------------------
# Progress bars


def test_progress_bars_show_by_default_and_set_progress_bar_config_silences_both(pair, capsys):
    pipe = wurst.WuerstchenCombinedPipeline(**pair[0].components)  # new pipes, with the default bar settings
    capsys.readouterr()
    kwargs = {**SMALL, "prior_num_inference_steps": 2, "num_inference_steps": 2}
    pipe(PROMPT, **kwargs)
    err = capsys.readouterr().err
    assert "prior" in err and "decoder" in err and err.count("2/2") >= 2, err
    pipe.set_progress_bar_config(disable=True)
    pipe(PROMPT, **kwargs)
    out, err = capsys.readouterr()
    assert out == "" and err == ""
