"""Reading model repositories: references to them (missing directories, hub ids while offline), prior and decoder
repositories passed the wrong way round, folders not in hub layout, and damaged checkpoint and config files. Through
the API each ends in a wurst error (ModelNotFoundError, CheckpointError or ConfigError) whose one-line message names
the culprit; through the CLI in one line on stderr, a non-zero exit and no file written."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import wurst
from tests.helpers import (
    ONE_STEP,
    SHORT_PROMPT,
    WEIGHTS,
    assert_one_line_error,
    edit_weights,
    run_cli,
    run_module,
)
from wurst import (
    CheckpointError,
    ConfigError,
    ModelNotFoundError,
    WuerstchenDecoderPipeline,
    WuerstchenPriorPipeline,
    WurstError,
)
from wurst.weights.hub import resolve

# ---------------------------------------------------------------------------------------------------------
# Model references: missing directories, hub ids offline, mixed-up repositories


def load_both(prior, decoder):
    """The combined pipeline of a prior and a decoder repository, as the API loads them."""
    return wurst.load_pipeline(prior=prior, decoder=decoder, device="cpu", dtype=torch.float32, low_memory=False)


@pytest.mark.parametrize("load", ["prior", "decoder", "pipeline-prior", "pipeline-decoder"])
def test_api_missing_directory_is_named(load, tmp_path, tiny_prior_repo, tiny_decoder_repo):
    missing = tmp_path / "no" / "such" / "model"
    calls = {
        "prior": lambda: WuerstchenPriorPipeline.from_pretrained(missing),
        "decoder": lambda: WuerstchenDecoderPipeline.from_pretrained(missing),
        "pipeline-prior": lambda: load_both(missing, tiny_decoder_repo),
        "pipeline-decoder": lambda: load_both(tiny_prior_repo, missing),
    }
    with pytest.raises(FileNotFoundError) as info:
        calls[load]()
    assert isinstance(info.value, WurstError)
    assert str(info.value) == f"model directory not found: {missing}"


def test_cli_missing_decoder_directory_is_named(tmp_path, tiny_prior_repo, out_dir, capsys):
    missing = tmp_path / "no" / "such" / "decoder"
    code, out, err = run_cli([SHORT_PROMPT, *ONE_STEP, "--prior", tiny_prior_repo, "--decoder", missing,
                              "--output", out_dir / "x.png"], capsys)
    assert_one_line_error(code, out, err, f"model directory not found: {missing}", out_dir)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache, for this process and its children."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-home"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(cache), "HF_HUB_CACHE": str(cache / "hub")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # huggingface_hub reads the environment once, at import.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    return env


def assert_offline_message(message: str, hub_id: str) -> None:
    assert hub_id in message and "offline" in message
    assert f"hf download {hub_id}" in message and "local directory" in message
    assert "\n" not in message


@pytest.mark.parametrize("kind", ["prior", "decoder"])
def test_api_hub_id_offline_and_not_cached(kind, offline_hub, tiny_prior_repo):
    hub_id = {"prior": "warp-ai/wuerstchen-prior", "decoder": "warp-ai/wuerstchen"}[kind]
    with pytest.raises(ModelNotFoundError) as info:
        if kind == "prior":
            WuerstchenPriorPipeline.from_pretrained(hub_id)
        else:
            load_both(tiny_prior_repo, hub_id)
    assert_offline_message(str(info.value), hub_id)


def test_cli_hub_id_offline_and_not_cached(offline_hub, tiny_prior_repo, out_dir):
    result = run_module(["-m", "wurst", SHORT_PROMPT, *ONE_STEP, "--prior", tiny_prior_repo,
                         "--decoder", "warp-ai/wuerstchen", "--output", out_dir / "x.png"],
                        env=offline_hub)
    line = assert_one_line_error(result.returncode, result.stdout, result.stderr, "warp-ai/wuerstchen ", out_dir)
    assert_offline_message(line, "warp-ai/wuerstchen")


@pytest.mark.parametrize(
    "pair,culprit",
    [
        (("decoder", "decoder"), "It is the decoder repository: pass it as the decoder"),
        (("prior", "prior"), "It is the prior repository: pass it as the prior"),
    ],
    ids=["decoder-repo-as-prior", "prior-repo-as-decoder"],
)
def test_api_mixed_up_repositories(pair, culprit, tiny_prior_repo, tiny_decoder_repo):
    repos = {"prior": tiny_prior_repo, "decoder": tiny_decoder_repo}
    with pytest.raises(ModelNotFoundError, match=culprit):
        load_both(repos[pair[0]], repos[pair[1]])


def test_cli_prior_repo_as_decoder_is_named(tiny_prior_repo, out_dir, capsys):
    code, out, err = run_cli([SHORT_PROMPT, *ONE_STEP, "--prior", tiny_prior_repo, "--decoder", tiny_prior_repo,
                              "--output", out_dir / "x.png"], capsys)
    line = assert_one_line_error(code, out, err, "It is the prior repository: pass it as the prior", out_dir)
    assert str(tiny_prior_repo) in line


# ---------------------------------------------------------------------------------------------------------
# Repositories not in hub layout, and damaged checkpoint and config files (in copies of the tiny repos)
#
# Each damage edits a copy of one repository and returns the text the error must hold.


def no_model_index(r: Path) -> str:
    (r / "model_index.json").unlink()
    return f"{r} is not a Würstchen prior repository in hub layout: no model_index.json"


def emptied(r: Path) -> str:
    shutil.rmtree(r)
    r.mkdir()
    return f"{r} is not a Würstchen decoder repository in hub layout: no model_index.json"


def model_index_not_json(r: Path) -> str:
    (r / "model_index.json").write_text('{"_class_name": "WuerstchenPriorPipeline",')
    return f"{r / 'model_index.json'} is not valid JSON"


def model_index_of_another_pipeline(r: Path) -> str:
    (r / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return f"{r} holds a StableDiffusionPipeline, not the prior (WuerstchenPriorPipeline)"


def model_index_without_class_name(r: Path) -> str:
    index = json.loads((r / "model_index.json").read_text())
    del index["_class_name"]
    (r / "model_index.json").write_text(json.dumps(index))
    return "_class_name"


def model_index_field_of_wrong_type(r: Path) -> str:
    index = json.loads((r / "model_index.json").read_text())
    index["resolution_multiple"] = "high"
    (r / "model_index.json").write_text(json.dumps(index))
    return "resolution_multiple"


def without(component: str, role: str):
    def damage(r: Path) -> str:
        shutil.rmtree(r / component)
        return f"{r} lacks the {component}/ folder of a {role} repository"

    return damage


def no_weights(r: Path) -> str:
    (r / "prior" / WEIGHTS).unlink()
    return f"no weights in {r / 'prior'}: expected {WEIGHTS} or its sharded form"


def no_config(r: Path) -> str:
    (r / "decoder" / "config.json").unlink()
    return f"missing file: {r / 'decoder' / 'config.json'}"


def truncated(r: Path) -> str:
    path = r / "prior" / WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return f"{path} is truncated or corrupt: tensor '"


def truncated_to_5_bytes(r: Path) -> str:
    path = r / "vqgan" / WEIGHTS
    path.write_bytes(path.read_bytes()[:5])
    return f"{path} is truncated or not a safetensors file (5 bytes)"


def corrupt_header(r: Path) -> str:
    path = r / "decoder" / WEIGHTS
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    path.write_bytes(bytes(data))
    return f"{path} is corrupt: its safetensors header is not valid JSON"


def header_length_past_the_end(r: Path) -> str:
    path = r / "decoder" / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    return f"{path} is truncated or not a safetensors file (bad header length)"


def missing_tensor(r: Path) -> str:
    path = r / "prior" / WEIGHTS
    shape = tuple(load_file(path)["projection.weight"].shape)
    edit_weights(path, lambda s: s.pop("projection.weight"))
    return f"{path}: missing tensor 'projection.weight' (shape ({', '.join(map(str, shape))}))"


def unexpected_tensor(r: Path) -> str:
    path = r / "decoder" / WEIGHTS
    edit_weights(path, lambda s: s.__setitem__("clf.9.weight", torch.zeros(3)))
    return f"{path}: unexpected tensor 'clf.9.weight'"


def misshaped_tensor(r: Path) -> str:
    path = r / "vqgan" / WEIGHTS
    name = "down_blocks.0.channelwise.0.weight"
    shape = tuple(load_file(path)[name].shape)
    edit_weights(path, lambda s: s.__setitem__(name, torch.ones(7)))
    return f"{path}: tensor '{name}' has shape (7), expected ({', '.join(map(str, shape))})"


def config_not_json(r: Path) -> str:
    (r / "prior" / "config.json").write_text("{'c': 32}")
    return f"{r / 'prior' / 'config.json'} is not valid JSON"


def config_lacks_field(r: Path) -> str:
    path = r / "text_encoder" / "config.json"
    config = json.loads(path.read_text())
    del config["hidden_size"]
    path.write_text(json.dumps(config))
    return f"{path} lacks the field 'hidden_size'"


def config_field_of_wrong_type(r: Path) -> str:
    path = r / "prior" / "config.json"
    config = json.loads(path.read_text())
    config["c"] = "wide"
    path.write_text(json.dumps(config))
    return "'c'"


def scheduler_config_not_json(r: Path) -> str:
    path = r / "scheduler" / "scheduler_config.json"
    path.write_text("")
    return f"{path} is not valid JSON"


def missing_shard(r: Path) -> str:
    """A sharded checkpoint whose index maps the later tensors to a second shard that is not there."""
    folder = r / "prior"
    state = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    names = sorted(state)
    shards = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    save_file({n: state[n] for n in names[:10]}, folder / shards[0])
    index = {"metadata": {}, "weight_map": {n: shards[i >= 10] for i, n in enumerate(names)}}
    (folder / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    return f"{folder / WEIGHTS}.index.json names the shard {shards[1]}, which is missing"


DAMAGES = {
    # A directory that is not (all of) a hub repository
    "prior-no-model-index": ("prior", no_model_index, ModelNotFoundError),
    "decoder-empty-directory": ("decoder", emptied, ModelNotFoundError),
    "prior-model-index-not-json": ("prior", model_index_not_json, ConfigError),
    "prior-model-index-of-another-pipeline": ("prior", model_index_of_another_pipeline, ModelNotFoundError),
    "prior-model-index-without-class-name": ("prior", model_index_without_class_name, ModelNotFoundError),
    "prior-no-prior-folder": ("prior", without("prior", "prior"), ModelNotFoundError),
    "prior-no-tokenizer-folder": ("prior", without("tokenizer", "prior"), ModelNotFoundError),
    "decoder-no-vqgan-folder": ("decoder", without("vqgan", "decoder"), ModelNotFoundError),
    "decoder-no-text-encoder-folder": ("decoder", without("text_encoder", "decoder"), ModelNotFoundError),
    "prior-no-weights": ("prior", no_weights, ModelNotFoundError),
    "decoder-no-config": ("decoder", no_config, ModelNotFoundError),
    # Damaged weight files
    "prior-truncated": ("prior", truncated, CheckpointError),
    "vqgan-truncated-to-5-bytes": ("decoder", truncated_to_5_bytes, CheckpointError),
    "decoder-corrupt-header": ("decoder", corrupt_header, CheckpointError),
    "decoder-header-length-past-the-end": ("decoder", header_length_past_the_end, CheckpointError),
    "prior-missing-tensor": ("prior", missing_tensor, CheckpointError),
    "decoder-unexpected-tensor": ("decoder", unexpected_tensor, CheckpointError),
    "vqgan-misshaped-tensor": ("decoder", misshaped_tensor, CheckpointError),
    "prior-missing-shard": ("prior", missing_shard, ModelNotFoundError),
    # Damaged configs
    "prior-config-not-json": ("prior", config_not_json, ConfigError),
    "decoder-text-encoder-config-lacks-field": ("decoder", config_lacks_field, ConfigError),
    "prior-scheduler-config-not-json": ("prior", scheduler_config_not_json, ConfigError),
    "prior-config-field-of-wrong-type": ("prior", config_field_of_wrong_type, ConfigError),
    "prior-model-index-field-of-wrong-type": ("prior", model_index_field_of_wrong_type, ConfigError),
}
DAMAGE_CASES = list(DAMAGES)


@pytest.fixture
def damaged(request, tmp_path, tiny_prior_repo, tiny_decoder_repo):
    """(prior repo, decoder repo, kind of the damaged one, expected error class, culprit): one of the two is a
    damaged copy of the tiny repository, the other the intact original."""
    kind, damage, error = DAMAGES[request.param]
    originals = {"prior": tiny_prior_repo, "decoder": tiny_decoder_repo}
    copy = tmp_path / "damaged" / originals[kind].name
    shutil.copytree(originals[kind], copy)
    culprit = damage(copy)
    repos = {**originals, kind: copy}
    return repos["prior"], repos["decoder"], kind, error, culprit


@pytest.mark.parametrize("damaged", DAMAGE_CASES, indirect=True)
def test_api_damaged_repository_is_named(damaged):
    prior, decoder, kind, error, culprit = damaged
    with pytest.raises(error) as info:
        if kind == "prior":
            WuerstchenPriorPipeline.from_pretrained(prior)
        else:
            WuerstchenDecoderPipeline.from_pretrained(decoder)
    assert isinstance(info.value, WurstError)
    assert culprit in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("damaged", DAMAGE_CASES, indirect=True)
def test_cli_damaged_repository_is_named(damaged, out_dir, capsys):
    prior, decoder, _, _, culprit = damaged
    code, out, err = run_cli([SHORT_PROMPT, *ONE_STEP, "--prior", prior, "--decoder", decoder,
                              "--output", out_dir / "x.png"], capsys)
    assert_one_line_error(code, out, err, culprit, out_dir)


@pytest.mark.parametrize("damaged", ["prior-truncated"], indirect=True)
def test_cli_damaged_checkpoint_in_a_real_process(damaged, out_dir):
    prior, decoder, _, _, culprit = damaged
    result = run_module(["-m", "wurst", SHORT_PROMPT, *ONE_STEP, "--prior", prior, "--decoder", decoder,
                         "--output", out_dir / "x.png"])
    assert_one_line_error(result.returncode, result.stdout, result.stderr, culprit, out_dir)


def test_resolve_local_and_missing(tmp_path):
    assert resolve(tmp_path) == tmp_path
    with pytest.raises(ModelNotFoundError, match="model directory not found: ./nope/dir"):
        resolve("./nope/dir")


def test_resolve_hub_id_offline(tmp_path):
    """A hub id that is not cached, with the hub unreachable, names the id and says how to get it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = "from wurst.weights.hub import resolve\nresolve('warp-ai/wuerstchen-prior')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "ModelNotFoundError" in last and "warp-ai/wuerstchen-prior" in last and "offline" in last


def test_converted_index_lacking_a_model_is_named(tmp_path, tiny_prior_repo):
    """A wurst.json without one of the models is a one-line ConfigError naming it, not a KeyError."""
    (tmp_path / "tokenizer").mkdir()
    index = {"format": "wurst", "version": 1, "kind": "prior", "pipeline": {}, "scheduler": {},
             "models": {"text_encoder": {}}}
    (tmp_path / "wurst.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="lacks the model 'stage_c' \\(prior\\)"):
        wurst.WuerstchenPriorPipeline.from_pretrained(tmp_path)


def test_decoder_without_a_model_card_says_how_to_name_the_prior(tmp_path, tiny_decoder_repo):
    decoder = tmp_path / "decoder"
    shutil.copytree(tiny_decoder_repo, decoder)
    (decoder / "README.md").unlink()
    with pytest.raises(ModelNotFoundError) as info:
        wurst.WuerstchenCombinedPipeline.from_pretrained(decoder)
    message = str(info.value)
    assert "\n" not in message and "model card" in message and "prior_repo=" in message


def test_model_card_prior_path_is_taken_from_the_decoder_folder(tmp_path, tiny_prior_repo, tiny_decoder_repo):
    """A card may name the prior by a path relative to the decoder's folder, as converted folders do."""
    shutil.copytree(tiny_decoder_repo, tmp_path / "decoder")
    shutil.copytree(tiny_prior_repo, tmp_path / "prior")
    (tmp_path / "decoder" / "README.md").write_text("---\nprior:\n- ../prior\n---\n")
    pipe = wurst.WuerstchenCombinedPipeline.from_pretrained(tmp_path / "decoder")
    assert pipe.prior_pipe.name_or_path == str(tmp_path / "decoder" / "../prior")


def test_auto_pipeline_given_the_prior_repository_names_it(tiny_prior_repo):
    """Text to image starts from the decoder repository; the prior's is refused in one line saying which it is."""
    with pytest.raises(ModelNotFoundError) as info:
        wurst.AutoPipelineForText2Image.from_pretrained(tiny_prior_repo)
    message = str(info.value)
    assert "\n" not in message and "holds a WuerstchenPriorPipeline, not the decoder" in message
