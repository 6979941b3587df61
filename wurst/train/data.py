"""The training set: images with captions, read from a folder in either of two conventions, each image given the
aspect bucket it is trained at.

- metadata.jsonl at the folder's top (Hugging Face imagefolder): one JSON object a line, {"file_name": path
  relative to the folder, "text": caption}; images it does not list are ignored.
- otherwise (kohya, OneTrainer): every image under the folder with a same-stem .txt caption beside it.

Everything is checked before training starts (each image decoded once, each caption read), and every problem is
reported at once, one line each naming its file: a bad file found hours into a run would waste them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from wurst.errors import ArgumentError
from wurst.files import file_sha256, read_bounded
from wurst.pipelines import preprocess

QUANTUM = 128  # bucket sides are multiples of this (OneTrainer quantises to 128)
FINE_QUANTUM = 32  # the image encoder downsamples by 32: no bucket side can be finer
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_ASPECT = 4.0  # buckets span 1:4 .. 4:1; a more extreme image is center-cropped to the end of that range
CAPTION_LIMIT = 1 << 20  # a caption of over 1 MiB is a wrong file, not a caption
METADATA_LIMIT = 1 << 30


@dataclass(frozen=True)
class Sample:
    index: int  # position in the dataset, sorted by relative path
    image: Path
    caption: str
    height: int  # its bucket, in pixels (see bucket_size)
    width: int


class DatasetError(ArgumentError):
    """Every problem found in a dataset, one line each (str(e) is the lines joined by \\n)."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def bucket_size(image_height: int, image_width: int, resolution: int) -> tuple[int, int]:
    """(height, width) in pixels of the aspect bucket of an image of this size: about resolution**2 pixels at the
    image's aspect (clamped to 1:4 .. 4:1), each side rounded to a multiple of QUANTUM (at least QUANTUM), or of 32
    where resolution is not a multiple of QUANTUM. A square image gets exactly (resolution, resolution)."""
    if resolution <= 0 or resolution % FINE_QUANTUM:
        raise ArgumentError(f"resolution must be a positive multiple of {FINE_QUANTUM}, got {resolution}")
    quantum = QUANTUM if resolution % QUANTUM == 0 else FINE_QUANTUM
    aspect = min(max(image_width / image_height, 1 / MAX_ASPECT), MAX_ASPECT)  # width / height
    sides = resolution / math.sqrt(aspect), resolution * math.sqrt(aspect)
    # floor(x + 0.5), not round(): round() goes to the even multiple on a tie, so ties would go both ways
    height, width = (max(quantum, math.floor(side / quantum + 0.5) * quantum) for side in sides)
    return height, width


def read_dataset(folder: str | os.PathLike, resolution: int) -> list[Sample]:
    """Scan, validate and bucket the whole dataset, or raise DatasetError listing every problem, one line each,
    each naming the file."""
    from PIL import ImageOps

    root = Path(folder)
    if not root.is_dir():
        raise DatasetError([f"dataset folder {root} {'is not a folder' if root.exists() else 'does not exist'}"])
    problems: list[str] = []
    metadata = root / "metadata.jsonl"
    entries = _listed(root, metadata, problems) if metadata.exists() else _beside(root, problems)
    if not entries and not problems:
        problems.append(f"{metadata} lists no images" if metadata.exists() else
                        f"dataset folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    samples = []
    for _, image_path, caption in sorted(entries, key=lambda entry: entry[0]):  # stable: keeps repeats' order
        if caption is None:
            caption = _read_caption(image_path, problems)
        try:  # decoded in full now, so that a truncated file fails here rather than hours into the run
            with preprocess.open_image(image_path) as image:
                width, height = ImageOps.exif_transpose(image).size  # a 90° EXIF rotation swaps the sides
        except ArgumentError as e:
            problems.append(str(e))
            continue
        if caption is not None:
            samples.append(Sample(len(samples), image_path, caption, *bucket_size(height, width, resolution)))
    if problems:
        raise DatasetError(problems)
    return samples


def _beside(root: Path, problems: list[str]) -> list[tuple[str, Path, None]]:
    """(relative path, image, None: its caption is read later) for every image under root. Hidden files and
    folders (.git, .ipynb_checkpoints, macOS's ._name.png resource forks) are never meant as training data."""
    def unreadable(e: OSError) -> None:
        problems.append(f"folder {e.filename} cannot be read ({e.strerror or e})")

    entries = []
    for top, folders, files in os.walk(root, onerror=unreadable):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            path = Path(top, name)
            if not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
                entries.append((path.relative_to(root).as_posix(), path, None))
    return entries


def _listed(root: Path, metadata: Path, problems: list[str]) -> list[tuple[str, Path, str]]:
    """(relative path, image, caption) for every line of metadata.jsonl. An image may be listed more than once, as
    datasets with several captions per image list them."""
    try:
        data = read_bounded(metadata, METADATA_LIMIT)
    except OSError as e:
        problems.append(f"{metadata} cannot be read ({_reason(e)})")
        return []
    entries = []
    # Split as bytes, on "\n" alone, so that a bad byte costs its line only, and a JSON string may hold U+2028
    # and the other characters str.splitlines() would break at.
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            if entry := _entry(root, raw):
                entries.append(entry)
        except ValueError as e:
            problems.append(f"{metadata}:{number}: {e}")
    return entries


def _entry(root: Path, raw: bytes) -> tuple[str, Path, str] | None:
    """(relative path, image, caption) from a line of metadata.jsonl, None from a blank one; or a ValueError saying
    what is wrong with it."""
    try:  # utf-8-sig: tools on Windows start the file with a byte-order mark
        line = raw.decode("utf-8-sig")
        entry = json.loads(line) if line.strip() else None
    except UnicodeDecodeError as e:  # before ValueError, which it is a kind of
        raise ValueError(_reason(e)) from None
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not line.strip():
        return None
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    if bad := [f"{key} is {'not a string' if key in entry else 'missing'}" for key in ("file_name", "text")
               if not isinstance(entry.get(key), str)]:
        raise ValueError(", ".join(bad))
    name = os.path.normpath(entry["file_name"])  # judged as written, not resolved: symlinks may point anywhere
    if os.path.isabs(name) or name.split(os.sep)[0] == "..":
        raise ValueError(f"file_name {entry['file_name']!r} points outside {root}")
    if not (root / name).exists():
        raise ValueError(f"file_name {entry['file_name']!r}: {root / name} does not exist")
    return Path(name).as_posix(), root / name, entry["text"].strip()


def _read_caption(image: Path, problems: list[str]) -> str | None:
    path = image.with_suffix(".txt")
    try:
        return read_bounded(path, CAPTION_LIMIT).decode("utf-8-sig").strip()
    except FileNotFoundError:
        problems.append(f"image {image} has no caption: expected {path} beside it")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"caption {path} cannot be read ({_reason(e)})")
    return None


def _reason(e: OSError | UnicodeDecodeError) -> str:
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start}"
    return e.strerror or str(e)  # where read_bounded and open_regular say why: "larger than 1 MiB"


def load_pixels(sample: Sample) -> torch.Tensor:
    """(3, sample.height, sample.width) float32: the image as the pipelines' image encoder is fed it (EXIF
    orientation applied, converted by preprocess.to_tensor, scaled to cover the bucket, center-cropped, normalised
    with ImageNet's mean and std)."""
    pixels = preprocess.resize_and_crop(preprocess.to_tensor(sample.image), sample.height, sample.width)
    return preprocess.normalize(pixels)


def dataset_fingerprint(samples: list[Sample]) -> str:
    """sha256 hex over each sample's image content, caption and bucket, in order, but not its path: a job resumed
    on a changed dataset is refused, one whose folder was only moved or renamed is not."""
    digest = hashlib.sha256()
    for sample in samples:
        identity = [file_sha256(sample.image), sample.caption, sample.height, sample.width]
        digest.update(json.dumps(identity).encode() + b"\n")  # JSON: no caption can run into the next field
    return digest.hexdigest()
