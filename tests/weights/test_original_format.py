"""wurst/weights/original.py: the authors' release files (.pt, original key layout) read into the hub layout give
wurst models whose outputs match the original classes (tests/support/original_modules.py), load strictly into
diffusers' classes, and yield the published configs, which the package carries as they are in configs/; damaged,
foreign or code-running files are refused."""

import json
import os
import pickle

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

from tests.helpers import RunsCode, parity_bound, relative_error
from tests.support import original_modules as original
from tools import hub_fixtures, package_configs
from wurst import CheckpointError, ConfigError, ModelNotFoundError
from wurst.models import stage_a, stage_b, stage_c
from wurst.weights.configs import config_from_dict
from wurst.weights.keymaps import STAGE_A_KEYS, STAGE_B_KEYS, STAGE_C_KEYS
from wurst.weights.load import load_module
from wurst.weights.original import interpolate, original_config, published_config, read_original, to_hub_names

PRIOR = hub_fixtures.TINY["prior"]["prior"]
DECODER = hub_fixtures.TINY["decoder"]["decoder"]
VQGAN = hub_fixtures.TINY["decoder"]["vqgan"]
HEADS = {"prior": {"nhead": PRIOR["nhead"]}, "decoder": {"nhead": DECODER["nhead"]}, "vqgan": {}}
STATE_KEY = {"prior": "ema_state_dict", "decoder": "state_dict", "vqgan": "state_dict"}
WURST = {
    "prior": (stage_c.StageCConfig, stage_c.StageC, STAGE_C_KEYS),
    "decoder": (stage_b.StageBConfig, stage_b.StageB, STAGE_B_KEYS),
    "vqgan": (stage_a.StageAConfig, stage_a.StageA, STAGE_A_KEYS),
}


def tiny_original(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny original-layout model with every tensor random (zero-initialised ones included)."""
    if kind == "prior":
        model = original.Prior(**PRIOR)
    elif kind == "decoder":
        model = original.DiffNeXt(**DECODER)
    else:
        model = original.VQModel(levels=VQGAN["levels"], bottleneck_blocks=VQGAN["bottleneck_blocks"],
                                 c_hidden=VQGAN["embed_dim"], c_latent=VQGAN["latent_channels"],
                                 codebook_size=VQGAN["num_vq_embeddings"], scale_factor=VQGAN["scale_factor"])
    hub_fixtures.randomize_(model, seed, hub_fixtures.HEAD_GAIN)
    return model.eval()


def save_release(model: torch.nn.Module, path, layout: dict) -> None:
    """torch.save in the release files' layout: `layout` maps top-level keys to "model", "other" (a different
    random state of the same model, standing for raw non-EMA weights) or plain metadata values."""
    other = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    values = {"model": model.state_dict(), "other": other}
    torch.save({key: values.get(value, value) if isinstance(value, str) else value for key, value in layout.items()},
               path)


def load_into_wurst(kind: str, state: dict, source: str) -> torch.nn.Module:
    config_cls, model_cls, keys = WURST[kind]
    cfg = config_from_dict(config_cls, original_config(kind, state, **HEADS[kind]), source)
    return load_module(lambda: model_cls(cfg), state, keys, source)


def check_close(got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    error, bound = relative_error(got, ref32), parity_bound(ref32, ref64)
    assert got.shape == ref32.shape and error <= bound, f"{what}: relative error {error:.2e} > bound {bound:.2e}"


def reference_outputs(model: torch.nn.Module, inputs: tuple, call=lambda model, *inputs: model(*inputs)):
    """The reference's output in fp32 and in fp64 (the model is left in fp32)."""
    ref32 = call(model, *inputs)
    ref64 = call(model.double(), *(t.double() for t in inputs))
    model.float()
    return ref32, ref64


# ---------------------------------------------------------------------------------------------------------
# Parity with the original classes, through a file in the release layout


@pytest.mark.parametrize(
    "filename, layout",
    [
        ("model_v2_stage_c.pt", {"ema_state_dict": "model", "state_dict": "other", "iter": 3, "wandb_run_id": "x"}),
        ("model_v2_stage_c_finetune_interpolation.pt", {"ema_state_dict": "model"}),
    ],
)
@torch.no_grad()
def test_prior_release_file_matches_the_original_model(tmp_path, filename, layout):
    ref = tiny_original("prior")
    save_release(ref, tmp_path / filename, layout)
    ours = load_into_wurst("prior", read_original(tmp_path / filename, "prior"), filename)
    generator = torch.Generator().manual_seed(0)
    for h, w in [(3, 3), (4, 6), (12, 12)]:
        x = torch.randn(2, PRIOR["c_in"], h, w, generator=generator)
        r = torch.rand(2, generator=generator)
        text = torch.randn(2, 77, PRIOR["c_cond"], generator=generator)
        ref32, ref64 = reference_outputs(ref, (x, r, text))
        check_close(ours(x, r, text), ref32, ref64, f"prior {h}x{w}")


@torch.no_grad()
def test_decoder_release_file_matches_the_original_model(tmp_path):
    ref = tiny_original("decoder")
    encoder = {"mapper.0.weight": torch.randn(16, 8, 1, 1)}  # stands for the EfficientNet state, ignored
    save_release(ref, tmp_path / "model_v2_stage_b.pt", {"state_dict": "model", "effnet_state_dict": encoder})
    ours = load_into_wurst("decoder", read_original(tmp_path / "model_v2_stage_b.pt", "decoder"), "stage b")
    generator = torch.Generator().manual_seed(1)
    for h, w in [(16, 16), (32, 16)]:  # the 4-level U-Net halves the patched latent three times
        x = torch.randn(2, DECODER["c_in"], h, w, generator=generator)
        r = torch.rand(2, generator=generator)
        effnet = 3 * torch.randn(2, DECODER["effnet_embd"], 3, 3, generator=generator)
        clip = torch.randn(2, 77, DECODER["clip_embd"], generator=generator)
        ref32, ref64 = reference_outputs(ref, (x, r, effnet, clip))
        check_close(ours(x, r, effnet, clip), ref32, ref64, f"decoder {h}x{w}")


@torch.no_grad()
def test_vqgan_release_file_matches_the_original_model(tmp_path):
    ref = tiny_original("vqgan")
    save_release(ref, tmp_path / "vqgan_f4_v1_500k.pt", {"state_dict": "model"})
    ours = load_into_wurst("vqgan", read_original(tmp_path / "vqgan_f4_v1_500k.pt", "vqgan"), "vqgan")
    scale = VQGAN["scale_factor"]
    generator = torch.Generator().manual_seed(2)
    latents = 0.3 * torch.randn(2, 4, 8, 12, generator=generator)
    images = torch.rand(2, 3, 32, 48, generator=generator)
    # The original scales inside decode and encode; wurst (like diffusers) leaves that to the pipeline.
    ref32, ref64 = reference_outputs(ref, (latents / scale,), lambda model, z: model.decode(z))
    check_close(ours.decode(latents), ref32, ref64, "decode")
    ref32, ref64 = reference_outputs(ref, (images,), lambda model, x: model.encode(x)[1] * scale)
    check_close(ours.encode(images), ref32, ref64, "encode")
    _, indices = ours.quantize(ours.encode(images))
    assert torch.equal(indices, ref.encode(images)[2])


@pytest.mark.parametrize("kind, cls", [("prior", WuerstchenPrior), ("decoder", WuerstchenDiffNeXt),
                                       ("vqgan", PaellaVQModel)])
def test_renamed_state_loads_into_diffusers(tmp_path, kind, cls):
    save_release(tiny_original(kind), tmp_path / "model.pt", {STATE_KEY[kind]: "model"})
    state = read_original(tmp_path / "model.pt", kind)
    config = original_config(kind, state, **HEADS[kind])
    model = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    model.load_state_dict(state, strict=True)
    assert any(".to_q." in name for name in state) or kind == "vqgan"


# ---------------------------------------------------------------------------------------------------------
# Configs


def test_configs_of_published_sizes_are_the_published_configs():
    with torch.device("meta"):  # shapes only: the published sizes cost no memory
        models = {"prior": original.Prior(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24),
                  "decoder": original.DiffNeXt(), "vqgan": original.VQModel()}
    counts = {"prior": 648, "decoder": 990, "vqgan": 122}  # the hub files' tensor counts
    for kind, model in models.items():
        state = to_hub_names(model.state_dict(), kind)
        assert len(state) == counts[kind], kind
        assert original_config(kind, state) == published_config(kind), kind


def test_packaged_published_configs_are_those_of_the_configs_folder():
    """configs/ is the one source; the package carries a copy, since an installed wurst has no checkout."""
    assert package_configs.PACKAGED.read_text(encoding="utf-8") == package_configs.packaged_text(), (
        "wurst/weights/published_configs.json is stale: run python tools/package_configs.py")
    for kind, source in package_configs.SOURCES.items():
        assert published_config(kind) == json.loads(source.read_text(encoding="utf-8")), kind


def test_head_counts_of_unpublished_widths_must_be_given():
    prior = to_hub_names(tiny_original("prior").state_dict(), "prior")
    with pytest.raises(ConfigError, match="nhead"):
        original_config("prior", prior)
    assert original_config("prior", prior, nhead=4)["nhead"] == 4
    decoder = to_hub_names(tiny_original("decoder").state_dict(), "decoder")
    with pytest.raises(ConfigError, match="nhead"):
        original_config("decoder", decoder)
    with pytest.raises(ConfigError, match="no field"):
        original_config("prior", prior, nhead=2, heads=2)


# ---------------------------------------------------------------------------------------------------------
# Key layout variants


def test_wrapper_prefixes_bare_state_dicts_and_legacy_files_are_read(tmp_path):
    model = tiny_original("prior")
    expected = to_hub_names(model.state_dict(), "prior")
    prefixes = ["module._orig_mod.", "_orig_mod.", "module."]
    wrapped = {prefixes[i % 3] + k: v for i, (k, v) in enumerate(model.state_dict().items())}
    torch.save({"ema_state_dict": wrapped}, tmp_path / "wrapped.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("wrapped.pt", "bare.pt", "legacy.pt"):
        state = read_original(tmp_path / name, "prior")
        assert state.keys() == expected.keys(), name
        assert all(torch.equal(state[k], expected[k]) for k in expected), name


def test_attention_is_split_into_q_k_v_in_order():
    model = tiny_original("prior")
    attn = model.blocks[2].attention.attn
    state = to_hub_names(model.state_dict(), "prior")
    c = attn.embed_dim
    for i, part in enumerate("qkv"):
        assert torch.equal(state[f"blocks.2.attention.to_{part}.weight"], attn.in_proj_weight[i * c : (i + 1) * c])
        assert torch.equal(state[f"blocks.2.attention.to_{part}.bias"], attn.in_proj_bias[i * c : (i + 1) * c])
    assert torch.equal(state["blocks.2.attention.to_out.0.weight"], attn.out_proj.weight)
    assert not any("in_proj" in k or "out_proj" in k or ".attn." in k for k in state)


# ---------------------------------------------------------------------------------------------------------
# interpolate


def test_interpolate_blends_floats_and_copies_equal_integers():
    a = {"w": torch.tensor([0.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor(7)}
    b = {"w": torch.tensor([4.0, 6.0]), "h": torch.tensor([3.0], dtype=torch.float16), "n": torch.tensor(7)}
    out = interpolate(a, b, 0.25)
    assert torch.equal(out["w"], torch.tensor([1.0, 3.0]))
    assert out["h"].dtype == torch.float16 and out["h"].item() == 1.5
    assert torch.equal(out["n"], a["n"]) and out["n"].data_ptr() != a["n"].data_ptr()
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"]) and torch.equal(interpolate(a, b, 1.0)["w"], b["w"])


def test_interpolate_of_two_release_files(tmp_path):
    save_release(tiny_original("vqgan", seed=1), tmp_path / "a.pt", {"state_dict": "model"})
    save_release(tiny_original("vqgan", seed=1), tmp_path / "b.pt", {"state_dict": "other"})  # floats + 1
    a, b = read_original(tmp_path / "a.pt", "vqgan"), read_original(tmp_path / "b.pt", "vqgan")
    mixed = interpolate(a, b, 0.5)
    assert mixed.keys() == a.keys()
    torch.testing.assert_close(mixed["in_block.1.weight"], a["in_block.1.weight"] + 0.5)
    load_into_wurst("vqgan", mixed, "mixed")


@pytest.mark.parametrize(
    "b, message",
    [
        ({"w": torch.zeros(2)}, "different tensors"),
        ({"w": torch.zeros(3), "n": torch.tensor(7)}, "shapes"),
        ({"w": torch.zeros(2), "n": torch.tensor(8)}, "only floating tensors blend"),
    ],
)
def test_interpolate_refuses_mismatched_state_dicts(b, message):
    with pytest.raises(CheckpointError, match=message):
        interpolate({"w": torch.ones(2), "n": torch.tensor(7)}, b, 0.5)


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model_v2_stage_b.pt"):
        read_original(tmp_path / "model_v2_stage_b.pt", "decoder")


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch notes the unusual pickle protocol of plain pickles
def test_damaged_files_are_refused(tmp_path):
    torch.save({"state_dict": tiny_original("vqgan").state_dict()}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    files = {"truncated.pt": data[: len(data) // 2], "empty.pt": b"", "junk.pt": os.urandom(4096),
             "text.pt": b"not a checkpoint"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name) as info:
            read_original(tmp_path / name, "vqgan")
        assert "\n" not in str(info.value), name


def test_files_without_a_state_dict_of_the_kind_are_refused(tmp_path):
    torch.save({"iter": 3, "metrics": {"ema_loss": 0.1}}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="meta.pt holds no state dict"):
        read_original(tmp_path / "meta.pt", "prior")
    torch.save({"state_dict": tiny_original("vqgan").state_dict()}, tmp_path / "vqgan.pt")
    with pytest.raises(CheckpointError, match="vqgan.pt does not hold a Würstchen decoder"):
        read_original(tmp_path / "vqgan.pt", "decoder")
    with pytest.raises(ValueError, match="kind"):
        read_original(tmp_path / "vqgan.pt", "stage_b")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pickles_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "code-ran"
    with open(tmp_path / "plain.pt", "wb") as f:
        pickle.dump({"state_dict": RunsCode(marker)}, f)
    torch.save({"ema_state_dict": {"projection.weight": torch.zeros(1)}, "extra": RunsCode(marker)},
               tmp_path / "zipped.pt")
    for name in ("plain.pt", "zipped.pt"):
        with pytest.raises(CheckpointError, match=f"{name} is corrupt or holds more than tensors"):
            read_original(tmp_path / name, "prior")
    assert not marker.exists()
