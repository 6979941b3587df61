"""Loader core: references, configs, memory-mapped safetensors, key maps, and the errors they raise."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from wurst import CheckpointError, CLIPTextConfig, ConfigError, ModelNotFoundError, load_clip_text_encoder
from wurst.models.clip import CLIPTextEncoder
from wurst.weights.configs import read_config
from wurst.weights.keymaps import CLIP_TEXT_KEYS, KeyMap
from wurst.weights.load import load_module
from wurst.weights.safetensors_io import read_safetensors, read_weights, weight_files, write_safetensors


@pytest.fixture
def encoder_dir(tmp_path, tiny_prior_repo):
    folder = tmp_path / "text_encoder"
    shutil.copytree(tiny_prior_repo / "text_encoder", folder)
    return folder


def rewrite(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_read_safetensors_matches_the_reference_reader(encoder_dir):
    ours = read_safetensors(encoder_dir / "model.safetensors")
    ref = load_file(encoder_dir / "model.safetensors")
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].dtype == ref[name].dtype and torch.equal(ours[name], ref[name]), name


def test_no_tensor_is_copied_whatever_its_alignment(tmp_path):
    # Sizes chosen so that most tensors start off a 64-byte boundary in a file written by safetensors itself.
    state = {f"t{i}": torch.randn(n) for i, n in enumerate([3, 16, 5, 64, 7, 1000, 1, 33])}
    save_file(state, tmp_path / "odd.safetensors")
    ours = read_safetensors(tmp_path / "odd.safetensors")
    assert all(torch.equal(t, state[n]) for n, t in ours.items())
    assert any(t.data_ptr() % 64 for t in ours.values())  # so the next line covers misaligned tensors
    # Views of one mapping of the file: each tensor sits at its header offset from the others.
    raw = (tmp_path / "odd.safetensors").read_bytes()
    offsets = {n: v["data_offsets"][0] for n, v in json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")]).items()}
    base = ours["t0"].data_ptr() - offsets["t0"]
    assert all(t.data_ptr() - base == offsets[n] for n, t in ours.items())
    # wurst's writer (the converter's and the cast copies') puts tensors of suitable sizes on 64-byte boundaries, in
    # a valid safetensors file.
    with open(tmp_path / "aligned.safetensors", "wb") as f:
        write_safetensors(f, state)
    assert load_file(tmp_path / "aligned.safetensors").keys() == state.keys()
    mapped = read_safetensors(tmp_path / "aligned.safetensors")
    assert mapped["t3"].data_ptr() == mapped["t1"].data_ptr() + 64  # written first, back to back in the mapping
    assert all(torch.equal(t, state[n]) for n, t in mapped.items())
    assert all(t.data_ptr() % 64 == 0 for t in mapped.values() if t.nbytes % 64 == 0)


def test_loaded_parameters_are_the_mapped_file_not_copies(encoder_dir):
    state = read_weights([encoder_dir / "model.safetensors"])
    cfg = read_config(CLIPTextConfig, encoder_dir / "config.json")
    model = load_module(lambda: CLIPTextEncoder(cfg), state, CLIP_TEXT_KEYS, "test")
    weight = model.token_embedding.weight
    assert weight.data_ptr() == state["text_model.embeddings.token_embedding.weight"].data_ptr()
    before = (encoder_dir / "model.safetensors").read_bytes()
    with torch.no_grad():
        weight.add_(1.0)  # copy-on-write: the file itself never changes
    assert (encoder_dir / "model.safetensors").read_bytes() == before


def test_dtype_cast_happens_per_tensor(encoder_dir):
    model = load_clip_text_encoder(encoder_dir, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_key_map_round_trip():
    keys = KeyMap([("a.layers.{}.w.{}", "blocks.{}.weight_{}")], ignore=["a.buffer"], optional_prefix="a.")
    assert keys.to_module("a.layers.3.w.bias") == "blocks.3.weight_bias"
    assert keys.to_module("layers.3.w.bias") == "blocks.3.weight_bias"  # prefix optional
    assert keys.to_checkpoint("blocks.3.weight_bias") == "a.layers.3.w.bias"
    assert keys.to_module("a.other") is None
    assert keys.ignored("a.buffer") and keys.ignored("buffer")


def test_missing_tensor_is_named(encoder_dir):
    rewrite(encoder_dir, lambda s: s.pop("text_model.encoder.layers.1.mlp.fc1.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'text_model.encoder.layers.1.mlp.fc1.weight' \(shape"):
        load_clip_text_encoder(encoder_dir)


def test_unexpected_tensor_is_named(encoder_dir):
    rewrite(encoder_dir, lambda s: s.__setitem__("text_model.encoder.layers.9.mlp.fc1.weight", torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'text_model.encoder.layers.9.mlp.fc1.weight'"):
        load_clip_text_encoder(encoder_dir)


def test_misshaped_tensor_is_named_with_expected_shape(encoder_dir):
    rewrite(encoder_dir, lambda s: s.__setitem__("text_model.final_layer_norm.weight", torch.ones(7)))
    with pytest.raises(CheckpointError, match=r"'text_model.final_layer_norm.weight' has shape \(7\), expected \(32\)"):
        load_clip_text_encoder(encoder_dir)


@pytest.mark.parametrize("prefix", ["text_model.", ""], ids=["transformers4", "transformers5"])
def test_position_ids_buffer_is_ignored(encoder_dir, prefix):
    """Older exports write the position-id buffer (arange(77)): it loads as if absent, under either naming, and
    reaches no tensor of the model (here it holds other numbers, which would show)."""
    plain = load_clip_text_encoder(encoder_dir).state_dict()
    plain = {name: tensor.clone() for name, tensor in plain.items()}
    rewrite(encoder_dir, lambda s: s.__setitem__(f"{prefix}embeddings.position_ids", torch.arange(77)[None].flip(1)))
    assert f"{prefix}embeddings.position_ids" in load_file(encoder_dir / "model.safetensors")
    state = load_clip_text_encoder(encoder_dir).state_dict()
    assert state.keys() == plain.keys()
    assert all(torch.equal(state[name], plain[name]) for name in plain)


def test_truncated_file_is_named(encoder_dir):
    path = encoder_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated or corrupt: tensor '.*' lies outside"):
        load_clip_text_encoder(encoder_dir)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        load_clip_text_encoder(encoder_dir)


def test_corrupt_header_is_named(encoder_dir):
    path = encoder_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_clip_text_encoder(encoder_dir)


def test_bad_config_json_and_missing_field(encoder_dir):
    config = encoder_dir / "config.json"
    good = json.loads(config.read_text())
    config.write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON"):
        load_clip_text_encoder(encoder_dir)
    config.write_text(json.dumps({k: v for k, v in good.items() if k != "num_hidden_layers"}))
    with pytest.raises(ConfigError, match=r"config.json lacks the field 'num_hidden_layers'"):
        load_clip_text_encoder(encoder_dir)


def test_missing_weights_and_missing_shard(encoder_dir):
    (encoder_dir / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="expected model.safetensors or its sharded form"):
        weight_files(encoder_dir, "model")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (encoder_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError, match="names the shard model-00001-of-00002.safetensors, which is missing"):
        load_clip_text_encoder(encoder_dir)


# ---------------------------------------------------------------------------------------------------------
# Cast copies ($WURST_CACHE/<dtype>/): written on the first load in another dtype, mapped afterwards


@pytest.fixture
def cast_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WURST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "bfloat16"


def load_bf16(folder):
    return load_clip_text_encoder(folder, dtype=torch.bfloat16)


def assert_is_the_cast_source(model, folder):
    """Every parameter equals the float32 file's tensor cast to bfloat16, as load_module's in-memory cast gives."""
    source = load_file(folder / "model.safetensors")
    for name, param in model.state_dict().items():
        expected = source[CLIP_TEXT_KEYS.to_checkpoint(name)]
        assert param.dtype == torch.bfloat16 and torch.equal(param, expected.to(torch.bfloat16)), name


def test_first_load_writes_the_copy_and_later_loads_map_it(encoder_dir, cast_cache, monkeypatch):
    import wurst.weights.cast_copies
    import wurst.weights.safetensors_io

    model = load_bf16(encoder_dir)
    copies = list(cast_cache.iterdir())
    assert [p.suffix for p in copies] == [".safetensors"]  # one copy, no temporary left
    assert_is_the_cast_source(model, encoder_dir)
    assert all(d == torch.bfloat16 for d, _ in wurst.weights.safetensors_io.read_header(copies[0]).values())

    def no_cast(*args, **kwargs):
        raise AssertionError("the copy was written again")

    monkeypatch.setattr(wurst.weights.cast_copies, "_write_cast_copy", no_cast)
    assert_is_the_cast_source(load_bf16(encoder_dir), encoder_dir)
    # The weights come from the copy, not from a cast in memory: a value changed in the copy's data shows.
    with open(copies[0], "r+b") as f:
        f.seek(copies[0].stat().st_size - 2)  # the last element of the last tensor in the file
        f.write(torch.tensor([123.0], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
    marked = [t for t in load_bf16(encoder_dir).state_dict().values() if t.flatten()[-1].item() == 123.0]
    assert len(marked) == 1


def test_the_copy_has_the_mode_of_any_new_file(encoder_dir, cast_cache):
    """The copy is readable as the umask allows (0644 under the usual 022), like the cache's other files, and not
    private to its writer (a temporary file's 0600)."""
    import stat

    load_bf16(encoder_dir)
    (copy,) = cast_cache.iterdir()
    plain = cast_cache / "plain"
    plain.write_text("a file made as any program makes one")
    assert stat.S_IMODE(copy.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_changed_source_is_cast_again(encoder_dir, cast_cache):
    load_bf16(encoder_dir)
    rewrite(encoder_dir, lambda state: state["text_model.final_layer_norm.weight"].add_(1.0))
    model = load_bf16(encoder_dir)
    assert_is_the_cast_source(model, encoder_dir)
    assert len(list(cast_cache.iterdir())) == 1  # the old copy was replaced, not kept beside


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_a_damaged_or_deleted_copy_is_rewritten(encoder_dir, cast_cache, damage):
    load_bf16(encoder_dir)
    (copy,) = cast_cache.iterdir()
    if damage == "truncate":
        copy.write_bytes(copy.read_bytes()[: copy.stat().st_size // 2])
    elif damage == "garbage":
        copy.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    else:
        copy.unlink()
    assert_is_the_cast_source(load_bf16(encoder_dir), encoder_dir)
    assert [p.name for p in cast_cache.iterdir()] == [copy.name]


def test_unwritable_cache_casts_in_memory(encoder_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("WURST_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="could not write the bfloat16 copy .* casting in memory"):
        model = load_bf16(encoder_dir)
    assert_is_the_cast_source(model, encoder_dir)


def test_a_failed_write_leaves_no_file(encoder_dir, cast_cache, monkeypatch):
    import wurst.weights.cast_copies

    def full_disk(f, tensors, **kwargs):
        f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wurst.weights.cast_copies, "write_safetensors", full_disk)
    with pytest.warns(UserWarning, match="No space left on device"):
        model = load_bf16(encoder_dir)
    assert_is_the_cast_source(model, encoder_dir)
    assert list(cast_cache.iterdir()) == []


def test_no_copy_when_the_file_is_already_in_the_dtype(encoder_dir, cast_cache):
    load_clip_text_encoder(encoder_dir, dtype=torch.float32)
    rewrite(encoder_dir, lambda state: state.update({k: v.to(torch.bfloat16) for k, v in state.items()
                                                     if v.is_floating_point()}))
    load_bf16(encoder_dir)
    assert not cast_cache.exists()
