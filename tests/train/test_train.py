"""python -m wurst.train end to end on the tiny fixtures: resume after SIGKILL, torchrun, learning, validation images,
reruns, and the refusals of bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import (
    ROOT,
    assert_one_line_error,
    assert_same_tensors,
    files_in,
    training_checkpoint,
    write_captioned_images,
)
from wurst.train.app import main

# One thread everywhere, as torchrun gives each process: the thread count changes how float sums round.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four captioned images in two aspect buckets at resolution 128: 128x128 (three) and 128x256."""
    return write_captioned_images(tmp_path_factory.mktemp("data"), sizes=((128, 128), (128, 128), (128, 256),
                                                                          (160, 128)))


@pytest.fixture(scope="module")
def models(tiny_prior_repo, encoder_folder):
    return ["--prior", str(tiny_prior_repo), "--image-encoder", str(encoder_folder), "--dtype", "float32",
            "--resolution", "128"]


def command(data: Path, out: Path, models: list[str], *options: str, processes: int = 1) -> list[str]:
    job = ["-m", "wurst.train", str(data), "--out", str(out), *models, *options]
    if processes == 1:
        return [sys.executable, *job]
    return [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc-per-node={processes}", *job]


def train(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), env=ENV, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done


def trained(out: Path) -> dict[str, torch.Tensor]:
    return training_checkpoint(out)["trained"]


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# Resume, and several processes

JOB = ("--steps", "60", "--batch-size", "2", "--checkpoint-every", "7", "--learning-rate", "1e-3", "--ema-decay",
       "0.9", "--lr-warmup-steps", "5")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset, models):
    folder = tmp_path_factory.mktemp("uninterrupted")
    train(*command(dataset, folder / "out", models, *JOB), cwd=folder)
    return folder / "out"


@pytest.mark.parametrize("kill_after", [3, 25])
def test_sigkill_then_rerun_ends_bit_identical(kill_after, uninterrupted, dataset, models, tmp_path):
    """Kill the run once `kill_after` steps are recorded (between checkpoints), rerun the same command: the same
    weights, bit for bit, the same LoRA file, and every step recorded exactly once."""
    out = tmp_path / "out"
    job = subprocess.Popen(command(dataset, out, models, *JOB), env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= kill_after):
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.002)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert all(not name.startswith(".") and ".partial" not in name for name in files_in(out))

    train(*command(dataset, out, models, *JOB), cwd=tmp_path)
    assert_same_tensors(trained(out), trained(uninterrupted))
    ema = training_checkpoint(out)["ema"]
    assert_same_tensors(ema, training_checkpoint(uninterrupted)["ema"])
    lora = "pytorch_lora_weights.safetensors"
    assert (out / lora).read_bytes() == (uninterrupted / lora).read_bytes()
    assert metric_steps(out) == list(range(1, 61))


def test_torchrun_two_processes_match_one(uninterrupted, dataset, models, tmp_path):
    done = train(*command(dataset, tmp_path / "out", models, *JOB, processes=2), cwd=tmp_path)
    ours, reference = trained(tmp_path / "out"), trained(uninterrupted)
    assert ours.keys() == reference.keys()
    for name in ours:  # the gradients are summed in another order: float rounding, amplified by 60 Adam steps
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-6)
    # One progress bar, rank 0's. A bar draws its 0% state once, when it opens; its 100% state may be drawn
    # twice (at the last step if 0.1 s have passed since the last draw, and when it closes), so count openings.
    assert done.stderr.count("train:   0%") == 1
    assert metric_steps(tmp_path / "out") == list(range(1, 61))


def test_rerun_of_a_finished_job_does_nothing(uninterrupted, dataset, models, tmp_path):
    before = {name: (uninterrupted / name).stat().st_mtime_ns for name in files_in(uninterrupted)}
    done = train(*command(dataset, uninterrupted, models, *JOB), cwd=tmp_path)
    assert "nothing to do" in done.stderr
    assert {name: (uninterrupted / name).stat().st_mtime_ns for name in files_in(uninterrupted)} == before


def test_rerun_with_other_settings_is_refused_naming_each(uninterrupted, dataset, models, capsys):
    before = {name: (uninterrupted / name).read_bytes() for name in files_in(uninterrupted)}
    args = [str(dataset), "--out", str(uninterrupted), *models, *JOB]
    args[args.index("--learning-rate") + 1] = "2e-3"
    code = main([*args, "--lora-rank", "8"])
    out, err = capsys.readouterr()
    line = assert_one_line_error(code, out, err, "holds another training job", None, prefix="wurst.train: error: ")
    assert "learning_rate is 0.001 there, 0.002 here" in line and "lora_rank is 4 there, 8 here" in line
    assert {name: (uninterrupted / name).read_bytes() for name in files_in(uninterrupted)} == before


# ---------------------------------------------------------------------------------------------------------
# Learning, and what it writes


def probe_loss(prior, out: Path, draws: int = 64) -> float:
    """The diffusers-recipe loss of `prior` on the run's cached training examples, averaged over the same `draws`
    noise draws for any prior: a measure of fit without the noise of single steps' random t."""
    from wurst.train.cache import EncodedCache
    from wurst.train.objective import RECIPES, Objective, draw

    cache, objective, total = EncodedCache(out / "cache", with_text=True), Objective(prior, None,
                                                                                    recipe=RECIPES["diffusers"]), 0.0
    for index in (0, 1):
        latent = cache.latent(index)
        chosen = [draw(seed=123, step=0, k=k, latent_shape=tuple(latent.shape), recipe=RECIPES["diffusers"])
                  for k in range(draws)]
        with torch.no_grad():
            total += float(objective(latents=latent.expand(draws, -1, -1, -1),
                                     noise=torch.stack([d.noise for d in chosen]),
                                     t=torch.tensor([d.t for d in chosen]),
                                     text=cache.text(index).expand(draws, -1, -1)).mean())
    return total / 2


def test_loss_falls_while_overfitting_two_images(tmp_path, models, tiny_prior_repo):
    from wurst import WuerstchenPriorPipeline

    data = write_captioned_images(tmp_path / "data", sizes=((128, 128), (128, 128)))
    out = tmp_path / "out"
    code = main([str(data), "--out", str(out), *models, "--full", "--recipe", "diffusers", "--steps", "400",
                 "--batch-size", "2", "--learning-rate", "3e-4", "--checkpoint-every", "1000"])
    assert code == 0
    base = WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo).prior
    tuned = WuerstchenPriorPipeline.from_pretrained(out / "prior").prior
    before, after = probe_loss(base, out), probe_loss(tuned, out)
    assert after < 0.5 * before, (before, after)


def test_validation_images_come_from_the_weights_being_trained(tmp_path, dataset, models, tiny_prior_repo,
                                                               tiny_decoder_repo):
    from wurst import WuerstchenCombinedPipeline

    out = tmp_path / "out"
    code = main([str(dataset), "--out", str(out), *models, "--steps", "4", "--batch-size", "2", "--learning-rate",
                 "5e-2", "--validation-prompt", "a cat", "--validation-every", "2", "--decoder",
                 str(tiny_decoder_repo)])
    assert code == 0
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002-0.png", "step-000004-0.png"]
    final = torch.tensor(list(Image.open(out / "validation" / "step-000004-0.png").getdata()))

    def drawn(with_lora: bool):
        pipe = WuerstchenCombinedPipeline.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo,
                                                          torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        if with_lora:
            pipe.load_lora_weights(out)
        image = pipe("a cat", height=128, width=128, generator=torch.Generator().manual_seed(0)).images[0]
        return torch.tensor(list(image.getdata()))

    assert torch.equal(final, drawn(with_lora=True))
    assert not torch.equal(final, drawn(with_lora=False))


def test_text_encoder_lora_and_tensorboard_logs(tmp_path, dataset, models, tiny_prior_repo):
    """--train-text-encoder writes `text_encoder.` keys that wurst's loader applies; --report-to tensorboard logs each
    step's loss, the values of metrics.jsonl."""
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from wurst import WuerstchenPriorPipeline

    out = tmp_path / "out"
    code = main([str(dataset), "--out", str(out), *models, "--steps", "3", "--batch-size", "2", "--learning-rate",
                 "5e-2", "--train-text-encoder", "--report-to", "tensorboard"])
    assert code == 0
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A") for k in keys), keys
    assert any(k.startswith("prior.") for k in keys)
    pipe = WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.encode_text(pipe.tokenizer, ["a cat"])
    pipe.load_lora_weights(out)
    assert not torch.equal(pipe.encode_text(pipe.tokenizer, ["a cat"]), base)  # the text encoder's LoRA applies

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    recorded = [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert [step for step, _ in logged] == [1, 2, 3]
    assert [value for _, value in logged] == pytest.approx([loss for _, loss in recorded], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line per problem naming the file, nothing written


def run_refused(args: list[str], capsys) -> list[str]:
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert lines and all(line.startswith("wurst.train: error: ") for line in lines), err
    return lines


@pytest.mark.parametrize(("option", "value", "culprit"), [
    ("--lora-rank", "0", "--lora-rank must be positive, got 0"),
    ("--steps", "0", "--steps must be positive, got 0"),
    ("--steps", "-3", "--steps must be positive, got -3"),
    ("--resolution", "100", "--resolution must be a positive multiple of 32"),
    ("--batch-size", "3", "--batch-size 3 does not split"),
    ("--learning-rate", "nan", "--learning-rate must be a positive number"),
    ("--ema-decay", "1", "--ema-decay must be in [0, 1)"),
])
def test_bad_options_are_refused(option, value, culprit, dataset, models, tmp_path, capsys):
    extra = ["--gradient-accumulation", "2"] if option == "--batch-size" else []
    lines = run_refused([str(dataset), "--out", str(tmp_path / "out"), *models, *extra, option, value], capsys)
    assert len(lines) == 1 and culprit in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_written_is_refused(dataset, models, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    lines = run_refused([str(dataset), "--out", str(tmp_path / "a-file" / "out"), *models], capsys)
    assert len(lines) == 1 and "cannot write to --out" in lines[0] and "a-file" in lines[0]


def test_every_problem_of_a_dataset_is_named_on_its_own_line(tmp_path, models, capsys):
    data = write_captioned_images(tmp_path / "data", sizes=((128, 128),) * 4)
    png = (data / "image0.png").read_bytes()
    (data / "image0.png").write_bytes(png[: len(png) // 2])  # truncated
    (data / "image1.txt").unlink()  # no caption
    (data / "image2.txt").write_bytes(b"\xff\xfe\xfa")  # not UTF-8
    lines = run_refused([str(data), "--out", str(tmp_path / "out"), *models], capsys)
    assert len(lines) == 3, lines
    assert "image0.png" in lines[0] and "image1.png" in lines[1] and "image2.txt" in lines[2], lines
    assert not (tmp_path / "out").exists()


def test_an_empty_folder_is_refused(tmp_path, models, capsys):
    (tmp_path / "empty").mkdir()
    lines = run_refused([str(tmp_path / "empty"), "--out", str(tmp_path / "out"), *models], capsys)
    assert len(lines) == 1 and "empty" in lines[0], lines


def test_lora_targets_that_name_no_layer_are_refused_before_anything_is_written(dataset, models, tmp_path, capsys):
    lines = run_refused([str(dataset), "--out", str(tmp_path / "out"), *models, "--lora-targets", "to_q,to_x"], capsys)
    assert len(lines) == 1 and "--lora-targets 'to_x' names no linear layer of the prior" in lines[0], lines
    assert "to_q" in lines[0]  # the ends of the layer names it has
    assert not (tmp_path / "out").exists()
