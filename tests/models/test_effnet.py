"""wurst/effnet.py: Stage C's image encoder against the original EfficientNetEncoder (torchvision's
efficientnet_v2_s().features plus the mapper) on random weights in the release layout; its configs read from the
weights; wurst's converted layout; fetching from the hub file through the Hugging Face cache; refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from tests.helpers import RunsCode, parity_bound, relative_error
from tests.support.image_fixtures import TINY_ENCODER, original_state, save_stage_b_release, tiny_encoder
from tools import hub_fixtures
from wurst import CheckpointError, ConfigError, ModelNotFoundError
from wurst.models import effnet
from wurst.weights import image_encoder
from wurst.weights.keymaps import image_encoder_keys


class OriginalEncoder(nn.Module):
    """The original EfficientNetEncoder (Würstchen v2's Stage C image encoder), as the release's key layout has
    it: `backbone` is torchvision's efficientnet_v2_s().features, `mapper` a 1x1 conv and a BatchNorm2d."""

    def __init__(self, c_latent: int = 16):
        super().__init__()
        # torchvision is a test extra (tools/torchvision_cpu.py lets its CUDA wheel import beside the CPU torch).
        torchvision = pytest.importorskip("torchvision", reason="a test extra: pip install -e '.[test]'")
        self.backbone = torchvision.models.efficientnet_v2_s().features
        self.mapper = nn.Sequential(nn.Conv2d(1280, c_latent, kernel_size=1, bias=False), nn.BatchNorm2d(c_latent))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.backbone(x))


@torch.no_grad()
def randomize_batch_norms_(model: nn.Module, seed: int) -> None:
    """Running statistics at a random offset from the statistics the layers really see. Drawn blindly, they would
    leave each channel's mean far from zero, and the encoder's output would be mostly the mapper's shift, the
    same for every image; a trained network's are near the real ones. So: measure each BatchNorm's input
    statistics on random images (a train-mode pass with a cumulative average), then move every mean by
    N(0, 0.1²)·std and scale every variance by U(0.8, 1.25)."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    model(torch.randn(4, 3, 128, 128, generator=generator))
    model.eval()
    for norm in norms:
        std = norm.running_var.sqrt()
        norm.running_mean += 0.1 * std * torch.randn(std.shape, generator=generator)
        norm.running_var *= torch.empty(std.shape).uniform_(0.8, 1.25, generator=generator)
        norm.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=generator)))


@pytest.fixture(scope="module")
def published_release(tmp_path_factory):
    """The reference at the published size with every tensor random (BatchNorm running statistics and counters
    included), and a model_v2_stage_b.pt holding it."""
    ref = OriginalEncoder().eval()
    hub_fixtures.randomize_(ref, 3)
    randomize_batch_norms_(ref, 4)
    path = tmp_path_factory.mktemp("release") / "model_v2_stage_b.pt"
    torch.save({"state_dict": {"clip_mapper.weight": torch.zeros(2, 2)}, "effnet_state_dict": ref.state_dict()}, path)
    return ref, path


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


def test_original_key_map_covers_the_release_layout(published_release):
    """Every tensor of the original layout has its place, num_batches_tracked aside, and back again."""
    ref, _ = published_release
    keys = image_encoder_keys(effnet.EfficientNetConfig())
    names = [n for n in ref.state_dict() if not n.endswith("num_batches_tracked")]
    with torch.device("meta"):
        ours = set(effnet.EfficientNetEncoder(effnet.EfficientNetConfig()).state_dict())
    assert sorted(keys.to_module(n) for n in names) == sorted(ours)
    assert all(keys.to_checkpoint(keys.to_module(n)) == n for n in names)


@torch.no_grad()
def test_a_small_release_file_gives_its_own_config():
    model = tiny_encoder()
    state = original_state(model)
    assert image_encoder.original_config(state, "tiny") == TINY_ENCODER


@torch.no_grad()
def test_release_file_and_converted_folder_give_the_same_encoder(tmp_path):
    model = tiny_encoder()
    release = save_stage_b_release(model, tmp_path / "model_v2_stage_b.pt")
    from_release = image_encoder.load_image_encoder(release)
    folder = image_encoder.save_converted(from_release, tmp_path / "converted")
    index = json.loads((folder / "wurst.json").read_text())
    assert index["models"][image_encoder.CONVERTED_NAME]["widths"] == list(TINY_ENCODER.widths)
    from_folder = image_encoder.load_image_encoder(folder)
    x = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(0))
    expected = model(x)
    assert torch.equal(from_release(x), expected) and torch.equal(from_folder(x), expected)
    assert expected.std() > 0.05
    bf16 = image_encoder.load_image_encoder(folder, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_adding_the_encoder_keeps_a_folder_index(tmp_path):
    (tmp_path / "wurst.json").write_text(json.dumps({"format": "wurst", "kind": "prior", "models": {"stage_c": {}}}))
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
    lacking = {k: v for k, v in original_state(tiny_encoder()).items() if k != "mapper.1.running_var"}
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
    model = tiny_encoder(seed=5)
    cache_release(offline, model)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    assert torch.equal(image_encoder.fetch_image_encoder()(x), model(x))
    extracted = tmp_path / "wurst-cache" / "image_encoder" / "dome272--wuerstchen"
    assert image_encoder.has_converted(extracted)
    for path in sorted(offline.rglob("*"), reverse=True):  # the hub file is gone: the extracted copy serves
        path.unlink() if not path.is_dir() or path.is_symlink() else path.rmdir()
    assert torch.equal(image_encoder.fetch_image_encoder()(x), model(x))


def test_offline_without_the_file_names_it_and_the_download_command(offline):
    with pytest.raises(ModelNotFoundError) as caught:
        image_encoder.fetch_image_encoder()
    message = str(caught.value)
    assert "model_v2_stage_b.pt" in message and "`hf download dome272/wuerstchen model_v2_stage_b.pt`" in message
    assert "\n" not in message
    assert not os.path.exists(offline.parent / "wurst-cache" / "image_encoder" / "dome272--wuerstchen")
