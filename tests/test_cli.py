"""python -m wurst and wurst.cli: the PNG equals the API's image and its metadata regenerates it; bad arguments and
unwritable outputs are refused before any model loads; a failed or interrupted run ends in one line on stderr, a
non-zero exit and no file (PNG or temporary) left behind; sizes over 2048 and long prompts warn but write the image.

Refusals of damaged or mixed-up repositories are in tests/weights/test_repository.py, those of NaN or inf in
tests/test_api.py."""

import errno
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

import wurst
from tests.helpers import (
    LONG_CUT,
    LONG_PROMPT,
    ONE_STEP,
    PROMPT,
    ROOT,
    SHORT_PROMPT,
    assert_one_line_error,
    files_in,
    run_cli,
    run_module,
)
from wurst.cli import main
from wurst.files import write_file_atomically, write_png_atomically
from wurst.runtime.devices import default_dtype

FAST = ["--height", "256", "--width", "128", "--prior-steps", "3", "--decoder-steps", "12"]


@pytest.fixture
def repos(tiny_prior_repo, tiny_decoder_repo):
    return ["--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo)]


def test_png_equals_the_api_image_and_its_metadata_regenerates_it(tmp_path, repos, capsys, tiny_prior_repo,
                                                                   tiny_decoder_repo):
    target = tmp_path / "cat.png"
    code, out, err = run_cli([PROMPT, *repos, *FAST, "--seed", "42", "--negative-prompt", "ugly",
                              "--output", target], capsys)
    assert code == 0, err
    assert out.strip() == str(target)
    # The API in the CLI's default dtype (bfloat16 on CPUs that multiply it natively, else float32).
    dtype = default_dtype(torch.device("cpu"))
    pipe = wurst.load_pipeline(prior=tiny_prior_repo, decoder=tiny_decoder_repo, device="cpu", dtype=dtype,
                               low_memory=False)
    pipe.set_progress_bar_config(disable=True)
    api = pipe(PROMPT, height=256, width=128, negative_prompt="ugly", prior_num_inference_steps=3,
               num_inference_steps=12, generator=torch.Generator("cpu").manual_seed(42), output_type="np").images[0]
    png = Image.open(target)
    pixels = np.asarray(png)
    assert png.size == (128, 256)
    assert np.abs(pixels.astype(np.float64) / 255 - api).max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only

    settings = json.loads(png.text["wurst"])
    assert settings["dtype"] == str(dtype).removeprefix("torch.")
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
    for path, extra in zip(paths, (["--resident"], ["--low-memory"]), strict=True):
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
            "--prior-steps", "2", "--decoder-steps", "60", "--output", str(tmp_path / "x.png")]
    # A child of a shell's background job starts with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # The first state of the Stage B bar: Stage C is done and Stage B is running.
        for line in proc.stderr:
            if line.lstrip("\r").startswith("decoder:"):
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


# ---------------------------------------------------------------------------------------------------------
# Refused before any model loads


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model (through any of the pipeline classes)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for cls in (wurst.WuerstchenCombinedPipeline, wurst.WuerstchenPriorPipeline, wurst.WuerstchenDecoderPipeline,
                wurst.WuerstchenImg2ImgPipeline):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


# Sizes, steps, guidance, counts: values test_bad_arguments_give_one_line does not try


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
    code, out, err = run_cli([SHORT_PROMPT, *ONE_STEP, *args, "--output", out_dir / "x.png"], capsys)
    assert_one_line_error(code, out, err, culprit, out_dir)


def test_cli_refuses_a_missing_prompt(out_dir, capsys, no_loading):
    code, out, err = run_cli([*ONE_STEP, "--output", out_dir / "x.png"], capsys)
    assert_one_line_error(code, out, err, "the following arguments are required: prompt", out_dir)


# ---------------------------------------------------------------------------------------------------------
# Warnings, not errors: sizes over 2048 and prompts over 77 tokens (the API's in tests/pipelines/test_checks.py)


@pytest.mark.parametrize(
    "prompt,args,warning",
    [
        (SHORT_PROMPT, ["--height", "2176"], "wurst: warning: --height 2176 is over 2048"),
        (LONG_PROMPT, [], f"wurst: warning: prompt is 102 tokens, over the limit of 77: the last {LONG_CUT} tokens "
                          "were cut"),
    ],
    ids=["size-over-2048", "prompt-over-77-tokens"],
)
def test_cli_warns_but_writes_the_image(prompt, args, warning, tiny_prior_repo, tiny_decoder_repo, out_dir, capsys):
    target = out_dir / "x.png"
    code, out, err = run_cli([prompt, *ONE_STEP, *args, "--prior", tiny_prior_repo, "--decoder", tiny_decoder_repo,
                              "--output", target], capsys)
    assert code == 0, err
    assert out.strip() == str(target) and files_in(out_dir) == ["x.png"]
    assert any(line.startswith(warning) for line in err.splitlines()), err
    assert "error" not in err and "Traceback" not in err


def test_cli_warns_once_about_a_size_over_2048(tiny_prior_repo, tiny_decoder_repo, out_dir):
    result = run_module(["-m", "wurst", SHORT_PROMPT, *ONE_STEP, "--height", "2176", "--prior", tiny_prior_repo,
                         "--decoder", tiny_decoder_repo, "--output", out_dir / "x.png"])
    assert result.returncode == 0, result.stderr
    assert files_in(out_dir) == ["x.png"]
    assert [line for line in result.stderr.splitlines() if "2176" in line] == [
        "wurst: warning: --height 2176 is over 2048, beyond what Würstchen was used at; expect repeated or broken "
        "structure"
    ]


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
    code, out, err = run_cli([SHORT_PROMPT, *ONE_STEP, "--output", target, *extra], capsys)
    assert_one_line_error(code, out, err, culprit, tmp_path / "none")
    assert files_in(tmp_path) == before  # and the probe file is gone


def test_cli_refuses_when_any_numbered_output_exists(tmp_path, capsys, no_loading):
    taken = tmp_path / "x-2.png"
    taken.write_bytes(b"precious")
    code, out, err = run_cli([SHORT_PROMPT, *ONE_STEP, "--num-images", "2", "--output", tmp_path / "x.png"], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip() == f"wurst: error: {taken} already exists: pass --overwrite to replace it, or choose another " \
                          "--output"
    assert files_in(tmp_path) == ["x-2.png"] and taken.read_bytes() == b"precious"


def failing_save(exception: BaseException):
    """A PIL save that encodes part of the image, then fails as a Ctrl-C would."""

    def save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise exception

    return save


def failing_fsync(fd):
    """A write that fails as a full disk does: after part of the file went out."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failure", [None, "disk-full", "interrupt"])
def test_write_png_atomically_leaves_no_temporary_file(failure, tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    if failure is None:
        write_png_atomically(Image.new("RGB", (8, 8)), target, {"prompt": "ü"})
        assert files_in(tmp_path) == ["x.png"] and Image.open(target).text["prompt"] == "ü"
        return
    if failure == "disk-full":
        monkeypatch.setattr(wurst.files.os, "fsync", failing_fsync)
    else:
        monkeypatch.setattr(Image.Image, "save", failing_save(KeyboardInterrupt()))
    with pytest.raises(OSError if failure == "disk-full" else KeyboardInterrupt):
        write_png_atomically(Image.new("RGB", (8, 8)), target, {})
    assert files_in(tmp_path) == []


def test_write_file_atomically_without_o_tmpfile_renames_a_named_temporary(tmp_path, monkeypatch):
    """Off Linux (no O_TMPFILE) the file still appears whole, with the mode a plain open() would give it."""
    monkeypatch.delattr(wurst.files.os, "O_TMPFILE")
    monkeypatch.setattr(wurst.files.os, "replace", lambda *a: (seen.append(files_in(tmp_path)), os.rename(*a)))
    seen, target = [], tmp_path / "x.bin"
    write_file_atomically(target, b"new")
    assert len(seen[0]) == 1 and seen[0][0].startswith(".x.bin.") and seen[0][0].endswith(".partial")
    assert files_in(tmp_path) == ["x.bin"] and target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o666 & ~wurst.files.current_umask()


@pytest.fixture
def disk_full(monkeypatch):
    monkeypatch.setattr(wurst.files.os, "fsync", failing_fsync)


def test_cli_failed_write_leaves_no_file(tiny_prior_repo, tiny_decoder_repo, out_dir, capsys, disk_full):
    code, out, err = run_cli([SHORT_PROMPT, *ONE_STEP, "--prior", tiny_prior_repo, "--decoder", tiny_decoder_repo,
                              "--output", out_dir / "x.png"], capsys)
    assert_one_line_error(code, out, err, "No space left on device", out_dir, progress_ok=True)


def test_cli_failed_write_names_the_file(tiny_prior_repo, tiny_decoder_repo, out_dir, capsys, disk_full):
    code, out, err = run_cli([SHORT_PROMPT, *ONE_STEP, "--prior", tiny_prior_repo, "--decoder", tiny_decoder_repo,
                              "--output", out_dir / "x.png"], capsys)
    assert_one_line_error(code, out, err, str(out_dir / "x.png"), out_dir, progress_ok=True)


# ---------------------------------------------------------------------------------------------------------
# Interrupts: Ctrl-C while loading, sampling or writing (test_ctrl_c_exits_cleanly_without_files sends a real
# SIGINT while sampling)


@pytest.mark.parametrize("when", ["loading", "sampling", "writing"])
def test_cli_interrupt_exits_130_without_files(when, tiny_prior_repo, tiny_decoder_repo, out_dir, capsys,
                                               monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt


    if when == "loading":
        monkeypatch.setattr(wurst.WuerstchenCombinedPipeline, "from_pretrained", interrupt)
    elif when == "sampling":
        monkeypatch.setattr(wurst.StageB, "forward", interrupt)  # in the decoder's first step
    else:
        monkeypatch.setattr(Image.Image, "save", failing_save(KeyboardInterrupt()))
    code, out, err = run_cli([SHORT_PROMPT, *ONE_STEP, "--prior", tiny_prior_repo, "--decoder", tiny_decoder_repo,
                              "--output", out_dir / "x.png"], capsys)
    assert_one_line_error(code, out, err, "no image was written", out_dir, exit_code=130,
                          prefix="wurst: interrupted", progress_ok=True)


def test_internal_errors_keep_their_traceback(tiny_prior_repo, tiny_decoder_repo, tmp_path, monkeypatch):
    """Only wurst's own errors (bad input, bad files) become one line: a ValueError from a bug is not swallowed."""

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(wurst.StageC, "forward", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main([PROMPT, "--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo), *FAST,
              "--output", str(tmp_path / "x.png")])
