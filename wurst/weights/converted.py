"""wurst's converted layout: a folder holding wurst.json beside one safetensors file per model, under wurst's module
names. wurst.json gives the layout's format version, the folder's kind ("prior", "decoder", or "image_encoder" for
an extracted encoder alone) and every config: the pipeline's, the scheduler's and each model's, under the name of
its weight file. This module is the one writer and the one reader of wurst.json, and writes the weight files and
whole folders; tools/convert_weights.py (wurst.weights.convert) fills them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from wurst.errors import ConfigError
from wurst.files import atomic_file, write_file_atomically
from wurst.weights.configs import read_json
from wurst.weights.safetensors_io import write_safetensors

CONVERTED_INDEX = "wurst.json"
FORMAT = "wurst"
# Raise it when a change to the layout would make an older wurst misread a folder: that wurst then refuses the
# folder and says to upgrade, instead of loading it wrongly.
FORMAT_VERSION = 1


def _as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def write_index(folder: str | os.PathLike, *, kind: str, models: Mapping[str, Any], pipeline: Any = None,
                scheduler: Any = None) -> Path:
    """Write `folder`/wurst.json, atomically. `models` maps each weight file's stem to its model's config; configs
    may be dataclasses or dicts. An image encoder folder has no pipeline or scheduler."""
    index: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind}
    if pipeline is not None:
        index["pipeline"] = _as_dict(pipeline)
    if scheduler is not None:
        index["scheduler"] = _as_dict(scheduler)
    index["models"] = {name: _as_dict(config) for name, config in models.items()}
    path = Path(folder) / CONVERTED_INDEX
    write_file_atomically(path, (json.dumps(index, indent=2) + "\n").encode())
    return path


def read_index(folder: str | os.PathLike) -> dict[str, Any]:
    """`folder`/wurst.json, its format and version checked: a folder written by a newer wurst, in a layout this one
    does not know, is refused rather than misread. Its other fields are the caller's to check."""
    path = Path(folder) / CONVERTED_INDEX
    index = read_json(path)
    if index.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a wurst index: its field 'format' is {index.get('format')!r}, not "
                          f"'{FORMAT}'")
    version = index.get("version")
    if type(version) is not int or version < 1:  # type(): a JSON true is no version either
        raise ConfigError(f"{path} has no valid format version (its field 'version' is {version!r}, and this wurst "
                          f"reads version {FORMAT_VERSION}): upgrade wurst if a newer one wrote it, else convert the "
                          f"weights again with tools/convert_weights.py")
    if version > FORMAT_VERSION:
        raise ConfigError(f"{path} is in version {version} of wurst's converted format, and this wurst reads "
                          f"version {FORMAT_VERSION} at most: upgrade wurst to load it")
    return index


def save_weights(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 dtype: torch.dtype | None = None) -> None:
    """One weight file, written atomically and 64-byte aligned (safetensors_io.write_safetensors), each floating
    tensor cast to `dtype` (when given) as it is written."""
    with atomic_file(Path(path)) as f:
        write_safetensors(f, tensors, dtype=dtype)


@contextlib.contextmanager
def replace_folder(target: str | os.PathLike, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A fresh temporary folder beside `target` to fill; when the block ends it becomes `target`, replacing an old
    one only then. A failure, in the block or in the swap, leaves the old `target` as it was and no temporary
    folder behind. With `keep`, the old `target`'s files that `keep` accepts (given their paths relative to it)
    and that the block did not write are carried into the new folder first (carry_over), so they survive."""
    target = Path(target)
    partial, old = target.with_name(f".{target.name}.partial"), target.with_name(f".{target.name}.old")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        if keep is not None and target.is_dir():
            carry_over(target, partial, keep)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    try:
        partial.rename(target)
    except OSError:
        if old.exists():  # put the previous folder back
            old.rename(target)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def carry_over(old: Path, new: Path, keep: Callable[[Path], bool]) -> None:
    """Give `new` the files of `old` that `keep` accepts and that `new` has no entry for, at the same relative
    paths: hard links (copies where a link is refused), symbolic links recreated as such. What `new` holds wins,
    a file where `new` has a folder included."""
    for root, folders, files in os.walk(old):  # a linked folder is listed, not entered
        here = Path(root)
        for name in files + [f for f in folders if (here / f).is_symlink()]:
            source = here / name
            relative = source.relative_to(old)
            blocked = any((new / p).is_symlink() or (new / p).is_file() for p in list(relative.parents)[:-1])
            if blocked or os.path.lexists(new / relative) or not keep(relative):
                continue
            (new / relative).parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():
                os.symlink(os.readlink(source), new / relative)
                continue
            try:
                os.link(source, new / relative)
            except OSError:
                shutil.copy2(source, new / relative)
