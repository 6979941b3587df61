"""Issue 7: every bad input, damaged file or failed run ends in a clear error that names the culprit.

Through the CLI (`wurst.cli.main` in-process, `python -m wurst` in a subprocess for a few cases): a non-zero exit,
one line on stderr naming the culprit, no traceback, and no file (PNG or temporary) left in the output folder.
Through the API (Pipeline, Prior, Decoder, the loader): ValueError, FileNotFoundError or a wurst error class,
with a message naming the culprit.

Only what tests/test_cli.py, test_pipeline.py, test_loader.py, test_original_format.py, test_convert.py and the
stage tests do not already cover is here.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import wurst
from tools import convert_weights
from wurst import (
    CheckpointError,
    ConfigError,
    Decoder,
    ModelNotFoundError,
    NumericalError,
    Pipeline,
    Prior,
    PromptTruncatedWarning,
    WurstError,
)
from wurst.cli import main, write_png_atomically

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a cat in a fire fighter's helmet"
FAST = ["--height", "128", "--width", "128", "--prior-steps", "1", "--decoder-steps", "1"]
SMALL = dict(height=128, width=128, prior_num_inference_steps=1, num_inference_steps=1, output_type="pt")
WEIGHTS = "diffusion_pytorch_model.safetensors"
# "cat" is one CLIP token: start + 100 + end = 102 tokens, 25 over the limit of 77.
LONG_PROMPT, LONG_CUT = "cat " * 100, 25
# The one-line progress report a finished stage prints on a non-tty stderr (not an error line).
PROGRESS = re.compile(r"^\s*(prior|decoder) \[#* *\] \d+/\d+ \d+\.\d+s$")
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def pipe(tiny_prior_repo, tiny_decoder_repo):
    return Pipeline.from_pretrained(tiny_prior_repo, tiny_decoder_repo, device="cpu", dtype=torch.float32)


@pytest.fixture
def out_dir(tmp_path):
    return tmp_path / "out"


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(wurst.Pipeline, "from_pretrained", refuse)


@pytest.fixture
def no_model_may_run(pipe, monkeypatch):
    """Fail the test if any model of the shared pipeline runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model ran before the arguments were checked")

    for module in (pipe.prior.model, pipe.prior.text_encoder, pipe.decoder.model, pipe.decoder.text_encoder,
                   pipe.decoder.vqgan):  # fmt: skip
        monkeypatch.setattr(module, "forward", refuse)
    monkeypatch.setattr(pipe.decoder, "decode", refuse)
    return pipe


def cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def files_in(folder: Path) -> list[str]:
    """Every file (PNG, temporary or probe) under `folder`, hidden ones included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


def assert_one_line_error(code, out, err, culprit, folder, *, exit_code=2, prefix="wurst: error: ",
                          progress_ok=False):  # fmt: skip
    """A non-zero exit, exactly one line on stderr (besides the progress lines of stages that finished, when
    `progress_ok`), naming `culprit`, no traceback, nothing on stdout and no file in `folder`."""
    assert code == exit_code, err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if not (progress_ok and PROGRESS.match(line))]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    assert culprit in lines[0], err
    assert out == ""
    assert files_in(folder) == []
    return lines[0]


def run_module(args, env=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)  # fmt: skip


def edit_weights(path: Path, edit) -> None:
    state = load_file(path)
    edit(state)
    save_file(state, path)


# ---------------------------------------------------------------------------------------------------------
# Sizes, steps, guidance, counts: the CLI values test_cli.py does not try, refused before any model loads


@pytest.mark.parametrize(
    "args,culprit",
    [
        (["--width=100"], "--width must be a multiple of 128, got 100: use 128"),
        (["--height=129"], "--height must be a multiple of 128, got 129: use 128 or 256"),
        (["--width=2100"], "--width must be a multiple of 128, got 2100: use 2048 or 2176"),
        (["--height=0"], "--height must be a positive multiple of 128, got 0"),
        (["--height=-128"], "--height must be a positive multiple of 128, got -128"),
        (["--width=-5"], "--width must be a positive multiple of 128, got -5"),
        (["--prior-steps=-1"], "--prior-steps must be a positive integer, got -1"),
        (["--decoder-steps=0"], "--decoder-steps must be a positive integer, got 0"),
        (["--prior-guidance=inf"], "--prior-guidance must be a finite number >= 0, got inf"),
        (["--prior-guidance=-0.5"], "--prior-guidance must be a finite number >= 0, got -0.5"),
        (["--decoder-guidance=nan"], "--decoder-guidance must be a finite number >= 0, got nan"),
        (["--decoder-guidance=inf"], "--decoder-guidance must be a finite number >= 0, got inf"),
        (["--decoder-guidance=-inf"], "--decoder-guidance must be a finite number >= 0, got -inf"),
        (["--num-images=-1"], "--num-images must be a positive integer, got -1"),
    ],
)
def test_cli_refuses_bad_numbers_before_loading(args, culprit, out_dir, capsys, no_loading):
    code, out, err = cli([PROMPT, *FAST, *args, "--output", out_dir / "x.png"], capsys)
    assert_one_line_error(code, out, err, culprit, out_dir)


def test_cli_refuses_a_missing_prompt(out_dir, capsys, no_loading):
    code, out, err = cli([*FAST, "--output", out_dir / "x.png"], capsys)
    assert_one_line_error(code, out, err, "the following arguments are required: prompt", out_dir)


# ---------------------------------------------------------------------------------------------------------
# The same through the API: the Pipeline values test_pipeline.py does not try, refused before any model runs


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(height=129), "height must be a multiple of 128, got 129: use 128 or 256"),
        (dict(width=0), "width must be a positive multiple of 128, got 0"),
        (dict(height=-256), "height must be a positive multiple of 128, got -256"),
        (dict(height=256.0), "height must be a positive multiple of 128, got 256.0"),
        (dict(width=True), "width must be a positive multiple of 128, got True"),
        (dict(prior_guidance_scale=INF), "prior_guidance_scale must be a finite number >= 0, got inf"),
        (dict(prior_guidance_scale=-0.5), "prior_guidance_scale must be a finite number >= 0, got -0.5"),
        (dict(decoder_guidance_scale=NAN), "decoder_guidance_scale must be a finite number >= 0, got nan"),
        (dict(decoder_guidance_scale=-INF), "decoder_guidance_scale must be a finite number >= 0, got -inf"),
        (dict(num_images_per_prompt=-2), "num_images_per_prompt must be a positive integer, got -2"),
        (dict(num_images_per_prompt=1.5), "num_images_per_prompt must be a positive integer, got 1.5"),
        (dict(prompt=42), "prompt must be a string or a non-empty list of strings, got 42"),
        (dict(prompt=None), "prompt must be a string or a non-empty list of strings, got None"),
        (dict(prompt=[]), "prompt must be a string or a non-empty list of strings, got []"),
        (dict(prompt=["a cat", 3]), "prompt must be a string or a non-empty list of strings, got ['a cat', 3]"),
        (dict(prompt=b"a cat"), "prompt must be a string or a non-empty list of strings, got b'a cat'"),
        (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt has 3 entries but prompt has 2"),
        (dict(negative_prompt=[None]), "negative_prompt must be a string or a non-empty list of strings"),
        (dict(prior_timesteps=[0.0, 0.5, 1.0]), "timesteps must be strictly descending, got [0.0, 0.5, 1.0]"),
        (dict(prior_timesteps=[1.0, 1.0, 0.0]), "timesteps must be strictly descending"),
        (dict(prior_timesteps=[1.5, 0.5, 0.0]), "timesteps must lie within [0, 1], got [1.5, 0.5, 0.0]"),
        (dict(prior_timesteps=[1.0, NAN, 0.0]), "timesteps must lie within [0, 1]"),
        (dict(prior_timesteps=[1.0]), "timesteps must hold at least two values, got 1"),
        (dict(decoder_timesteps=[1.0, -0.1]), "timesteps must lie within [0, 1], got [1.0, -0.1]"),
        (dict(decoder_timesteps=[1.0, 0.4, 0.6, 0.0]), "timesteps must be strictly descending"),
    ],
)
def test_api_refuses_bad_arguments_before_any_model_runs(kwargs, message, no_model_may_run):
    kwargs = {"prompt": PROMPT, **SMALL, **kwargs}
    with pytest.raises(ValueError) as info:
        no_model_may_run(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "target,kwargs,culprit",
    [
        pytest.param("pipe", dict(prior_num_inference_steps=0), "prior_num_inference_steps"),
        pytest.param("pipe", dict(num_inference_steps=-1), "num_inference_steps"),
        pytest.param("pipe", dict(prior_timesteps=[0.0, 1.0]), "prior_timesteps"),
        pytest.param("pipe", dict(decoder_timesteps=[0.0, 1.0]), "decoder_timesteps"),
        pytest.param("prior", dict(num_inference_steps=0), "num_inference_steps"),
    ],
)  # fmt: skip
def test_step_and_timestep_errors_name_the_argument(target, kwargs, culprit, no_model_may_run):
    """prior_num_inference_steps=0 and num_inference_steps=0 must not give the same message."""
    call = no_model_may_run if target == "pipe" else no_model_may_run.prior
    kwargs = {"prompt": PROMPT, **(SMALL if target == "pipe" else dict(height=128, width=128)), **kwargs}
    with pytest.raises(ValueError) as info:
        call(**kwargs)
    assert culprit in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Warnings, not errors: sizes over 2048 and prompts over 77 tokens


def test_api_size_over_2048_warns_and_generates(pipe):
    with pytest.warns(UserWarning, match="height 2176 is over 2048"):
        images = pipe(PROMPT, **{**SMALL, "height": 2176})
    assert images.shape == (1, 3, 2176, 128)


def test_api_long_prompt_warns_how_much_was_cut_and_generates(pipe):
    with pytest.warns(PromptTruncatedWarning, match=rf"prompt is 102 tokens, .* the last {LONG_CUT} tokens were cut"):
        images = pipe(LONG_PROMPT, **SMALL)
    assert images.shape == (1, 3, 128, 128)


@pytest.mark.parametrize(
    "prompt,args,warning",
    [
        (PROMPT, ["--height", "2176"], "wurst: warning: --height 2176 is over 2048"),
        (LONG_PROMPT, [], f"wurst: warning: prompt is 102 tokens, over the limit of 77: the last {LONG_CUT} tokens "
                          "were cut"),
    ],
    ids=["size-over-2048", "prompt-over-77-tokens"],
)  # fmt: skip
def test_cli_warns_but_writes_the_image(prompt, args, warning, tiny_prior_repo, tiny_decoder_repo, out_dir, capsys):
    target = out_dir / "x.png"
    code, out, err = cli([prompt, *FAST, *args, "--prior", tiny_prior_repo, "--decoder", tiny_decoder_repo,
                          "--output", target], capsys)  # fmt: skip
    assert code == 0, err
    assert out.strip() == str(target) and files_in(out_dir) == ["x.png"]
    assert any(line.startswith(warning) for line in err.splitlines()), err
    assert "error" not in err and "Traceback" not in err


def test_cli_warns_once_about_a_size_over_2048(tiny_prior_repo, tiny_decoder_repo, out_dir):
    result = run_module(["-m", "wurst", PROMPT, *FAST, "--height", "2176", "--prior", tiny_prior_repo,
                         "--decoder", tiny_decoder_repo, "--output", out_dir / "x.png"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert files_in(out_dir) == ["x.png"]
    assert [line for line in result.stderr.splitlines() if "2176" in line] == [
        "wurst: warning: --height 2176 is over 2048, beyond what Würstchen was used at; expect repeated or broken "
        "structure"
    ]


# ---------------------------------------------------------------------------------------------------------
# Model references: missing directories, hub ids offline, mixed-up repositories


@pytest.mark.parametrize("load", ["prior", "decoder", "pipeline-prior", "pipeline-decoder"])
def test_api_missing_directory_is_named(load, tmp_path, tiny_prior_repo, tiny_decoder_repo):
    missing = tmp_path / "no" / "such" / "model"
    calls = {
        "prior": lambda: Prior.from_pretrained(missing, device="cpu"),
        "decoder": lambda: Decoder.from_pretrained(missing, device="cpu"),
        "pipeline-prior": lambda: Pipeline.from_pretrained(missing, tiny_decoder_repo, device="cpu"),
        "pipeline-decoder": lambda: Pipeline.from_pretrained(tiny_prior_repo, missing, device="cpu"),
    }
    with pytest.raises(FileNotFoundError) as info:
        calls[load]()
    assert isinstance(info.value, WurstError)
    assert str(info.value) == f"model directory not found: {missing}"


def test_cli_missing_decoder_directory_is_named(tmp_path, tiny_prior_repo, out_dir, capsys):
    missing = tmp_path / "no" / "such" / "decoder"
    code, out, err = cli([PROMPT, *FAST, "--prior", tiny_prior_repo, "--decoder", missing,
                          "--output", out_dir / "x.png"], capsys)  # fmt: skip
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
            Prior.from_pretrained(hub_id, device="cpu")
        else:
            Pipeline.from_pretrained(tiny_prior_repo, hub_id, device="cpu")
    assert_offline_message(str(info.value), hub_id)


def test_cli_hub_id_offline_and_not_cached(offline_hub, tiny_prior_repo, out_dir):
    result = run_module(["-m", "wurst", PROMPT, *FAST, "--prior", tiny_prior_repo, "--decoder", "warp-ai/wuerstchen",
                         "--output", out_dir / "x.png"], env=offline_hub)  # fmt: skip
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
        Pipeline.from_pretrained(repos[pair[0]], repos[pair[1]], device="cpu")


def test_cli_prior_repo_as_decoder_is_named(tiny_prior_repo, out_dir, capsys):
    code, out, err = cli([PROMPT, *FAST, "--prior", tiny_prior_repo, "--decoder", tiny_prior_repo,
                          "--output", out_dir / "x.png"], capsys)  # fmt: skip
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
        (Prior if kind == "prior" else Decoder).from_pretrained(prior if kind == "prior" else decoder, device="cpu")
    assert isinstance(info.value, WurstError)
    assert culprit in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("damaged", DAMAGE_CASES, indirect=True)
def test_cli_damaged_repository_is_named(damaged, out_dir, capsys):
    prior, decoder, _, _, culprit = damaged
    code, out, err = cli([PROMPT, *FAST, "--prior", prior, "--decoder", decoder, "--output", out_dir / "x.png"],
                         capsys)  # fmt: skip
    assert_one_line_error(code, out, err, culprit, out_dir)


@pytest.mark.parametrize("damaged", ["prior-truncated"], indirect=True)
def test_cli_damaged_checkpoint_in_a_real_process(damaged, out_dir):
    prior, decoder, _, _, culprit = damaged
    result = run_module(["-m", "wurst", PROMPT, *FAST, "--prior", prior, "--decoder", decoder,
                         "--output", out_dir / "x.png"])  # fmt: skip
    assert_one_line_error(result.returncode, result.stdout, result.stderr, culprit, out_dir)


# ---------------------------------------------------------------------------------------------------------
# Original-format .pt files through tools/convert_weights.py: weights-only loading, one line, nothing written


class RunsCode:
    """Unpickling this would call os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def code_running_checkpoint(folder: Path, form: str) -> tuple[Path, Path]:
    """A .pt file that would run a shell command when unpickled without weights_only: a plain pickle, or a
    torch.save zip file whose state dict is real but which carries one more object. Returns (file, marker)."""
    marker, path = folder / "code-ran", folder / f"{form}.pt"
    if form == "plain":
        with open(path, "wb") as f:
            pickle.dump({"state_dict": RunsCode(marker)}, f)
    else:
        torch.save({"ema_state_dict": {"projection.weight": torch.zeros(1)}, "extra": RunsCode(marker)}, path)
    return path, marker


def convert_args(prior, decoder, out, flag, path):
    return ["--prior", str(prior), "--decoder", str(decoder), "--out", str(out), flag, str(path)]


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch notes the unusual protocol of a plain pickle
@pytest.mark.parametrize("form", ["plain", "zip"])
def test_convert_refuses_code_running_pickles(form, tmp_path, tiny_prior_repo, tiny_decoder_repo, capsys):
    path, marker = code_running_checkpoint(tmp_path, form)
    out = tmp_path / "converted"
    code = convert_weights.main(convert_args(tiny_prior_repo, tiny_decoder_repo, out, "--stage-c", path))
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("convert_weights: error: ")
    assert f"{path} is corrupt or holds more than tensors, which weights-only loading refuses" in captured.err
    assert not marker.exists()
    assert files_in(out) == []


@pytest.mark.parametrize("form", ["plain", "zip"])
def test_convert_refusal_is_one_line_in_a_real_process(form, tmp_path, tiny_prior_repo, tiny_decoder_repo):
    path, marker = code_running_checkpoint(tmp_path, form)
    out = tmp_path / "converted"
    result = run_module([ROOT / "tools" / "convert_weights.py",
                         *convert_args(tiny_prior_repo, tiny_decoder_repo, out, "--stage-c", path)])  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert str(path) in result.stderr and not marker.exists()
    assert files_in(out) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("form", ["plain", "zip"])
def test_convert_refusal_names_the_refused_callable(form, tmp_path, tiny_prior_repo, tiny_decoder_repo, capsys):
    path, _ = code_running_checkpoint(tmp_path, form)
    code = convert_weights.main(convert_args(tiny_prior_repo, tiny_decoder_repo, tmp_path / "out", "--stage-c", path))
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"\b(posix|nt|os)\.system\b", err) and "will likely succeed" not in err, err


@pytest.mark.parametrize("flag", ["--stage-b", "--stage-a"])
def test_convert_refuses_a_bad_decoder_file_before_writing(flag, tmp_path, tiny_prior_repo, tiny_decoder_repo,
                                                           capsys):  # fmt: skip
    path, marker = code_running_checkpoint(tmp_path, "zip")
    out = tmp_path / "converted"
    code = convert_weights.main(convert_args(tiny_prior_repo, tiny_decoder_repo, out, flag, path))
    captured = capsys.readouterr()
    assert code == 2 and str(path) in captured.err and not marker.exists()
    assert files_in(out) == [] and captured.out == ""


# ---------------------------------------------------------------------------------------------------------
# Output: refused before loading, atomic writes, no overwriting


@pytest.mark.parametrize("case", ["parent-is-a-file", "under-proc", "name-too-long", "directory"])
def test_cli_unwritable_output_is_refused_before_loading(case, tmp_path, capsys, no_loading):
    extra = []
    if case == "parent-is-a-file":
        (tmp_path / "file").write_text("")
        target, culprit = tmp_path / "file" / "x.png", f"cannot write to {tmp_path / 'file'}"
    elif case == "under-proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("needs Linux /proc")
        target, culprit = Path("/proc/wurst-test-no-such-folder/x.png"), "cannot write to /proc/wurst-test-no-such"
    elif case == "name-too-long":
        name = "x" * 300 + ".png"
        target, culprit = tmp_path / name, name
    else:
        (tmp_path / "x.png").mkdir()
        target, culprit, extra = tmp_path / "x.png", f"--output {tmp_path / 'x.png'} is a directory", ["--overwrite"]
    before = files_in(tmp_path)
    code, out, err = cli([PROMPT, *FAST, "--output", target, *extra], capsys)
    assert_one_line_error(code, out, err, culprit, tmp_path / "none")
    assert files_in(tmp_path) == before  # and the probe file is gone


def test_cli_refuses_when_any_numbered_output_exists(tmp_path, capsys, no_loading):
    taken = tmp_path / "x-2.png"
    taken.write_bytes(b"precious")
    code, out, err = cli([PROMPT, *FAST, "--num-images", "2", "--output", tmp_path / "x.png"], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip() == f"wurst: error: {taken} already exists: pass --overwrite to replace it, or choose another " \
                          "--output"  # fmt: skip
    assert files_in(tmp_path) == ["x-2.png"] and taken.read_bytes() == b"precious"


def failing_save(exception: BaseException):
    """A PIL save that writes part of the file, then fails as a full disk or a Ctrl-C would."""

    def save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise exception

    return save


@pytest.mark.parametrize("exception", [None, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), KeyboardInterrupt()],
                         ids=["ok", "disk-full", "interrupt"])  # fmt: skip
def test_write_png_atomically_leaves_no_temporary_file(exception, tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    if exception is None:
        write_png_atomically(Image.new("RGB", (8, 8)), target, {"prompt": "ü"})
        assert files_in(tmp_path) == ["x.png"] and Image.open(target).text["prompt"] == "ü"
        return
    monkeypatch.setattr(Image.Image, "save", failing_save(exception))
    with pytest.raises(type(exception)):
        write_png_atomically(Image.new("RGB", (8, 8)), target, {})
    assert files_in(tmp_path) == []


@pytest.fixture
def disk_full(monkeypatch):
    monkeypatch.setattr(Image.Image, "save", failing_save(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))


def test_cli_failed_write_leaves_no_file(tiny_prior_repo, tiny_decoder_repo, out_dir, capsys, disk_full):
    code, out, err = cli([PROMPT, *FAST, "--prior", tiny_prior_repo, "--decoder", tiny_decoder_repo,
                          "--output", out_dir / "x.png"], capsys)  # fmt: skip
    assert_one_line_error(code, out, err, "No space left on device", out_dir, progress_ok=True)


def test_cli_failed_write_names_the_file(tiny_prior_repo, tiny_decoder_repo, out_dir, capsys, disk_full):
    code, out, err = cli([PROMPT, *FAST, "--prior", tiny_prior_repo, "--decoder", tiny_decoder_repo,
                          "--output", out_dir / "x.png"], capsys)  # fmt: skip
    assert_one_line_error(code, out, err, str(out_dir / "x.png"), out_dir, progress_ok=True)


# ---------------------------------------------------------------------------------------------------------
# Numerics: NaN or inf in the latents


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_api_non_finite_latents_stop_with_advice(stage, value, pipe, monkeypatch):
    def non_finite(x, *args, **kwargs):
        return torch.full_like(x, value)

    def refuse(*args, **kwargs):
        raise AssertionError("generation went on after the latents turned non-finite")

    monkeypatch.setattr((pipe.prior if stage == "prior" else pipe.decoder).model, "forward", non_finite)
    if stage == "prior":
        monkeypatch.setattr(pipe.decoder.model, "forward", refuse)
    monkeypatch.setattr(pipe.decoder, "decode", refuse)
    with pytest.raises(NumericalError) as info:
        pipe(PROMPT, **SMALL)
    message = str(info.value)
    assert isinstance(info.value, WurstError) and "\n" not in message
    assert {"prior": "Stage C", "decoder": "Stage B"}[stage] in message and "NaN or inf" in message
    assert "use bfloat16 or float32" in message


def nan_weight_copy(repo: Path, folder: Path, component: str, name: str) -> Path:
    copy = folder / repo.name
    shutil.copytree(repo, copy)
    edit_weights(copy / component / WEIGHTS, lambda s: s.__setitem__(name, torch.full_like(s[name], NAN)))
    return copy


def test_cli_nan_weight_stops_without_writing(tmp_path, tiny_prior_repo, tiny_decoder_repo, out_dir, capsys):
    prior = nan_weight_copy(tiny_prior_repo, tmp_path, "prior", "projection.weight")
    code, out, err = cli([PROMPT, *FAST, "--prior", prior, "--decoder", tiny_decoder_repo,
                          "--output", out_dir / "x.png"], capsys)  # fmt: skip
    line = assert_one_line_error(code, out, err, "the Stage C latents hold NaN or inf", out_dir, progress_ok=True)
    assert "use bfloat16 or float32" in line


def test_api_nan_image_from_the_vqgan_is_refused(tmp_path, tiny_prior_repo, tiny_decoder_repo):
    decoder = nan_weight_copy(tiny_decoder_repo, tmp_path, "vqgan", "out_block.0.bias")
    pipe = Pipeline.from_pretrained(tiny_prior_repo, decoder, device="cpu")
    with pytest.raises(NumericalError):
        pipe(PROMPT, **{**SMALL, "output_type": "pil"})


def test_cli_nan_image_from_the_vqgan_is_not_saved(tmp_path, tiny_prior_repo, tiny_decoder_repo, out_dir, capsys):
    decoder = nan_weight_copy(tiny_decoder_repo, tmp_path, "vqgan", "out_block.0.bias")
    code, out, err = cli([PROMPT, *FAST, "--prior", tiny_prior_repo, "--decoder", decoder,
                          "--output", out_dir / "x.png"], capsys)  # fmt: skip
    assert_one_line_error(code, out, err, "NaN", out_dir, progress_ok=True)


# ---------------------------------------------------------------------------------------------------------
# Interrupts: Ctrl-C while loading, sampling or writing (test_cli.py sends a real SIGINT while sampling)


@pytest.mark.parametrize("when", ["loading", "sampling", "writing"])
def test_cli_interrupt_exits_130_without_files(when, tiny_prior_repo, tiny_decoder_repo, out_dir, capsys,
                                               monkeypatch):  # fmt: skip
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    def interrupt_in_decoder(self, stage, *args):
        if stage == "decoder":
            raise KeyboardInterrupt

    if when == "loading":
        monkeypatch.setattr(wurst.Pipeline, "from_pretrained", interrupt)
    elif when == "sampling":
        monkeypatch.setattr(wurst.cli.Progress, "__call__", interrupt_in_decoder)
    else:
        monkeypatch.setattr(Image.Image, "save", failing_save(KeyboardInterrupt()))
    code, out, err = cli([PROMPT, *FAST, "--prior", tiny_prior_repo, "--decoder", tiny_decoder_repo,
                          "--output", out_dir / "x.png"], capsys)  # fmt: skip
    assert_one_line_error(code, out, err, "no image was written", out_dir, exit_code=130,
                          prefix="wurst: interrupted", progress_ok=True)  # fmt: skip
