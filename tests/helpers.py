"""Constants and plain functions shared by several test modules: prompts, the parity tolerance, the CLI harness
(in-process and in a subprocess), the memory probe of the peak-RSS measurements, file helpers, and running wurst
and diffusers alike (run_both). Fixtures live in tests/conftest.py."""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import resource
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from wurst.batch import app as batch_app
from wurst.cli import main

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------
# Constants

# The prompts of the parity and pipeline tests.
PROMPT, OTHER = "Anthropomorphic cat dressed as a fire fighter", "a lighthouse on a cliff at night, oil painting"

# The prompt, CLI arguments and API arguments of the quickest run: the refusal, warning and numerics tests.
SHORT_PROMPT = "a cat in a fire fighter's helmet"
ONE_STEP = ["--height", "128", "--width", "128", "--prior-steps", "1", "--decoder-steps", "1"]
SMALL = dict(height=128, width=128, prior_num_inference_steps=1, num_inference_steps=1, output_type="pt")
# "cat" is one CLIP token: start + 100 + end = 102 tokens, 25 over the limit of 77.
LONG_PROMPT, LONG_CUT = "cat " * 100, 25

WEIGHTS = "diffusion_pytorch_model.safetensors"
# The one-line progress report a finished stage prints on a non-tty stderr (not an error line).
# The device of the parity tests: `WURST_TEST_DEVICE=cuda make test` runs them on a GPU against diffusers there.
DEVICE = torch.device(os.environ.get("WURST_TEST_DEVICE", "cpu"))
PROGRESS = re.compile(r"^(prior|decoder): +\d+%\|.*\| \d+/\d+ \[.*\]$")  # a tqdm bar's state
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------------------
# Parity


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((ours.double() - ref).norm() / ref.norm()).item()


def parity_bound(ref32: torch.Tensor, ref64: torch.Tensor) -> float:
    """The tolerance the issues set: the reference's own fp32-vs-fp64 distance, or 1e-5 if that is larger."""
    return max(relative_error(ref32, ref64), 1e-5)


@torch.no_grad()
def bfloat16_forward_errors(ref, load_ours, inputs):
    """One forward pass in bfloat16 of wurst's model (`load_ours(dtype)`) and of diffusers' `ref`, on the same
    float32 `inputs`: the relative errors of wurst's and of diffusers' against diffusers in float64, and between
    the two."""
    exact = ref.double()(*(t.double() for t in inputs))
    theirs = ref.to(torch.bfloat16)(*(t.bfloat16() for t in inputs))
    ours = load_ours(torch.bfloat16)(*(t.bfloat16() for t in inputs))
    return relative_error(ours, exact), relative_error(theirs, exact), relative_error(ours, theirs)


def assert_images_informative(images):
    """A parity test on saturated or flat images proves little."""
    clamped = ((images <= 0) | (images >= 1)).float().mean().item()
    assert clamped < 0.01, f"{clamped:.1%} of pixels at the clamp"
    assert images.std() > 0.02


# ---------------------------------------------------------------------------------------------------------
# The CLI and its output


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_batch(args, capsys):
    """`python -m wurst.batch ARGS` in this process: (exit code, stdout, stderr)."""
    code = batch_app.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def contents(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes."""
    return {name: (folder / name).read_bytes() for name in files_in(folder)}


def run_module(args, env=None, cwd=None, *, timeout: float = 120, memory: int | None = None):
    """`python ARGS` in a fresh process that imports this checkout. Running past `timeout` seconds (a hang) fails the
    test; `memory` caps the process's address space (RLIMIT_AS), so that an input which would exhaust memory fails
    it at once instead of taking the machine's."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (memory, memory))) if memory else None
    try:
        return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                              timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"python {shlex.join(map(str, args))[:300]} ran past {timeout} s") from None


def fingerprint(folder: Path) -> dict[str, str]:
    """Every entry under `folder`, hidden ones included, and what it is: a file's sha256, a link's target, a
    folder, or another kind (a pipe); equal fingerprints mean that nothing was left behind or changed."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(folder))] = f"link to {os.readlink(path)}"
        elif path.is_dir() or not path.is_file():
            found[str(path.relative_to(folder))] = "folder" if path.is_dir() else "special"
        else:
            found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def files_in(folder: Path) -> list[str]:
    """Every file (PNG, temporary or probe) under `folder`, hidden ones included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


def assert_one_line_error(code, out, err, culprit, folder, *, exit_code=2, prefix="wurst: error: ",
                          progress_ok=False):
    """A non-zero exit, exactly one line on stderr (besides the progress lines of stages that finished, when
    `progress_ok`), naming `culprit`, no traceback, nothing on stdout and no file in `folder` (unless it is None:
    a folder that holds files already is compared with tests.helpers.fingerprint instead)."""
    assert code == exit_code, err
    assert "Traceback" not in out + err
    # tqdm redraws a bar after a carriage return, which splitlines() also splits at: the empty piece before it
    # and each state of the bar are progress, not error lines.
    lines = [line for line in err.splitlines() if not (progress_ok and (not line or PROGRESS.match(line)))]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    assert culprit in lines[0], err
    assert out == ""
    assert folder is None or files_in(folder) == []
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# Memory, as the kernel counts it


def rss(field: str) -> int:
    """Bytes of a memory field of /proc/self/status: "VmRSS" (resident now) or "VmHWM" (the peak so far)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/self/status has no {field} line")


# rss() as source, for the scripts the measurements run in a fresh process: they begin with it.
RSS_PROBE = inspect.getsource(rss)


# ---------------------------------------------------------------------------------------------------------
# Damaged and hostile files


def not_a_regular_file(path: Path, kind: str) -> Path:
    """Put at `path` (removing what is there) a named pipe (kind "pipe"), where opening blocks until a writer comes,
    or a link to /dev/zero ("zero"), endless zeros."""
    path.unlink(missing_ok=True)
    if kind == "pipe":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    return path


def edit_weights(path: Path, edit) -> None:
    state = load_file(path)
    edit(state)
    save_file(state, path)


class RunsCode:
    """Unpickling this would call os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------------------------------------
# wurst against diffusers, one pipeline class at a time


def seeded(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_both(pair, *args, seed: int = 7, output: str | None = None, **kwargs):
    """The same call on (wurst's, diffusers') pipelines, each with a fresh CPU generator of the same seed (as the
    documentation's examples seed them). Both outputs as they come; or, when `output` names a field of them
    ("images", "image_embeddings"), that field of each, on the CPU (the pipelines may run on WURST_TEST_DEVICE)."""
    ours, ref = pair
    results = ours(*args, generator=seeded(seed), **kwargs), ref(*args, generator=seeded(seed), **kwargs)
    if output is None:
        return results
    got, expected = (getattr(result, output) for result in results)
    return got.cpu(), expected.cpu()


def assert_close_images(got, expected, tolerance: float) -> None:
    assert isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == expected.dtype
    error = (got - expected).abs().max().item()
    assert error <= tolerance, error


def record_shapes(records: list, pipe, step: int, timestep, tensors: dict) -> None:
    """What a step callback saw: the pipeline, step, timestep and {name: (shape, dtype) or None}."""
    shapes = {k: None if v is None else (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    records.append((pipe, step, round(float(timestep), 6), shapes))


def shape_recorder(records: dict, key: str):
    """A step callback that records what it sees (record_shapes) under records[key] and edits nothing."""
    records[key] = []

    def record(pipe, step, timestep, tensors):
        record_shapes(records[key], pipe, step, timestep, tensors)
        return {}

    return record


# ---------------------------------------------------------------------------------------------------------
# LoRA files

# The tiny prior (tools/hub_fixtures.TINY): width 32, depth 2, so its attention blocks are blocks 2 and 5; its text
# encoder has width 32 and 2 layers. Names as diffusers' WuerstchenPrior and transformers' CLIPTextModel give them.
TINY_PRIOR_ATTENTION = [f"blocks.{i}.attention.{p}" for i in (2, 5) for p in ("to_q", "to_k", "to_v", "to_out.0")]
TINY_TEXT_ATTENTION = [f"text_model.encoder.layers.{i}.self_attn.{p}" for i in (0, 1)
                       for p in ("q_proj", "k_proj", "v_proj", "out_proj")]


def make_prior_lora(seed: int, rank: int = 2, scale: float = 0.3, text_encoder: bool = False,
                    width: int = 32) -> dict[str, torch.Tensor]:
    """A random LoRA in diffusers' format for the tiny prior's attention (and its text encoder's, when asked): strong
    enough to move the output far beyond every parity tolerance."""
    generator = torch.Generator().manual_seed(seed)
    modules = [("prior", m) for m in TINY_PRIOR_ATTENTION]
    modules += [("text_encoder", m) for m in TINY_TEXT_ATTENTION] if text_encoder else []
    state = {}
    for prefix, module in modules:
        state[f"{prefix}.{module}.lora_A.weight"] = torch.randn(rank, width, generator=generator) * scale
        state[f"{prefix}.{module}.lora_B.weight"] = torch.randn(width, rank, generator=generator) * scale
    return state


# ---------------------------------------------------------------------------------------------------------
# Training


def write_captioned_images(folder: Path, sizes=((128, 128), (128, 128)), seed: int = 0) -> Path:
    """A training dataset in kohya's layout: random-noise PNGs of `sizes` (height, width) with same-name captions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (height, width) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"image{i}.png")
        (folder / f"image{i}.txt").write_text(f"a picture of noise number {i}", encoding="utf-8")
    return folder


def training_checkpoint(out: Path) -> dict:
    """The checkpoint.pt of a python -m wurst.train output folder."""
    return torch.load(out / "checkpoint.pt", weights_only=True, map_location="cpu")


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same names and, for each, the same values bit for bit."""
    assert got.keys() == expected.keys()
    for name in got:
        assert torch.equal(got[name], expected[name]), name
