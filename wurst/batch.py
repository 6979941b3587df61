"""`python -m wurst.batch PROMPTS --out DIR [options]`: many prompts, in one process or under torchrun.

    python -m wurst.batch prompts.txt --out images/
    torchrun --nproc-per-node 4 -m wurst.batch prompts.jsonl --out images/ --batch-size 4

PROMPTS is a text file (one prompt per line; blank lines are skipped) or, when it ends in .jsonl, JSON Lines with
`prompt` and optional `negative_prompt`, `seed`, `height`, `width`, `num_images`. The options are the CLI's; they
are the defaults of lines that do not set their own.

What an image is depends on the job alone, never on the number of processes, the order of work or restarts:
- Images are numbered k = 0, 1, ... in file order; image k is DIR/k.png (zero-padded) with the CLI's metadata.
- A line without a seed: image k is what `python -m wurst PROMPT --seed BASE+k` draws (BASE is --seed, 0 by
  default). A line with its own seed is what `python -m wurst PROMPT --seed SEED --num-images N` draws.
- --batch-size B runs up to B images of one size through each forward pass, with one generator per image, so an
  image equals its batch-size-1 result up to float rounding. Groups are fixed by the job (same-size images in
  index order, B at a time; a seeded line of N images is one group), so a rerun recomputes exactly those groups.

Files appear whole or not at all (see files.atomic_file). Each process appends a record to its own journal
(DIR/.journal/rank-R.jsonl) only after the image is in place; when every image is done, rank 0 writes
DIR/manifest.jsonl, sorted by index, and removes the journals. Rerunning the same command skips every image whose
file and record are complete, so after a kill and a rerun DIR holds exactly what an uninterrupted run writes.
DIR/job.json holds the job's settings; a different job into the same DIR is refused.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import hashlib
import json
import os
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from wurst.cli import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    Parser,
    UsageError,
    add_generation_options,
    add_model_options,
    check_generation_options,
    check_memory,
    device_and_dtype,
    generation_settings,
)
from wurst.errors import ArgumentError, WurstError
from wurst.files import png_bytes, png_metadata, write_file_atomically

JOB, MANIFEST, JOURNALS = "job.json", "manifest.jsonl", ".journal"
LINE_KEYS = ("prompt", "negative_prompt", "seed", "height", "width", "num_images")
SEEDS = 2**63  # seeds are 0 <= seed < 2**63, so that BASE + k stays a valid torch seed (< 2**64)


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
# The job: prompts -> images -> groups


@dataclass(frozen=True)
class PlannedImage:
    index: int  # k: the image's number in the job and its file name
    line: int  # where it comes from in the prompts file (1-based)
    prompt: str
    negative_prompt: str | None
    seed: int
    image_index: int  # its place among the images one generator draws
    drawn_with: int  # how many images that generator draws: N for a seeded line of N images, else 1
    height: int
    width: int


def read_prompts(path: Path, args: argparse.Namespace) -> list[PlannedImage]:
    """Every image of the job, or one line naming the file and line that is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ArgumentError(f"cannot read the prompts file {path}: {reason}") from e
    images: list[PlannedImage] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        line = parse_json_line(raw, where) if path.suffix == ".jsonl" else {"prompt": raw.strip()}
        count = checked(where, "num_images", line.get("num_images", args.num_images), int, 1)
        height = checked(where, "height", line.get("height", args.height), int)
        width = checked(where, "width", line.get("width", args.width), int)
        negative = checked(where, "negative_prompt", line.get("negative_prompt", args.negative_prompt), str)
        own_seed = checked(where, "seed", line.get("seed"), int, 0)
        for j in range(count):
            k = len(images)
            if own_seed is None:
                images.append(PlannedImage(k, number, line["prompt"], negative, args.seed + k, 0, 1, height, width))
            else:
                images.append(PlannedImage(k, number, line["prompt"], negative, own_seed, j, count, height, width))
    if not images:
        raise ArgumentError(f"the prompts file {path} holds no prompts")
    return images


def parse_json_line(raw: str, where: str) -> dict:
    try:
        line = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ArgumentError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(line, dict):
        raise ArgumentError(f"{where}: a line must be a JSON object, got {type(line).__name__}")
    unknown = sorted(set(line) - set(LINE_KEYS))
    if unknown:
        raise ArgumentError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(LINE_KEYS)})")
    if not isinstance(line.get("prompt"), str):
        raise ArgumentError(f"{where}: 'prompt' must be a string")
    return line


def checked(where: str, key: str, value, kind: type, minimum: int | None = None):
    """A line's value of `key` (None passes: the default applies); sizes must be on the 128 grid."""
    from wurst.pipelines import checks

    if value is None:
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ArgumentError(f"{where}: {key} must be an integer, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ArgumentError(f"{where}: {key} must be a string, got {value!r}")
    if key in ("height", "width"):
        checks.check_size(f"{where}: {key}", value)
    elif minimum is not None and value < minimum:
        raise ArgumentError(f"{where}: {key} must be at least {minimum}, got {value}")
    elif key == "seed" and value >= SEEDS:
        raise ArgumentError(f"{where}: seed must be below 2**63, got {value}")
    return value


def plan_groups(images: list[PlannedImage], batch_size: int) -> list[list[PlannedImage]]:
    """The forward passes of the job, fixed by it alone: a seeded line of several images is one group (one
    generator draws them all, as in the CLI); other images, by size, in index order, batch_size at a time."""
    groups, by_size = [], {}
    for image in images:
        if image.drawn_with > 1:
            if image.image_index == 0:
                groups.append(images[image.index : image.index + image.drawn_with])
            continue
        pending = by_size.setdefault((image.height, image.width), [])
        pending.append(image)
        if len(pending) == batch_size:
            groups.append(by_size.pop((image.height, image.width)))
    groups.extend(by_size.values())
    return sorted(groups, key=lambda group: group[0].index)


# ---------------------------------------------------------------------------------------------------------
# The output folder: job.json, the images, the journals while the job runs, the manifest when it is done


def file_name(index: int, total: int) -> str:
    return f"{index:0{max(6, len(str(total - 1)))}d}.png"


def inspect_folder(out: Path, settings: dict) -> None:
    """Rank 0, before any model loads and without writing: the folder can be written and holds this job (or
    nothing yet)."""
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"--out {out} is a file, not a folder")
    existing = next(folder for folder in [out, *out.parents] if folder.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ArgumentError(f"cannot write to --out {out}: {e.strerror or e}") from e
    job = out / JOB
    if not job.exists():
        others = sorted(p.name for p in out.iterdir() if p.name != JOURNALS) if out.exists() else []
        if others:
            raise ArgumentError(f"--out {out} holds other files ({others[0]}, ...) and no {JOB}: use a new folder")
        return
    try:
        theirs = json.loads(job.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArgumentError(f"{job} is damaged ({e}): use a new --out folder") from e
    differences = [f"{key} is {theirs.get(key)!r} there, {value!r} here" for key, value in settings.items()
                   if theirs.get(key) != value]
    if differences:
        raise ArgumentError(f"--out {out} holds another job ({JOB}): {'; '.join(differences)}")


def start_folder(out: Path, settings: dict) -> None:
    """Rank 0, once the models are there and the memory suffices: the folder, its job.json first."""
    (out / JOURNALS).mkdir(parents=True, exist_ok=True)
    if not (out / JOB).exists():
        write_file_atomically(out / JOB, (json.dumps(settings, indent=1) + "\n").encode())


def read_records(out: Path) -> dict[int, dict]:
    """The records of the manifest and the journals by index. A line cut short by a kill is no record."""
    records = {}
    for path in [out / MANIFEST, *sorted((out / JOURNALS).glob("rank-*.jsonl"))]:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                records[int(record["index"])] = record
            except (ValueError, KeyError, TypeError):
                continue
    return records


def sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def complete(out: Path, images: list[PlannedImage]) -> set[int]:
    """The images whose file is in place and whose record says so."""
    records, done = read_records(out), set()
    for image in images:
        record, name = records.get(image.index), file_name(image.index, len(images))
        if record and record.get("file") == name and record.get("sha256") == sha256(out / name):
            done.add(image.index)
    return done


class Journal:
    """One process's append-only record file: one line per image, written only after the image is in place."""

    def __init__(self, path: Path):
        if path.exists():  # a line a kill cut short: drop it, so the next record starts on a line of its own
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                os.truncate(path, data.rfind(b"\n") + 1)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def append(self, record: dict) -> None:
        os.write(self.fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())
        os.fsync(self.fd)


def finish(out: Path, images: list[PlannedImage]) -> None:
    """Rank 0, once every process is done: the manifest, sorted by index, in place of the journals."""
    done = complete(out, images)
    if len(done) < len(images):
        missing = min(set(range(len(images))) - done)
        raise WurstError(f"image {missing} of {out} is missing after the run; rerun the same command to make it")
    records = read_records(out)
    lines = "".join(json.dumps(records[image.index], ensure_ascii=False) + "\n" for image in images)
    write_file_atomically(out / MANIFEST, lines.encode())
    for journal in (out / JOURNALS).iterdir():
        journal.unlink()
    (out / JOURNALS).rmdir()


# ---------------------------------------------------------------------------------------------------------
# Running: the job's checks on every process, then each process's share of the pending groups


class ReportedByRankZero(Exception):
    """A refusal that rank 0 reports; the other processes exit quietly."""


class JobRefused(ArgumentError):
    """A refusal of the job itself (its options or prompts file), which every process reaches alike."""


def job_settings(args: argparse.Namespace, prompts: Path, device, dtype) -> dict:
    """What decides the images: not the number of processes, their threads or the memory mode."""
    import wurst

    return {"prompts_sha256": hashlib.sha256(prompts.read_bytes()).hexdigest(), "seed": args.seed,
            "negative_prompt": args.negative_prompt, "height": args.height, "width": args.width,
            "num_images": args.num_images, "prior_steps": args.prior_steps or "default",
            "decoder_steps": args.decoder_steps, "prior_guidance": args.prior_guidance,
            "decoder_guidance": args.decoder_guidance, "prior": str(args.prior), "decoder": str(args.decoder),
            "device": device.type, "dtype": str(dtype).removeprefix("torch."), "batch_size": args.batch_size,
            "wurst_version": wurst.__version__}


def cli_command(image: PlannedImage, args: argparse.Namespace, device, dtype) -> list[str]:
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
                      "--dtype", str(dtype).removeprefix("torch.")]


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


class Progress:
    """Rank 0's one line for the whole job: images done of the total (all processes), images per minute, ETA.
    With several processes, a thread counts the journals' records every few seconds."""

    def __init__(self, out: Path, images: list[PlannedImage], done: int, poll: bool):
        from tqdm.auto import tqdm

        self.out, self.images, self.start = out, images, done
        self.bar = tqdm(total=len(images), initial=done, unit="image", dynamic_ncols=True,
                        bar_format="{n}/{total} images [{elapsed}<{remaining}{postfix}]")
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.watch, daemon=True) if poll else None
        if self.thread:
            self.thread.start()

    def set(self, done: int) -> None:
        with self.lock:
            elapsed = self.bar.format_dict["elapsed"]
            if elapsed > 0 and done > self.start:
                self.bar.set_postfix_str(f"{(done - self.start) / elapsed * 60:.1f} images/min", refresh=False)
            self.bar.update(done - self.bar.n)

    def watch(self) -> None:
        while not self.stop.wait(3.0):
            self.set(len(set(read_records(self.out)) & set(range(len(self.images)))))

    def close(self, done: int) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join()
        self.set(done)
        self.bar.close()


def distributed_setup(device) -> tuple[int, int, object]:
    """(rank, world size, device) from torchrun's environment; a process group when there are several."""
    import torch

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        if device.index is not None and world > 1:
            raise ArgumentError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; pass cuda")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist

        # The final barrier waits for the slowest process, which may be hours behind: no 30-minute default.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(days=7))
    return rank, world, device


def share(value, rank: int, world: int):
    """Rank 0's `value`, on every process."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run(argv: list[str]) -> None:
    from wurst.api import load_pipeline
    from wurst.pipelines import checks

    args = build_parser().parse_args(argv)
    # The job's checks, before any model loads; every process makes them and reaches the same verdict. Size
    # warnings wait for the memory check, which may refuse the size outright.
    with warnings.catch_warnings(record=True) as size_warnings:
        warnings.simplefilter("always")
        try:
            check_generation_options(args)
            checks.check_count("--batch-size", args.batch_size)
            if not 0 <= args.seed < SEEDS:
                raise ArgumentError(f"--seed must be at least 0 and below 2**63, got {args.seed}")
            prompts, out = Path(args.prompts), Path(args.out)
            images = read_prompts(prompts, args)
            groups = plan_groups(images, args.batch_size)
            device, dtype = device_and_dtype(args)
            settings = job_settings(args, prompts, device, dtype)
        except ArgumentError as e:
            raise JobRefused(str(e)) from e

    rank, world, device = distributed_setup(device)
    try:
        if rank == 0:  # the folder's state, read once, before anyone writes
            try:
                inspect_folder(out, settings)
                done = complete(out, images)
                verdict = [n for n, group in enumerate(groups) if any(i.index not in done for i in group)]
            except (WurstError, OSError) as e:
                verdict = e
        verdict = share(verdict if rank == 0 else None, rank, world)
        if isinstance(verdict, BaseException):
            raise verdict if rank == 0 else ReportedByRankZero()
        mine = verdict[rank::world]

        if verdict:  # a finished job loads nothing
            pipe = load_pipeline(prior=args.prior, decoder=args.decoder, device=device, dtype=dtype,
                                 low_memory=args.low_memory, force=args.force)
            pipe.set_progress_bar_config(disable=True)
            shapes = {(groups[n][0].height, groups[n][0].width, len(groups[n])) for n in verdict}
            for height, width, size in sorted(shapes):  # every forward pass of the job fits, or none runs
                check_memory(pipe, args, height=height, width=width, num_images=size)
        for warning in size_warnings:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        if rank == 0:
            start_folder(out, settings)
            progress = Progress(out, images, len(images) - sum(len(groups[n]) for n in verdict), world > 1)
        (out / JOURNALS).mkdir(parents=True, exist_ok=True)  # whichever process comes first
        journal = Journal(out / JOURNALS / f"rank-{rank}.jsonl")
        for number in mine:
            group = groups[number]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", checks.LargeSizeWarning)  # said when the prompts were read
                pictures = generate_group(pipe, group, args)
            for image, picture in zip(group, pictures, strict=True):
                made_with = generation_settings(args, prompt=image.prompt, negative_prompt=image.negative_prompt,
                                                seed=image.seed, height=image.height, width=image.width,
                                                num_images=image.drawn_with, device=device, dtype=dtype)
                data = png_bytes(picture, png_metadata(made_with, image_index=image.image_index,
                                                       command=cli_command(image, args, device, dtype)))
                name = file_name(image.index, len(images))
                write_file_atomically(out / name, data)
                journal.append({"index": image.index, "file": name, "sha256": hashlib.sha256(data).hexdigest(),
                                "prompt": image.prompt, "seed": image.seed, "line": image.line,
                                "settings": {**made_with, "image_index": image.image_index}})
            if rank == 0 and world == 1:
                progress.set(progress.bar.n + len(group))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if rank == 0:
            finish(out, images)
            progress.close(len(images))
            print(out / MANIFEST)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    who = f"wurst.batch (rank {rank})" if world > 1 else "wurst.batch"
    warnings.showwarning = lambda message, *rest: rank == 0 and print(f"wurst.batch: warning: {message}",
                                                                      file=sys.stderr)
    try:
        run(argv)
    except ReportedByRankZero:
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{who}: interrupted; finished images are kept: rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, JobRefused) as e:  # the same on every process: rank 0 says it
        if rank == 0:
            print(f"wurst.batch: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (WurstError, OSError) as e:
        if isinstance(e, OSError) and e.strerror:
            e = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        print(f"{who}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
