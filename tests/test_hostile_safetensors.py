"""Hostile safetensors files and sharded indexes, through `python -m wurst` on a copy of the tiny prior: the loader
follows the safetensors library's rules (tensors contiguous from the start of the data to the end of the file, no
gap, no overlap, integer shapes and offsets, string metadata, a UTF-8 header of at most 100 MB), opens regular files
only, and loads no shard from outside its repository (symlinks resolved). Each case is refused in one line naming
the file, exit 2, before any model is built, nothing written and the repository unchanged.

Each case runs in a fresh process whose address space is capped (tests.helpers.run_module): where these checks are
missing, a hang fails the test at its time guard, and a file that loads silently fails it by exit 0."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.helpers import (
    ONE_STEP,
    SHORT_PROMPT,
    WEIGHTS,
    assert_one_line_error,
    fingerprint,
    not_a_regular_file,
    run_module,
)

SECONDS = 60  # the hang guard: a refusal takes about 3 s
MEMORY = 4 * 2**30  # the address space of each run: wurst with the tiny models needs about 1.2 GB


def read_raw(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header, as parsed JSON, and its data."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_raw(path: Path, header: dict, data: bytes, *, encoding: str = "utf-8", padding: int = 0) -> None:
    text = json.dumps(header).encode(encoding) + b" " * padding
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def in_offset_order(header: dict) -> list[str]:
    return sorted((name for name in header if name != "__metadata__"), key=lambda n: header[n]["data_offsets"])


def edit(change):
    """A damage: the prior's weight file rewritten by change(header, data) -> (header, data), its header in order."""

    def damage(repo: Path) -> Path:
        path = repo / "prior" / WEIGHTS
        header, data = change(*read_raw(path))
        write_raw(path, header, data)
        return path

    return damage


def shift(header: dict, names: list[str], by: int) -> dict:
    for name in names:
        header[name]["data_offsets"] = [offset + by for offset in header[name]["data_offsets"]]
    return header


def overlap(header, data):
    """The last tensor moved 4 bytes back, into the one before it; the file 4 bytes shorter."""
    return shift(header, in_offset_order(header)[-1:], -4), data[:-4]


def gap(header, data):
    """64 unused bytes before the last tensor."""
    last = in_offset_order(header)[-1]
    begin = header[last]["data_offsets"][0]
    return shift(header, [last], 64), data[:begin] + bytes(64) + data[begin:]


def leading_gap(header, data):
    return shift(header, in_offset_order(header), 64), bytes(64) + data


def set_entry(field: str, value):
    def change(header, data):
        header[in_offset_order(header)[0]][field] = value
        return header, data

    return change


def floats(header, data):
    first = header[in_offset_order(header)[0]]
    first["data_offsets"] = [float(offset) for offset in first["data_offsets"]]
    return header, data


def strings(header, data):
    first = header[in_offset_order(header)[0]]
    first["shape"] = [str(size) for size in first["shape"]]
    return header, data


def rewrite(**options):
    """A damage: the prior's weight file with the same header and data, written with `options` (write_raw's)."""

    def damage(repo: Path) -> Path:
        path = repo / "prior" / WEIGHTS
        write_raw(path, *read_raw(path), **options)
        return path

    return damage


def replace_weights(kind: str):
    def damage(repo: Path) -> Path:
        return not_a_regular_file(repo / "prior" / WEIGHTS, kind)

    return damage


def sharded(name_the_second):
    """A damage: the prior's weights in two shards beside an index; the index names the second shard as
    name_the_second(repo, file) returns, after it has put the file where it likes."""

    def damage(repo: Path) -> Path:
        folder = repo / "prior"
        state = load_file(folder / WEIGHTS)
        (folder / WEIGHTS).unlink()
        names = sorted(state)
        first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
        save_file({n: state[n] for n in names[:20]}, folder / first)
        save_file({n: state[n] for n in names[20:]}, folder / second)
        named = name_the_second(repo, folder / second)
        index = {"metadata": {}, "weight_map": {n: first if i < 20 else named for i, n in enumerate(names)}}
        (folder / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
        return folder / f"{WEIGHTS}.index.json"

    return damage


def elsewhere(repo: Path, shard: Path) -> Path:
    """The shard moved to a folder beside the repository."""
    target = repo.parent.parent / "elsewhere" / shard.name
    target.parent.mkdir(exist_ok=True)
    return shard.rename(target)


def up_and_out(repo: Path, shard: Path):
    return os.path.relpath(elsewhere(repo, shard), shard.parent)  # ../../../elsewhere/...


def absolute(repo: Path, shard: Path):
    return str(elsewhere(repo, shard))


def linked_out(repo: Path, shard: Path):
    target = elsewhere(repo, shard)
    shard.symlink_to(target)
    return shard.name


# case: (damage a copy of the prior repository, the text the one error line must hold; {path} is the damaged file,
# {folder} the prior's component folder)
HOSTILE = {
    "overlapping-tensors": (edit(overlap), "{path} is corrupt: tensor 'projection.weight' overlaps the tensor before "
                                           "it, which the safetensors format forbids"),
    "a-gap-between-tensors": (edit(gap), "{path} is corrupt: tensor 'projection.weight' leaves 64 bytes unused before"),
    "a-gap-before-the-first-tensor": (edit(leading_gap), "leaves 64 bytes unused before it"),
    "bytes-after-the-last-tensor": (edit(lambda header, data: (header, data + bytes(64))),
                                    "{path} is corrupt: 64 bytes follow its last tensor"),
    "offsets-as-floats": (edit(floats), "{path} is corrupt: bad header entry for tensor"),
    "shape-as-strings": (edit(strings), "{path} is corrupt: bad header entry for tensor"),
    "shape-as-booleans": (edit(set_entry("shape", [True])), "{path} is corrupt: bad header entry for tensor"),
    "metadata-not-strings": (edit(lambda header, data: ({**header, "__metadata__": {"format": 1}}, data)),
                             "{path} is corrupt: its header's __metadata__ must map names to strings"),
    "a-header-in-utf-16": (rewrite(encoding="utf-16-le"), "{path} is corrupt: its safetensors header is not valid"),
    "a-header-past-100-mb": (rewrite(padding=99_999_000), "bytes, over the safetensors format's limit of "
                                                          "100000000"),
    "weights-a-named-pipe": (replace_weights("pipe"), "{path} cannot be read: not a regular file (a named pipe)"),
    "weights-a-link-to-dev-zero": (replace_weights("zero"), "{path} cannot be read: not a regular file (a character"),
    "a-shard-outside-the-repository": (sharded(up_and_out), "{path} names the shard ../../../elsewhere/model-00002-of"
                                                            "-00002.safetensors, which lies outside {folder}"),
    "a-shard-at-an-absolute-path": (sharded(absolute), "which lies outside {folder}"),
    "a-shard-linked-outside": (sharded(linked_out), "{path} names the shard model-00002-of-00002.safetensors, which "
                                                    "lies outside {folder}"),
    "a-shard-name-not-a-string": (sharded(lambda repo, shard: 5), "{path}: the field 'weight_map' must map tensor "
                                                                  "names to shard file names"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_weight_files_are_refused_in_one_line(case, tmp_path, tiny_prior_repo, tiny_decoder_repo):
    damage, template = HOSTILE[case]
    repo, out = tmp_path / "repos" / "prior", tmp_path / "out"
    shutil.copytree(tiny_prior_repo, repo)
    path = damage(repo)
    before = fingerprint(tmp_path / "repos")
    result = run_module(["-m", "wurst", SHORT_PROMPT, *ONE_STEP, "--prior", repo, "--decoder", tiny_decoder_repo,
                         "--output", out / "x.png"], timeout=SECONDS, memory=MEMORY)
    assert_one_line_error(result.returncode, result.stdout, result.stderr,
                          template.format(path=path, folder=repo / "prior"), out)
    assert fingerprint(tmp_path / "repos") == before


def test_shards_in_the_hugging_face_cache_link_to_its_blobs(tmp_path, tiny_prior_repo, tiny_decoder_repo):
    """Where the rule above must not refuse: a snapshot's files are links into its repository's blobs/."""
    cache = tmp_path / "models--warp-ai--wuerstchen-prior"
    snapshot = cache / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_prior_repo, snapshot)
    sharded(lambda repo, shard: shard.name)(snapshot)
    (cache / "blobs").mkdir()
    for number, path in enumerate(sorted(p for p in snapshot.rglob("*") if p.is_file())):
        blob = path.rename(cache / "blobs" / f"blob{number}")
        path.symlink_to(os.path.relpath(blob, path.parent))
    out = tmp_path / "out"
    result = run_module(["-m", "wurst", SHORT_PROMPT, *ONE_STEP, "--prior", snapshot, "--decoder", tiny_decoder_repo,
                         "--output", out / "x.png"], timeout=SECONDS, memory=MEMORY)
    assert result.returncode == 0 and result.stdout == f"{out / 'x.png'}\n", result.stderr
