"""wurst.train against diffusers, on the tiny fixtures.

- One step's loss and gradients, with `--recipe diffusers`, against diffusers' WuerstchenPrior (with peft's LoRA, or
  in full) fed as diffusers' examples/wuerstchen/text_to_image/train_text_to_image_(lora_)prior.py feeds it:
  `DDPMWuerstchenScheduler().add_noise(latents, noise, t)` with t = torch.rand(bsz), `prior(noisy, t, text)`, then
  `F.mse_loss(pred.float(), noise.float(), reduction="mean")`.
- The P2 weight of `--recipe original`: each sample's MSE times 1 / (1 + SNR), SNR from diffusers' scheduler.
- The files a run writes (a LoRA, a full prior repository, their EMA versions), loaded by diffusers and by wurst.

The reference prior runs in eval mode: wurst's Stage C has no dropout, so only without it do the two compute the same
function (diffusers' scripts train in train mode, with the fixture's dropout of 0.1 active)."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior
from peft import LoraConfig
from safetensors.torch import load_file

import wurst
from tests.helpers import (
    PROMPT,
    assert_same_tensors,
    parity_bound,
    relative_error,
    run_both,
    training_checkpoint,
    write_captioned_images,
)
from tests.support import reference
from wurst.train.app import build_parser, main
from wurst.train.loop import trainable_objective
from wurst.train.objective import RECIPES, Objective
from wurst.weights.spec import COMPONENTS

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the trainer's default --lora-targets
RANK = 4
# The prior's attention key biases: a key bias adds q·b to every logit of a query alike, which the softmax cancels,
# so their exact gradient is zero and what either library computes is float rounding (about 1e-10 here).
ZERO_GRADIENT = "attention.to_k.bias"
# As tests/pipelines/test_lora.py: relative, for the prior's image embeddings; and the least effect that a trained
# change must have on them for a parity test to prove anything.
EMBEDDINGS_TOLERANCE, EFFECT = 1e-4, 0.05
RUN = dict(prompt=PROMPT, height=256, width=256, num_inference_steps=4, output="image_embeddings")


# ---------------------------------------------------------------------------------------------------------
# Helpers


def trainer_args(*options: str) -> argparse.Namespace:
    """The options of `python -m wurst.train` (the data and --out are never read here)."""
    return build_parser().parse_args(["data", "--out", "out", "--dtype", "float32", *options])


def wurst_objective(repo: Path, *options: str) -> tuple[Objective, dict[str, torch.nn.Parameter], object]:
    """The objective, its trained parameters and the pipeline, made by the trainer's own trainable_objective."""
    pipe = wurst.WuerstchenPriorPipeline.from_pretrained(repo, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    objective, trained = trainable_objective(trainer_args(*options), pipe, torch.float32)
    return objective, trained, pipe


def file_name(component: str, module_name: str) -> str:
    """A wurst module or parameter name under diffusers' (or transformers') name for it."""
    return COMPONENTS[component].key_map.to_checkpoint(module_name)


def peft_name(trained_name: str) -> tuple[str, str]:
    """("prior", "blocks.2.attention.to_q.lora_A.default.weight") for "prior.blocks.2.q_proj.lora.down"."""
    component, name = trained_name.split(".", 1)
    layer, factor = name.rsplit(".lora.", 1)
    module = COMPONENTS[component].key_map.checkpoint_layer(layer)
    return component, f"{module}.lora_{'A' if factor == 'down' else 'B'}.default.weight"


def diffusers_loss(prior: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The loss as diffusers' Würstchen prior training scripts compute it (in float64 throughout for dtype float64,
    where the scripts' pred.float() would round)."""
    latents, noise, t, text = (batch[k].to(dtype) for k in ("latents", "noise", "t", "text"))
    noisy = DDPMWuerstchenScheduler().add_noise(latents, noise, t)
    pred = prior(noisy, t, text)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    return F.mse_loss(pred.to(accumulate), noise.to(accumulate), reduction="mean")


def gradients_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_gradient_parity(ours: dict[str, torch.Tensor], ref32: dict[str, torch.Tensor],
                           ref64: dict[str, torch.Tensor]) -> list[tuple[float, float, str]]:
    """Every gradient of wurst's (names as in the reference) within the parity bound of diffusers' in float32: the
    reference's own distance from float64 or 1e-5, whichever is larger (tests.helpers.parity_bound). The gradients
    must be non-zero, except those that are zero in exact arithmetic (ZERO_GRADIENT), which must be rounding-small
    in both. Returns (error, bound, name) of each, worst first."""
    assert ours.keys() == ref32.keys() == ref64.keys()
    total = torch.cat([g.flatten() for g in ref64.values()]).norm().item()
    checked = []
    for name in ours:
        if name.endswith(ZERO_GRADIENT):
            for grad in (ours[name], ref32[name], ref64[name]):
                assert grad.norm().item() <= 1e-6 * total, name
            continue
        assert ours[name].norm() > 0 and ref32[name].norm() > 0, name
        error, bound = relative_error(ours[name], ref32[name]), parity_bound(ref32[name], ref64[name])
        assert error <= bound, (name, error, bound)
        checked.append((error, bound, name))
    assert checked
    return sorted(checked, reverse=True)


def assert_step_matches(objective: Objective, trained: dict[str, torch.nn.Parameter], ref: torch.nn.Module,
                        batch: dict[str, torch.Tensor], label: str) -> None:
    """One step's loss and gradients, wurst's objective against diffusers' formulation with `ref` (float32, and a
    float64 copy for the bound); `trained` is wurst's trained parameters by the reference's names."""
    ref64 = copy.deepcopy(ref).double()
    loss = objective(**batch).mean()  # the trainer's step: losses.sum() / batch size, for one process
    loss.backward()
    ref_loss, ref_loss64 = diffusers_loss(ref, batch, torch.float32), diffusers_loss(ref64, batch, torch.float64)
    ref_loss.backward()
    ref_loss64.backward()

    error, bound = relative_error(loss.detach(), ref_loss.detach()), parity_bound(ref_loss.detach(), ref_loss64)
    assert error <= bound, (error, bound)
    ours = {name: p.grad for name, p in trained.items()}
    worst = assert_gradient_parity(ours, gradients_of(ref), gradients_of(ref64))
    print(f"{label}: loss error {error:.1e} (bound {bound:.0e}); worst gradient error {worst[0][0]:.1e} "
          f"({worst[0][2]}, bound {worst[0][1]:.1e})")


def saved_prior(out: Path) -> dict[str, torch.Tensor]:
    """The prior weights of a --full run's output repository, under diffusers' names."""
    return load_file(out / "prior" / "prior" / "diffusion_pytorch_model.safetensors")


def as_saved(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's "prior.<wurst name>" weights under diffusers' names, as the output repository holds them."""
    return {file_name("prior", name.removeprefix("prior.")): tensor for name, tensor in weights.items()}


def prior_pipelines(repo: Path):
    """wurst's prior pipeline and diffusers' (built as tests/support/reference.py builds it) from one repository."""
    ours = wurst.WuerstchenPriorPipeline.from_pretrained(repo)
    ours.set_progress_bar_config(disable=True)
    return ours, reference.prior_pipeline(repo)


# ---------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def batch():
    """Two samples: (2, 16, 4, 4) latents and noise, (2, 77, 32) text states (the tiny prior's c_cond), t in [0, 1)."""
    generator = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(2, 16, 4, 4, generator=generator),
            "noise": torch.randn(2, 16, 4, 4, generator=generator),
            "text": torch.randn(2, 77, 32, generator=generator),
            "t": torch.rand(2, generator=generator)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_captioned_images(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def train(dataset, tiny_prior_repo, encoder_folder, tmp_path_factory):
    """Run `python -m wurst.train` in this process on the dataset with the tiny models, batch 2, 128x128, float32
    and a learning rate high enough for a few steps to change the output clearly; returns the output folder."""

    def run(*options: str) -> Path:
        out = tmp_path_factory.mktemp("run") / "out"
        code = main([str(dataset), "--out", str(out), "--prior", str(tiny_prior_repo), "--image-encoder",
                     str(encoder_folder), "--resolution", "128", "--dtype", "float32", "--batch-size", "2",
                     "--learning-rate", "1e-2", *options])
        assert code == 0
        return out

    return run


@pytest.fixture(scope="module")
def base_embeddings(tiny_prior_repo):
    ours, _ = prior_pipelines(tiny_prior_repo)
    return run_both((ours, ours), **RUN)[0]


@pytest.fixture(scope="module")
def full_run(train):
    return train("--full", "--steps", "2")


# ---------------------------------------------------------------------------------------------------------
# One step's loss and gradients, --recipe diffusers


@pytest.mark.parametrize("options", [[], ["--gradient-checkpointing"]], ids=["plain", "gradient-checkpointing"])
def test_lora_loss_and_gradients_match_diffusers_with_peft(tiny_prior_repo, batch, options):
    objective, trained, _ = wurst_objective(tiny_prior_repo, "--recipe", "diffusers", "--lora-rank", str(RANK),
                                            *options)
    assert objective.recipe == RECIPES["diffusers"]
    assert len(trained) == 16  # down and up of q, k, v and out of the tiny prior's two attention blocks
    assert objective.prior.gradient_checkpointing == ("--gradient-checkpointing" in options)
    ref = WuerstchenPrior.from_pretrained(tiny_prior_repo, subfolder="prior", torch_dtype=torch.float32)
    ref.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS))
    # up starts at zero (as peft's lora_B), which would leave every gradient of down zero: random factors instead.
    generator = torch.Generator().manual_seed(1)
    ref_params = dict(ref.named_parameters())
    names = {}
    with torch.no_grad():
        for name, factor in trained.items():
            component, names[name] = peft_name(name)
            assert component == "prior"
            factor.copy_(torch.randn(factor.shape, generator=generator) * 0.3)
            ref_params[names[name]].copy_(factor)
    assert {n for n, p in ref.named_parameters() if p.requires_grad} == set(names.values())
    assert_step_matches(objective, {names[name]: p for name, p in trained.items()}, ref, batch, f"LoRA {options}")


def test_full_loss_and_gradients_match_diffusers(tiny_prior_repo, batch):
    objective, trained, _ = wurst_objective(tiny_prior_repo, "--recipe", "diffusers", "--full")
    assert len(trained) == 48  # every parameter of the tiny prior
    ref = WuerstchenPrior.from_pretrained(tiny_prior_repo, subfolder="prior", torch_dtype=torch.float32)
    ref.requires_grad_(True)
    assert_step_matches(objective, {file_name("prior", name.removeprefix("prior.")): p for name, p in trained.items()},
                        ref, batch, "full")


@torch.no_grad()
def test_original_recipe_weights_each_sample_by_p2(tiny_prior_repo, batch):
    """--recipe original: each sample's MSE (in diffusers' formulation) times 1 / (1 + SNR), SNR = ᾱ / (1 - ᾱ) from
    diffusers' scheduler; t at both ends of the stretched range (0.001 and 1) and between."""
    objective, _, _ = wurst_objective(tiny_prior_repo, "--recipe", "original", "--full")
    ref = WuerstchenPrior.from_pretrained(tiny_prior_repo, subfolder="prior", torch_dtype=torch.float32)
    ref64 = copy.deepcopy(ref).double()
    t = torch.tensor([0.001, 0.2, 0.6, 1.0])
    generator = torch.Generator().manual_seed(2)
    four = {"latents": torch.randn(4, 16, 4, 4, generator=generator),
            "noise": torch.randn(4, 16, 4, 4, generator=generator),
            "text": batch["text"].repeat(2, 1, 1), "t": t}

    def p2_weighted(model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        latents, noise, text, times = (four[k].to(dtype) for k in ("latents", "noise", "text", "t"))
        scheduler = DDPMWuerstchenScheduler()
        pred = model(scheduler.add_noise(latents, noise, times), times, text)
        mse = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        alpha_cumprod = scheduler._alpha_cumprod(times, times.device)
        snr = alpha_cumprod / (1 - alpha_cumprod)
        return mse / (1 + snr), mse

    expected, unweighted = p2_weighted(ref, torch.float32)
    exact, _ = p2_weighted(ref64, torch.float64)
    got = objective(**four)
    assert got.shape == (4,) and got.dtype == torch.float32
    errors = []
    for k in range(4):
        error, bound = relative_error(got[k], expected[k]), parity_bound(expected[k], exact[k])
        assert error <= bound, (k, error, bound)
        errors.append(error)
    weights = (expected / unweighted).tolist()
    assert weights[0] < 1e-3 and weights[-1] > 0.999  # t = 0.001 hardly counts, pure noise fully
    assert weights == sorted(weights)
    print(f"P2: worst per-sample loss error {max(errors):.1e}, weights {', '.join(f'{w:.2e}' for w in weights)}")


# ---------------------------------------------------------------------------------------------------------
# What a run writes, loaded by diffusers and by wurst


@pytest.mark.parametrize("text_encoder", [False, True], ids=["prior", "prior-and-text-encoder"])
def test_lora_file_loads_in_diffusers_and_wurst_alike(train, tiny_prior_repo, base_embeddings, text_encoder):
    """A trained LoRA (alpha 2 x rank, so the file must fold the scale into lora_B) gives diffusers + peft the same
    embeddings as wurst, and both the embeddings of the weights as trained (the trainer's modules, not the file)."""
    options = ["--lora-rank", str(RANK), "--lora-alpha", str(2 * RANK), *(["--train-text-encoder"] * text_encoder)]
    out = train(*options, "--steps", "6")
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert sum(k.startswith("prior.") for k in lora) == 16
    assert sum(k.startswith("text_encoder.") for k in lora) == (16 if text_encoder else 0)

    ours, ref = prior_pipelines(tiny_prior_repo)
    ours.load_lora_weights(out)
    ref.load_lora_weights(out)
    assert set(ref.get_list_adapters()) == ({"prior", "text_encoder"} if text_encoder else {"prior"})
    got, expected = run_both((ours, ref), **RUN)
    error, effect = relative_error(got, expected), relative_error(expected, base_embeddings)
    assert error <= EMBEDDINGS_TOLERANCE, error
    assert effect > EFFECT, effect

    _, trained, as_trained = wurst_objective(tiny_prior_repo, *options)
    state = training_checkpoint(out)
    assert state["step"] == 6 and state["trained"].keys() == trained.keys()
    with torch.no_grad():
        for name, factor in trained.items():
            factor.copy_(state["trained"][name])
    in_training = run_both((as_trained, as_trained), **RUN)[0]
    folded = relative_error(got, in_training)
    assert folded <= EMBEDDINGS_TOLERANCE, folded
    print(f"LoRA file (text encoder {text_encoder}): wurst vs diffusers {error:.1e}, file vs as trained "
          f"{folded:.1e}, effect {effect:.2f}")


def test_full_output_loads_in_diffusers_and_wurst_alike(full_run, tiny_prior_repo, base_embeddings):
    """--full writes a prior repository: its prior holds the checkpoint's trained weights (all changed from the
    base), beside the base's text encoder; diffusers' component loaders and wurst give the same embeddings."""
    saved, base = saved_prior(full_run), load_file(tiny_prior_repo / "prior" / "diffusion_pytorch_model.safetensors")
    state = training_checkpoint(full_run)
    assert state["step"] == 2 and state["ema"] is None
    assert_same_tensors(saved, as_saved(state["trained"]))
    assert saved.keys() == base.keys()
    unchanged = [name for name in saved if torch.equal(saved[name], base[name])]
    assert unchanged == [], unchanged
    assert_same_tensors(load_file(full_run / "prior" / "text_encoder" / "model.safetensors"),
                        load_file(tiny_prior_repo / "text_encoder" / "model.safetensors"))

    got, expected = run_both(prior_pipelines(full_run / "prior"), **RUN)
    error, effect = relative_error(got, expected), relative_error(expected, base_embeddings)
    assert error <= EMBEDDINGS_TOLERANCE, error
    assert effect > EFFECT, effect
    print(f"--full: wurst vs diffusers {error:.1e}, effect {effect:.2f}")


def test_full_ema_output_is_the_ema_of_the_steps(train, full_run, tiny_prior_repo):
    """--ema-decay 0.5 for 2 steps: the EMA starts at the base weights w0 and takes in each step's weights, so the
    output is 0.25 w0 + 0.25 w1 + 0.5 w2, w1 from a run of 1 step; training itself is the run without EMA's."""
    out, first = train("--full", "--steps", "2", "--ema-decay", "0.5"), train("--full", "--steps", "1")
    state = training_checkpoint(out)
    assert_same_tensors(state["trained"], training_checkpoint(full_run)["trained"])  # the EMA does not change training
    saved = saved_prior(out)
    assert_same_tensors(saved, as_saved(state["ema"]))
    w0 = load_file(tiny_prior_repo / "prior" / "diffusion_pytorch_model.safetensors")
    w1, w2 = as_saved(training_checkpoint(first)["trained"]), as_saved(state["trained"])
    worst = 0.0
    for name in saved:
        expected = 0.25 * w0[name].double() + 0.25 * w1[name].double() + 0.5 * w2[name].double()
        # Two float32 lerps: a few units in the last place of the weights' size.
        torch.testing.assert_close(saved[name].double(), expected, rtol=0, atol=1e-6, msg=name)
        worst = max(worst, (saved[name].double() - expected).abs().max().item())
        assert not torch.equal(saved[name], w2[name]), name
    print(f"--ema-decay: worst distance from the hand-computed EMA {worst:.1e}")


def test_lora_ema_output_holds_the_ema_factors(train):
    """With a LoRA, the file holds the EMA's factors (lora_B with the alpha / rank scale folded in), not the last
    step's."""
    out = train("--lora-rank", str(RANK), "--lora-alpha", str(2 * RANK), "--steps", "2", "--ema-decay", "0.5")
    state, lora = training_checkpoint(out), load_file(out / "pytorch_lora_weights.safetensors")
    expected = {}
    for name, factor in state["ema"].items():
        _, peft = peft_name(name)
        key = "prior." + peft.replace(".default", "")
        expected[key] = factor * 2.0 if key.endswith("lora_B.weight") else factor
        assert not torch.equal(factor, state["trained"][name]), name
    assert lora.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(lora[key], tensor, rtol=0, atol=0, msg=key)
