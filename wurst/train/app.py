"""python -m wurst.train DATA --out DIR: fine-tune Stage C (LoRA or full) on a folder of captioned images.

The run: check everything (options, dataset, output folder, memory), load the models, encode the dataset once into
the cache, then train step by step, checkpointing every --checkpoint-every steps. Rerunning the same command resumes
from the last checkpoint; under torchrun the processes share each step's global batch (DistributedDataParallel)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from wurst.batch.folder import JOB, inspect_folder
from wurst.cli import DTYPES, Parser, device_and_dtype, run_command
from wurst.errors import ArgumentError, WurstError
from wurst.files import write_file_atomically
from wurst.runtime.distributed import decided_by_rank_zero, process_group, rank_and_world

PROGRESS = "progress.json"  # {"step": the checkpoint's step, "finished": whether the outputs are written}
DEFAULT_PRIOR = "warp-ai/wuerstchen-prior-model-base"  # the documentation: "use v2-base for finetunings"
DEFAULT_TARGETS = "to_q,to_k,to_v,to_out.0"  # diffusers' LoRA script and peft's usual attention targets

# Settings that do not change the trained weights: a rerun may change them.
NOT_COMPARED = ("steps", "checkpoint_every", "validation_prompt", "validation_every", "report_to", "decoder", "force",
                "device")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m wurst.train", description="Fine-tune Würstchen's Stage C (the prior) with LoRA or "
               "in full, on a folder of images with captions.")
    p.add_argument("data", help="a folder of images with same-name .txt captions, or with a metadata.jsonl of "
                   "file_name and text")
    p.add_argument("--out", required=True, help="the output folder: weights, checkpoint, metrics.jsonl")
    p.add_argument("--prior", default=DEFAULT_PRIOR, help=f"the prior to fine-tune (default {DEFAULT_PRIOR})")
    p.add_argument("--image-encoder", default=None, help="Stage C's image encoder: model_v2_stage_b.pt or a "
                   "converted folder (default: the one of a converted --prior, else dome272/wuerstchen's)")
    p.add_argument("--decoder", default="warp-ai/wuerstchen", help="the decoder that draws the validation images")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="train every weight of the prior instead of a LoRA")
    mode.add_argument("--lora-rank", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; the scale is alpha / rank "
                   "(default: the rank, a scale of 1)")
    p.add_argument("--lora-targets", default=DEFAULT_TARGETS, help="the prior's linear layers to adapt, by the end "
                   f"of their diffusers name, comma-separated, or 'all' (default {DEFAULT_TARGETS})")
    p.add_argument("--train-text-encoder", action="store_true", help="also train a LoRA on the text encoder's "
                   "attention (LoRA only)")
    p.add_argument("--recipe", choices=("original", "diffusers"), default="original",
                   help="original (default): stretched t, P2 loss weight, 5%% caption dropout; diffusers: uniform t, "
                        "plain MSE, as diffusers' training scripts")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=1, help="the global batch of one step, over all processes")
    p.add_argument("--gradient-accumulation", type=int, default=1, help="micro-batches per step and process")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW's learning rate (default 1e-4)")
    p.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default 1.0)")
    p.add_argument("--resolution", type=int, default=512, help="training image size, a multiple of 32; the latent is "
                   "1/32 of it (default 512)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the data order, noise and t (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="the frozen weights' dtype and, with --full, "
                   "the compute dtype (autocast); trained weights stay float32 (default as in python -m wurst)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward "
                   "pass: less memory, more time")
    p.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the trained weights with this decay "
                   "per step, and write it as the output")
    p.add_argument("--validation-prompt", action="append", default=[], help="draw an image of this prompt every "
                   "--validation-every steps and at the end (repeatable)")
    p.add_argument("--validation-every", type=int, default=None, help="steps between validation images "
                   "(default: only at the end)")
    p.add_argument("--report-to", choices=("none", "tensorboard"), default="none", help="also write TensorBoard logs")
    p.add_argument("--force", action="store_true", help="skip the memory check")
    return p


def check_options(args: argparse.Namespace, world: int) -> None:
    """The options that can be checked alone, before anything is read."""
    def positive(name: str, value) -> None:
        if value is not None and value <= 0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be positive, got {value}")

    for name in ("steps", "batch_size", "gradient_accumulation", "checkpoint_every", "validation_every"):
        positive(name, getattr(args, name))
    if not args.full:
        positive("lora_rank", args.lora_rank)
        positive("lora_alpha", args.lora_alpha)
    if args.full and args.train_text_encoder:
        raise ArgumentError("--train-text-encoder trains a LoRA on the text encoder: it goes with LoRA, not --full")
    if args.resolution < 32 or args.resolution % 32:
        raise ArgumentError(f"--resolution must be a positive multiple of 32 (the latent is 1/32 of it), got "
                            f"{args.resolution}")
    for name in ("learning_rate", "max_grad_norm"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise ArgumentError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if args.lr_warmup_steps < 0:
        raise ArgumentError(f"--lr-warmup-steps must be 0 or more, got {args.lr_warmup_steps}")
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        raise ArgumentError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.seed < 0 or args.seed >= 2**63:
        raise ArgumentError(f"--seed must be in [0, 2**63), got {args.seed}")
    per_step = args.gradient_accumulation * world
    if args.batch_size % per_step:
        raise ArgumentError(f"--batch-size {args.batch_size} does not split into {args.gradient_accumulation} "
                            f"micro-batches on each of {world} processes: make it a multiple of {per_step}")
    if args.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError as e:
            raise ArgumentError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from e


def job_settings(args: argparse.Namespace, *, fingerprint: str, dtype) -> dict:
    """job.json: what the trained weights depend on (a rerun with other values is refused), and the rest."""
    settings = {key: value for key, value in vars(args).items() if key not in ("data", "out")}
    settings.update(data=str(Path(args.data).resolve()), dataset_sha256=fingerprint,
                    dtype=str(dtype).removeprefix("torch."))
    if args.full:
        for key in ("lora_rank", "lora_alpha", "lora_targets", "train_text_encoder"):
            settings.pop(key)
    return settings


def compared(settings: dict) -> dict:
    return {key: value for key, value in settings.items() if key not in NOT_COMPARED}


def read_progress(out: Path) -> dict:
    from wurst.weights.configs import read_json

    return read_json(out / PROGRESS) if (out / PROGRESS).exists() else {"step": 0, "finished": False}


def write_progress(out: Path, *, step: int, finished: bool) -> None:
    import json

    write_file_atomically(out / PROGRESS, json.dumps({"step": step, "finished": finished}).encode() + b"\n")


def check_job(args: argparse.Namespace, rank: int, world: int):
    """The dataset and the output folder, checked by rank 0: (samples, settings, dtype, progress)."""
    from wurst.train.data import dataset_fingerprint, read_dataset

    dtype = device_and_dtype(args)[1]

    def decide():
        samples = read_dataset(args.data, args.resolution)
        settings = job_settings(args, fingerprint=dataset_fingerprint(samples), dtype=dtype)
        out = Path(args.out)
        job = read_job(out) if (out / JOB).exists() else None
        if job is not None:  # a rerun: the weights must come out as this job's
            check_same_job(out, theirs=job, ours=settings)
        inspect_folder(out, job or settings)  # a folder this process can write, and no other job's files
        progress = read_progress(out)
        if progress["step"] > args.steps:
            raise ArgumentError(f"--out {out} holds a checkpoint of step {progress['step']}, past --steps "
                                f"{args.steps}")
        return samples, settings, progress

    samples, settings, progress = decided_by_rank_zero(decide, rank, world)
    return samples, settings, dtype, progress


def read_job(out: Path) -> dict:
    from wurst.weights.configs import read_json

    try:
        return read_json(out / JOB)
    except WurstError as e:
        raise ArgumentError(f"{e}: use a new --out folder") from e


def check_same_job(out: Path, *, theirs: dict, ours: dict) -> None:
    theirs, ours = compared(theirs), compared(ours)
    keys = [*ours, *(key for key in theirs if key not in ours)]
    differences = [f"{key} is {theirs.get(key)!r} there, {ours.get(key)!r} here" for key in keys
                   if theirs.get(key) != ours.get(key)]
    if differences:
        raise ArgumentError(f"--out {out} holds another training job ({JOB}): {'; '.join(differences)}")


def run(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    check_options(args, world=rank_and_world()[1])
    with process_group(device_and_dtype(args)[0]) as (rank, world, device):
        samples, settings, dtype, progress = check_job(args, rank, world)
        if progress.get("finished") and progress["step"] == args.steps:
            if rank == 0:
                print(f"wurst.train: {args.out} already holds this job, finished at step {args.steps}: nothing to do",
                      file=sys.stderr)
            return
        from wurst.train.loop import train

        train(args, samples=samples, settings=settings, device=device, dtype=dtype, rank=rank, world=world)


def main(argv: list[str] | None = None) -> int:
    return run_command("wurst.train", run, argv,
                       interrupted="rerun the same command to resume from the last checkpoint")
