"""Argument checks of the Python API (WuerstchenCombinedPipeline and WuerstchenPriorPipeline): bad sizes, steps,
timesteps, guidance scales, image counts and prompts are refused with a one-line ValueError that names the
argument, before any model runs; sizes over 2048 and prompts over 77 tokens only warn, and the image is still made.

The CLI's own checks of the same values are in tests/test_cli.py."""

from __future__ import annotations

import pytest

from tests.helpers import INF, LONG_CUT, LONG_PROMPT, NAN, SHORT_PROMPT, SMALL
from wurst import PromptTruncatedWarning
from wurst.pipelines import checks


@pytest.fixture
def no_model_may_run(pipe, monkeypatch):
    """Fail the test if any model of the shared pipeline runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model ran before the arguments were checked")

    for name in ("prior_prior", "prior_text_encoder", "decoder", "text_encoder", "vqgan"):
        monkeypatch.setattr(getattr(pipe, name), "forward", refuse)
    monkeypatch.setattr(pipe.decoder_pipe, "decode", refuse)
    return pipe


# ---------------------------------------------------------------------------------------------------------
# Refusals: the values tests/test_api.py does not try, refused before any model runs


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(height=129), "height must be a multiple of 128, got 129: use 128 or 256"),
        (dict(width=0), "width must be a positive multiple of 128, got 0"),
        (dict(height=-256), "height must be a positive multiple of 128, got -256"),
        (dict(height=256.0), "height must be a positive multiple of 128, got 256.0"),
        (dict(width=True), "width must be a positive multiple of 128, got True"),
        (dict(prior_guidance_scale=INF), "prior_guidance_scale must be a finite number >= 0, got inf"),
        (dict(prior_guidance_scale=-0.5), "prior_guidance_scale must be a finite number >= 0, got -0.5"),
        (dict(decoder_guidance_scale=NAN), "decoder_guidance_scale must be a finite number >= 0, got nan"),
        (dict(decoder_guidance_scale=-INF), "decoder_guidance_scale must be a finite number >= 0, got -inf"),
        (dict(num_images_per_prompt=-2), "num_images_per_prompt must be a positive integer, got -2"),
        (dict(num_images_per_prompt=1.5), "num_images_per_prompt must be a positive integer, got 1.5"),
        (dict(prompt=42), "prompt must be a string or a non-empty list of strings, got 42"),
        (dict(prompt=None), "Provide either `prompt` or `prompt_embeds`"),
        (dict(prompt=[]), "prompt must be a string or a non-empty list of strings, got []"),
        (dict(prompt=["a cat", 3]), "prompt must be a string or a non-empty list of strings, got ['a cat', 3]"),
        (dict(prompt=b"a cat"), "prompt must be a string or a non-empty list of strings, got b'a cat'"),
        (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt has 3 entries but prompt has 2"),
        (dict(negative_prompt=[None]), "negative_prompt must be a string or a non-empty list of strings"),
        (dict(prior_timesteps=[0.0, 0.5, 1.0]), "timesteps must be strictly descending, got [0.0, 0.5, 1.0]"),
        (dict(prior_timesteps=[1.0, 1.0, 0.0]), "timesteps must be strictly descending"),
        (dict(prior_timesteps=[1.5, 0.5, 0.0]), "timesteps must lie within [0, 1], got [1.5, 0.5, 0.0]"),
        (dict(prior_timesteps=[1.0, NAN, 0.0]), "timesteps must lie within [0, 1]"),
        (dict(prior_timesteps=[1.0]), "timesteps must hold at least two values, got 1"),
        (dict(decoder_timesteps=[1.0, -0.1]), "timesteps must lie within [0, 1], got [1.0, -0.1]"),
        (dict(decoder_timesteps=[1.0, 0.4, 0.6, 0.0]), "timesteps must be strictly descending"),
    ],
)
def test_api_refuses_bad_arguments_before_any_model_runs(kwargs, message, no_model_may_run):
    kwargs = {"prompt": SHORT_PROMPT, **SMALL, **kwargs}
    with pytest.raises(ValueError) as info:
        no_model_may_run(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "target,kwargs,culprit",
    [
        pytest.param("pipe", dict(prior_num_inference_steps=0), "prior_num_inference_steps"),
        pytest.param("pipe", dict(num_inference_steps=-1), "num_inference_steps"),
        pytest.param("pipe", dict(prior_timesteps=[0.0, 1.0]), "prior_timesteps"),
        pytest.param("pipe", dict(decoder_timesteps=[0.0, 1.0]), "decoder_timesteps"),
        pytest.param("prior", dict(num_inference_steps=0), "num_inference_steps"),
    ],
)
def test_step_and_timestep_errors_name_the_argument(target, kwargs, culprit, no_model_may_run):
    """prior_num_inference_steps=0 and num_inference_steps=0 must not give the same message."""
    call = no_model_may_run if target == "pipe" else no_model_may_run.prior_pipe
    kwargs = {"prompt": SHORT_PROMPT, **(SMALL if target == "pipe" else dict(height=128, width=128)), **kwargs}
    with pytest.raises(ValueError) as info:
        call(**kwargs)
    assert culprit in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Warnings, not errors: sizes over 2048 and prompts over 77 tokens


def test_api_size_over_2048_warns_and_generates(pipe):
    with pytest.warns(UserWarning, match="height 2176 is over 2048"):
        images = pipe(SHORT_PROMPT, **{**SMALL, "height": 2176}).images
    assert images.shape == (1, 3, 2176, 128)


def test_api_long_prompt_warns_how_much_was_cut_and_generates(pipe):
    with pytest.warns(PromptTruncatedWarning, match=rf"prompt is 102 tokens, .* the last {LONG_CUT} tokens were cut"):
        images = pipe(LONG_PROMPT, **SMALL).images
    assert images.shape == (1, 3, 128, 128)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, "4"])
def test_bad_guidance(value):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        checks.check_guidance("guidance_scale", value)


@pytest.mark.parametrize("value,expected", [(0, 0.0), (1, 1.0), (4.5, 4.5), (7.25, 7.25)])
def test_good_guidance_comes_back_as_the_same_float(value, expected):
    """A valid scale, int or float, comes back exactly, as a float."""
    got = checks.check_guidance("guidance_scale", value)
    assert type(got) is float and got == expected
