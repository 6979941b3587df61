"""Cast copies: the weights in another dtype, written once and mapped from then on."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from wurst.errors import CheckpointError
from wurst.files import atomic_file
from wurst.weights.hub import cache_root
from wurst.weights.safetensors_io import open_weights, read_header, read_safetensors, write_safetensors

# Casting a billion float32 weights to bfloat16 on every load costs seconds per model (22 s for a whole
# pipeline on a 2-core machine, against under 2 s to map it). So the first load in a dtype other than the
# file's writes the cast tensors to $WURST_CACHE/<dtype>/, and later loads map that copy as they map the
# source. One copy per source file, named after its path and stamped with its size and mtime: a changed
# source is cast again over its old copy. Deleting the folder is always safe; it only costs the next cast.
CAST_COPY_VERSION = "1"


def _cast_copy_path(source: Path, dtype: torch.dtype) -> Path:
    resolved = source.resolve()  # hub-cache files are links to blobs
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    return cache_root() / str(dtype).removeprefix("torch.") / f"{source.parent.name}-{source.stem}-{digest}.safetensors"


def _stamp(source: Path) -> dict[str, str]:
    stat = source.stat()
    return {"wurst_cast_copy": CAST_COPY_VERSION, "source": str(source.resolve()), "source_size": str(stat.st_size),
            "source_mtime_ns": str(stat.st_mtime_ns)}


def _copy_is_current(copy: Path, source: Path, source_header: dict, dtype: torch.dtype) -> bool:
    """The copy exists, is whole, carries the source's stamp and holds every tensor of the source (whose
    read_header is `source_header`), cast."""
    try:
        with open_weights(copy) as (_, header, entries):
            pass
    except (OSError, CheckpointError):  # missing (ModelNotFoundError is an OSError), damaged, or not a file
        return False
    if header.get("__metadata__", {}) != {"format": "pt", **_stamp(source)} or entries.keys() != source_header.keys():
        return False
    for name, (src_dtype, shape) in source_header.items():
        cast = dtype if src_dtype.is_floating_point else src_dtype
        if entries[name][:2] != (cast, shape):
            return False
    return True


def _write_cast_copy(source: Path, copy: Path, dtype: torch.dtype) -> None:
    """Write the copy of `source` with every floating tensor cast to `dtype`, atomically (files.atomic_file), so
    that a crash or a full disk leaves the old copy or none, never half of one. One cast tensor at a time is in
    memory."""
    copy.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(copy) as f:
        write_safetensors(f, read_safetensors(source), metadata={"format": "pt", **_stamp(source)}, dtype=dtype)


def files_in_dtype(files: list[Path], dtype: torch.dtype | None) -> list[Path]:
    """The files to map for weights in `dtype`: each file itself where its floating tensors already are in
    `dtype` (or no dtype is asked for), else its cast copy, written first if it is missing or stale. Where the
    cache cannot be written (read-only, full), the source is returned and load_module casts in memory."""
    if dtype is None:
        return list(files)
    chosen = []
    for source in files:
        header = read_header(source)
        if {d for d, _ in header.values() if d.is_floating_point} <= {dtype}:
            chosen.append(source)
            continue
        copy = _cast_copy_path(source, dtype)
        if not _copy_is_current(copy, source, header, dtype):
            try:
                _write_cast_copy(source, copy, dtype)
            except Exception as e:  # OSError (read-only, full disk), or safetensors' own error on writing
                reason = getattr(e, "strerror", None) or e
                warnings.warn(f"could not write the {str(dtype).removeprefix('torch.')} copy of {source} to "
                              f"{copy.parent} ({reason}): casting in memory", stacklevel=2)
                chosen.append(source)
                continue
        chosen.append(copy)
    return chosen
