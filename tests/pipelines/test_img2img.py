"""wurst/pipeline_img2img.py: image to image, variations and reconstruction on the tiny random-weight models.

What is checked is the plumbing (random weights prove nothing about pictures): the noised start is Stage C's
forward process at t = strength, computed here from the cosine schedule's formula; strength 0 hands the encoded
latent itself to Stage B; strength 1 is text to image started from sqrt(ᾱ(1))·x0 + sqrt(1 - ᾱ(1))·ε with the same
noise ε, ᾱ(1) = 1e-4; seeds reproduce; batches line up; the CLI and the converter; refusals in one line."""

from __future__ import annotations

import json
import math
import re
import shlex

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import ROOT, assert_one_line_error, files_in, parity_bound, relative_error, run_cli, seeded
from tests.support.image_fixtures import TINY_ENCODER, photo, save_stage_b_release, tiny_encoder, tiny_original
from tools import convert_weights, hub_fixtures
from wurst import ModelNotFoundError, WuerstchenCombinedPipeline
from wurst.errors import ArgumentError, ConfigError
from wurst.models import effnet
from wurst.pipelines.img2img import AutoPipelineForImage2Image, WuerstchenImg2ImgPipeline
from wurst.weights import image_encoder

PROMPT = "a red fox in the snow"
SMALL = dict(height=128, width=128, prior_num_inference_steps=4, num_inference_steps=2, output_type="pt")
LATENT = dict(SMALL, output_type="latent")  # Stage B's latents: compared before the images' [0, 1] clamp


@pytest.fixture(scope="module")
def pipe(tiny_prior_repo, tiny_decoder_repo):
    pipe = WuerstchenImg2ImgPipeline.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo,
                                                     image_encoder=tiny_encoder())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def text_to_image(pipe):
    return WuerstchenCombinedPipeline.from_pipes(pipe.prior_pipe, pipe.decoder_pipe)


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    """ᾱ(t) of the Würstchen schedule, written out from its formula (not wurst's sampler), clamped as it is."""
    value = math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return min(max(value, 1e-4), 0.9999)


def encoded_latents(pipe, image, n=1):
    """The encoded images in Stage C's space, (x + 1) / 42 of the encoder's output, n rows per image."""
    return ((pipe.encode_image(image, 128, 128) + 1) / 42).repeat_interleave(n, dim=0)


class FirstCalls:
    """Records what the prior model is called with: (latents, r) of each call."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(lambda module, args: self.calls.append((args[0], args[1])))

    def __enter__(self):
        return self.calls

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------------------
# The semantics


@pytest.mark.parametrize("strength", [0.35, 0.5, 0.9])
def test_the_noised_start_is_the_forward_process_at_t_strength(pipe, strength):
    image = photo(96, 128)
    with FirstCalls(pipe.prior_prior) as calls:
        pipe.image_embeddings(PROMPT, image=image, strength=strength, prior_guidance_scale=0.0, generator=seeded(3),
                              height=128, width=128, prior_num_inference_steps=4)
    x0 = encoded_latents(pipe, image).double()
    noise = torch.randn(x0.shape, generator=seeded(3), dtype=torch.float32).double()
    abar = cosine_alpha_bar(strength)
    expected = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise
    start, r = calls[0]
    assert torch.allclose(start.double(), expected, atol=1e-6, rtol=0)
    # Then Stage C runs from t = strength through the points of its schedule (here 1, .75, .5, .25, 0) below it.
    schedule = [1.0, 0.75, 0.5, 0.25]
    assert [round(float(r[0]), 6) for _, r in calls] == [strength] + [t for t in schedule if t < strength]


def test_strength_zero_returns_the_encoded_latent_itself(pipe):
    image = photo(96, 128)
    generator = seeded(5)
    before = generator.get_state()
    embeddings = pipe.image_embeddings(PROMPT, image=[image, image[::-1]], strength=0.0, num_images_per_prompt=2,
                                       generator=generator, height=128, width=128)
    encoded = pipe.encode_image([image, image[::-1]], 128, 128)
    assert embeddings.shape == (4, 16, 3, 3)
    assert torch.equal(embeddings, encoded.repeat_interleave(2, dim=0))
    assert torch.equal(generator.get_state(), before)  # Stage C drew nothing
    seen = {}

    def record(pipeline, step, timestep, tensors):
        seen.setdefault("image_embeddings", tensors["image_embeddings"])
        return {}

    pipe(image=image, strength=0.0, callback_on_step_end=record, generator=seeded(5),
         callback_on_step_end_tensor_inputs=["image_embeddings"], **SMALL)
    assert torch.equal(seen["image_embeddings"], pipe.encode_image(image, 128, 128))


def test_strength_one_is_text_to_image_from_a_start_that_keeps_one_percent_of_the_image(pipe, text_to_image):
    """ᾱ(1) is clamped to 1e-4: the start is 0.01·x0 + 0.99995·ε instead of ε. Started from that latent and with
    the generator after the same draw, text to image gives the same images exactly; from its own start it lands
    next to them (measured on Stage C's output, before any clamp)."""
    image = photo(96, 128)
    ours = pipe(PROMPT, image=image, strength=1.0, generator=seeded(11), **SMALL).images
    generator = seeded(11)
    noise = torch.randn((1, 16, 3, 3), generator=generator)
    start = 0.01 * encoded_latents(pipe, image) + math.sqrt(1 - 1e-4) * noise
    same_start = text_to_image(PROMPT, latents=start, generator=generator, **SMALL).images
    assert torch.allclose(ours, same_start, atol=1e-6, rtol=0)
    prior = dict(height=128, width=128, num_inference_steps=4, guidance_scale=4.0)  # the img2img call's defaults
    embeddings = pipe.image_embeddings(PROMPT, image=image, strength=1.0, generator=seeded(11), height=128, width=128,
                                       prior_num_inference_steps=4)
    plain = text_to_image.prior_pipe(PROMPT, generator=seeded(11), **prior).image_embeddings
    other_seed = text_to_image.prior_pipe(PROMPT, generator=seeded(12), **prior).image_embeddings
    residue, seeds_apart = (embeddings - plain).norm().item(), (other_seed - plain).norm().item()
    print(f"strength 1 vs text to image: {residue:.2e}; two seeds of text to image: {seeds_apart:.2e}")
    assert 0 < residue < seeds_apart / 1000, (residue, seeds_apart)  # measured: 1.3e-1 against 7.1e2


def test_variations_reproduce_with_a_seed_and_differ_across_seeds(pipe):
    image = photo(96, 128)
    first = pipe.variations(image, generator=seeded(1), num_images_per_prompt=2, **LATENT).images
    again = pipe.variations(image, generator=seeded(1), num_images_per_prompt=2, **LATENT).images
    other = pipe.variations(image, generator=seeded(2), num_images_per_prompt=2, **LATENT).images
    assert first.shape == (2, 4, 32, 32) and torch.equal(first, again)
    assert (first - other).abs().max() > 0.01 and (first[0] - first[1]).abs().max() > 0.01
    reconstruction = pipe.reconstruct(image, generator=seeded(1), **LATENT).images
    assert torch.equal(reconstruction, pipe.variations(image, generator=seeded(1), **LATENT).images)  # one path


def test_img2img_reproduces_and_lines_up_in_batches(pipe):
    a, b = photo(96, 128, seed=1), photo(128, 96, seed=2)
    run = dict(SMALL, num_images_per_prompt=2)
    generators = [seeded(20 + i) for i in range(4)]
    batch = pipe([PROMPT, "a lighthouse"], image=[a, b], strength=0.6, generator=generators, **run).images
    again = pipe([PROMPT, "a lighthouse"], image=[a, b], strength=0.6, generator=[seeded(20 + i) for i in range(4)],
                 **run).images
    assert batch.shape == (4, 3, 128, 128) and torch.equal(batch, again)
    # Row 2k + j is image k's j-th result: the same as image k alone with that row's generator.
    alone = pipe("a lighthouse", image=b, strength=0.6, generator=seeded(23), **SMALL).images
    assert torch.allclose(batch[3], alone[0], atol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 0.01


def test_size_defaults_follow_the_first_image(pipe):
    images = pipe(image=photo(300, 700), strength=0.0, num_inference_steps=1, output_type="pt",
                  generator=seeded(0)).images
    assert images.shape[-2:] == (256, 640)  # 300x700 to the nearest multiples of 128: 2.34 and 5.47 -> 2 and 5
    out = pipe(image=Image.fromarray(photo(64, 64)), strength=0.0, num_inference_steps=1, output_type="np",
               generator=seeded(0)).images
    assert out.shape == (1, 128, 128, 3)


def test_auto_pipeline_and_pipe_components(pipe, tiny_prior_repo, tiny_decoder_repo):
    encoder = tiny_encoder()
    auto = AutoPipelineForImage2Image.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo,
                                                      image_encoder=encoder)
    assert isinstance(auto, WuerstchenImg2ImgPipeline) and auto.image_encoder is encoder
    assert set(pipe.components) >= {"image_encoder", "prior_prior", "decoder", "vqgan"}
    auto.to(torch.bfloat16)
    assert next(auto.image_encoder.parameters()).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_strength_outside_zero_to_one_is_refused(pipe, strength):
    with pytest.raises(ArgumentError, match=r"^strength must be a number within \[0, 1\], got "):
        pipe(PROMPT, image=photo(), strength=strength, **SMALL)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image=None), "image is required"),
        (dict(image="no/such/image.png"), "image no/such/image.png does not exist"),
        (dict(image=[photo(), photo()], prompt=["a", "b", "c"]), "prompt has 3 entries for 2 images"),
        (dict(image=np.zeros((8, 8, 2), np.uint8)), "image is a numpy array of shape (8, 8, 2)"),
        (dict(image=photo(), height=100), "height must be a multiple of 128"),
        (dict(image=photo(), output_type="jpeg"), "output_type must be one of"),
    ],
)
def test_bad_inputs_get_one_line(pipe, kwargs, message):
    with pytest.raises(ArgumentError) as caught:
        pipe(**{"prompt": PROMPT, "generator": seeded(0), **SMALL, **kwargs})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_encoder_of_another_width_is_refused(pipe):
    other = tiny_encoder(config=effnet.EfficientNetConfig(**{**TINY_ENCODER.__dict__, "c_latent": 8}))
    with pytest.raises(ConfigError, match="the image encoder gives 8 channels, but Stage C takes 16"):
        WuerstchenImg2ImgPipeline.from_pipes(pipe.prior_pipe, pipe.decoder_pipe, other)


@pytest.fixture
def no_encoder_anywhere(tmp_path, monkeypatch):
    """Offline, with empty Hugging Face and wurst caches."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("WURST_CACHE", str(tmp_path / "wurst"))


def test_missing_encoder_weights_are_named_before_the_models_load(no_encoder_anywhere, tiny_prior_repo,
                                                                   tiny_decoder_repo, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the models were loaded before the encoder was found")

    monkeypatch.setattr(WuerstchenCombinedPipeline, "from_pretrained", refuse)
    with pytest.raises(ModelNotFoundError) as caught:
        WuerstchenImg2ImgPipeline.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo)
    assert "`hf download dome272/wuerstchen model_v2_stage_b.pt`" in str(caught.value)


# ---------------------------------------------------------------------------------------------------------
# The command line


def cli_args(tiny_prior_repo, tiny_decoder_repo, encoder_folder, *extra):
    return ["--prior", tiny_prior_repo, "--decoder", tiny_decoder_repo, "--image-encoder", encoder_folder,
            "--height", "128", "--width", "128", "--prior-steps", "4", "--decoder-steps", "2", *extra]


def test_cli_image_to_image_matches_the_api(pipe, tiny_prior_repo, tiny_decoder_repo, encoder_folder, tmp_path,
                                            capsys):
    source = tmp_path / "fox.png"
    Image.fromarray(photo(96, 128)).save(source)
    out = tmp_path / "out"
    code, stdout, err = run_cli([PROMPT, "--image", source, "--strength", "0.6", "--seed", "9", "--output",
                                 out / "fox.png", *cli_args(tiny_prior_repo, tiny_decoder_repo, encoder_folder),
                                 "--dtype", "float32"], capsys)  # the fixture pipeline's dtype
    assert code == 0, err
    written = Image.open(out / "fox.png")
    # The API with the encoder read from the same folder (a copy in other memory can round differently).
    encoder = image_encoder.load_converted(encoder_folder)
    pipe = WuerstchenImg2ImgPipeline.from_pipes(pipe.prior_pipe, pipe.decoder_pipe, encoder)
    api = pipe(PROMPT, image=str(source), strength=0.6, generator=torch.Generator("cpu").manual_seed(9), height=128,
               width=128, prior_num_inference_steps=4, num_inference_steps=2, output_type="pil",
               prior_guidance_scale=4.0).images[0]
    assert np.array_equal(np.asarray(written), np.asarray(api))
    settings = json.loads(written.text["wurst"])
    assert settings["strength"] == 0.6 and settings["image"] == str(source) and settings["prompt"] == PROMPT


def test_cli_variations_need_no_prompt(tiny_prior_repo, tiny_decoder_repo, encoder_folder, tmp_path, capsys,
                                       monkeypatch):
    source = tmp_path / "fox.png"
    Image.fromarray(photo(96, 128)).save(source)
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(["--image", source, "--strength", "0", "--seed", "4", "--num-images", "2",
                                 *cli_args(tiny_prior_repo, tiny_decoder_repo, encoder_folder)], capsys)
    assert code == 0, err
    assert stdout.split() == ["fox-4-1.png", "fox-4-2.png"]
    first, second = (np.asarray(Image.open(tmp_path / name)) for name in stdout.split())
    assert not np.array_equal(first, second)


@pytest.mark.parametrize(
    "extra, culprit",
    [
        (["--strength", "1.5"], "--strength must be a number within [0, 1], got 1.5"),
        (["--strength", "-0.2"], "--strength must be a number within [0, 1], got -0.2"),
    ],
)
def test_cli_refuses_a_strength_outside_zero_to_one(extra, culprit, tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.fromarray(photo(8, 8)).save(source)
    out = tmp_path / "out"
    code, stdout, err = run_cli([PROMPT, "--image", source, *extra, "--output", out / "x.png"], capsys)
    assert_one_line_error(code, stdout, err, culprit, out)


def test_cli_refuses_an_unreadable_image_and_options_without_image(tmp_path, capsys):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"no image here")
    out = tmp_path / "out"
    for args, culprit in (([PROMPT, "--image", garbage], f"image {garbage} is not an image Pillow can read"),
                          ([PROMPT, "--strength", "0.5"], "--strength needs --image"),
                          ([PROMPT, "--image-encoder", "x.pt"], "--image-encoder needs --image"),
                          (["--strength", "0.5"], "the following arguments are required: prompt")):
        code, stdout, err = run_cli([*args, "--output", out / "x.png"], capsys)
        assert_one_line_error(code, stdout, err, culprit, out)


def test_cli_missing_encoder_is_one_line(no_encoder_anywhere, tiny_prior_repo, tiny_decoder_repo, tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.fromarray(photo(8, 8)).save(source)
    out = tmp_path / "out"
    code, stdout, err = run_cli([PROMPT, "--image", source, "--prior", tiny_prior_repo, "--decoder",
                                 tiny_decoder_repo, "--output", out / "x.png"], capsys)
    line = assert_one_line_error(code, stdout, err, "model_v2_stage_b.pt", out)
    assert "hf download dome272/wuerstchen model_v2_stage_b.pt" in line
    assert files_in(tmp_path / "wurst") == []


# ---------------------------------------------------------------------------------------------------------
# The converter


def test_converter_writes_the_encoder_with_the_prior(pipe, tiny_prior_repo, tiny_decoder_repo, tmp_path,
                                                     no_encoder_anywhere):
    original = tiny_original()
    release = save_stage_b_release(original, tmp_path / "model_v2_stage_b.pt")
    out = tmp_path / "converted"
    assert convert_weights.main(["--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo), "--out",
                                 str(out), "--image-encoder", str(release)]) == 0
    assert set(load_file(out / "prior" / "stage_c_encoder.safetensors")) == set(tiny_encoder().state_dict())
    # The converted prior's encoder is found without image_encoder= (and without the hub: offline, no caches).
    converted = WuerstchenImg2ImgPipeline.from_pretrained(out / "decoder", prior_repo=out / "prior")
    converted.set_progress_bar_config(disable=True)
    from_release = image_encoder.load_image_encoder(release).state_dict()
    assert all(torch.equal(converted.image_encoder.state_dict()[k], v) for k, v in from_release.items())
    x = torch.randn(1, 3, 64, 64, generator=seeded(0))
    with torch.no_grad():  # and it is the release's encoder: it computes what the original model computes
        expected, exact = original(x), original.double()(x.double())
        assert relative_error(converted.image_encoder(x), expected) <= parity_bound(expected, exact)
    assert converted(PROMPT, image=photo(96, 128), strength=0.5, generator=seeded(1), **SMALL).images.shape == (
        1, 3, 128, 128)
    # A converted prior carries its encoder into the next conversion.
    again = tmp_path / "again"
    assert convert_weights.main(["--prior", str(out / "prior"), "--decoder", str(out / "decoder"), "--out",
                                 str(again)]) == 0
    assert image_encoder.has_converted(again / "prior")


# ---------------------------------------------------------------------------------------------------------
# The README's examples, offline on the tiny models placed under the real hub ids


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Image to image, variations and reconstruction"):text.index("## Speed")]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.fixture
def real_ids_offline(tmp_path, monkeypatch):
    """The tiny models as warp-ai/wuerstchen(-prior) and a tiny model_v2_stage_b.pt as dome272/wuerstchen's, in an
    offline Hugging Face cache; an empty wurst cache; a working folder holding fox.jpg."""
    from huggingface_hub import constants

    hub = hub_fixtures.offline_hub_cache(tmp_path / "hub")
    commit = "2" * 40
    repo = hub / "models--dome272--wuerstchen"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_stage_b_release(tiny_original(), repo / "snapshots" / commit / "model_v2_stage_b.pt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("WURST_CACHE", str(tmp_path / "wurst"))
    work = tmp_path / "work"
    work.mkdir()
    Image.fromarray(photo(160, 240)).save(work / "fox.jpg")
    monkeypatch.chdir(work)
    return work


def test_readme_python_example_runs(real_ids_offline):
    (block,) = readme_blocks("python")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert namespace["edited"].size == (256, 128)  # fox.jpg's 240x160 on the 128 grid
    assert len(namespace["variations"]) == 4 and namespace["reconstruction"].size == (256, 128)
    assert (real_ids_offline / "fox-oil.png").is_file()
    assert image_encoder.has_converted(real_ids_offline.parent / "wurst" / "image_encoder" / "dome272--wuerstchen")


def test_readme_command_line_examples_run(real_ids_offline, capsys):
    lines = [line.split("#")[0] for line in readme_blocks("sh")[0].splitlines() if "--image fox.jpg" in line]
    assert len(lines) == 2
    for line in lines:
        args = shlex.split(line)[3:]  # after "python -m wurst"
        code, stdout, err = run_cli([*args, "--height", "128", "--width", "128"], capsys)  # the tiny size: quick
        assert code == 0, err
    assert sorted(p.name for p in real_ids_offline.glob("*.png")) == ["fox-1-1.png", "fox-1-2.png", "fox-1-3.png",
                                                                       "fox-1-4.png", "fox-oil.png"]
