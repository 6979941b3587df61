"""One spec table for the models of a Würstchen repository: where each lives and how it loads.

The hub layout, wurst's converted layout and the converter all read this table, in the way flux's `configs`
and mlx-examples' `_MODELS` serve their loaders. Components are named as diffusers names them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wurst.errors import ConfigError
from wurst.models import clip, stage_a, stage_b, stage_c
from wurst.weights import header_checks
from wurst.weights.cast_copies import files_in_dtype
from wurst.weights.configs import read_config
from wurst.weights.keymaps import CLIP_TEXT_KEYS, SAME_NAMES, STAGE_A_KEYS, STAGE_B_KEYS, STAGE_C_KEYS, KeyMap
from wurst.weights.load import check_tensors, load_module
from wurst.weights.safetensors_io import read_headers, read_weights, weight_files


@dataclass(frozen=True)
class ComponentSpec:
    folder: str  # the hub repository's folder, which is also diffusers' attribute name
    converted_name: str  # the weight file stem (and wurst.json key) in wurst's converted layout
    config_cls: type
    model_cls: type[nn.Module]
    key_map: KeyMap  # hub checkpoint names -> module names
    file_stem: str  # the hub weight file stem


COMPONENTS: dict[str, ComponentSpec] = {
    "prior": ComponentSpec("prior", "stage_c", stage_c.StageCConfig, stage_c.StageC, STAGE_C_KEYS,
                           "diffusion_pytorch_model"),
    "decoder": ComponentSpec("decoder", "stage_b", stage_b.StageBConfig, stage_b.StageB, STAGE_B_KEYS,
                             "diffusion_pytorch_model"),
    "vqgan": ComponentSpec("vqgan", "stage_a", stage_a.StageAConfig, stage_a.StageA, STAGE_A_KEYS,
                           "diffusion_pytorch_model"),
    "text_encoder": ComponentSpec("text_encoder", "text_encoder", clip.CLIPTextConfig, clip.CLIPTextEncoder,
                                  CLIP_TEXT_KEYS, "model"),
}


def describe(files: list[Path]) -> str:
    """How errors name a component's weights: the file, or the folder and shard count."""
    return str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"


@functools.lru_cache(maxsize=8)
def expected_state(model_cls: type[nn.Module], config) -> dict[str, torch.Tensor]:
    """The state of `model_cls(config)` as meta tensors (names, shapes, dtypes; no memory)."""
    with torch.device("meta"):
        return dict(model_cls(config).state_dict(keep_vars=True))


def check_against_weights(name: str, *, config, files: list[Path], converted: bool = False,
                          config_source: str) -> None:
    """Compare component `name`'s config with the safetensors headers of its files, reading no tensor data:
    first the counts and widths the file implies (before anything is built, so an absurd depth is refused at
    once), then every tensor's name, shape and dtype against the model built on the meta device. The first
    disagreement raises ConfigError naming the field and what the file holds, or CheckpointError naming the
    tensor."""
    spec = COMPONENTS[name]
    key_map = SAME_NAMES if converted else spec.key_map
    found = read_headers(files)
    shapes = {}
    for ckpt_name, (_, shape) in found.items():
        module_name = None if key_map.ignored(ckpt_name) else key_map.to_module(ckpt_name)
        if module_name is not None:
            shapes[module_name] = shape
    held = header_checks.FIELDS_IN_HEADER.get(name)
    for field, wanted, holds, evidence in held(config, shapes) if held else ():
        if wanted != holds:
            raise ConfigError(f"{config_source}: the field '{field}' is {wanted}, but {describe(files)} holds "
                              f"{holds} ({evidence})")
    check_tensors(expected_state(spec.model_cls, config), found, key_map, describe(files))


def load_component(
    name: str,
    *,
    config,
    files: list[Path],
    converted: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Build component `name` on the meta device from `config` and assign it the tensors of `files`, which
    carry hub names, or module names when `converted`."""
    spec = COMPONENTS[name]
    key_map = SAME_NAMES if converted else spec.key_map
    state = read_weights(files_in_dtype(files, dtype))
    return load_module(lambda: spec.model_cls(config), state, key_map, describe(files), dtype, device)


def hub_config(name: str, folder: str | Path):
    """The config of component `name` from its hub folder's config.json."""
    return read_config(COMPONENTS[name].config_cls, Path(folder) / "config.json")


def load_hub_component(
    name: str, folder: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Load one hub component folder (config.json and its safetensors, plain, sharded or fp16)."""
    files = weight_files(Path(folder), COMPONENTS[name].file_stem)
    config = hub_config(name, folder)
    check_against_weights(name, config=config, files=files, config_source=str(Path(folder) / "config.json"))
    return load_component(name, config=config, files=files, dtype=dtype, device=device)


load_stage_c = functools.partial(load_hub_component, "prior")
load_stage_b = functools.partial(load_hub_component, "decoder")
load_stage_a = functools.partial(load_hub_component, "vqgan")
load_clip_text_encoder = functools.partial(load_hub_component, "text_encoder")
