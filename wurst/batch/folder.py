"""The output folder: job.json, the images, a journal per process while the job runs, the manifest when it is
done."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from wurst.batch.plan import PlannedImage
from wurst.errors import ArgumentError, WurstError
from wurst.files import file_sha256, open_regular, write_file_atomically
from wurst.weights.configs import read_json

JOB, MANIFEST, JOURNALS = "job.json", "manifest.jsonl", ".journal"


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
        theirs = read_json(job)  # an object, from a regular file of bounded size
    except WurstError as e:
        raise ArgumentError(f"{e}: use a new --out folder") from e
    keys = [*settings, *(key for key in theirs if key not in settings)]  # a setting only one of them has counts
    differences = [f"{key} is {theirs.get(key)!r} there, {settings.get(key)!r} here" for key in keys
                   if theirs.get(key) != settings.get(key)]
    if differences:
        raise ArgumentError(f"--out {out} holds another job ({JOB}): {'; '.join(differences)}")


def start_folder(out: Path, settings: dict) -> None:
    """Rank 0, once the models are there and the memory suffices: the folder, its job.json first."""
    (out / JOURNALS).mkdir(parents=True, exist_ok=True)
    if not (out / JOB).exists():
        write_file_atomically(out / JOB, (json.dumps(settings, indent=1) + "\n").encode())


def read_records(out: Path) -> dict[int, dict]:
    """The records of the manifest and the journals by index. A line cut short by a kill is no record; a pipe or
    a device in place of one of these files is refused (NotRegularFileError)."""
    records = {}
    for path in [out / MANIFEST, *sorted((out / JOURNALS).glob("rank-*.jsonl"))]:
        if not path.exists():
            continue
        with open_regular(path) as f:  # records end at \n alone: a prompt may hold U+2028, which splitlines splits at
            lines = f.read().decode("utf-8", errors="replace").split("\n")
        for line in lines:
            try:
                record = json.loads(line)
                records[int(record["index"])] = record
            except (ValueError, KeyError, TypeError):
                continue
    return records


def sha256(path: Path) -> str | None:
    try:
        return file_sha256(path)
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
