"""safetensors files, memory-mapped: their headers read and checked, their tensors viewed in place, and
wurst's aligned writer."""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from wurst.errors import CheckpointError, ConfigError, ModelNotFoundError
from wurst.files import open_regular
from wurst.weights.configs import read_json
from wurst.weights.hub import inside_repository

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


# tools/convert_weights.py starts tensors on 64-byte boundaries (a cache line, an AVX-512 vector); files
# written by safetensors itself only align the data block to 8 bytes. Either way the loader views tensors
# in place: copying 12 GB costs seconds of load time, and in our measurements results and speed on
# unaligned weights were the same.
ALIGNMENT = 64


# The safetensors library refuses headers over this size.
MAX_HEADER = 100_000_000


def open_header(path: Path, f) -> tuple[dict, int, int]:
    """The parsed header of an open safetensors file, where its data starts, and the file size."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > size - 8:
        raise CheckpointError(f"{path} is truncated or not a safetensors file (bad header length)")
    if header_len > MAX_HEADER:
        raise CheckpointError(f"{path} is corrupt: its header is {header_len} bytes, over the safetensors format's "
                              f"limit of {MAX_HEADER}")
    try:
        header = json.loads(f.read(header_len).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not a JSON object")
    return header, 8 + header_len, size


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0  # type(): a JSON true or 2.0 is no size or offset


def header_entries(path: Path, header: dict, data_start: int,
                   size: int) -> dict[str, tuple[torch.dtype, list[int], int]]:
    """name -> (dtype, shape, offset in the file) of every tensor, checked as the safetensors library checks them:
    a known dtype, a shape of integers >= 0, two integer offsets whose span holds the tensor exactly, and, in
    offset order, each tensor starting where the one before it ends, the first at the start of the data and the
    last at the end of the file: no gap, no overlap, nothing outside the file. __metadata__ maps names to strings."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path} is corrupt: its header's __metadata__ must map names to strings")
    entries, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = _DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            if not (isinstance(shape, list) and all(_is_count(v) for v in (*shape, begin, end))):
                raise ValueError("shape and offsets must be integers >= 0")
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} is corrupt: bad header entry for tensor '{name}'") from e
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path} is corrupt: tensor '{name}' spans {end - begin} bytes, and its shape and "
                                  f"dtype take {math.prod(shape) * dtype.itemsize}")
        entries[name] = (dtype, shape, data_start + begin)
        spans.append((begin, end, name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            fault = "overlaps the tensor before it" if begin < end else f"leaves {begin - end} bytes unused before it"
            raise CheckpointError(f"{path} is corrupt: tensor '{name}' {fault}, which the safetensors format forbids")
        end = stop
    if data_start + end > size:
        last = max(spans)[2]
        raise CheckpointError(f"{path} is truncated or corrupt: tensor '{last}' lies outside the file (file has "
                              f"{size} bytes, tensor ends at {data_start + end})")
    if data_start + end < size:
        raise CheckpointError(f"{path} is corrupt: {size - data_start - end} bytes follow its last tensor, which the "
                              "safetensors format forbids")
    return entries


@contextlib.contextmanager
def open_weights(path: Path) -> Iterator[tuple[BinaryIO, dict, dict[str, tuple[torch.dtype, list[int], int]]]]:
    """A safetensors file open for reading (a regular file: never a pipe or a device), with its header and its
    checked entries (header_entries). A missing file is a ModelNotFoundError."""
    try:
        f = open_regular(path)
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"missing weight file: {path}") from e
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from e
    with f:
        header, data_start, size = open_header(path, f)
        yield f, header, header_entries(path, header, data_start, size)


def read_header(path: Path) -> dict[str, tuple[torch.dtype, list[int]]]:
    """name -> (dtype, shape) of every tensor of a .safetensors file, from its header alone (no data is read)."""
    with open_weights(path) as (_, _, entries):
        return {name: (dtype, shape) for name, (dtype, shape, _) in entries.items()}


def read_headers(files: Iterable[Path]) -> dict[str, tuple[torch.dtype, list[int]]]:
    found: dict[str, tuple[torch.dtype, list[int]]] = {}
    for path in files:
        found.update(read_header(path))
    return found


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Map every tensor of a .safetensors file, without copying any.

    The file is mapped copy-on-write, so the tensors are writable views whose pages come from the page
    cache on first touch; nothing is read until a tensor is used.
    """
    with open_weights(path) as (f, _, entries):
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for name, (dtype, shape, offset) in entries.items():
        numel = math.prod(shape)
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(buffer, dtype=dtype, count=numel, offset=offset).view(shape)
    return tensors


def weight_files(component_dir: Path, stem: str, variant: str | None = None) -> list[Path]:
    """The safetensors files of one component: `stem.safetensors`, its sharded form with an index, or
    the `stem.<variant>.safetensors` forms. Without an explicit variant, the plain file is preferred and
    an fp16 variant is used only when it is the only one there."""
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        base = f"{stem}.{v}" if v else stem
        single = component_dir / f"{base}.safetensors"
        if single.exists():  # a pipe or a device there is refused when it is opened, not passed over
            return [single]
        # A variant's index carries the variant before ".json", as diffusers and transformers name it.
        index = component_dir / (f"{stem}.safetensors.index.{v}.json" if v else f"{stem}.safetensors.index.json")
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"{index} lacks the field 'weight_map'")
            if not all(isinstance(shard, str) and shard for shard in weight_map.values()):
                raise ConfigError(f"{index}: the field 'weight_map' must map tensor names to shard file names")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not inside_repository(component_dir / shard, component_dir):
                    raise CheckpointError(f"{index} names the shard {shard}, which lies outside {component_dir}")
                if not (component_dir / shard).exists():
                    raise ModelNotFoundError(f"{index} names the shard {shard}, which is missing")
            return [component_dir / s for s in shards]
    wanted = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    raise ModelNotFoundError(f"no weights in {component_dir}: expected {wanted} or its sharded form")


def read_weights(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_safetensors(path))
    return state


# ---------------------------------------------------------------------------------------------------------
# Writing

_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def write_safetensors(f: BinaryIO, tensors: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None,
                      dtype: torch.dtype | None = None) -> None:
    """Stream a standard .safetensors file to the open binary file `f`, each floating tensor cast to `dtype` (when
    given) only as it is written, so that one cast tensor at a time is in memory.

    Tensors start on ALIGNMENT-byte boundaries wherever their sizes allow, so that vector loads of the weights
    never straddle a cache line. The format forbids gaps between tensors, so the header is padded with spaces
    (which the format allows) and the tensors whose byte size is a multiple of ALIGNMENT go first; the few
    odd-sized ones follow."""

    def target(tensor: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype

    def nbytes(tensor: torch.Tensor) -> int:
        return tensor.numel() * target(tensor).itemsize

    order = sorted(tensors, key=lambda name: nbytes(tensors[name]) % ALIGNMENT != 0)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name in order:
        size = nbytes(tensors[name])
        header[name] = {"dtype": _NAMES[target(tensors[name])], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)
    f.write(struct.pack("<Q", len(text)) + text)
    for name in order:
        tensor = tensors[name].to(device="cpu", dtype=target(tensors[name])).contiguous()  # from any device
        f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
