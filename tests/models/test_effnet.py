"""wurst/effnet.py: Stage C's image encoder against the original EfficientNetEncoder (torchvision's
efficientnet_v2_s().features plus the mapper) on random weights in the release layout; its configs read from the
weights; wurst's converted layout; fetching from the hub file through the Hugging Face cache; refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import RunsCode, parity_bound, relative_error
from tests.support.image_fixtures import (
    PUBLISHED_ENCODER,
    TINY_ENCODER,
    OriginalEncoder,
    original_encoder,
    original_state,
    save_stage_b_release,
    tiny_encoder,
    tiny_original,
    torchvision_features,
)
from wurst import CheckpointError, ConfigError, ModelNotFoundError
from wurst.models import effnet
from wurst.weights import image_encoder
from wurst.weights.keymaps import image_encoder_keys


@pytest.fixture(scope="module")
def published_release(tmp_path_factory):
    """The reference at the published size with every tensor random (BatchNorm running statistics and counters
    included), and a model_v2_stage_b.pt holding it."""
    ref = original_encoder(PUBLISHED_ENCODER, seed=3)
    return ref, save_stage_b_release(ref, tmp_path_factory.mktemp("release") / "model_v2_stage_b.pt")


@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
@torch.no_grad()
def test_encoder_matches_the_original_in_float32(published_release, size):
    ref, path = published_release
    ours = image_encoder.load_image_encoder(path)
    assert ours.config == effnet.EfficientNetConfig()  # read from the shapes: EfficientNetV2-S, 16 channels
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[1]))
    ref32 = ref(x)
    ref64 = ref.double()(x.double())
    ref.float()
    got = ours(x)
    assert got.shape == (2, 16, size[0] // 32, size[1] // 32)
    error, bound = relative_error(got, ref32), parity_bound(ref32, ref64)
    assert error <= bound, f"relative error {error:.2e} > bound {bound:.2e}"
    # The two images encode differently: the output is not just the mapper's BatchNorm bias.
    assert relative_error(got[0], got[1]) > 0.1


def test_the_tiny_reference_is_torchvisions_builder_at_another_config():
    """torchvision_features, the tiny reference's backbone, is torchvision's efficientnet_v2_s().features when
    given the published config: the same names and shapes, in the same order."""
    torchvision = pytest.importorskip("torchvision", reason="a test extra: pip install -e '.[test]'")
    with torch.device("meta"):
        published = torchvision.models.efficientnet_v2_s().features.state_dict()
        built = torchvision_features(PUBLISHED_ENCODER).state_dict()
    assert [(n, t.shape) for n, t in built.items()] == [(n, t.shape) for n, t in published.items()]


@pytest.mark.parametrize("config", [PUBLISHED_ENCODER, TINY_ENCODER], ids=["published", "tiny"])
def test_original_key_map_covers_the_release_layout(config):
    """Every tensor of the original layout (torchvision's names) has its place in wurst's module, with its shape,
    num_batches_tracked aside, and back again."""
    with torch.device("meta"):
        release = OriginalEncoder(config).state_dict()
        ours = {n: t.shape for n, t in effnet.EfficientNetEncoder(config).state_dict().items()}
    names = {n: t.shape for n, t in release.items() if not n.endswith("num_batches_tracked")}
    keys = image_encoder_keys(config)
    assert sorted(keys.to_module(n) for n in names) == sorted(ours)
    assert all(ours[keys.to_module(n)] == shape for n, shape in names.items())
    assert all(keys.to_checkpoint(keys.to_module(n)) == n for n in names)


@torch.no_grad()
def test_a_small_release_file_gives_its_own_config():
    state = original_state(tiny_original())
    assert image_encoder.original_config(state, "tiny") == TINY_ENCODER


@torch.no_grad()
def test_release_file_and_converted_folder_give_the_same_encoder(tmp_path):
    """The encoder read from a release file computes what the original model computes (to float32's own
    rounding), and its converted folder gives it back exactly."""
    ref = tiny_original()
    release = save_stage_b_release(ref, tmp_path / "model_v2_stage_b.pt")
    from_release = image_encoder.load_image_encoder(release)
    folder = image_encoder.save_converted(from_release, tmp_path / "converted")
    index = json.loads((folder / "wurst.json").read_text())
    assert index["models"][image_encoder.CONVERTED_NAME]["widths"] == list(TINY_ENCODER.widths)
    from_folder = image_encoder.load_image_encoder(folder)
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(0))
    expected = ref(x)
    exact = ref.double()(x.double())
    got = from_release(x)
    assert got.shape == (2, 16, 3, 2)
    assert relative_error(got, expected) <= parity_bound(expected, exact)
    assert torch.equal(from_folder(x), got)
    assert expected.std() > 0.05 and relative_error(expected[0], expected[1]) > 0.1  # images encode differently
    bf16 = image_encoder.load_image_encoder(folder, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_adding_the_encoder_keeps_a_folder_index(tmp_path):
    (tmp_path / "wurst.json").write_text(json.dumps({"format": "wurst", "version": 1, "kind": "prior",
                                                      "models": {"stage_c": {}}}))
    image_encoder.save_converted(tiny_encoder(), tmp_path)
    index = json.loads((tmp_path / "wurst.json").read_text())
    assert index["kind"] == "prior" and set(index["models"]) == {"stage_c", image_encoder.CONVERTED_NAME}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage_c_encoder.safetensors", "wurst.json"]


# ---------------------------------------------------------------------------------------------------------
# Refusals, each one line


def test_refusals(tmp_path):
    stage_b_only = tmp_path / "stage_b_only.pt"
    torch.save({"state_dict": {"clip_mapper.weight": torch.zeros(2)}}, stage_b_only)
    cases = [
        (stage_b_only, CheckpointError, "holds no Stage C image encoder: expected a dict of tensors under "
                                        "'effnet_state_dict'"),
        (tmp_path / "missing.pt", ModelNotFoundError, "image encoder file not found"),
        (tmp_path, ModelNotFoundError, "holds no Stage C image encoder: expected wurst.json"),
    ]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    cases.append((garbage, CheckpointError, "garbage.pt"))
    lacking = {k: v for k, v in original_state(tiny_original()).items() if k != "mapper.1.running_var"}
    torch.save({"effnet_state_dict": lacking}, tmp_path / "lacking.pt")
    cases.append((tmp_path / "lacking.pt", CheckpointError, "missing tensor 'mapper.1.running_var'"))
    for ref, error, message in cases:
        with pytest.raises(error) as caught:
            image_encoder.load_image_encoder(ref)
        assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_a_release_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model_v2_stage_b.pt"
    torch.save({"effnet_state_dict": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="weights-only loading refuses"):
        image_encoder.load_image_encoder(path)
    assert not marker.exists()


def test_a_bad_converted_config_is_named(tmp_path):
    image_encoder.save_converted(tiny_encoder(), tmp_path)
    index = json.loads((tmp_path / "wurst.json").read_text())
    index["models"]["stage_c_encoder"]["depths"] = [1, 2]
    (tmp_path / "wurst.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="one entry per stage"):
        image_encoder.load_image_encoder(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# The published encoder through the Hugging Face cache


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE with a Hugging Face cache and a wurst cache of this test's own, both empty."""
    from huggingface_hub import constants

    hub = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads the environment at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("WURST_CACHE", str(tmp_path / "wurst-cache"))
    return hub


def cache_release(hub, model) -> None:
    """model_v2_stage_b.pt of dome272/wuerstchen in the Hugging Face cache layout."""
    commit = "1" * 40
    repo = hub / "models--dome272--wuerstchen"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_stage_b_release(model, repo / "snapshots" / commit / "model_v2_stage_b.pt")


@torch.no_grad()
def test_fetched_once_then_reused_without_the_hub(offline, tmp_path):
    model = tiny_original(seed=5)
    cache_release(offline, model)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    fetched = image_encoder.fetch_image_encoder()(x)
    expected = model(x)
    assert relative_error(fetched, expected) <= parity_bound(expected, model.double()(x.double()))
    extracted = tmp_path / "wurst-cache" / "image_encoder" / "dome272--wuerstchen"
    assert image_encoder.has_converted(extracted)
    for path in sorted(offline.rglob("*"), reverse=True):  # the hub file is gone: the extracted copy serves
        path.unlink() if not path.is_dir() or path.is_symlink() else path.rmdir()
    assert torch.equal(image_encoder.fetch_image_encoder()(x), fetched)


def test_offline_without_the_file_names_it_and_the_download_command(offline):
    with pytest.raises(ModelNotFoundError) as caught:
        image_encoder.fetch_image_encoder()
    message = str(caught.value)
    assert "model_v2_stage_b.pt" in message and "`hf download dome272/wuerstchen model_v2_stage_b.pt`" in message
    assert "\n" not in message
    assert not os.path.exists(offline.parent / "wurst-cache" / "image_encoder" / "dome272--wuerstchen")
