"""`python -m wurst.batch`: the command, its checks, and the run of each process (see wurst/batch/__init__.py)."""

from __future__ import annotations

import argparse
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

from wurst.batch.folder import JOURNALS, MANIFEST, Journal, complete, file_name, finish, inspect_folder, start_folder
from wurst.batch.plan import PlannedImage, plan_groups, read_prompts
from wurst.batch.progress import Progress
from wurst.cli import (
    Parser,
    add_generation_options,
    add_model_options,
    check_generation_options,
    check_memory,
    device_and_dtype,
    generation_settings,
    lora_options,
    run_command,
)
from wurst.errors import ArgumentError, WurstError
from wurst.files import file_sha256, png_bytes, png_metadata, write_file_atomically
from wurst.runtime.distributed import decided_by_rank_zero, process_group
from wurst.weights.lora_refs import ChosenLora, choose_loras


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m wurst.batch", description="Würstchen v2 for many prompts, on one or many processes.")
    p.add_argument("prompts", help="a text file (one prompt per line) or a .jsonl file (one JSON object per line)")
    p.add_argument("--out", required=True, help="the output folder (created; a rerun resumes the job in it)")
    p.add_argument("--batch-size", type=int, default=1, help="images of one size per forward pass (default 1)")
    add_generation_options(p, seed_help="base seed BASE: image k of a line without a seed draws from BASE+k "
                                         "(default 0: a rerun must draw the same images, so never random)")
    add_model_options(p)
    p.set_defaults(seed=0)
    return p


# ---------------------------------------------------------------------------------------------------------
# Running: the job's checks on every process, then each process's share of the pending groups


class JobRefused(ArgumentError):
    """A refusal of the job itself (its options or prompts file), which every process reaches alike."""


def job_settings(args: argparse.Namespace, prompts: Path, device, dtype, *, loras: list[ChosenLora]) -> dict:
    """What decides the images: not the number of processes, their threads or the memory mode. The LoRAs, when
    there are any, as given, as found and by their files' sha256."""
    import wurst

    return {"prompts_sha256": file_sha256(prompts), "seed": args.seed,
            "negative_prompt": args.negative_prompt, "height": args.height, "width": args.width,
            "num_images": args.num_images, "prior_steps": args.prior_steps or "default",
            "decoder_steps": args.decoder_steps, "prior_guidance": args.prior_guidance,
            "decoder_guidance": args.decoder_guidance, "prior": str(args.prior), "decoder": str(args.decoder),
            "device": device.type, "dtype": str(dtype).removeprefix("torch."), "batch_size": args.batch_size,
            "wurst_version": wurst.__version__, **({"loras": [lora.record() for lora in loras]} if loras else {})}


def cli_command(image: PlannedImage, args: argparse.Namespace, device, dtype, *,
                loras: list[ChosenLora]) -> list[str]:
    """The `python -m wurst` command that draws this image (as image `image_index` of its --num-images)."""
    command = ["python", "-m", "wurst", image.prompt, "--seed", str(image.seed), "--height", str(image.height),
               "--width", str(image.width), "--num-images", str(image.drawn_with)]
    if image.negative_prompt:
        command += ["--negative-prompt", image.negative_prompt]
    if args.prior_steps:
        command += ["--prior-steps", str(args.prior_steps)]
    return command + ["--decoder-steps", str(args.decoder_steps), "--prior-guidance", str(args.prior_guidance),
                      "--decoder-guidance", str(args.decoder_guidance), "--prior", str(args.prior),
                      "--decoder", str(args.decoder), "--device", device.type,
                      "--dtype", str(dtype).removeprefix("torch."),
                      *(part for lora in loras for part in ("--lora", f"{lora.reference}:{lora.weight!r}"))]


def generate_group(pipe, group: list[PlannedImage], args: argparse.Namespace, output_type: str = "pil"):
    """One forward pass: a seeded line's images from its one generator, or one generator per image."""
    import torch

    from wurst.api import prior_schedule

    first = group[0]
    common = dict(height=first.height, width=first.width, prior_guidance_scale=args.prior_guidance,
                  num_inference_steps=args.decoder_steps, decoder_guidance_scale=args.decoder_guidance,
                  output_type=output_type, **prior_schedule(args.prior_steps))
    if first.drawn_with > 1:
        return pipe(first.prompt, negative_prompt=first.negative_prompt, num_images_per_prompt=first.drawn_with,
                    generator=torch.Generator("cpu").manual_seed(first.seed), **common).images
    return pipe([image.prompt for image in group], negative_prompt=[image.negative_prompt or "" for image in group],
                generator=[torch.Generator("cpu").manual_seed(image.seed) for image in group],
                **common).images


@dataclass(frozen=True)
class Job:
    """A checked job: what every process agrees on before anything is read from --out or loaded."""

    args: argparse.Namespace
    out: Path
    images: list[PlannedImage]
    groups: list[list[PlannedImage]]  # the forward passes, fixed by the job
    settings: dict  # job.json
    device: object
    dtype: object
    loras: list[ChosenLora]  # with their files' sha256


def check_job(args: argparse.Namespace) -> Job:
    """The job's checks, before any model loads; every process makes them and reaches the same verdict."""
    from wurst.pipelines import checks

    try:
        check_generation_options(args)
        checks.check_count("--batch-size", args.batch_size)
        prompts = Path(args.prompts)
        images = read_prompts(prompts, args)
        device, dtype = device_and_dtype(args)
        # Checked against the prior here too, so that under torchrun a bad LoRA is one line (rank 0's), not one a rank.
        loras = choose_loras(lora_options(args.lora), prior=args.prior, hashes=True, name="--lora")
        return Job(args=args, out=Path(args.out), images=images, groups=plan_groups(images, args.batch_size),
                   settings=job_settings(args, prompts, device, dtype, loras=loras), device=device, dtype=dtype,
                   loras=loras)
    except WurstError as e:
        raise JobRefused(str(e)) from e


def pending_groups(job: Job, rank: int, world: int) -> list[int]:
    """The numbers of the groups not done yet, read by rank 0 from --out once, before anyone writes, and shared."""

    def pending() -> list[int]:
        inspect_folder(job.out, job.settings)
        done = complete(job.out, job.images)
        return [n for n, group in enumerate(job.groups) if any(i.index not in done for i in group)]

    return decided_by_rank_zero(pending, rank, world)


def load_for(job: Job, pending: list[int], device):
    """The pipeline, once every pending forward pass is known to fit in memory (or none runs)."""
    from wurst.api import load_pipeline

    args = job.args
    pipe = load_pipeline(prior=args.prior, decoder=args.decoder, device=device, dtype=job.dtype,
                         low_memory=args.low_memory, force=args.force, loras=[lora.spec for lora in job.loras])
    pipe.set_progress_bar_config(disable=True)
    shapes = {(job.groups[n][0].height, job.groups[n][0].width, len(job.groups[n])) for n in pending}
    for height, width, size in sorted(shapes):
        check_memory(pipe, args, height=height, width=width, num_images=size)
    return pipe


def render(pipe, job: Job, group: list[PlannedImage], journal: Journal) -> None:
    """One group's images, each written whole under its number and then recorded in the journal."""
    from wurst.pipelines import checks

    args, device, dtype = job.args, job.device, job.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", checks.LargeSizeWarning)  # said when the prompts were read
        pictures = generate_group(pipe, group, args)
    for image, picture in zip(group, pictures, strict=True):
        made_with = generation_settings(args, prompt=image.prompt, negative_prompt=image.negative_prompt,
                                        seed=image.seed, height=image.height, width=image.width,
                                        num_images=image.drawn_with, device=device, dtype=dtype, loras=job.loras)
        data = png_bytes(picture, png_metadata(made_with, image_index=image.image_index,
                                               command=cli_command(image, args, device, dtype, loras=job.loras)))
        name = file_name(image.index, len(job.images))
        write_file_atomically(job.out / name, data)
        journal.append({"index": image.index, "file": name, "sha256": hashlib.sha256(data).hexdigest(),
                        "prompt": image.prompt, "seed": image.seed, "line": image.line,
                        "settings": {**made_with, "image_index": image.image_index}})


def run(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    # Size warnings wait for the memory check, which may refuse the size outright.
    with warnings.catch_warnings(record=True) as size_warnings:
        warnings.simplefilter("always")
        job = check_job(args)
    with process_group(job.device) as (rank, world, device):
        pending = pending_groups(job, rank, world)
        pipe = load_for(job, pending, device) if pending else None  # a finished job loads nothing
        for warning in size_warnings:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        # job.json before any process writes an image: a folder of images without it is refused, so a job stopped
        # while rank 0 was still loading could not be resumed. The other processes wait here for rank 0.
        decided_by_rank_zero(lambda: start_folder(job.out, job.settings), rank, world)
        if rank == 0:
            left = sum(len(job.groups[n]) for n in pending)
            progress = Progress(job.out, job.images, len(job.images) - left, poll=world > 1)
        journal = Journal(job.out / JOURNALS / f"rank-{rank}.jsonl")
        for number in pending[rank::world]:
            render(pipe, job, job.groups[number], journal)
            if rank == 0 and world == 1:
                progress.set(progress.bar.n + len(job.groups[number]))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if rank == 0:
            finish(job.out, job.images)
            progress.close(len(job.images))
            print(job.out / MANIFEST)


def main(argv: list[str] | None = None) -> int:
    return run_command("wurst.batch", run, argv, interrupted="finished images are kept: rerun the same command to "
                       "resume", said_once=(JobRefused,))
