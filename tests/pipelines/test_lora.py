"""LoRA on the prior pipeline (wurst.pipelines.lora) against diffusers with peft, on the tiny fixtures: one adapter,
a weighted one, two at once, fusing and unfusing, unloading, a text-encoder LoRA, the combined pipeline through
`prior_pipe`, kohya's format against its diffusers twin, files written by either library; then what diffusers does
not do: refusals that leave the pipeline as it was, fuse_lora() without arguments, the combined pipeline's own
methods, low-memory mode and offload keeping their adapters, and files in the cache left untouched."""

import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

import wurst
from tests.helpers import (
    PROMPT,
    TINY_PRIOR_ATTENTION,
    assert_close_images,
    make_prior_lora,
    relative_error,
    run_both,
)
from tests.support import reference
from wurst.errors import ArgumentError, CheckpointError, ModelNotFoundError

EMBEDDINGS_TOLERANCE = 1e-4  # relative, as for the prior's other parity tests
IMAGE_TOLERANCE = 1e-3  # absolute, in pixels
RUN = dict(prompt=PROMPT, height=256, width=256, num_inference_steps=4, output="image_embeddings")
IMAGE_RUN = dict(prompt=PROMPT, height=128, width=128, prior_num_inference_steps=3, num_inference_steps=3,
                 output_type="pt", output="images")
EFFECT = 0.05  # a LoRA must move the embeddings by more than this (relative), or its parity proves nothing


@pytest.fixture
def pair(tiny_prior_repo):
    ours = wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo)
    ours.set_progress_bar_config(disable=True)
    return ours, reference.prior_pipeline(tiny_prior_repo)


@pytest.fixture(scope="module")
def base_embeddings(tiny_prior_repo):
    ours = wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo)
    ours.set_progress_bar_config(disable=True)
    return run_both((ours, ours), **RUN)[0]


def both(pair, method: str, *args, **kwargs) -> None:
    for pipe in pair:
        getattr(pipe, method)(*args, **kwargs)


def assert_parity(pair, base=None):
    got, expected = run_both(pair, **RUN)
    error = relative_error(got, expected)
    assert error <= EMBEDDINGS_TOLERANCE, error
    if base is not None:
        assert relative_error(expected, base) > EFFECT
    return got


def prior_weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.prior.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers + peft


def test_one_lora(pair, base_embeddings):
    both(pair, "load_lora_weights", make_prior_lora(1))
    assert_parity(pair, base_embeddings)
    assert pair[0].get_active_adapters() == pair[1].get_active_adapters() == ["default_0"]
    assert pair[0].get_list_adapters() == pair[1].get_list_adapters() == {"prior": ["default_0"]}


def test_weighted_adapter(pair, base_embeddings):
    both(pair, "load_lora_weights", make_prior_lora(1), adapter_name="style")
    both(pair, "set_adapters", "style", 0.4)
    weighted = assert_parity(pair, base_embeddings)
    both(pair, "set_adapters", "style", 1.0)
    assert relative_error(assert_parity(pair), weighted) > EFFECT


def test_two_adapters_at_once(pair, base_embeddings):
    both(pair, "load_lora_weights", make_prior_lora(1), adapter_name="a")
    both(pair, "load_lora_weights", make_prior_lora(2, rank=3), adapter_name="b")
    assert pair[0].get_active_adapters() == pair[1].get_active_adapters() == ["b"]  # loading activates the new one
    both(pair, "set_adapters", ["a", "b"], [0.7, 0.4])
    assert_parity(pair, base_embeddings)


def test_fuse_with_a_scale_then_unfuse(pair, base_embeddings):
    ours, ref = pair
    base = prior_weights(ours)
    both(pair, "load_lora_weights", make_prior_lora(1), adapter_name="a")
    both(pair, "load_lora_weights", make_prior_lora(2), adapter_name="b")
    both(pair, "set_adapters", ["a", "b"], [0.8, 0.5])
    unfused = run_both(pair, **RUN)[0]
    both(pair, "fuse_lora", components=["prior"], lora_scale=0.6)
    fused = assert_parity(pair, base_embeddings)
    assert relative_error(fused, unfused) > EFFECT  # the scale applied
    changed = [k for k, v in ours.prior.state_dict().items() if not torch.equal(v, base[k])]
    assert changed and all(".q_proj." in k or "_proj.weight" in k for k in changed)
    both(pair, "unfuse_lora", components=["prior"])
    # wurst puts the base weights back exactly; diffusers subtracts what it added, within float rounding.
    assert all(torch.equal(v, base[k]) for k, v in ours.prior.state_dict().items())
    assert torch.equal(run_both((ours, ours), **RUN)[0], unfused)  # the adapters apply unfused again
    both(pair, "disable_lora")
    got, expected = run_both(pair, **RUN)
    assert torch.equal(got, base_embeddings)
    assert relative_error(expected, base_embeddings) <= EMBEDDINGS_TOLERANCE


def test_unload(pair, base_embeddings):
    ours, _ = pair
    base = prior_weights(ours)
    both(pair, "load_lora_weights", make_prior_lora(1, text_encoder=True))
    # Fused, then unloaded: wurst is back to the base. diffusers 0.42 unloads a fused LoRA's layers but keeps its
    # weights fused in, so its reference is unloaded unfused.
    ours.fuse_lora(components=["prior"])
    both(pair, "unload_lora_weights")
    got, expected = run_both(pair, **RUN)
    assert torch.equal(got, base_embeddings)  # exactly the base
    assert relative_error(expected, base_embeddings) <= EMBEDDINGS_TOLERANCE
    assert all(torch.equal(v, base[k]) for k, v in ours.prior.state_dict().items())
    assert ours.get_list_adapters() == {} and ours.get_active_adapters() == []


def test_text_encoder_lora(pair, base_embeddings):
    lora = {k: v for k, v in make_prior_lora(3, text_encoder=True).items() if k.startswith("text_encoder.")}
    both(pair, "load_lora_weights", lora)
    assert pair[0].get_list_adapters() == pair[1].get_list_adapters() == {"text_encoder": ["default_0"]}
    assert_parity(pair, base_embeddings)
    both(pair, "fuse_lora", components=["text_encoder"], lora_scale=0.5)
    assert_parity(pair, base_embeddings)


def test_combined_pipeline_through_prior_pipe(tiny_prior_repo, tiny_decoder_repo):
    ours = wurst.WuerstchenCombinedPipeline.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo)
    ours.set_progress_bar_config(disable=True)
    pair = ours, reference.combined_pipeline(tiny_prior_repo, tiny_decoder_repo)
    base = run_both(pair, **IMAGE_RUN)[1]
    for pipe in pair:
        pipe.prior_pipe.load_lora_weights(make_prior_lora(1, text_encoder=True), adapter_name="a")
        pipe.prior_pipe.set_adapters("a", 0.8)
    got, expected = run_both(pair, **IMAGE_RUN)
    assert_close_images(got, expected, IMAGE_TOLERANCE)
    assert (expected - base).abs().max() > 0.05


def kohya_twin(lora: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The same LoRA in kohya's format, with an alpha: lora_down = A, and lora_up = B · rank / alpha so that the
    scale alpha / rank gives back B."""
    twin = {}
    for key, tensor in lora.items():
        module, part = key.rsplit(".lora_", 1)
        prefix, path = module.split(".", 1)
        name = ("lora_unet_" if prefix == "prior" else "lora_te_") + path.replace(".", "_")
        if part == "A.weight":
            twin[f"{name}.lora_down.weight"] = tensor
            twin[f"{name}.alpha"] = torch.tensor(alpha)
        else:
            twin[f"{name}.lora_up.weight"] = tensor * tensor.shape[1] / alpha
    return twin


def test_kohya_file_matches_its_diffusers_twin(pair, tmp_path, base_embeddings):
    ours, ref = pair
    lora = make_prior_lora(4, rank=4, text_encoder=True)
    save_file(kohya_twin(lora, alpha=1.0), tmp_path / "kohya.safetensors")
    ours.load_lora_weights(tmp_path / "kohya.safetensors")
    ref.load_lora_weights(lora)
    assert ours.get_list_adapters() == {"prior": ["default_0"], "text_encoder": ["default_0"]}
    assert_parity(pair, base_embeddings)


def test_files_written_by_either_library(pair, tmp_path, base_embeddings):
    """save_lora_weights, with peft's LoraConfig as metadata (scales 2 and 0.5), writes a file both
    libraries read alike; so does diffusers' own save_lora_weights for wurst."""
    ours, ref = pair
    lora = make_prior_lora(5, text_encoder=True)
    prior = {k.removeprefix("prior."): v for k, v in lora.items() if k.startswith("prior.")}
    text = {k.removeprefix("text_encoder."): v for k, v in lora.items() if k.startswith("text_encoder.")}
    configs = dict(unet_lora_adapter_metadata={"r": 2, "lora_alpha": 4,
                                               "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
                   text_encoder_lora_adapter_metadata={"r": 2, "lora_alpha": 1,
                                                       "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"]})
    wurst.WuerstchenPriorPipeline.save_lora_weights(tmp_path / "ours", unet_lora_layers=prior,
                                                    text_encoder_lora_layers=text, **configs)
    type(ref).save_lora_weights(tmp_path / "theirs", unet_lora_layers=prior, text_encoder_lora_layers=text, **configs)
    ours.load_lora_weights(tmp_path / "theirs")
    ref.load_lora_weights(tmp_path / "ours")
    doubled = assert_parity(pair, base_embeddings)
    both(pair, "unload_lora_weights")
    both(pair, "load_lora_weights", lora)  # the same layers without the metadata: scale 1
    assert relative_error(assert_parity(pair), doubled) > EFFECT


def test_get_lora_layers_round_trip(pair, tmp_path):
    ours, _ = pair
    ours.load_lora_weights(make_prior_lora(6, text_encoder=True), adapter_name="x")
    ours.set_adapters("x", 1.0)
    before = run_both((ours, ours), **RUN)[0]
    wurst.WuerstchenPriorPipeline.save_lora_weights(tmp_path, **ours.get_lora_layers("x"))
    ours.unload_lora_weights()
    ours.load_lora_weights(tmp_path)
    assert torch.equal(run_both((ours, ours), **RUN)[0], before)


# ---------------------------------------------------------------------------------------------------------
# Refusals: one line naming the first bad key, and the pipeline exactly as it was


def lora_with(**changes) -> dict[str, torch.Tensor]:
    lora = make_prior_lora(1)
    for key, value in changes.items():
        if value is None:
            del lora[key.replace("__", ".")]
        else:
            lora[key.replace("__", ".")] = value
    return lora


FIRST_A = f"prior.{TINY_PRIOR_ATTENTION[0]}.lora_A.weight"
REFUSED = {
    "no such module": ({"prior.blocks.2.attention.to_z.lora_A.weight": torch.ones(2, 32),
                        "prior.blocks.2.attention.to_z.lora_B.weight": torch.ones(32, 2)},
                       "'prior.blocks.2.attention.to_z.lora_A.weight' names no layer of the prior"),
    "shape mismatch": ({**make_prior_lora(1), FIRST_A: torch.ones(2, 33)},
                       f"tensor '{FIRST_A}' has shape (2, 33), but the layer takes (rank, 32)"),
    "rank mismatch": ({**make_prior_lora(1), FIRST_A: torch.ones(3, 32)}, "expected (32, 3)"),
    "missing half": ({k: v for k, v in make_prior_lora(1).items() if k != FIRST_A}, "has no matching down tensor"),
    "stage b": ({"prior.down_blocks.1.0.attention.to_q.lora_A.weight": torch.ones(2, 32),
                 "prior.down_blocks.1.0.attention.to_q.lora_B.weight": torch.ones(32, 2)}, "a layer of Stage B"),
    "stage b kohya": ({"lora_unet_down_blocks_1_0_attention_to_q.lora_down.weight": torch.ones(2, 32),
                       "lora_unet_down_blocks_1_0_attention_to_q.lora_up.weight": torch.ones(32, 2)},
                      "a layer of Stage B"),
    "no lora": ({"blocks.2.attention.to_q.weight": torch.ones(32, 32)}, "holds no LoRA"),
    "stray key": ({**make_prior_lora(1), "prior.blocks.2.attention.to_q.weight": torch.ones(32, 32)},
                  "'prior.blocks.2.attention.to_q.weight' is not a LoRA tensor"),
    "convolution": ({"prior.blocks.0.depthwise.lora_A.weight": torch.ones(2, 32),
                     "prior.blocks.0.depthwise.lora_B.weight": torch.ones(32, 2)}, "not a linear layer"),
    "integer tensor": ({**make_prior_lora(1), FIRST_A: torch.ones(2, 32, dtype=torch.int64)}, "holds int64"),
    "decoder text encoder width": ({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                                    torch.ones(2, 24),
                                    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight":
                                    torch.ones(24, 2)}, "has shape (2, 24)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_without_side_effects(pair, base_embeddings, tmp_path, case):
    ours, _ = pair
    ours.load_lora_weights(make_prior_lora(7), adapter_name="kept")
    ours.set_adapters("kept", 0.5)
    before = run_both((ours, ours), **RUN)[0]
    state, message = REFUSED[case]
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as refusal:
        ours.load_lora_weights(tmp_path / "bad.safetensors", adapter_name="bad")
    assert message in str(refusal.value) and "\n" not in str(refusal.value)
    assert str(tmp_path / "bad.safetensors") in str(refusal.value)
    assert ours.get_list_adapters() == {"prior": ["kept"]} and ours.get_active_adapters() == ["kept"]
    assert torch.equal(run_both((ours, ours), **RUN)[0], before)


def test_bad_sources_and_arguments(pair, tmp_path):
    ours, _ = pair
    with pytest.raises(ModelNotFoundError, match="LoRA not found"):
        ours.load_lora_weights(tmp_path / "absent.safetensors")
    os.mkfifo(tmp_path / "pipe.safetensors")  # opening it would block until a writer came
    with pytest.raises(ModelNotFoundError, match="not a file"):
        ours.load_lora_weights(tmp_path / "pipe.safetensors")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ArgumentError, match="safetensors only"):
        ours.load_lora_weights(tmp_path / "weights.bin")
    (tmp_path / "pipe.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="holds no LoRA file"):
        ours.load_lora_weights(tmp_path)
    ours.load_lora_weights(make_prior_lora(1), adapter_name="a")
    with pytest.raises(ArgumentError, match="'a' is already in use"):
        ours.load_lora_weights(make_prior_lora(2), adapter_name="a")
    with pytest.raises(ArgumentError, match="'b' is not loaded"):
        ours.set_adapters(["a", "b"])
    with pytest.raises(ArgumentError, match="must be a finite number"):
        ours.set_adapters("a", float("nan"))
    with pytest.raises(ArgumentError, match="'decoder' is not one of"):
        ours.fuse_lora(components=["decoder"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'scale'"):
        ours.load_lora_weights(make_prior_lora(2), scale=2)
    with pytest.raises(ArgumentError, match="revision= is not supported"):
        ours.load_lora_weights(make_prior_lora(2), revision="main")
    assert ours.get_list_adapters() == {"prior": ["a"]}


def test_a_corrupt_file_is_refused(pair, tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(make_prior_lora(1), path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        pair[0].load_lora_weights(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# What diffusers lacks: fuse_lora() as documented, the combined pipeline's own methods, every memory mode


def test_fuse_lora_without_arguments(pair):
    ours, ref = pair
    both(pair, "load_lora_weights", make_prior_lora(1, text_encoder=True))
    ours.fuse_lora()  # diffusers 0.42 fails here ("unet is not found"); its components=[...] form is the reference
    ref.fuse_lora(components=["prior", "text_encoder"])
    assert_parity(pair)
    ours.unfuse_lora()
    ref.unfuse_lora(components=["prior", "text_encoder"])


def test_combined_pipeline_methods_act_on_the_prior(tiny_prior_repo, tiny_decoder_repo):
    direct = wurst.WuerstchenCombinedPipeline.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo)
    through = wurst.WuerstchenCombinedPipeline.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo)
    for pipe in (direct, through):
        pipe.set_progress_bar_config(disable=True)
    direct.load_lora_weights(make_prior_lora(1), adapter_name="a")
    direct.set_adapters("a", 0.6)
    through.prior_pipe.load_lora_weights(make_prior_lora(1), adapter_name="a")
    through.prior_pipe.set_adapters("a", 0.6)
    assert direct.prior_pipe.get_active_adapters() == ["a"] and direct.get_list_adapters() == {"prior": ["a"]}
    got, expected = run_both((direct, through), **IMAGE_RUN)
    assert torch.equal(got, expected)


def test_low_memory_and_offload_keep_their_adapters(tiny_prior_repo):
    """Low-memory mode loads the prior from its file for every run and offload moves it: the adapters, their
    weights and the fused state apply every time, and the files are never written."""
    files = sorted(tiny_prior_repo.rglob("*.safetensors"))
    digests = [hashlib.sha256(p.read_bytes()).digest() for p in files]
    pipes = {mode: wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo, low_memory=mode == "low")
             for mode in ("resident", "low", "offload")}
    pipes["offload"].enable_model_cpu_offload(device="cpu")
    results = {}
    for mode, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(make_prior_lora(1, text_encoder=True), adapter_name="a")
        pipe.load_lora_weights(make_prior_lora(2), adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.5, {"prior": 0.9}])
        results[mode, "unfused"] = run_both((pipe, pipe), **RUN)[0]
        pipe.fuse_lora(lora_scale=0.7)
        results[mode, "fused"] = run_both((pipe, pipe), **RUN)[0]
        pipe.unload_lora_weights()
        results[mode, "unloaded"] = run_both((pipe, pipe), **RUN)[0]
    for mode in ("low", "offload"):
        for state in ("unfused", "fused", "unloaded"):
            assert torch.equal(results[mode, state], results["resident", state]), (mode, state)
    assert relative_error(results["resident", "fused"], results["resident", "unloaded"]) > EFFECT
    assert [hashlib.sha256(p.read_bytes()).digest() for p in files] == digests


def test_dtype_moves_keep_the_adapters(pair):
    ours, _ = pair
    ours.load_lora_weights(make_prior_lora(1))
    ours.to(torch.bfloat16)
    layer = ours.prior.blocks[2].q_proj
    assert layer.lora.down.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    ours.to(torch.float32)
    lora_on = run_both((ours, ours), **RUN)[0]
    ours.unload_lora_weights()
    assert relative_error(run_both((ours, ours), **RUN)[0], lora_on) > EFFECT


# ---------------------------------------------------------------------------------------------------------
# Published size (slow)


def published_lora(seed: int) -> dict[str, torch.Tensor]:
    """Rank 4 on diffusers' training-script targets of the published prior (128 layers of width 1536) and on the
    attention of its text encoder (32 layers of width 1280)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    modules = [("prior", f"blocks.{3 * i + 2}.attention.{p}", 1536) for i in range(32)
               for p in ("to_q", "to_k", "to_v", "to_out.0")]
    modules += [("text_encoder", f"text_model.encoder.layers.{i}.self_attn.{p}", 1280) for i in range(32)
                for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    for prefix, module, width in modules:
        state[f"{prefix}.{module}.lora_A.weight"] = torch.randn(4, width, generator=generator) * 0.05
        state[f"{prefix}.{module}.lora_B.weight"] = torch.randn(width, 4, generator=generator) * 0.05
    return state


@pytest.fixture(scope="module")
def published_prior_repo():
    from tools import hub_fixtures

    return hub_fixtures.ensure("published", "prior")


@pytest.mark.slow
def test_published_lora_parity_float32(published_prior_repo):
    ours = wurst.WuerstchenPriorPipeline.from_pretrained(published_prior_repo)
    ours.set_progress_bar_config(disable=True)
    pair = ours, reference.prior_pipeline(published_prior_repo)
    run = dict(prompt=PROMPT, height=512, width=512, num_inference_steps=3, guidance_scale=4.0,
               output="image_embeddings")
    base = run_both(pair, **run)[1]
    both(pair, "load_lora_weights", published_lora(0))
    got, expected = run_both(pair, **run)
    error, effect = relative_error(got, expected), relative_error(expected, base)
    print(f"published LoRA float32: relative error {error:.2e}, the LoRA's effect {effect:.2e}")
    assert error <= 1e-3 and effect > EFFECT


@pytest.mark.slow
@torch.no_grad()
def test_published_lora_bfloat16_forward_is_as_accurate_as_diffusers(published_prior_repo):
    """One Stage C forward (guidance's batch of 2, the 24x24 latent of 1024x1024) with a LoRA: wurst's bfloat16
    against float64, beside diffusers' bfloat16 with peft on the same inputs; no more than 10% further."""
    lora = published_lora(0)
    ref = reference.prior_pipeline(published_prior_repo)
    ref.load_lora_weights(lora)
    ours = wurst.WuerstchenPriorPipeline.from_pretrained(published_prior_repo, torch_dtype=torch.bfloat16)
    ours.load_lora_weights(lora)
    generator = torch.Generator().manual_seed(0)
    x, r, text = torch.randn(2, 16, 24, 24, generator=generator), torch.rand(2, generator=generator), \
        torch.randn(2, 77, 1280, generator=generator)
    exact = ref.prior.double()(x.double(), r.double(), text.double())
    theirs = ref.prior.to(torch.bfloat16)(x.bfloat16(), r.bfloat16(), text.bfloat16())
    got = ours.prior(x.bfloat16(), r.bfloat16(), text.bfloat16())
    ours_error, theirs_error = relative_error(got, exact), relative_error(theirs, exact)
    print(f"published LoRA bfloat16 forward: wurst {ours_error:.2e}, diffusers {theirs_error:.2e}, between "
          f"{relative_error(got, theirs):.2e}")
    assert ours_error <= 1.1 * theirs_error


def test_the_memory_estimate_counts_the_adapters(tiny_prior_repo, tiny_decoder_repo):
    """Rank 2 on 8 layers of width 32 in float32: 8 · (2·32 + 32·2) · 4 = 4096 bytes of factors; fused, each layer
    also holds a new 32x32 weight: 8 · 32 · 32 · 4 = 32768 bytes more."""
    from wurst.runtime import memory

    pipe = wurst.load_pipeline(prior=tiny_prior_repo, decoder=tiny_decoder_repo, device="cpu", dtype=torch.float32)

    def stage_c_weights() -> int:
        stages = memory.estimate(pipe, height=256, width=256).stages
        return next(s.weights for s in stages if s.name == "Stage C")

    base = stage_c_weights()
    pipe.load_lora_weights(make_prior_lora(1))
    assert stage_c_weights() - base == 4096
    pipe.fuse_lora()
    assert stage_c_weights() - base == 4096 + 32768


@pytest.mark.parametrize("low_memory", [False, True])
def test_save_pretrained_bakes_a_fused_lora(tiny_prior_repo, tmp_path, low_memory, base_embeddings):
    """Fused, then saved: the saved repository gives the fused pipeline's output, in wurst and in diffusers'
    component loaders; an unfused adapter is not baked in."""
    ours = wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo, low_memory=low_memory)
    ours.set_progress_bar_config(disable=True)
    ours.load_lora_weights(make_prior_lora(1, text_encoder=True), adapter_name="a")
    ours.load_lora_weights(make_prior_lora(2), adapter_name="b")
    ours.fuse_lora(adapter_names=["a"], lora_scale=0.8)
    ours.set_adapters("b", 0.5)  # active, not fused: not part of the saved weights
    ours.save_pretrained(tmp_path / "saved")
    ours.disable_lora()
    fused = run_both((ours, ours), **RUN)[0]
    assert relative_error(fused, base_embeddings) > EFFECT
    baked = wurst.WuerstchenPriorPipeline.from_pretrained(tmp_path / "saved")
    baked.set_progress_bar_config(disable=True)
    assert torch.equal(run_both((baked, baked), **RUN)[0], fused)
    ref = reference.prior_pipeline(tmp_path / "saved")
    assert relative_error(run_both((ref, ref), **RUN)[0], fused) <= EMBEDDINGS_TOLERANCE


def test_paths_that_look_like_hub_ids_and_names_that_climb_out(pair, tmp_path, monkeypatch):
    ours, _ = pair
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="LoRA not found: missing/lora.safetensors"):
        ours.load_lora_weights("missing/lora.safetensors")
    save_file(make_prior_lora(1), tmp_path / "lora.safetensors")
    (tmp_path / "folder").mkdir()
    for name in ("../lora.safetensors", "/etc/passwd", "", ".hidden.safetensors"):
        with pytest.raises(ArgumentError, match="weight_name must name a file inside"):
            ours.load_lora_weights(tmp_path / "folder", weight_name=name)
    assert ours.get_list_adapters() == {}
