"""The DDPM sampler against diffusers' DDPMWuerstchenScheduler, step by step."""


import pytest
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import DEFAULT_STAGE_C_TIMESTEPS as DIFFUSERS_DEFAULT

from wurst import sampler


def test_default_stage_c_timesteps_equal_diffusers():
    assert len(sampler.DEFAULT_STAGE_C_TIMESTEPS) == 30
    ours = sampler.make_timesteps(timesteps=sampler.DEFAULT_STAGE_C_TIMESTEPS)
    assert torch.equal(ours, torch.Tensor(DIFFUSERS_DEFAULT))
    assert sampler.DEFAULT_STAGE_C_TIMESTEPS[19] == pytest.approx(2 / 3) and sampler.DEFAULT_STAGE_C_TIMESTEPS[-1] == 0


def test_linspace_timesteps_equal_diffusers():
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(12)
    assert torch.equal(sampler.make_timesteps(12), scheduler.timesteps)


@pytest.mark.parametrize("scaler", [1.0, 0.5, 2.0])
def test_alpha_cumprod_is_bit_exact(scaler):
    t = torch.rand(50)
    scheduler = DDPMWuerstchenScheduler(scaler=scaler)
    assert torch.equal(sampler.alpha_cumprod(t, scaler=scaler), scheduler._alpha_cumprod(t, "cpu"))
    # the clamp: 1e-4 at t = 1, 0.9999 at t = 0
    ends = sampler.alpha_cumprod(torch.tensor([1.0, 0.0]))
    assert ends[0].item() == pytest.approx(1e-4) and ends[1].item() == pytest.approx(0.9999)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_chain_matches_scheduler_and_generator_order(dtype):
    """Ten steps with a toy denoiser: same latents bit for bit, and the generator ends in the same state."""
    timesteps = sampler.make_timesteps(10)

    def denoise(x, r):
        return (0.7 * x + 0.1 * r.view(-1, 1, 1, 1)).to(dtype)

    ours_gen, ref_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x0 = sampler.randn((2, 4, 5, 6), ours_gen, dtype, "cpu")
    ours = x0
    for step in sampler.sample_steps(denoise, x0, timesteps, ours_gen):
        ours = step.latents

    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(10)
    x = torch.randn((2, 4, 5, 6), generator=ref_gen, dtype=dtype)
    for t in scheduler.timesteps[:-1]:
        r = t.expand(2).to(dtype)
        x = scheduler.step(denoise(x, r), r, x, generator=ref_gen).prev_sample
    assert ours.dtype == dtype and torch.equal(ours, x)
    assert torch.equal(ours_gen.get_state(), ref_gen.get_state())


def test_generator_list_draws_per_item():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    noise = sampler.randn((2, 3, 4), gens, torch.float32, "cpu")
    assert torch.equal(noise[1:], torch.randn((1, 3, 4), generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sampler.randn((3, 3, 4), gens, torch.float32, "cpu")


def test_sample_steps_yields_every_step():
    steps = sampler.sample_steps(lambda x, r: x, torch.zeros(1, 1, 2, 2), sampler.make_timesteps(4))
    seen = [(step.index, round(step.t.item(), 4)) for step in steps]
    assert seen == [(0, 1.0), (1, 0.75), (2, 0.5), (3, 0.25)]


def test_sample_steps_continues_from_replaced_latents():
    """A caller (the pipelines' step callbacks) may replace the latents after a step; the next step starts
    from them."""
    seen = []

    def denoise(x, r):
        seen.append(x.clone())
        return torch.zeros_like(x)

    steps = sampler.sample_steps(denoise, torch.ones(1, 1, 2, 2), sampler.make_timesteps(3))
    for step in steps:
        step.latents = torch.full_like(step.latents, float(step.index + 10))
    assert [x.flatten()[0].item() for x in seen] == [1.0, 10.0, 11.0]


def test_guided_is_lerp_of_the_two_halves():
    def model(x, r):
        return torch.cat([x[:1] * 2, x[1:] * 0.5])

    x = torch.randn(1, 2, 3, 3)
    out = sampler.guided(model, 4.0)(x, torch.ones(1))
    assert torch.equal(out, torch.lerp(x * 0.5, x * 2, 4.0))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_steps": 0}, "num_steps must be a positive integer"),
        ({"num_steps": -3}, "num_steps must be a positive integer"),
        ({"num_steps": 2.5}, "num_steps must be a positive integer"),
        ({"timesteps": [1.0, 0.5, 0.5, 0.0]}, "timesteps must be strictly descending"),
        ({"timesteps": [0.0, 0.5, 1.0]}, "timesteps must be strictly descending"),
        ({"timesteps": [1.5, 0.5, 0.0]}, r"timesteps must lie within \[0, 1\]"),
        ({"timesteps": [1.0, -0.1]}, r"timesteps must lie within \[0, 1\]"),
        ({"timesteps": [float("nan"), 0.0]}, r"timesteps must lie within \[0, 1\]"),
        ({"timesteps": [1.0]}, "at least two values"),
    ],
)
def test_bad_timesteps(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampler.make_timesteps(**kwargs)
