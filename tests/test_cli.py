"""python -m wurst: the PNG equals the API's image, its metadata regenerates it, and bad input ends in one line
on stderr, a non-zero exit and no file."""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_pipeline import PROMPT
from wurst import Pipeline
from wurst.cli import main

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--height", "256", "--width", "128", "--prior-steps", "3", "--decoder-steps", "12"]


@pytest.fixture
def repos(tiny_prior_repo, tiny_decoder_repo):
    return ["--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo)]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_png_equals_the_api_image_and_its_metadata_regenerates_it(tmp_path, repos, capsys, tiny_prior_repo,
                                                                   tiny_decoder_repo):  # fmt: skip
    target = tmp_path / "cat.png"
    code, out, err = run_cli([PROMPT, *repos, *FAST, "--seed", "42", "--negative-prompt", "ugly",
                              "--output", target], capsys)  # fmt: skip
    assert code == 0, err
    assert out.strip() == str(target)
    pipe = Pipeline.from_pretrained(tiny_prior_repo, tiny_decoder_repo, device="cpu")
    api = pipe(PROMPT, height=256, width=128, negative_prompt="ugly", prior_num_inference_steps=3,
               generator=torch.Generator("cpu").manual_seed(42), output_type="np")[0]  # fmt: skip
    png = Image.open(target)
    pixels = np.asarray(png)
    assert png.size == (128, 256)
    assert np.abs(pixels.astype(np.float64) / 255 - api).max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only

    settings = json.loads(png.text["wurst"])
    assert settings["prompt"] == PROMPT and settings["seed"] == 42 and settings["negative_prompt"] == "ugly"
    assert png.text["prompt"] == PROMPT and png.text["prior"] == str(tiny_prior_repo)
    # The recorded command, pointed at a new file, makes the same picture.
    command = shlex.split(png.text["command"])[3:]
    again = tmp_path / "again.png"
    command[command.index("--output") + 1] = str(again)
    code, _, err = run_cli(command, capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(again)), pixels)


def test_several_images_get_numbered_names_and_a_default_name(tmp_path, repos, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["A cat, in the rain!", *repos, *FAST, "--seed", "5", "--num-images", "2"], capsys)
    assert code == 0, err
    assert out.split() == ["a-cat-in-the-rain-5-1.png", "a-cat-in-the-rain-5-2.png"]
    first, second = (np.asarray(Image.open(tmp_path / name)) for name in out.split())
    assert not np.array_equal(first, second)
    assert Image.open(tmp_path / "a-cat-in-the-rain-5-2.png").text["image_index"] == "1"
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_low_memory_gives_the_same_png(tmp_path, repos, capsys):
    paths = [tmp_path / "normal.png", tmp_path / "low.png"]
    for path, extra in zip(paths, ([], ["--low-memory"]), strict=True):
        code, out, err = run_cli([PROMPT, *repos, *FAST, "--seed", "3", "--output", path, *extra], capsys)
        assert code == 0, err
    assert np.array_equal(*(np.asarray(Image.open(path)) for path in paths))


def test_existing_file_is_refused_without_overwrite(tmp_path, repos, capsys):
    target = tmp_path / "taken.png"
    target.write_bytes(b"precious")
    code, out, err = run_cli([PROMPT, *repos, *FAST, "--output", target], capsys)
    assert code == 2 and out == ""
    expected = f"{target} already exists: pass --overwrite to replace it, or choose another --output"
    assert err.strip() == f"wurst: error: {expected}"
    assert target.read_bytes() == b"precious"
    code, _, err = run_cli([PROMPT, *repos, *FAST, "--output", target, "--overwrite"], capsys)
    assert code == 0, err
    assert Image.open(target).size == (128, 256)


@pytest.mark.parametrize(
    "args,culprit",
    [
        (["--height", "1000"], "--height must be a multiple of 128, got 1000: use 896 or 1024"),
        (["--width", "0"], "--width must be a positive multiple of 128"),
        (["--prior-steps", "0"], "--prior-steps must be a positive integer"),
        (["--decoder-steps", "-3"], "--decoder-steps must be a positive integer"),
        (["--prior-guidance", "nan"], "--prior-guidance must be a finite number >= 0"),
        (["--decoder-guidance", "-1"], "--decoder-guidance must be a finite number >= 0"),
        (["--num-images", "0"], "--num-images must be a positive integer"),
        (["--height", "abc"], "argument --height: invalid int value: 'abc'"),
        (["--dtype", "int8"], "argument --dtype: invalid choice"),
        (["--output", "picture.jpg"], "must end in .png"),
        (["--prior", "/no/such/dir"], "model directory not found: /no/such/dir"),
    ],
)
def test_bad_arguments_give_one_line(args, culprit, tmp_path, repos, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli([PROMPT, *repos, *FAST, *args], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and culprit in err and err.startswith("wurst: error: ")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_refused_before_loading(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    # No model arguments that exist: the output check must come first.
    code, _, err = run_cli([PROMPT, "--prior", "/no/such/dir", "--output", blocker / "sub" / "x.png"], capsys)
    assert code == 2 and f"cannot write to {blocker / 'sub'}" in err


def test_mixed_up_repositories_are_named(repos, capsys, tmp_path):
    swapped = ["--prior", repos[3], "--decoder", repos[1]]
    code, _, err = run_cli([PROMPT, *swapped, *FAST, "--output", tmp_path / "x.png"], capsys)
    assert code == 2 and "It is the decoder repository: pass it as the decoder" in err


def test_ctrl_c_exits_cleanly_without_files(tmp_path, repos):
    """SIGINT while the sampler runs: exit 130, a short message, no traceback and no file."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "wurst", PROMPT, *repos, "--height", "1024", "--width", "1024",
            "--prior-steps", "2", "--decoder-steps", "60", "--output", str(tmp_path / "x.png")]  # fmt: skip
    # A child of a shell's background job starts with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        # On a pipe the progress bar prints one line per finished stage: once Stage C is done, Stage B is running.
        for line in proc.stderr:
            if line.lstrip().startswith("prior ["):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted; no image was written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_module_entry_point(tmp_path, repos):
    out = subprocess.run([sys.executable, "-m", "wurst", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--negative-prompt" in out.stdout
