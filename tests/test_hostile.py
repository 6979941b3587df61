"""Damaged and hostile inputs through the CLI: integer weights, negative, zero and absurd config values, configs that
do not match their weights, config and tokenizer files that are not what they claim (a named pipe, a link to
/dev/zero, too large, a tokenizer of another model), sizes and image counts that cannot fit in memory, seeds out of
range, and devices this machine lacks. Each ends in one line naming the culprit (a config field and what the file
holds, a tensor, the memory needed and what would fit, the devices that are there), exit 2, no traceback, no file,
and no hang (an absurd depth is refused from the safetensors header, before any model is built). The
refusals of damaged files kept from before (truncated, corrupt headers, missing tensors, ...) are in
tests/weights/test_repository.py; the other surfaces' hostile inputs in tests/test_hostile_images.py,
test_hostile_prompts.py, test_hostile_job_folders.py, test_hostile_safetensors.py and test_hostile_converter.py."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import wurst
from tests.helpers import (
    ONE_STEP,
    SHORT_PROMPT,
    WEIGHTS,
    assert_one_line_error,
    edit_weights,
    fingerprint,
    not_a_regular_file,
    run_cli,
    run_module,
)
from tools import convert_weights
from wurst import ArgumentError, CheckpointError, ConfigError
from wurst.weights.configs import read_config
from wurst.weights.image_encoder import load_image_encoder
from wurst.weights.keymaps import CLIP_TEXT_KEYS
from wurst.weights.load import load_module
from wurst.weights.safetensors_io import read_weights

# The hang guard: a refusal takes about a second, a hang or a model built at an absurd size far longer. Generous, as
# on a loaded machine (the suite's first run writes 18 GB of fixtures) a refusal can take several seconds; that
# an absurd size is refused before any module is built is checked directly (test_absurd_depth_is_refused_...).
SECONDS = 60


def set_config(component: str, **values):
    """A damage: component/config.json with some fields replaced."""

    def damage(repo: Path) -> str:
        path = repo / component / "config.json"
        config = json.loads(path.read_text())
        config.update(values)
        path.write_text(json.dumps(config))
        return path.parent

    return damage


def set_json(relative: str, **values):
    def damage(repo: Path) -> str:
        path = repo / relative
        data = json.loads(path.read_text())
        data.update(values)
        path.write_text(json.dumps(data))
        return path.parent

    return damage


def integer_tensor(component: str, name: str, dtype: torch.dtype):
    """A damage: one weight stored as integers (same shape)."""

    def damage(repo: Path) -> str:
        path = repo / component / (WEIGHTS if component != "text_encoder" else "model.safetensors")
        edit_weights(path, lambda state: state.__setitem__(name, state[name].round().to(dtype)))
        return path.parent

    return damage


def shrink_text_encoder(embedding: str, rows: int):
    """A damage: the text encoder's token or position embedding cut to `rows`, its config saying so."""

    def damage(repo: Path) -> Path:
        name = f"text_model.embeddings.{embedding}.weight"
        edit_weights(repo / "text_encoder" / "model.safetensors",
                     lambda state: state.__setitem__(name, state[name][:rows].clone()))
        field = "vocab_size" if embedding == "token_embedding" else "max_position_embeddings"
        return set_config("text_encoder", **{field: rows})(repo)

    return damage


# case: (repository, damage, the text the one error line must hold). A damage returns the folder it changed;
# {config} and {weights} stand for its config.json and its weight file.
HOSTILE = {
    # Weights of the wrong type
    "prior-int64-weight": ("prior", integer_tensor("prior", "projection.weight", torch.int64),
                           "{weights}: tensor 'projection.weight' holds int64 where a floating weight belongs"),
    "text-encoder-int32-embedding": ("decoder", integer_tensor("text_encoder",
                                                               "text_model.embeddings.token_embedding.weight",
                                                               torch.int32),
                                     "'text_model.embeddings.token_embedding.weight' holds int32 where a floating"),
    "vqgan-uint8-codebook": ("decoder", integer_tensor("vqgan", "vquantizer.embedding.weight", torch.uint8),
                             "'vquantizer.embedding.weight' holds uint8 where a floating weight belongs"),
    "decoder-bool-weight": ("decoder", integer_tensor("decoder", "clf.1.weight", torch.bool),
                            "'clf.1.weight' holds bool where a floating weight belongs"),
    # Negative, zero and absurd config values
    "prior-negative-width": ("prior", set_config("prior", c=-32), "{config}: the field 'c' must be positive, got -32"),
    "prior-zero-heads": ("prior", set_config("prior", nhead=0),
                         "{config}: the field 'nhead' (0) must be a positive divisor of 'c' (32)"),
    "prior-heads-not-dividing": ("prior", set_config("prior", nhead=3), "the field 'nhead' (3) must be a positive"),
    "prior-zero-depth": ("prior", set_config("prior", depth=0), "the field 'depth' must be positive, got 0"),
    "prior-depth-1e9": ("prior", set_config("prior", depth=10**9),
                        "{config}: the field 'depth' is 1000000000, but {weights} holds 2"),
    "prior-c-r-too-small": ("prior", set_config("prior", c_r=2), "the field 'c_r' must be at least 4, got 2"),
    "decoder-blocks-1e9": ("decoder", set_config("decoder", blocks=[1, 1, 10**9, 1]),
                           "the field 'blocks[2]' is 1000000000, but"),
    "decoder-negative-level-width": ("decoder", set_config("decoder", c_hidden=[16, -32, 32, 32]),
                                     "the field 'c_hidden' must be positive, got (16, -32, 32, 32)"),
    "decoder-zero-heads": ("decoder", set_config("decoder", nhead=[-1, 0, 2, 2]),
                           "the field 'nhead[1]' (0) must be a positive divisor of 'c_hidden[1]' (32)"),
    "decoder-even-kernel": ("decoder", set_config("decoder", kernel_size=4), "the field 'kernel_size' must be odd"),
    "decoder-zero-patch": ("decoder", set_config("decoder", patch_size=0), "the field 'patch_size' must be positive"),
    "vqgan-levels-1e9": ("decoder", set_config("vqgan", levels=10**9), "the field 'levels' is 1000000000, but"),
    "vqgan-zero-scale": ("decoder", set_config("vqgan", scale_factor=0.0), "the field 'scale_factor' must be"),
    "vqgan-nan-scale": ("decoder", set_config("vqgan", scale_factor=float("nan")),
                        "the field 'scale_factor' must be finite"),
    "vqgan-negative-bottleneck": ("decoder", set_config("vqgan", bottleneck_blocks=-1),
                                  "the field 'bottleneck_blocks' must be 0 or more"),
    "text-encoder-layers-1e9": ("prior", set_config("text_encoder", num_hidden_layers=10**9),
                                "the field 'num_hidden_layers' is 1000000000, but"),
    "text-encoder-zero-heads": ("prior", set_config("text_encoder", num_attention_heads=0),
                                "the field 'num_attention_heads' (0) must be a positive divisor"),
    "text-encoder-negative-vocab": ("decoder", set_config("text_encoder", vocab_size=-5),
                                    "the field 'vocab_size' must be positive, got -5"),
    "text-encoder-infinite-eps": ("decoder", set_config("text_encoder", layer_norm_eps=float("inf")),
                                  "the field 'layer_norm_eps' must be finite"),
    "text-encoder-unknown-activation": ("prior", set_config("text_encoder", hidden_act="relu"),
                                        "the field 'hidden_act' must be one of ['gelu', 'quick_gelu'], got 'relu'"),
    "prior-zero-resolution-multiple": ("prior", set_json("model_index.json", resolution_multiple=0),
                                       "the field 'resolution_multiple' must be finite and at least 1.0, got 0"),
    "decoder-negative-latent-scale": ("decoder", set_json("model_index.json", latent_dim_scale=-10.67),
                                      "the field 'latent_dim_scale' must be finite and at least 1.0"),
    "scheduler-negative-offset": ("prior", set_json("scheduler/scheduler_config.json", s=-1),
                                  "the field 's' must be finite and at least 0.0, got -1"),
    # Configs that do not match their weights
    "prior-text-width-mismatch": ("prior", set_config("prior", c_cond=64),
                                  "the field 'c_cond' is 64, but {weights} holds 32 ('cond_in.weight' has shape "
                                  "(32, 32))"),
    "prior-depth-mismatch": ("prior", set_config("prior", depth=3),
                             "the field 'depth' is 3, but {weights} holds 2 (6 blocks"),
    "decoder-level-count-mismatch": ("decoder", set_config("decoder", c_hidden=[16, 32, 32], nhead=[-1, 2, 2],
                                                           blocks=[1, 1, 2], level_config=["CT", "CTA", "CTA"],
                                                           inject_effnet=[False, True, True]),
                                     "the field 'c_hidden' is 3 levels, but {weights} holds 4 levels"),
    "decoder-level-width-mismatch": ("decoder", set_config("decoder", c_hidden=[16, 32, 64, 32]),
                                     "the field 'c_hidden[2]' is 64, but {weights} holds 32"),
    "decoder-level-letters-mismatch": ("decoder", set_config("decoder", level_config=["CT", "CT", "CTA", "CTA"]),
                                       "the field 'level_config[1]' is 'CT', but {weights} holds 'CTA'"),
    "decoder-injection-mismatch": ("decoder", set_config("decoder", inject_effnet=[True, True, True, True]),
                                   "the field 'inject_effnet[0]' is True, but {weights} holds False"),
    "vqgan-width-mismatch": ("decoder", set_config("vqgan", embed_dim=32),
                             "the field 'embed_dim' is 32, but {weights} holds 16"),
    "vqgan-bottleneck-mismatch": ("decoder", set_config("vqgan", bottleneck_blocks=5),
                                  "the field 'bottleneck_blocks' is 5, but {weights} holds 2"),
    "text-encoder-mlp-mismatch": ("decoder", set_config("text_encoder", intermediate_size=96),
                                  "the field 'intermediate_size' is 96, but {weights} holds 48"),
    "text-encoder-positions-mismatch": ("prior", set_config("text_encoder", max_position_embeddings=100),
                                        "the field 'max_position_embeddings' is 100, but {weights} holds 77"),
    # Text encoders too small for their tokenizer (config and weights agreeing)
    "text-encoder-vocabulary-smaller-than-the-tokenizer": ("prior", shrink_text_encoder("token_embedding", 1000),
                                                           "{config}: the field 'vocab_size' is 1000, but the "
                                                           "tokenizer gives ids up to 49407"),
    "text-encoder-positions-fewer-than-the-tokens": ("decoder", shrink_text_encoder("position_embedding", 16),
                                                     "{config}: the field 'max_position_embeddings' is 16, but the "
                                                     "tokenizer pads prompts to 77 tokens"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_cli_refuses_hostile_repository_in_one_line(case, tmp_path, tiny_prior_repo, tiny_decoder_repo, out_dir,
                                                    capsys):
    kind, damage, template = HOSTILE[case]
    originals = {"prior": tiny_prior_repo, "decoder": tiny_decoder_repo}
    copy = tmp_path / "hostile" / originals[kind].name
    shutil.copytree(originals[kind], copy)
    folder = damage(copy)
    names = {"config": folder / "config.json", "weights": next(folder.glob("*.safetensors"), None)}
    repos = {**originals, kind: copy}
    start = time.perf_counter()
    code, out, err = run_cli([SHORT_PROMPT, *ONE_STEP, "--prior", repos["prior"], "--decoder", repos["decoder"],
                              "--output", out_dir / "x.png"], capsys)
    elapsed = time.perf_counter() - start
    assert_one_line_error(code, out, err, template.format(**names), out_dir)
    assert elapsed < SECONDS, f"{elapsed:.1f} s"


@pytest.mark.parametrize("case", ["prior-depth-1e9", "prior-int64-weight"])
def test_absurd_depth_and_integer_weights_in_a_real_process(case, tmp_path, tiny_prior_repo, tiny_decoder_repo,
                                                            out_dir):
    """The whole process, interpreter start included, ends with the one line and no traceback, without hanging."""
    _, damage, template = HOSTILE[case]
    copy = tmp_path / "hostile" / tiny_prior_repo.name
    shutil.copytree(tiny_prior_repo, copy)
    folder = damage(copy)
    result = run_module(["-m", "wurst", SHORT_PROMPT, *ONE_STEP, "--prior", copy, "--decoder", tiny_decoder_repo,
                         "--output", out_dir / "x.png"])
    culprit = template.format(config=folder / "config.json", weights=folder / WEIGHTS)
    assert_one_line_error(result.returncode, result.stdout, result.stderr, culprit, out_dir)


# ---------------------------------------------------------------------------------------------------------
# The loader's trust boundary: config and tokenizer files that are not what they claim. Each case runs in a fresh
# process whose address space is capped (tests.helpers.run_module), so that where these checks are missing, a
# hang fails the test at its time guard and reading /dev/zero fails it at once.


def replaced(relative: str, kind: str):
    """A damage: a file of the repository replaced by a named pipe or a link to /dev/zero, or (kind "padded")
    followed by 17 MiB of spaces, valid JSON still and more than any such file holds."""

    def damage(repo: Path) -> Path:
        path = repo / relative
        if kind == "padded":
            with open(path, "a") as f:
                f.write(" " * 17 * 2**20)
            return path
        return not_a_regular_file(path, kind)  # the decoder's tokenizer has no tokenizer.json: it is made

    return damage


def tokenizer_of(model):
    """A damage: tokenizer/tokenizer.json of another kind of model, which takes precedence over vocab.json."""

    def damage(repo: Path) -> Path:
        from tokenizers import Tokenizer, pre_tokenizers

        tokenizer = Tokenizer(model())
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.save(str(repo / "tokenizer" / "tokenizer.json"))
        return repo / "tokenizer" / "tokenizer.json"

    return damage


def word_level():
    from tokenizers.models import WordLevel

    return WordLevel({"a": 0, "cat": 1}, unk_token=None)  # fails on the first word it lacks


def unigram():
    from tokenizers.models import Unigram

    return Unigram([("<unk>", 0.0), ("a", -1.0), ("cat", -2.0)], 0)


# case: (repository, damage, the text the one error line must hold; {path} is the damaged file)
UNREADABLE = {
    "config-a-link-to-dev-zero": ("prior", replaced("prior/config.json", "zero"),
                                  "{path} cannot be read: not a regular file (a character device)"),
    "config-a-named-pipe": ("decoder", replaced("vqgan/config.json", "pipe"),
                            "{path} cannot be read: not a regular file (a named pipe)"),
    "config-past-the-limit": ("prior", replaced("text_encoder/config.json", "padded"),
                              "{path} cannot be read: larger than 16 MiB"),
    "model-index-a-named-pipe": ("prior", replaced("model_index.json", "pipe"), "{path} cannot be read: not a regular"),
    "scheduler-config-a-link-to-dev-zero": ("decoder", replaced("scheduler/scheduler_config.json", "zero"),
                                            "{path} cannot be read: not a regular file (a character device)"),
    "tokenizer-config-a-named-pipe": ("prior", replaced("tokenizer/tokenizer_config.json", "pipe"),
                                      "{path} cannot be read: not a regular file (a named pipe)"),
    "vocabulary-past-the-limit": ("decoder", replaced("tokenizer/vocab.json", "padded"),
                                  "{path} cannot be read: larger than 16 MiB"),
    "merges-a-link-to-dev-zero": ("decoder", replaced("tokenizer/merges.txt", "zero"),
                                  "{path} cannot be read: not a regular file (a character device)"),
    "tokenizer-json-a-named-pipe": ("decoder", replaced("tokenizer/tokenizer.json", "pipe"),
                                    "{path} cannot be read: not a regular file (a named pipe)"),
    "tokenizer-json-word-level": ("prior", tokenizer_of(word_level),
                                  "{path} holds a WordLevel tokenizer, not CLIP's BPE: it belongs to another model"),
    "tokenizer-json-unigram": ("decoder", tokenizer_of(unigram), "{path} holds a Unigram tokenizer, not CLIP's BPE"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_cli_refuses_unreadable_configs_and_foreign_tokenizers(case, tmp_path, tiny_prior_repo, tiny_decoder_repo,
                                                               out_dir):
    kind, damage, template = UNREADABLE[case]
    repos = {"prior": tiny_prior_repo, "decoder": tiny_decoder_repo}
    repos[kind] = tmp_path / "hostile" / repos[kind].name
    shutil.copytree({"prior": tiny_prior_repo, "decoder": tiny_decoder_repo}[kind], repos[kind])
    path = damage(repos[kind])
    before = fingerprint(tmp_path / "hostile")
    result = run_module(["-m", "wurst", SHORT_PROMPT, *ONE_STEP, "--prior", repos["prior"], "--decoder",
                         repos["decoder"], "--output", out_dir / "x.png"], timeout=60, memory=4 * 2**30)
    assert_one_line_error(result.returncode, result.stdout, result.stderr, template.format(path=path), out_dir)
    assert fingerprint(tmp_path / "hostile") == before


# ---------------------------------------------------------------------------------------------------------
# Sizes and image counts past the memory there is, seeds out of range, and devices that are not there


@pytest.mark.parametrize("seed", [2**70, 2**63, -1])
def test_cli_seeds_are_bounded_as_batch_seeds_are(seed, tiny_prior_repo, tiny_decoder_repo, out_dir, capsys):
    start = time.perf_counter()
    code, out, err = run_cli([SHORT_PROMPT, *ONE_STEP, "--seed", str(seed), "--prior", tiny_prior_repo,
                              "--decoder", tiny_decoder_repo, "--output", out_dir / "x.png"], capsys)
    assert_one_line_error(code, out, err, f"--seed must be at least 0 and below 2**63, got {seed}", out_dir)
    assert time.perf_counter() - start < SECONDS


def test_model_loaders_refuse_a_second_cpu(tiny_prior_repo, tiny_decoder_repo, encoder_folder):
    """torch copies to cpu:1 as to the CPU; like the pipelines, the load functions take only devices that exist."""
    loads = [lambda: wurst.load_stage_c(tiny_prior_repo / "prior", device="cpu:1"),
             lambda: wurst.load_clip_text_encoder(tiny_decoder_repo / "text_encoder", torch.float32, "cpu:1"),
             lambda: load_image_encoder(encoder_folder, device=torch.device("cpu", 1))]
    for load in loads:
        with pytest.raises(ArgumentError, match=r"^device .cpu:1. is not on this machine; devices here: cpu"):
            load()

MEMORY = {
    "size-far-past-2048": (["--height", "65536", "--width", "65536"], "65536x65536 needs about"),
    "many-images": (["--num-images", "10000000"], "with 10000000 images needs about"),
}


@pytest.mark.parametrize("case", list(MEMORY))
def test_cli_refuses_what_cannot_fit_in_memory(case, tiny_prior_repo, tiny_decoder_repo, out_dir, capsys):
    args, culprit = MEMORY[case]
    start = time.perf_counter()
    code, out, err = run_cli([SHORT_PROMPT, *ONE_STEP, *args, "--prior", tiny_prior_repo, "--decoder",
                              tiny_decoder_repo, "--output", out_dir / "x.png"], capsys)
    line = assert_one_line_error(code, out, err, culprit, out_dir)
    assert time.perf_counter() - start < SECONDS
    assert "of RAM at its peak" in line and "GB is available; would fit: " in line and "(--force tries anyway)" in line


def test_cli_refuses_a_size_off_the_decoders_grid(tiny_prior_repo, tiny_decoder_repo, out_dir, capsys):
    """Past about 12800 pixels the Stage B latent is no longer a multiple of 16, which its U-Net needs."""
    code, out, err = run_cli([SHORT_PROMPT, *ONE_STEP, "--width", "12800", "--prior", tiny_prior_repo, "--decoder",
                              tiny_decoder_repo, "--output", out_dir / "x.png"], capsys)
    assert_one_line_error(code, out, err, "128x12800 gives a Stage B latent of 32x3201, and the decoder needs sides "
                                          "that are multiples of 16", out_dir)


@pytest.mark.parametrize(
    "device,culprit",
    [
        ("tpu:7", "--device 'tpu:7' is not a device torch knows; devices here: cpu"),
        ("cuda:3", "--device 'cuda:3' is not on this machine; devices here: cpu"),
        ("mps", "--device 'mps' is not on this machine; devices here: cpu"),
        ("meta", "--device 'meta' is not on this machine; devices here: cpu"),
        ("gpu", "--device 'gpu' is not a device torch knows; devices here: cpu"),
    ],
)
def test_cli_refuses_devices_that_are_not_here(device, culprit, out_dir, capsys, monkeypatch):
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("the expected lists name this machine's devices: cpu only")
    start = time.perf_counter()
    code, out, err = run_cli([SHORT_PROMPT, *ONE_STEP, "--device", device, "--prior", "/no/such/prior",
                              "--output", out_dir / "x.png"], capsys)
    assert_one_line_error(code, out, err, culprit, out_dir)
    assert time.perf_counter() - start < SECONDS


# ---------------------------------------------------------------------------------------------------------
# The same checks from Python, in wurst's converted layout, and before anything is built


def test_absurd_depth_is_refused_before_any_module_is_built(tmp_path, tiny_prior_repo, monkeypatch):
    copy = tmp_path / "prior"
    shutil.copytree(tiny_prior_repo, copy)
    set_config("prior", depth=10**9)(copy)

    def refuse(*args, **kwargs):
        raise AssertionError("a Stage C was built")

    monkeypatch.setattr(wurst.StageC, "__init__", refuse)
    with pytest.raises(ConfigError, match=r"the field 'depth' is 1000000000, but .* holds 2 \(6 blocks: blocks.0 to "
                                          r"blocks.5\)"):
        wurst.WuerstchenPriorPipeline.from_pretrained(copy, low_memory=True)
    with pytest.raises(ConfigError, match="the field 'depth' is 1000000000"):
        wurst.load_stage_c(copy / "prior")


def test_integer_weights_are_refused_when_a_model_is_loaded_directly(tmp_path, tiny_decoder_repo):
    folder = tmp_path / "text_encoder"
    shutil.copytree(tiny_decoder_repo / "text_encoder", folder)
    name = "text_model.final_layer_norm.weight"
    edit_weights(folder / "model.safetensors", lambda state: state.__setitem__(name, state[name].to(torch.int16)))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds int16 where a floating weight belongs"):
        wurst.load_clip_text_encoder(folder)
    # and by load_module, on tensors already read (the path low-memory mode takes at each use)
    state = read_weights([folder / "model.safetensors"])
    config = read_config(wurst.CLIPTextConfig, folder / "config.json")
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds int16"):
        load_module(lambda: wurst.CLIPTextEncoder(config), state, CLIP_TEXT_KEYS, "here")


def test_converted_layout_config_mismatch_names_its_entry(tmp_path, tiny_prior_repo, tiny_decoder_repo):
    out = tmp_path / "converted"
    assert convert_weights.main(["--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo),
                                 "--out", str(out)]) == 0
    index_path = out / "decoder" / "wurst.json"
    index = json.loads(index_path.read_text())
    index["models"]["stage_b"]["blocks"] = [1, 1, 10**9, 1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConfigError) as info:
        wurst.WuerstchenDecoderPipeline.from_pretrained(out / "decoder")
    assert str(info.value).startswith(f"{index_path} (models.stage_b): the field 'blocks[2]' is 1000000000, but "
                                      f"{out / 'decoder' / 'stage_b.safetensors'} holds 2")
