"""Loader core: resolve a model reference, read configs, and fill meta-device modules from safetensors.

Tensors are memory-mapped straight out of the file (no copy, no random init): the module is built on the
meta device and its parameters are assigned the mapped tensors, so peak memory stays at one copy of the
weights. A per-model `KeyMap` translates checkpoint names to module names, and every problem is reported
under the name the tensor carries in the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import mmap
import os
import re
import struct
import typing
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, ModelNotFoundError

# ---------------------------------------------------------------------------------------------------------
# Configs

ConfigT = TypeVar("ConfigT")


def read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"missing file: {path}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's type (int, float, bool, str, or a tuple of those)."""
    if typing.get_origin(hint) is tuple:
        return isinstance(value, (list, tuple)) and all(_has_type(v, typing.get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if hint in (bool, str) else True


def config_from_dict(cls: type[ConfigT], data: Mapping[str, Any], source: str) -> ConfigT:
    """Build the frozen dataclass `cls` from a hub config dict, checking each field's type; unknown keys
    are ignored."""
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name in data:
            value, hint = data[field.name], hints[field.name]
            if not _has_type(value, hint):
                item = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else None
                kind = f"a list of {item.__name__}" if item else f"a JSON {hint.__name__}"
                raise ConfigError(f"{source}: the field '{field.name}' must be {kind}, got {value!r}")
            kwargs[field.name] = tuple(value) if isinstance(value, list) else value
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source} lacks the field '{field.name}'")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # ConfigError included: a field out of range or inconsistent
        raise ConfigError(f"{source}: {e}") from e


def require_positive(config, *fields: str) -> None:
    """Config bounds, from a dataclass's __post_init__: each field (an int, or a tuple of ints) is positive."""
    for field in fields:
        value = getattr(config, field)
        if any(v <= 0 for v in (value if isinstance(value, tuple) else (value,))):
            raise ConfigError(f"the field '{field}' must be positive, got {value!r}")


def require_finite(config, *fields: str, minimum: float | None = None) -> None:
    """Each float field is finite (and at least `minimum`, when given)."""
    for field in fields:
        value = getattr(config, field)
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            bound = f" and at least {minimum}" if minimum is not None else ""
            raise ConfigError(f"the field '{field}' must be finite{bound}, got {value!r}")


def require_heads_divide(width_field: str, width: int, heads_field: str, heads: int) -> None:
    if heads <= 0 or width % heads:
        raise ConfigError(f"the field '{heads_field}' ({heads}) must be a positive divisor of "
                          f"'{width_field}' ({width})")  # fmt: skip


def read_config(cls: type[ConfigT], path: Path) -> ConfigT:
    return config_from_dict(cls, read_json(path), str(path))


# ---------------------------------------------------------------------------------------------------------
# safetensors, memory-mapped

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


# tools/convert_weights.py starts tensors on 64-byte boundaries (a cache line, an AVX-512 vector); files
# written by safetensors itself only align the data block to 8 bytes. Either way the loader views tensors
# in place: copying 12 GB costs seconds of load time, and in our measurements results and speed on
# unaligned weights were the same.
ALIGNMENT = 64


def _open_header(path: Path, f) -> tuple[dict, int, int]:
    """The parsed header of an open safetensors file, where its data starts, and the file size."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > size - 8:
        raise CheckpointError(f"{path} is truncated or not a safetensors file (bad header length)")
    try:
        header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not a JSON object")
    return header, 8 + header_len, size


def _entries(path: Path, header: dict, data_start: int, size: int) -> dict[str, tuple[torch.dtype, list[int], int]]:
    """name -> (dtype, shape, offset in the file) of every tensor, each checked to lie inside the file."""
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} is corrupt: bad header entry for tensor '{name}'") from e
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if any(s < 0 for s in shape) or end - begin != numel * itemsize or begin < 0 or data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated or corrupt: tensor '{name}' lies outside the file "
                f"(file has {size} bytes, tensor ends at {data_start + end})"
            )
        entries[name] = (dtype, shape, data_start + begin)
    return entries


def read_header(path: Path) -> dict[str, tuple[torch.dtype, list[int]]]:
    """name -> (dtype, shape) of every tensor of a .safetensors file, from its header alone (no data is read)."""
    try:
        with open(path, "rb") as f:
            entries = _entries(path, *_open_header(path, f))
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"missing weight file: {path}") from e
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
    try:
        with open(path, "rb") as f:
            entries = _entries(path, *_open_header(path, f))
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"missing weight file: {path}") from e
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
        if single.is_file():
            return [single]
        index = component_dir / f"{base}.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"{index} lacks the field 'weight_map'")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (component_dir / shard).is_file():
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
# Checkpoint names -> module names


class KeyMap:
    """A short table of (checkpoint pattern, module pattern) pairs. `{}` stands for one dotted name part
    (a layer number, or weight/bias) and is carried across in order. Checkpoint names matching an
    `ignore` pattern are skipped (buffers that some exporters write and the model recomputes). When
    `optional_prefix` is set, checkpoint names may carry it or not; the patterns are written with it."""

    def __init__(self, pairs: Iterable[tuple[str, str]], ignore: Iterable[str] = (), optional_prefix: str = ""):
        self.pairs = list(pairs)
        self.prefix = optional_prefix
        self._forward = [(self._regex(c), m) for c, m in self.pairs]
        self._backward = [(self._regex(m), c) for c, m in self.pairs]
        self._ignore = [self._regex(p) for p in ignore]

    @staticmethod
    def _regex(pattern: str) -> re.Pattern[str]:
        return re.compile("^" + re.escape(pattern).replace(r"\{\}", r"([^.]+)") + "$")

    @staticmethod
    def _apply(rules: list[tuple[re.Pattern[str], str]], name: str) -> str | None:
        for regex, target in rules:
            match = regex.match(name)
            if match:
                return target.format(*match.groups())
        return None

    def _with_prefix(self, checkpoint_name: str) -> str:
        return checkpoint_name if checkpoint_name.startswith(self.prefix) else self.prefix + checkpoint_name

    def to_module(self, checkpoint_name: str) -> str | None:
        if not self.pairs:  # an empty table: the file already uses the module's names
            return checkpoint_name
        return self._apply(self._forward, self._with_prefix(checkpoint_name))

    def to_checkpoint(self, module_name: str) -> str:
        return self._apply(self._backward, module_name) or module_name

    def ignored(self, checkpoint_name: str) -> bool:
        return any(r.match(self._with_prefix(checkpoint_name)) for r in self._ignore)


def _shape(t: torch.Size | list[int]) -> str:
    return "(" + ", ".join(str(s) for s in t) + ")"


def _summarise(items: list[str]) -> str:
    return items[0] + (f" and {len(items) - 1} more" if len(items) > 1 else "")


def check_tensors(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, tuple[torch.dtype, list[int]]], key_map: KeyMap,
    source: str,
) -> dict[str, str]:  # fmt: skip
    """Compare what a checkpoint holds (name -> dtype and shape, as its header gives them) with a module's state
    (`expected`, meta tensors will do). Missing, unexpected, mis-shaped tensors and integer tensors where a
    floating weight belongs raise CheckpointError naming them as the file does. Returns checkpoint name ->
    module name of every tensor the module takes."""
    names: dict[str, str] = {}
    unexpected, misshaped, mistyped = [], [], []
    for ckpt_name, (dtype, shape) in found.items():
        if key_map.ignored(ckpt_name):
            continue
        name = key_map.to_module(ckpt_name)
        if name is None or name not in expected:
            unexpected.append(ckpt_name)
            continue
        want = expected[name]
        if tuple(shape) != tuple(want.shape):
            misshaped.append(f"'{ckpt_name}' has shape {_shape(shape)}, expected {_shape(want.shape)}")
        elif want.is_floating_point() and not dtype.is_floating_point:
            mistyped.append(f"'{ckpt_name}' holds {str(dtype).removeprefix('torch.')} where a floating weight "
                            "belongs")  # fmt: skip
        else:
            names[ckpt_name] = name
    if misshaped:
        raise CheckpointError(f"{source}: tensor {_summarise(misshaped)}")
    if mistyped:
        raise CheckpointError(f"{source}: tensor {_summarise(mistyped)}")
    taken = set(names.values())
    missing = [n for n in expected if n not in taken]
    if missing:
        described = [f"'{key_map.to_checkpoint(n)}' (shape {_shape(expected[n].shape)})" for n in missing]
        raise CheckpointError(f"{source}: missing tensor {_summarise(described)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {_summarise([repr(u) for u in unexpected])}")
    return names


def load_module(
    build: Callable[[], nn.Module],
    state: Mapping[str, torch.Tensor],
    key_map: KeyMap,
    source: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Build a module on the meta device and assign it the checkpoint tensors in `state`.

    Floating tensors are cast to `dtype` (when given) one at a time, then moved to `device`. Missing,
    unexpected, mis-shaped and wrongly typed tensors raise CheckpointError naming them as the file does.
    """
    with torch.device("meta"):
        module = build()
    expected = dict(module.state_dict(keep_vars=True))
    found = {name: (tensor.dtype, list(tensor.shape)) for name, tensor in state.items()}
    assigned: dict[str, torch.Tensor] = {}
    for ckpt_name, name in check_tensors(expected, found, key_map, source).items():
        tensor = state[ckpt_name]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        assigned[name] = tensor.to(device) if device is not None else tensor
    module.load_state_dict(assigned, strict=True, assign=True)
    return module.eval().requires_grad_(False)


SAME_NAMES = KeyMap([])  # for files in wurst's own layout, written under the module names


# ---------------------------------------------------------------------------------------------------------
# Cast copies: the weights in another dtype, written once and mapped from then on

# Casting a billion float32 weights to bfloat16 on every load costs seconds per model (22 s for a whole
# pipeline on a 2-core machine, against under 2 s to map it). So the first load in a dtype other than the
# file's writes the cast tensors to $WURST_CACHE/<dtype>/, and later loads map that copy as they map the
# source. One copy per source file, named after its path and stamped with its size and mtime: a changed
# source is cast again over its old copy. Deleting the folder is always safe; it only costs the next cast.
CAST_COPY_VERSION = "1"


def cache_root() -> Path:
    return Path(os.environ.get("WURST_CACHE", Path.home() / ".cache" / "wurst"))


def _cast_copy_path(source: Path, dtype: torch.dtype) -> Path:
    resolved = source.resolve()  # hub-cache files are links to blobs
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    return cache_root() / str(dtype).removeprefix("torch.") / f"{source.parent.name}-{source.stem}-{digest}.safetensors"


def _stamp(source: Path) -> dict[str, str]:
    stat = source.stat()
    return {"wurst_cast_copy": CAST_COPY_VERSION, "source": str(source.resolve()), "source_size": str(stat.st_size),
            "source_mtime_ns": str(stat.st_mtime_ns)}  # fmt: skip


def _copy_is_current(copy: Path, source: Path, source_header: dict, dtype: torch.dtype) -> bool:
    """The copy exists, is whole, carries the source's stamp and holds every tensor of the source (whose
    read_header is `source_header`), cast."""
    try:
        with open(copy, "rb") as f:
            header, data_start, size = _open_header(copy, f)
            entries = _entries(copy, header, data_start, size)
    except (OSError, CheckpointError):
        return False
    if header.get("__metadata__", {}) != {"format": "pt", **_stamp(source)} or entries.keys() != source_header.keys():
        return False
    for name, (src_dtype, shape) in source_header.items():
        cast = dtype if src_dtype.is_floating_point else src_dtype
        if entries[name][:2] != (cast, shape):
            return False
    return True


def _write_cast_copy(source: Path, copy: Path, dtype: torch.dtype) -> None:
    """Cast every floating tensor of `source` and write the copy atomically (a temporary file, then a rename), so
    that a crash or a full disk leaves the old copy or none, never half of one."""
    from safetensors.torch import save_file

    state = {name: (t.to(dtype) if t.is_floating_point() else t).contiguous()
             for name, t in read_safetensors(source).items()}  # fmt: skip
    copy.parent.mkdir(parents=True, exist_ok=True)
    temporary = copy.with_name(f"{copy.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.partial")
    open(temporary, "x").close()  # claims the name, and shows the mode the umask gives a new file
    try:
        mode = temporary.stat().st_mode
        save_file(state, temporary, metadata={"format": "pt", **_stamp(source)})
        os.chmod(temporary, mode)  # safetensors writes its files 0600, as if private
        os.replace(temporary, copy)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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
                              f"{copy.parent} ({reason}): casting in memory", stacklevel=2)  # fmt: skip
                chosen.append(source)
                continue
        chosen.append(copy)
    return chosen
