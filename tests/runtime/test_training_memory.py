"""The training memory estimate (python -m wurst.train): how it moves with the options, its activation term against
what autograd really keeps, the one-line refusal and its ways out, the refusal through the trainer before anything
is written, and, at published size (slow), the estimate against the measured peak RSS of a training step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.autograd.graph import saved_tensors_hooks

from tests.helpers import RSS_PROBE, assert_one_line_error
from tools import hub_fixtures
from wurst.errors import InsufficientMemoryError
from wurst.pipelines.prior import WuerstchenPriorPipeline
from wurst.runtime import memory, training_memory
from wurst.train.app import build_parser, main
from wurst.train.data import Sample
from wurst.train.loop import TEXT_TARGETS, chosen_layers, trainable_objective

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)  # the estimate only reads the device's type


def options(*extra: str, resolution: int = 256) -> object:
    return build_parser().parse_args(["data", "--out", "out", "--resolution", str(resolution), *extra])


def square(side: int) -> list[Sample]:
    return [Sample(index=0, image=Path("x.png"), caption="c", height=side, width=side)]


def load(repo, args):
    """The prior pipeline as the trainer loads it: float32 for --full, else the training dtype."""
    dtype = getattr(torch, args.dtype or "float32")
    pipe = WuerstchenPriorPipeline.from_pretrained(repo, torch_dtype=torch.float32 if args.full else dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dtype


@pytest.fixture(scope="module")
def prior32(tiny_prior_repo):
    """The tiny prior pipeline in float32, read by every estimate that attaches nothing to it."""
    return load(tiny_prior_repo, options("--dtype", "float32"))[0]


def estimate(pipe, *extra: str, resolution: int = 256, samples=None, device=CUDA, world: int = 1,
             dtype=torch.float32) -> training_memory.TrainingEstimate:
    args = options(*extra, resolution=resolution)
    return training_memory.training_estimate(args, pipe=pipe, samples=samples or square(resolution), device=device,
                                    dtype=dtype, world=world)


def loaded_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def lora_parameters(module, component: str, targets: list[str], rank: int) -> int:
    """The parameters a LoRA of `rank` on `targets` trains, counted from the layers' shapes."""
    return sum(rank * (layer.weight.shape[0] + layer.weight.shape[1])
               for layer in chosen_layers(component, module, targets).values())


# ---------------------------------------------------------------------------------------------------------
# How the estimate moves


def test_weights_and_trained_state_are_counted_from_the_models(prior32):
    """Weights: the prior as loaded, and the text encoder where it trains. Trained state, float32 per trained
    parameter: gradient 4 and AdamW's two moments 8, the LoRA factors themselves 4, an EMA copy 4,
    DistributedDataParallel's buckets 4."""
    lora = lora_parameters(prior32.prior, "prior", ["to_q", "to_k", "to_v", "to_out.0"], 4)
    assert lora == 2 * 4 * 4 * (32 + 32)  # two attention blocks, four 32x32 layers, rank 4
    plain = estimate(prior32)
    assert plain.weights == loaded_bytes(prior32.prior)  # the text encoder is loaded only to fill the cache
    assert estimate(prior32, "--train-text-encoder").weights == loaded_bytes(prior32.prior, prior32.text_encoder)
    assert plain.trained == 16 * lora
    assert estimate(prior32, "--ema-decay", "0.99").trained == 20 * lora
    assert estimate(prior32, "--lora-rank", "8").trained == 16 * 2 * lora
    text = lora_parameters(prior32.text_encoder, "text_encoder", list(TEXT_TARGETS), 4)
    assert estimate(prior32, "--train-text-encoder").trained == 16 * (lora + text)
    full = sum(p.numel() for p in prior32.prior.parameters())
    assert estimate(prior32, "--full").trained == 12 * full  # the weights themselves are the weights
    two = estimate(prior32, "--batch-size", "2", world=2)
    assert two.trained == 20 * lora and two.micro_batch == 1


def test_activations_at_128x128_by_hand(prior32):
    """One sample of the tiny prior (c 32, depth 2: blocks 0-5, AttnBlocks 2 and 5), float32, the default LoRA on
    q, k, v and out of both AttnBlocks, a 4x4 latent: 16 pixels of 32 values, 2048 bytes a layer of width c."""
    layer = 16 * 32 * 4
    by_hand = (
        4 * layer  # block 2, the first trained one: SDPA's q, k, v, output (not its norm's input)
        + 10 * layer  # block 3, ResBlock: depthwise and norm inputs, the 4c GELU's input and output
        + 5 * layer  # block 5, AttnBlock: its norm's input too
        + 2 * (layer + 4 * 16 * 4 * 4)  # the LoRA, each AttnBlock: the tokens q, k, v share; four rank-4 products
        + 2 * (77 * 32 * 4 + 2 * 77 * 4 * 4)  # and on the text: the context k and v share, their rank-4 products
        + 2 * 2 * 77 * 32 * 4  # the text half of SDPA's keys and values, each AttnBlock
        + 2 * layer + 5 * 16 * 16 * 4  # the final norm's and the head's inputs; five 16-channel float32 tensors
        + 12 * layer  # the backward pass's working set
    )
    assert by_hand == 142912
    assert estimate(prior32, resolution=128).activations == by_hand
    assert estimate(prior32, "--batch-size", "2", resolution=128, device=CPU).activations == 3 * by_hand


def test_activations_grow_with_batch_and_resolution_and_shrink_with_checkpointing(prior32):
    def activations(*extra, **kw) -> int:
        return estimate(prior32, *extra, **kw).activations

    one = activations()
    # A micro-batch of n keeps n samples' tensors; accumulation and processes split the global batch.
    assert activations("--batch-size", "3") == 3 * one
    assert activations("--batch-size", "4", "--gradient-accumulation", "2") == 2 * one
    assert activations("--batch-size", "4", world=2) == 2 * one
    # Per sample, the tensors are an affine function of the latent's pixel count: the text terms stay the same
    # (8x8, 12x12, 16x16 latents), and nothing grows with the square of the pixels.
    a256, a384, a512 = (activations(resolution=r) for r in (256, 384, 512))
    assert (a384 - a256) * (256 - 64) == (a512 - a256) * (144 - 64)
    # The largest bucket sets the latent: a 512x256 bucket keeps as much as a 384x384 one would with 128 pixels.
    wide = [Sample(index=0, image=Path("x.png"), caption="c", height=256, width=512), *square(256)]
    assert activations(samples=wide) == a256 + (a384 - a256) * (128 - 64) // (144 - 64)
    assert activations("--gradient-checkpointing") < one
    assert activations("--full") > one and activations("--lora-targets", "all") > one
    assert activations("--train-text-encoder") > one
    # On the CPU the heap's holes come on top: glibc's RSS over the tensors' bytes.
    assert estimate(prior32, device=CPU).activations == -(-one * 3 // 2)


def test_total_grows_with_full_and_the_optimizer_scratch_covers_cuda(prior32):
    assert estimate(prior32, "--full").total > estimate(prior32).total
    # With the activations small, AdamW's foreach scratch (sqrt of the second moment, 4 bytes per trained
    # parameter) is the larger part of the step on CUDA. (On a device that is neither, the activations alone.)
    trained = sum(p.numel() for p in prior32.prior.parameters())
    run = ("--full", "--gradient-checkpointing")
    alone = estimate(prior32, *run, resolution=32, device=torch.device("meta")).activations
    assert alone < 4 * trained
    assert estimate(prior32, *run, resolution=32).activations == 4 * trained


# ---------------------------------------------------------------------------------------------------------
# The activation term against what autograd keeps


def kept_bytes(objective: torch.nn.Module, inputs: dict) -> int:
    """The bytes of the tensors autograd keeps from one forward pass for the backward pass, each storage once,
    the parameters left out (they are the weights)."""
    weights = {t.untyped_storage().data_ptr() for t in [*objective.parameters(), *objective.buffers()]}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        objective(**inputs)
    return sum(kept.values())


@pytest.mark.parametrize("extra", [
    ("--dtype", "float32"),
    ("--dtype", "bfloat16"),
    ("--dtype", "float32", "--lora-targets", "all"),
    ("--dtype", "bfloat16", "--lora-targets", "all", "--lora-rank", "8"),
    ("--dtype", "float32", "--full"),
    ("--dtype", "bfloat16", "--full"),
    ("--dtype", "bfloat16", "--train-text-encoder"),
], ids=["lora-f32", "lora-bf16", "lora-all-f32", "lora-all-bf16", "full-f32", "full-bf16-autocast", "text-encoder"])
@pytest.mark.parametrize("resolution", [256, 512])
def test_kept_tensors_match_the_constants(extra, resolution, tiny_prior_repo):
    """One training forward of the tiny prior (batch 2), made trainable as the trainer makes it, with the tensors
    autograd keeps measured by saved_tensors_hooks: the estimate's kept part (its activations less the backward's
    working set) is within 10% of them."""
    args = options(*extra, "--batch-size", "2", resolution=resolution)
    pipe, dtype = load(tiny_prior_repo, args)
    targets = [t.strip() for t in args.lora_targets.split(",")]
    prior_lora = {} if args.full else chosen_layers("prior", pipe.prior, targets)
    text_lora = chosen_layers("text_encoder", pipe.text_encoder, list(TEXT_TARGETS)) if args.train_text_encoder else {}
    autocast_copies = memory.model_bytes(pipe.prior, dtype) if args.full and dtype != torch.float32 else 0
    cfg, e, side = pipe.prior.config, dtype.itemsize, resolution // 32
    plan = training_memory._Plan(full=args.full, checkpointing=False, batch=2, resolution=resolution)
    per_sample = training_memory._stage_c_kept(cfg, plan, pixels=side * side, e=e, lora=prior_lora, rank=args.lora_rank)
    per_sample -= training_memory.BACKWARD * side * side * cfg.c * e
    if text_lora:
        per_sample += training_memory._text_encoder_kept(pipe.text_encoder.config, text_lora, rank=args.lora_rank, e=e)
    # The whole estimate is that, plus the backward's working set, plus autocast's weight copies (--full bfloat16).
    working = 2 * training_memory.BACKWARD * side * side * cfg.c * e
    assert training_memory.training_estimate(args, pipe=pipe, samples=square(resolution), device=CUDA, dtype=dtype,
                                    world=1).activations == 2 * per_sample + working + autocast_copies

    objective, _ = trainable_objective(args, pipe, dtype)
    generator = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(2, 16, side, side, generator=generator) for name in ("latents", "noise")}
    inputs["t"] = torch.rand(2, generator=generator)
    if args.train_text_encoder:
        ids, mask = pipe.tokenizer(["a cat", "a dog on a mat"])
        inputs.update(token_ids=ids, token_mask=mask)
    else:
        inputs["text"] = torch.randn(2, 77, cfg.c_cond, generator=generator).to(dtype)
    measured = kept_bytes(objective, inputs)
    assert abs((2 * per_sample + autocast_copies) / measured - 1) <= 0.10, (2 * per_sample + autocast_copies, measured)


# ---------------------------------------------------------------------------------------------------------
# The refusal


def fake_memory(monkeypatch, available) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda device: available)


def check(pipe, *extra: str, resolution: int = 256, device=CPU, world: int = 1):
    args = options(*extra, resolution=resolution)
    return training_memory.check_training_memory(args, pipe=pipe, samples=square(resolution), device=device,
                                        dtype=torch.float32, world=world)


def refusal(pipe, *extra: str, **kw) -> str:
    with pytest.raises(InsufficientMemoryError) as info:
        check(pipe, *extra, **kw)
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith("(--force tries anyway)")
    return message


def ways_out(message: str) -> list[str]:
    return message.split("would fit: ")[1].removesuffix(" (--force tries anyway)").split(" or ")


def test_a_run_that_fits_returns_its_estimate_and_an_unknown_device_is_not_checked(prior32, monkeypatch):
    need = estimate(prior32, device=CPU)
    fake_memory(monkeypatch, need.total)
    assert check(prior32) == need
    fake_memory(monkeypatch, None)
    assert check(prior32) is None


def test_refusal_says_what_it_needs_what_there_is_and_each_way_out(prior32, monkeypatch):
    run = ("--full", "--batch-size", "4")
    need = estimate(prior32, *run, resolution=512, device=CPU)
    lora = estimate(prior32, "--batch-size", "4", resolution=512, device=CPU)
    available = (need.total + lora.total) // 2  # LoRA fits; so do a smaller batch and resolution, and checkpointing
    fake_memory(monkeypatch, available)
    message = refusal(prior32, *run, resolution=512)
    assert message.startswith(f"training (--full, --batch-size 4, images up to 512x512) needs about "
                              f"{need.total / 1e6:.0f} MB of RAM at its peak ({need.weights / 1e6:.0f} MB of weights, "
                              f"{need.trained / 1e6:.0f} MB of trained state, {need.activations / 1e6:.0f} MB of "
                              f"activations) and {available / 1e6:.0f} MB is available; would fit: ")  # under 1 GB: MB
    ways = ways_out(message)
    assert ways[:2] == ["LoRA (without --full)", "--gradient-checkpointing"]
    assert estimate(prior32, *run, "--gradient-checkpointing", resolution=512, device=CPU).total <= available

    def fits(batch=4, resolution=512):
        return estimate(prior32, "--full", "--batch-size", str(batch), resolution=resolution,
                        device=CPU).total <= available

    # The largest batch that fits, and the largest resolution on the 128 grid that fits.
    batch = int(ways[2].removeprefix("--batch-size "))
    assert 1 <= batch < 4 and fits(batch=batch) and not fits(batch=batch + 1)
    resolution = int(ways[3].removeprefix("--resolution "))
    assert resolution % 128 == 0 and fits(resolution=resolution) and not fits(resolution=resolution + 128)


def test_batch_suggestions_keep_the_batch_a_multiple_of_accumulation_and_processes(prior32, monkeypatch):
    run = ("--gradient-accumulation", "2", "--gradient-checkpointing")

    def need(batch: int) -> int:  # on the CPU, each of the 2 processes
        return 2 * estimate(prior32, "--batch-size", str(batch), *run, world=2, device=CPU).total

    available = (need(8) + need(16)) // 2
    fake_memory(monkeypatch, available)
    message = refusal(prior32, "--batch-size", "16", *run, world=2)
    assert "--batch-size 16 in micro-batches of 4" in message and "in each of its 2 processes" in message
    batch = int(next(way for way in ways_out(message) if way.startswith("--batch-size ")).split()[1])
    assert batch % 4 == 0 and 8 <= batch < 16 and need(batch) <= available < need(batch + 4)


def test_when_no_one_change_fits_the_changes_together_are_named(prior32, monkeypatch):
    """At the smallest resolution and batch, LoRA alone and checkpointing alone are not enough, both are."""
    together = estimate(prior32, "--gradient-checkpointing", resolution=128, device=CPU).total
    lora_alone = estimate(prior32, resolution=128, device=CPU).total
    checkpointing_alone = estimate(prior32, "--full", "--gradient-checkpointing", resolution=128, device=CPU).total
    assert together < min(lora_alone, checkpointing_alone)
    fake_memory(monkeypatch, together)
    assert ways_out(refusal(prior32, "--full", resolution=128)) == [
        "LoRA (without --full) with --gradient-checkpointing"]
    # A larger batch: LoRA, checkpointing and the largest batch that fits with them.
    run = ("--gradient-checkpointing", "--batch-size")
    fake_memory(monkeypatch, estimate(prior32, *run, "3", resolution=128, device=CPU).total)
    assert estimate(prior32, *run, "4", resolution=128, device=CPU).total > memory.available_memory(CPU)
    assert ways_out(refusal(prior32, "--full", "--batch-size", "8", resolution=128)) == [
        "LoRA (without --full) with --gradient-checkpointing and --batch-size 3"]


def test_when_nothing_fits_the_refusal_says_so(prior32, monkeypatch):
    fake_memory(monkeypatch, 1000)
    message = refusal(prior32, "--full", "--batch-size", "2")
    assert message.endswith(" 0 MB is available; nothing smaller fits either (--force tries anyway)")


def test_on_a_gpu_the_loaded_weights_are_added_back_to_the_free_memory(prior32, monkeypatch):
    """The models are on the GPU when the check runs: the free memory no longer holds them."""
    need = estimate(prior32, device=CUDA)
    fake_memory(monkeypatch, need.total - need.weights)
    assert check(prior32, device=CUDA) == need
    fake_memory(monkeypatch, need.total - need.weights - 1)
    assert " MB of memory on cuda:0 at its peak" in refusal(prior32, device=CUDA)


def test_cpu_processes_of_one_machine_each_need_their_own(prior32, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    need = estimate(prior32, "--batch-size", "2", world=2, device=CPU)
    fake_memory(monkeypatch, 2 * need.total)
    assert check(prior32, "--batch-size", "2", world=2) == need
    fake_memory(monkeypatch, 2 * need.total - 1)
    assert "of RAM in each of its 2 processes at its peak" in refusal(prior32, "--batch-size", "2", world=2)


# ---------------------------------------------------------------------------------------------------------
# Through the trainer


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(folder / f"image{i}.png")
        (folder / f"image{i}.txt").write_text(f"noise number {i}", encoding="utf-8")
    return folder


def test_trainer_refuses_before_anything_is_written_and_force_trains(dataset, tiny_prior_repo, encoder_folder,
                                                                     out_dir, capsys, monkeypatch):
    fake_memory(monkeypatch, 1000)
    command = [str(dataset), "--out", str(out_dir), "--prior", str(tiny_prior_repo), "--image-encoder",
               str(encoder_folder), "--dtype", "float32", "--device", "cpu", "--resolution", "128", "--steps", "1"]
    code = main(command)
    captured = capsys.readouterr()
    line = assert_one_line_error(code, captured.out, captured.err, "0 MB is available; nothing smaller fits either",
                                 out_dir, prefix="wurst.train: error: training (LoRA rank 4, --batch-size 1, "
                                                 "images up to 128x128) needs about ")
    assert line.endswith("(--force tries anyway)")
    assert not (out_dir / "checkpoint.pt").exists() and not (out_dir / "metrics.jsonl").exists()
    assert main([*command, "--force"]) == 0, capsys.readouterr().err
    assert (out_dir / "checkpoint.pt").exists() and (out_dir / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------
# Published size: the estimate against the measured peak RSS of a training step

MEASURE = RSS_PROBE + """
import json, sys
from pathlib import Path
import torch
from wurst.runtime import training_memory
from wurst.train.app import build_parser
from wurst.train.data import Sample
from wurst.train.loop import load_prior_pipeline, trainable_objective
torch.set_num_threads(2)
args = build_parser().parse_args(["data", "--out", "out", *sys.argv[2:]])
dtype = getattr(torch, args.dtype)
args.prior = sys.argv[1]
pipe = load_prior_pipeline(args, torch.device("cpu"), dtype)
side = args.resolution
samples = [Sample(index=0, image=Path("x.png"), caption="c", height=side, width=side)]
estimate = training_memory.training_estimate(args, pipe=pipe, samples=samples, device=torch.device("cpu"),
                                             dtype=dtype, world=1)
with torch.no_grad():  # the trainer encodes the captions first, the text encoder loaded only while it runs
    text = pipe.encode_text(pipe.tokenizer, ["a photo of a cat"] * args.batch_size)
Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: loading's own transient left out
before = rss("VmRSS")
objective, trained = trainable_objective(args, pipe, dtype)
optimizer = torch.optim.AdamW(trained.values(), lr=1e-4)
generator = torch.Generator().manual_seed(0)
latent = (args.batch_size, 16, side // 32, side // 32)
losses = objective(latents=torch.randn(latent, generator=generator), noise=torch.randn(latent, generator=generator),
                   t=torch.rand(args.batch_size, generator=generator), text=text)
losses.sum().backward()
optimizer.step()
print(json.dumps({"before": before, "estimate": estimate.total, "peak": rss("VmHWM")}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--gradient-checkpointing",)], ids=["plain", "checkpointing"])
def test_published_training_estimate_within_15_percent_of_the_measured_peak(extra):
    """LoRA rank 4 on the attention, bfloat16, one 512x512 image, on the CPU: one step in a fresh process (about
    half a minute on 2 cores), its peak RSS against the RSS before the step plus the estimate. Measured when the
    constants were set: 4.59 GB against 4.72 predicted, and 4.07 against 3.99 with checkpointing."""
    prior_dir = hub_fixtures.ensure("published", "prior")
    run = ["--dtype", "bfloat16", "--resolution", "512", "--batch-size", "1", *extra]
    out = subprocess.run([sys.executable, "-c", MEASURE, prior_dir, *run], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    predicted = result["before"] + result["estimate"]
    print(f"published training step {' '.join(run)}: measured peak RSS {result['peak'] / 1e9:.2f} GB, predicted "
          f"{predicted / 1e9:.2f} GB ({result['before'] / 1e9:.2f} GB before the step + {result['estimate'] / 1e9:.2f} "
          "GB estimated)")
    assert abs(predicted / result["peak"] - 1) <= 0.15
