"""LoRA files: found (a file, a folder, a hub id or a state dict in memory), read, checked against the models they
adapt, and written in diffusers' format.

Two formats are read:
- diffusers' (what its training scripts and `save_lora_weights` write): `prior.<module>.lora_A.weight` /
  `lora_B.weight`, and `text_encoder.<module>...` for the CLIP text encoder, under diffusers' module names. The scale
  is 1, or lora_alpha / r where the file's metadata (`lora_adapter_metadata`, peft's LoraConfig) gives an alpha.
- kohya's (OneTrainer's for Würstchen v2): `lora_unet_<module with _ for .>.lora_down.weight` / `lora_up.weight` and
  an `alpha` per module, scale alpha / rank; `lora_te_` for the text encoder.
Every key must be understood: a key that names no layer of the model, a layer of Stage B, or a tensor of the wrong
shape is refused, naming the key."""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from wurst.errors import ArgumentError, CheckpointError, ModelNotFoundError
from wurst.files import atomic_file
from wurst.models.lora import LoraFactors, lora_layers
from wurst.weights.hub import HUB_ID, hub_file
from wurst.weights.safetensors_io import open_weights, read_safetensors, write_safetensors
from wurst.weights.spec import COMPONENTS

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry: peft's LoraConfig per component

# Key prefixes -> the pipeline component they adapt. diffusers writes `prior.` (its prior pipeline's unet_name) and
# `text_encoder.`; peft's own state dicts carry no prefix; kohya-style trainers write the `lora_*_` forms.
DIFFUSERS_PREFIXES = {"prior.": "prior", "unet.": "prior", "text_encoder.": "text_encoder"}
KOHYA_PREFIXES = {"lora_unet_": "prior", "lora_prior_unet_": "prior", "lora_prior_prior_": "prior",
                  "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_prior_te_": "text_encoder"}
# Top-level modules of Stage B that neither the prior nor the text encoder has.
STAGE_B_ONLY = ("down_blocks.", "up_blocks.", "effnet_mappers.", "clip_mapper.", "embedding.", "clf.")
COMPONENT_NAMES = {"prior": "the prior (Stage C)", "text_encoder": "the text encoder"}
# The suffixes of each format's tensors: (down, up, alpha).
DIFFUSERS_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".alpha")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


@dataclass(frozen=True)
class LoraFile:
    """A LoRA as read: its tensors, diffusers' metadata (or {}), and how errors name it (its file, or the dict)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict
    description: str


# ---------------------------------------------------------------------------------------------------------
# Finding and reading


def _pick_in_folder(folder: Path, weight_name: str | None) -> Path:
    if weight_name is not None:
        return folder / weight_name
    if (folder / DEFAULT_WEIGHT_NAME).is_file():
        return folder / DEFAULT_WEIGHT_NAME
    candidates = sorted(p for p in folder.glob("*.safetensors")
                        if not any(word in p.name for word in ("scheduler", "optimizer", "checkpoint")))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelNotFoundError(f"{folder} holds no LoRA file: expected {DEFAULT_WEIGHT_NAME} or one .safetensors "
                                 "file")
    names = ", ".join(p.name for p in candidates)
    raise ArgumentError(f"{folder} holds several .safetensors files ({names}): pass weight_name= to choose one")


def _inside(weight_name: object) -> bool:
    """A relative path with no part that starts with a dot: it cannot climb out of a folder or a repository."""
    parts = Path(weight_name).parts if isinstance(weight_name, str) and weight_name else ()
    return bool(parts) and not Path(weight_name).is_absolute() and not any(p.startswith(".") for p in parts)


def find_lora_file(source: str | os.PathLike, weight_name: str | None = None) -> Path:
    """The file of a LoRA given as a file, a folder (its `weight_name`, else diffusers' default name, else its one
    .safetensors file) or a hub id (its `weight_name`, else diffusers' default name, through the Hugging Face cache)."""
    if weight_name is not None and not _inside(weight_name):
        raise ArgumentError(f"weight_name must name a file inside the LoRA's folder or repository, got {weight_name!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        path = _pick_in_folder(path, weight_name)
    elif not path.exists() and HUB_ID.match(str(source)) and not path.suffix:  # a missing x/y.safetensors is a path
        name = weight_name or DEFAULT_WEIGHT_NAME
        path = hub_file(str(source), name, offline=f"the LoRA {source} ({name}) is not in the Hugging Face cache and "
                        f"the hub cannot be reached (offline): download it on a connected machine with "
                        f"`hf download {source} {name}`, or pass a local file")
    if not path.is_file():
        raise ModelNotFoundError(f"LoRA not found: {path} (not a file, a folder or a hub id)")
    if path.suffix != ".safetensors":
        raise ArgumentError(f"{path} is not a .safetensors file: wurst reads LoRA weights in safetensors only")
    return path


def read_lora(source: str | os.PathLike | dict, weight_name: str | None = None) -> LoraFile:
    """A LoRA from a file, folder or hub id (find_lora_file), or a state dict of tensors."""
    if isinstance(source, dict):
        bad = next((k for k, v in source.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise ArgumentError(f"the LoRA state dict's entry {bad!r} is not a tensor under a string key")
        return LoraFile(dict(source), {}, "the LoRA state dict")
    path = find_lora_file(source, weight_name)
    with open_weights(path) as (_, header, _):
        raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its {METADATA_KEY} metadata is not valid JSON") from e
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: its {METADATA_KEY} metadata is not a JSON object")
    return LoraFile(read_safetensors(path), metadata, str(path))


# ---------------------------------------------------------------------------------------------------------
# The layers a LoRA may name


@dataclass(frozen=True)
class Targets:
    """One component's adaptable layers: module name -> (in, out), and the names LoRA files use for them."""

    shapes: dict[str, tuple[int, int]]
    by_file_name: dict[str, str]  # diffusers' module name (with and without an optional prefix) -> module name
    by_kohya_name: dict[str, str]  # the same with "_" for "."
    other_modules: frozenset[str]  # diffusers' names of modules that hold weights but are not linear layers


@functools.lru_cache(maxsize=8)
def targets(component: str, config) -> Targets:
    spec = COMPONENTS[component]
    with torch.device("meta"):
        model = spec.model_cls(config)
    key_map = spec.key_map
    shapes = {name: (m.in_features, m.out_features) for name, m in lora_layers(model).items()}
    by_file_name = {}
    for name in shapes:
        file_name = key_map.checkpoint_layer(name)
        by_file_name[file_name] = name
        if key_map.prefix:
            by_file_name[file_name.removeprefix(key_map.prefix)] = name
    others = {key_map.to_checkpoint(n).rsplit(".", 1)[0] for n in model.state_dict()} - set(by_file_name)
    return Targets(shapes, by_file_name, {k.replace(".", "_"): v for k, v in by_file_name.items()}, frozenset(others))


# ---------------------------------------------------------------------------------------------------------
# Parsing


def _split(key: str) -> tuple[str, str, str, bool] | None:
    """(component, module path as the file names it, tensor role 'down'/'up'/'alpha', whether it is kohya's format) of
    a LoRA key, or None."""
    for prefixes, suffixes in ((KOHYA_PREFIXES, KOHYA_SUFFIXES), (DIFFUSERS_PREFIXES, DIFFUSERS_SUFFIXES)):
        kohya = prefixes is KOHYA_PREFIXES
        for suffix, role in zip(suffixes, ("down", "up", "alpha"), strict=True):
            if key.endswith(suffix):
                module = key.removesuffix(suffix)
                prefix = next((p for p in prefixes if module.startswith(p)), None)
                if prefix is not None:
                    return prefixes[prefix], module.removeprefix(prefix), role, kohya
                if not kohya:  # peft's own state dicts: no prefix at all
                    return "", module, role, kohya
    return None


def _module_of(key: str, component: str, path: str, kohya: bool, found: dict[str, Targets],
               source: str) -> tuple[str, str]:
    """(component, module name) for a key, or a one-line refusal that says why it fits nothing."""
    candidates = [component] if component else list(found)
    for c in candidates:
        table = found[c].by_kohya_name if kohya else found[c].by_file_name
        if path in table:
            return c, table[path]
    others = {o.replace(".", "_") if kohya else o for c in candidates for o in found[c].other_modules}
    if path in others:
        raise CheckpointError(f"{source}: '{key}' adapts '{path}', which is not a linear layer: wurst applies LoRA to "
                              "linear layers only")
    stage_b = tuple(p.replace(".", "_") for p in STAGE_B_ONLY) if kohya else STAGE_B_ONLY
    if path.startswith(stage_b):
        raise CheckpointError(f"{source}: '{key}' adapts a layer of Stage B (the decoder); this pipeline takes LoRAs "
                              "for the prior (Stage C) and its text encoder")
    where = " or ".join(COMPONENT_NAMES[c] for c in candidates)
    raise CheckpointError(f"{source}: '{key}' names no layer of {where}")


def _config_value(metadata: dict, component: str, field: str, path: str, default, source: str):
    """A field ('r' or 'lora_alpha') of the file's peft LoraConfig for `component`, its per-module pattern
    (`rank_pattern`, `alpha_pattern`, whose keys peft matches against the module path's tail) first."""
    pattern_field = {"r": "rank_pattern", "lora_alpha": "alpha_pattern"}[field]
    for pattern, value in (metadata.get(f"{component}.{pattern_field}") or {}).items():
        try:
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", path):
                return value
        except re.error as e:
            raise CheckpointError(f"{source}: the {pattern_field} key {pattern!r} is not a regular expression") from e
    return metadata.get(f"{component}.{field}", default)


def parse_lora(lora: LoraFile, *, configs: dict[str, object]) -> dict[str, dict[str, LoraFactors]]:
    """The factors of every layer the LoRA adapts, by component and module name, for the components whose model
    configs are `configs` (component -> config). Refuses, in one line naming the first bad key, anything it cannot
    place exactly."""
    source = lora.description
    found = {c: targets(c, config) for c, config in configs.items()}
    if not lora.tensors:
        raise CheckpointError(f"{source} holds no tensors, so no LoRA")
    parts: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in lora.tensors.items():
        split = _split(key)
        if split is None:
            if not any(_split(k) for k in lora.tensors):
                raise CheckpointError(f"{source} holds no LoRA: no lora_A/lora_B or lora_down/lora_up tensors "
                                      f"(its first tensor is '{key}')")
            raise CheckpointError(f"{source}: '{key}' is not a LoRA tensor (expected .lora_A.weight/.lora_B.weight, or "
                                  ".lora_down.weight/.lora_up.weight/.alpha)")
        component, path, role, kohya = split
        if component and component not in found:
            raise CheckpointError(f"{source}: '{key}' adapts {COMPONENT_NAMES.get(component, component)}, which this "
                                  "pipeline does not hold")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: '{key}' holds {str(tensor.dtype).removeprefix('torch.')} where a "
                                  "floating tensor belongs")
        place = _module_of(key, component, path, kohya, found, source)
        parts.setdefault(place, {})[role] = (key, tensor)
    layers: dict[str, dict[str, LoraFactors]] = {}
    for (component, name), roles in parts.items():
        first_key = next(iter(roles.values()))[0]
        lacking = [r for r in ("down", "up") if r not in roles]
        if lacking:
            raise CheckpointError(f"{source}: '{first_key}' has no matching {lacking[0]} tensor")
        (down_key, down), (up_key, up) = roles["down"], roles["up"]
        fan_in, fan_out = found[component].shapes[name]
        rank = down.shape[0] if down.dim() == 2 else -1
        if down.dim() != 2 or down.shape[1] != fan_in:
            raise CheckpointError(f"{source}: tensor '{down_key}' has shape {tuple(down.shape)}, but the layer takes "
                                  f"(rank, {fan_in})")
        if tuple(up.shape) != (fan_out, rank):
            raise CheckpointError(f"{source}: tensor '{up_key}' has shape {tuple(up.shape)}, expected ({fan_out}, "
                                  f"{rank}) to match '{down_key}'")
        layers.setdefault(component, {})[name] = LoraFactors(down, up, _scale(lora, roles, component, first_key, rank))
    return layers


def _scale(lora: LoraFile, roles: dict, component: str, key: str, rank: int) -> float:
    if "alpha" in roles:
        alpha_key, alpha = roles["alpha"]
        if alpha.numel() != 1:
            raise CheckpointError(f"{lora.description}: '{alpha_key}' must hold one number, holds {alpha.numel()}")
        value = float(alpha.reshape(()))
    else:
        path = key.split(".lora_")[0].removeprefix(f"{component}.")
        value = _config_value(lora.metadata, component, "lora_alpha", path, rank, lora.description)
        if lora.metadata.get(f"{component}.use_dora"):
            raise CheckpointError(f"{lora.description} is a DoRA, which wurst does not apply")
        if lora.metadata.get(f"{component}.use_rslora"):
            return float(value) / math.sqrt(rank)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{lora.description}: the alpha of '{key}' is not a finite number")
    return float(value) / rank


# ---------------------------------------------------------------------------------------------------------
# Writing


def peft_state_dict(component: str, layers: dict[str, LoraFactors]) -> dict[str, torch.Tensor]:
    """One component's LoRA factors (by module name) as a peft-style state dict under diffusers' module names,
    `<layer>.lora_A.weight` (down) and `<layer>.lora_B.weight` (up, the scale folded in): what save_lora_weights
    takes."""
    key_map = COMPONENTS[component].key_map
    return {f"{key_map.checkpoint_layer(name)}.lora_{part}.weight": tensor
            for name, factors in layers.items()
            for part, tensor in (("A", factors.down), ("B", factors.up * factors.scale))}


def write_lora(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], *, weight_name: str | None = None,
               metadata: dict | None = None) -> Path:
    """Write a LoRA file in diffusers' format, atomically: `tensors` already carry their `prior.`/`text_encoder.`
    keys; `metadata` (peft's LoraConfig fields under the same prefixes) goes into the header as diffusers puts it."""
    directory = Path(directory)
    if directory.is_file():
        raise ArgumentError(f"{directory} is a file; save_lora_weights takes a folder")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (weight_name or DEFAULT_WEIGHT_NAME)
    header = {"format": "pt"}
    if metadata:
        header[METADATA_KEY] = json.dumps(metadata, indent=2, sort_keys=True)
    with atomic_file(path) as f:
        write_safetensors(f, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=header)
    return path
