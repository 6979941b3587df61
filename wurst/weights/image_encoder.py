"""Stage C's image encoder, from its files: the original release's .pt (read with weights_only=True), or wurst's
converted layout, a folder whose wurst.json lists `stage_c_encoder` beside a `stage_c_encoder.safetensors` (a
converted prior folder, or what `fetch_image_encoder` extracts from the hub file once)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from wurst.errors import CheckpointError, ConfigError, ModelNotFoundError
from wurst.models.effnet import EfficientNetConfig, EfficientNetEncoder
from wurst.weights.configs import config_from_dict
from wurst.weights.converted import CONVERTED_INDEX, read_index, replace_folder, save_weights, write_index
from wurst.weights.hub import cache_root, hub_file
from wurst.weights.keymaps import SAME_NAMES, image_encoder_keys
from wurst.weights.load import load_module
from wurst.weights.original import load_weights_only
from wurst.weights.safetensors_io import read_safetensors

CONVERTED_NAME = "stage_c_encoder"  # the weight file stem and wurst.json key in wurst's converted layout
HUB_REPO, HUB_FILE = "dome272/wuerstchen", "model_v2_stage_b.pt"
STATE_KEY = "effnet_state_dict"


# ---------------------------------------------------------------------------------------------------------
# The original key layout: `backbone.` is torchvision's efficientnet_v2_s().features (index 0 the stem, 1..n
# the stages, n + 1 the head), each conv-norm pair a Sequential (0 conv, 1 BatchNorm); `mapper.0`/`mapper.1`.


def original_config(state: Mapping[str, torch.Tensor], source: str) -> EfficientNetConfig:
    """The config of an original-layout state dict, read from its tensor shapes. Strides leave no trace in the
    weights: the published ones are assumed, so the stage count must be the published six."""

    def shape(name: str) -> tuple[int, ...]:
        if name not in state:
            raise CheckpointError(f"{source}: the image encoder lacks the tensor '{name}'")
        return tuple(state[name].shape)

    blocks: dict[int, set[int]] = {}
    for name in state:
        match = re.match(r"backbone\.(\d+)\.(\d+)\.block\.", name)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    stages = sorted(blocks)
    default = EfficientNetConfig()
    if stages != list(range(1, len(default.strides) + 1)):
        raise CheckpointError(f"{source}: the image encoder has stages {stages}, not EfficientNetV2's 1 to "
                              f"{len(default.strides)}")
    widths, depths, expands, fused = [], [], [], []
    c_in = shape("backbone.0.0.weight")[0]
    for s in stages:
        prefix = f"backbone.{s}.0.block."
        parts = sorted({int(n[len(prefix):].split(".")[0]) for n in state if n.startswith(prefix)})
        has_se = f"{prefix}{parts[-2]}.fc1.weight" in state if len(parts) >= 2 else False
        first = shape(f"{prefix}0.0.weight")[0]
        if has_se:  # MBConv: [expand,] depthwise, se, project
            expand = first // c_in if len(parts) == 4 else 1
        else:  # Fused-MBConv: conv[, project]
            expand = first // c_in if len(parts) == 2 else 1
        widths.append(shape(f"{prefix}{parts[-1]}.0.weight")[0])
        depths.append(len(blocks[s]))
        expands.append(expand)
        fused.append(not has_se)
        c_in = widths[-1]
    fused_stages = fused.index(False) if False in fused else len(fused)
    if any(fused[fused_stages:]):
        raise CheckpointError(f"{source}: the image encoder's Fused-MBConv stages do not all come first")
    head = shape(f"backbone.{len(stages) + 1}.0.weight")
    return EfficientNetConfig(stem=shape("backbone.0.0.weight")[0], widths=tuple(widths), depths=tuple(depths),
                              expand_ratios=tuple(expands), fused_stages=fused_stages, c_cond=head[0],
                              c_latent=shape("mapper.0.weight")[0])


# ---------------------------------------------------------------------------------------------------------
# Reading and writing


def read_original(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `effnet_state_dict` of an original release file, unpickled with weights_only=True (it cannot run
    code) and memory-mapped, so that Stage B's weights beside it are never read (original.load_weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"image encoder file not found: {path}")
    payload = load_weights_only(path)
    state = payload.get(STATE_KEY) if isinstance(payload, Mapping) else None
    if not (isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"{path} holds no Stage C image encoder: expected a dict of tensors under "
                              f"'{STATE_KEY}', as {HUB_FILE} of {HUB_REPO} has")
    return {name.removeprefix("module."): tensor for name, tensor in state.items()}


def load_original(path: str | os.PathLike, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> EfficientNetEncoder:
    state = read_original(path)
    cfg = original_config(state, str(path))
    return load_module(lambda: EfficientNetEncoder(cfg), state, image_encoder_keys(cfg), str(path), dtype, device)


def has_converted(folder: str | os.PathLike) -> bool:
    """Whether `folder` is in wurst's converted layout and holds the image encoder. A wurst.json this wurst cannot
    read (damaged, or in a newer format version) is refused, not taken for a folder without the encoder."""
    if not (Path(folder) / CONVERTED_INDEX).is_file():
        return False
    models = read_index(folder).get("models")
    return isinstance(models, dict) and CONVERTED_NAME in models


def load_converted(folder: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> EfficientNetEncoder:
    folder = Path(folder)
    models = read_index(folder).get("models")
    if not isinstance(models, dict) or CONVERTED_NAME not in models:
        raise ModelNotFoundError(f"{folder / CONVERTED_INDEX} lists no image encoder ('{CONVERTED_NAME}')")
    cfg = config_from_dict(EfficientNetConfig, models[CONVERTED_NAME], f"{folder / CONVERTED_INDEX} "
                           f"(models.{CONVERTED_NAME})")
    files = folder / f"{CONVERTED_NAME}.safetensors"
    state = read_safetensors(files)
    return load_module(lambda: EfficientNetEncoder(cfg), state, SAME_NAMES, str(files), dtype, device)


def load_image_encoder(ref: str | os.PathLike, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> EfficientNetEncoder:
    """The encoder from an original .pt file (model_v2_stage_b.pt) or a folder in wurst's converted layout."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not has_converted(path):
            raise ModelNotFoundError(f"{path} holds no Stage C image encoder: expected wurst.json listing "
                                     f"'{CONVERTED_NAME}' beside {CONVERTED_NAME}.safetensors (as "
                                     f"tools/convert_weights.py writes it), or pass the original {HUB_FILE}")
        return load_converted(path, dtype, device)
    return load_original(path, dtype, device)


def save_converted(model: EfficientNetEncoder, folder: str | os.PathLike) -> Path:
    """Write (or add to) a converted folder: stage_c_encoder.safetensors, and its config under wurst.json's models.
    Each file is written atomically, the weights first, so an interruption leaves no index naming weights that
    are not there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = read_index(folder) if (folder / CONVERTED_INDEX).is_file() else {"kind": "image_encoder"}
    models = index.get("models") if isinstance(index.get("models"), dict) else {}
    save_weights(folder / f"{CONVERTED_NAME}.safetensors", model.state_dict())
    write_index(folder, kind=index.get("kind", "image_encoder"), pipeline=index.get("pipeline"),
                scheduler=index.get("scheduler"), models={**models, CONVERTED_NAME: model.config})
    return folder


# ---------------------------------------------------------------------------------------------------------
# The published encoder, through the Hugging Face cache


def fetch_image_encoder(dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> EfficientNetEncoder:
    """The published encoder: extracted once from model_v2_stage_b.pt of dome272/wuerstchen (fetched through
    the Hugging Face cache) into $WURST_CACHE/image_encoder (default ~/.cache/wurst), and read from there
    afterwards, without the hub."""
    extracted = cache_root() / "image_encoder" / HUB_REPO.replace("/", "--")
    try:
        if has_converted(extracted):
            return load_converted(extracted, dtype, device)
    except (ConfigError, CheckpointError):  # a damaged (or another wurst's) extraction: this cache is ours to redo
        pass
    path = hub_file(HUB_REPO, HUB_FILE, offline=f"the Stage C image encoder is missing: {HUB_FILE} of {HUB_REPO} is "
                    f"not in the Hugging Face cache and the hub cannot be reached (offline): run `hf download "
                    f"{HUB_REPO} {HUB_FILE}` on a connected machine, or pass image_encoder= (--image-encoder) a "
                    f"local {HUB_FILE} or converted folder")
    model = load_original(path, torch.float32, "cpu")
    with replace_folder(extracted) as partial:
        save_converted(model, partial)
    return load_converted(extracted, dtype, device)


def choose_image_encoder(given: str | os.PathLike | nn.Module | None, *, prior: str | os.PathLike | None,
                         dtype: torch.dtype) -> nn.Module:
    """The encoder image to image uses, on the CPU in `dtype`: the one `given` (a module, an original .pt file or a
    converted folder), else the one a converted prior folder holds (`prior` may also be a hub id, which is never
    converted), else the published one (fetch_image_encoder)."""
    if isinstance(given, nn.Module):
        return given
    if given is not None:
        return load_image_encoder(given, dtype, "cpu")
    if prior is not None and os.path.isdir(prior) and has_converted(prior):
        return load_converted(prior, dtype, "cpu")
    return fetch_image_encoder(dtype, "cpu")
