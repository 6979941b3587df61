"""The job's plan: the prompts file read into numbered images, and those grouped into forward passes."""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

from wurst.errors import ArgumentError
from wurst.files import open_regular

LINE_KEYS = ("prompt", "negative_prompt", "seed", "height", "width", "num_images")
# The prompts file is read a line at a time and each line is checked before it is parsed: a line may hold at most
# LINE_LIMIT characters (room for a prompt and a negative prompt at their limit, JSON-escaped), and a job at most
# MAX_IMAGES images (its plan is held in memory; split a larger job into several).
LINE_LIMIT, MAX_IMAGES = 2**18, 10**6


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
    """Every image of the job, or one line naming the file and line that is wrong. The file must be a regular file
    of UTF-8 text; a byte-order mark at its start is skipped (as utf-8-sig reads it). Lines end at \\n, \\r\\n or
    \\r, and nowhere else (str.splitlines would also split a prompt at U+2028 or a form feed)."""
    images: list[PlannedImage] = []
    try:
        with open_regular(path) as raw_file, io.TextIOWrapper(raw_file, encoding="utf-8-sig") as f:
            number = 0
            while raw := f.readline(LINE_LIMIT + 1):
                number += 1
                raw = raw.removesuffix("\n")
                if len(raw) > LINE_LIMIT:
                    raise ArgumentError(f"{path}:{number}: the line is over {LINE_LIMIT} characters long")
                if raw.strip():
                    images += planned_images(raw, f"{path}:{number}", number, path.suffix, len(images), args)
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ArgumentError(f"cannot read the prompts file {path}: {reason}") from e
    if not images:
        raise ArgumentError(f"the prompts file {path} holds no prompts")
    return images


def planned_images(raw: str, where: str, number: int, suffix: str, first: int,
                   args: argparse.Namespace) -> list[PlannedImage]:
    """The images of one line, numbered from `first`."""
    line = parse_json_line(raw, where) if suffix == ".jsonl" else {"prompt": raw.strip()}
    prompt = checked(where, "prompt", line["prompt"], str)
    count = checked(where, "num_images", line.get("num_images", args.num_images), int, 1)
    height = checked(where, "height", line.get("height", args.height), int)
    width = checked(where, "width", line.get("width", args.width), int)
    negative = checked(where, "negative_prompt", line.get("negative_prompt", args.negative_prompt), str)
    own_seed = checked(where, "seed", line.get("seed"), int, 0)
    if first + count > MAX_IMAGES:
        raise ArgumentError(f"{where}: num_images {count} takes the job past {MAX_IMAGES} images: split it into "
                            "several jobs")
    images = []
    for j in range(count):
        k = first + j
        if own_seed is None:
            images.append(PlannedImage(k, number, prompt, negative, args.seed + k, 0, 1, height, width))
        else:
            images.append(PlannedImage(k, number, prompt, negative, own_seed, j, count, height, width))
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
    if kind is str:
        checks.as_prompt_list(value, f"{where}: {key}")  # at most MAX_PROMPT_CHARACTERS
    if key in ("height", "width"):
        checks.check_size(f"{where}: {key}", value)
    elif minimum is not None and value < minimum:
        raise ArgumentError(f"{where}: {key} must be at least {minimum}, got {value}")
    elif key == "seed" and value >= checks.SEEDS:
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
