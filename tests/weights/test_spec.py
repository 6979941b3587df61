"""wurst/weights/spec.py, the component table: each entry's key map covers exactly its module's state on the tiny
fixtures' files (every checkpoint name maps to a module name, every module name back to the checkpoint name that
maps to it); load_component fills the module with the file's tensors; check_against_weights passes a config that
fits the file, names the field of one that does not, and the tensor of a damaged file, reading no tensor data;
and the converted layout (files under the module's own names, converted=True)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import edit_weights
from tools import hub_fixtures
from wurst import CheckpointError, ConfigError
from wurst.models import clip, stage_a, stage_b, stage_c
from wurst.weights import spec
from wurst.weights.safetensors_io import read_headers, weight_files

REPO_OF = {"prior": "prior", "text_encoder": "prior", "decoder": "decoder", "vqgan": "decoder"}


def component(name: str):
    """(folder, config, weight files) of component `name` of the tiny fixture."""
    folder = hub_fixtures.ensure("tiny", REPO_OF[name]) / name
    return folder, spec.hub_config(name, folder), weight_files(folder, spec.COMPONENTS[name].file_stem)


def test_the_table_holds_the_four_models_of_a_wuerstchen_repository():
    expected = {"prior": (stage_c.StageCConfig, stage_c.StageC, "stage_c", "diffusion_pytorch_model"),
                "decoder": (stage_b.StageBConfig, stage_b.StageB, "stage_b", "diffusion_pytorch_model"),
                "vqgan": (stage_a.StageAConfig, stage_a.StageA, "stage_a", "diffusion_pytorch_model"),
                "text_encoder": (clip.CLIPTextConfig, clip.CLIPTextEncoder, "text_encoder", "model")}
    assert {name: (s.config_cls, s.model_cls, s.converted_name, s.file_stem) for name, s in spec.COMPONENTS.items()} \
        == expected
    assert all(s.folder == name for name, s in spec.COMPONENTS.items())  # diffusers' attribute, the hub folder


@pytest.mark.parametrize("name", list(spec.COMPONENTS))
def test_the_key_map_covers_exactly_the_module_state(name):
    _, config, files = component(name)
    key_map = spec.COMPONENTS[name].key_map
    in_file = read_headers(files)
    module = spec.expected_state(spec.COMPONENTS[name].model_cls, config)
    forward = {n: key_map.to_module(n) for n in in_file if not key_map.ignored(n)}
    assert None not in forward.values(), [n for n, m in forward.items() if m is None]
    assert sorted(forward.values()) == sorted(module)  # onto the module's state, and one to one
    for module_name, tensor in module.items():
        checkpoint_name = key_map.to_checkpoint(module_name)
        assert checkpoint_name in in_file, module_name
        assert key_map.to_module(checkpoint_name) == module_name
        assert tuple(in_file[checkpoint_name][1]) == tuple(tensor.shape), module_name


@pytest.mark.parametrize("name", list(spec.COMPONENTS))
def test_load_component_fills_the_module_with_the_file_tensors(name, tmp_path, monkeypatch):
    monkeypatch.setenv("WURST_CACHE", str(tmp_path / "cache"))
    _, config, files = component(name)
    key_map = spec.COMPONENTS[name].key_map
    (path,) = files
    source = load_file(path)
    model = spec.load_component(name, config=config, files=files)
    assert type(model) is spec.COMPONENTS[name].model_cls and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    state = model.state_dict()
    assert all(torch.equal(t, source[key_map.to_checkpoint(n)]) for n, t in state.items())
    half = spec.load_component(name, config=config, files=files, dtype=torch.bfloat16, device="cpu")
    for n, t in half.state_dict().items():
        expected = source[key_map.to_checkpoint(n)]
        assert torch.equal(t, expected.bfloat16() if expected.is_floating_point() else expected), n


# ---------------------------------------------------------------------------------------------------------
# check_against_weights


@pytest.mark.parametrize("name", list(spec.COMPONENTS))
def test_a_config_that_fits_its_file_passes(name):
    folder, config, files = component(name)
    assert spec.check_against_weights(name, config=config, files=files, config_source="config.json") is None


@pytest.mark.parametrize("name, field, value, message", [
    ("prior", "depth", 3, "the field 'depth' is 3, but {file} holds 2 (6 blocks: blocks.0 to blocks.5)"),
    ("decoder", "clip_embd", 48, "the field 'clip_embd' is 48, but {file} holds 24 ('text_proj.weight' has shape "
                                 "(32, 24))"),
    ("vqgan", "num_vq_embeddings", 128, "the field 'num_vq_embeddings' is 128, but {file} holds 64 "
                                        "('codebook.weight' has shape (64, 4))"),
    ("text_encoder", "hidden_size", 64, "the field 'hidden_size' is 64, but {file} holds 32 "
                                        "('token_embedding.weight' has shape (49408, 32))"),
], ids=["prior-depth", "decoder-clip_embd", "vqgan-num_vq_embeddings", "text_encoder-hidden_size"])
def test_a_config_that_does_not_fit_names_the_field_and_what_the_file_holds(name, field, value, message):
    folder, config, files = component(name)
    with pytest.raises(ConfigError) as info:
        spec.check_against_weights(name, config=dataclasses.replace(config, **{field: value}), files=files,
                                   config_source=str(folder / "config.json"))
    assert str(info.value) == f"{folder / 'config.json'}: " + message.format(file=files[0])


def test_an_absurd_depth_is_refused_before_anything_is_built(monkeypatch):
    """10^9 blocks would take hours to build even on the meta device: the header check comes first."""
    _, config, files = component("prior")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked against the header")

    monkeypatch.setattr(spec, "expected_state", refuse)
    with pytest.raises(ConfigError, match="the field 'depth' is 1000000000"):
        spec.check_against_weights("prior", config=dataclasses.replace(config, depth=10**9), files=files,
                                   config_source="config.json")


def test_a_misshaped_tensor_is_named_as_the_file_names_it(tmp_path):
    """A tensor the header check does not read, the wrong shape: the tensor-by-tensor comparison names it."""
    folder, config, files = component("prior")
    copy = tmp_path / "prior.safetensors"
    shutil.copy(files[0], copy)
    edit_weights(copy, lambda s: s.__setitem__("blocks.3.channelwise.0.weight", torch.zeros(8, 32)))
    with pytest.raises(CheckpointError, match=r"'blocks.3.channelwise.0.weight' has shape \(8, 32\), expected "
                                              r"\(128, 32\)"):
        spec.check_against_weights("prior", config=config, files=[copy], config_source="config.json")


def test_no_tensor_data_is_read(tmp_path):
    """The check reads headers only: a file whose tensor bytes are all garbage (its header intact) passes it."""
    _, config, files = component("vqgan")
    copy = tmp_path / "vqgan.safetensors"
    data = bytearray(files[0].read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[header_end:] = b"\xff" * (len(data) - header_end)  # NaN in every float32
    copy.write_bytes(bytes(data))
    spec.check_against_weights("vqgan", config=config, files=[copy], config_source="config.json")
    assert torch.isnan(load_file(copy)["vquantizer.embedding.weight"]).all()


# ---------------------------------------------------------------------------------------------------------
# The converted layout: the module's own names


@pytest.mark.parametrize("name", list(spec.COMPONENTS))
def test_converted_files_check_and_load_under_the_module_names(name, tmp_path):
    _, config, files = component(name)
    hub_model = spec.load_component(name, config=config, files=files)
    converted = tmp_path / f"{spec.COMPONENTS[name].converted_name}.safetensors"
    save_file({n: t.contiguous() for n, t in hub_model.state_dict().items()}, converted)
    spec.check_against_weights(name, config=config, files=[converted], converted=True, config_source="wurst.json")
    model = spec.load_component(name, config=config, files=[converted], converted=True)
    assert model.state_dict().keys() == hub_model.state_dict().keys()
    assert all(torch.equal(t, hub_model.state_dict()[n]) for n, t in model.state_dict().items())
    # Each layout read as the other is refused: the hub file's names are not the module's (by the header check,
    # which then finds no layers where the config has some, or by the tensor comparison) ...
    with pytest.raises((ConfigError, CheckpointError)) as info:
        spec.check_against_weights(name, config=config, files=files, converted=True, config_source="wurst.json")
    assert str(files[0]) in str(info.value) and "\n" not in str(info.value)
    # ... and the converted file's names are not the hub's.
    with pytest.raises(CheckpointError, match="unexpected tensor|missing tensor"):
        spec.load_component(name, config=config, files=[converted])


def test_describe_names_one_file_or_the_folder_and_its_shard_count(tmp_path):
    one = tmp_path / "model.safetensors"
    shards = [tmp_path / f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert spec.describe([one]) == str(one)
    assert spec.describe(shards) == f"{tmp_path} (3 shards)"


def test_load_hub_component_checks_the_config_against_the_file_first(tmp_path):
    folder, _, _ = component("vqgan")
    copy = tmp_path / "vqgan"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "embed_dim": 32}))
    with pytest.raises(ConfigError, match=rf"^{copy / 'config.json'}: the field 'embed_dim' is 32, but .* holds 16"):
        spec.load_stage_a(copy)
    assert isinstance(spec.load_stage_a(folder), stage_a.StageA)
