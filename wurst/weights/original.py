"""Read the original release files of the authors' code (github.com/dome272/Wuerstchen) into the diffusers hub
key layout, so that wurst's loaders (and diffusers' classes) take them as they take the hub safetensors.

    kind      file                                          weights under
    prior     model_v2_stage_c.pt                           ema_state_dict
    prior     model_v2_stage_c_finetune_interpolation.pt    ema_state_dict
    decoder   model_v2_stage_b.pt                           state_dict (beside effnet_state_dict, Stage C's encoder)
    vqgan     vqgan_f4_v1_500k.pt                           state_dict

Training checkpoints of the prior also carry `state_dict`, the raw (non-EMA) weights; any of these keys, or a
bare state dict, is accepted.

The original names equal the hub names but for two things, which diffusers' scripts/convert_wuerstchen.py
translated: attention is an nn.MultiheadAttention (`attention.attn.in_proj_weight`/`in_proj_bias`, q, k, v
stacked along dim 0, and `attention.attn.out_proj`), and the VQGAN codebook is `vquantizer.codebook`.

    from wurst.models import stage_c
    from wurst.weights.configs import config_from_dict
    from wurst.weights.load import load_module
    state = read_original("model_v2_stage_c.pt", "prior")
    cfg = config_from_dict(stage_c.StageCConfig, original_config("prior", state), "model_v2_stage_c.pt")
    model = load_module(lambda: stage_c.StageC(cfg), state, STAGE_C_KEYS, "model_v2_stage_c.pt")
"""

from __future__ import annotations

import importlib.resources
import json
import os
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from wurst.errors import CheckpointError, ConfigError, ModelNotFoundError
from wurst.weights.spec import COMPONENTS

KINDS = tuple(name for name in COMPONENTS if name != "text_encoder")  # the three stages

# Top-level keys that may hold the weights, preferred first. The prior's sampling weights are its EMA; the
# decoder and VQGAN were trained without one (and the hub decoder was converted from `state_dict`).
STATE_KEYS = {
    "prior": ("ema_state_dict", "state_dict"),
    "decoder": ("state_dict", "ema_state_dict"),
    "vqgan": ("state_dict", "ema_state_dict"),
}

# A tensor every file of the kind holds, named alike in both layouts: a wrong kind fails early and clearly.
MARKERS = {"prior": "cond_mapper.0.weight", "decoder": "clip_mapper.weight", "vqgan": "in_block.1.weight"}

# Added by DistributedDataParallel and torch.compile when a wrapped model's state is saved.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Original name ending -> hub name endings. Several endings: the tensor is cut into that many equal chunks
# along dim 0 (nn.MultiheadAttention stacks the q, k and v projections in one matrix).
_ATTENTION = {
    "attention.attn.in_proj_weight": ("attention.to_q.weight", "attention.to_k.weight", "attention.to_v.weight"),
    "attention.attn.in_proj_bias": ("attention.to_q.bias", "attention.to_k.bias", "attention.to_v.bias"),
    "attention.attn.out_proj.weight": ("attention.to_out.0.weight",),
    "attention.attn.out_proj.bias": ("attention.to_out.0.bias",),
}
RENAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "prior": _ATTENTION,
    "decoder": _ATTENTION,
    "vqgan": {"vquantizer.codebook.weight": ("vquantizer.embedding.weight",)},
}

# The published configs of the three stages, {kind: config.json}, as package data: an installed wurst has no
# configs/ folder. tools/package_configs.py writes the file from configs/warp-ai, their one source.
PUBLISHED_CONFIGS = "published_configs.json"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that says why (a refused GLOBAL, an unsupported opcode),
    rather than its boilerplate about the weights_only default."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "GLOBAL" in line:
            return line
        if line.endswith("WeightsUnpickler error:") and index + 1 < len(lines):
            return lines[index + 1]
    return _first_line(error)


def _pickled_callables(path: Path) -> list[str]:
    """The module.name of every global a plain pickle file refers to, read from its opcodes without running
    anything (pickletools only decodes). Empty when the file is not a readable pickle."""
    names, strings = [], []
    try:
        with open(path, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name == "GLOBAL":  # protocols 0-3: "module name" as the argument
                    names.append(".".join(str(arg).split(" ", 1)))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:  # protocol 4+: the last two strings
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and "UNICODE" in opcode.name:
                    strings.append(arg)
    except (ValueError, EOFError, OSError, UnicodeDecodeError, MemoryError):  # MemoryError: a garbage length
        pass
    return sorted(set(names))


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# ---------------------------------------------------------------------------------------------------------
# Reading


def load_weights_only(path: str | os.PathLike) -> Any:
    """What torch.save wrote to `path`, unpickled with weights_only=True, so that it cannot run code, and
    memory-mapped when it is in the zip format torch.save has written since PyTorch 1.6 (older files are read into
    memory). Whatever torch.load raises becomes one CheckpointError line naming the file."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses or loads
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # Raised both for garbage and for pickles that name functions or classes, which could run code.
        detail = _unpickler_reason(e)
        if "GLOBAL" not in detail and not zipfile.is_zipfile(path):
            named = _pickled_callables(path)  # torch stopped before the first global; name them ourselves
            detail += f"; it names {', '.join(named)}" if named else ""
        raise CheckpointError(f"{path} is corrupt or holds more than tensors, which weights-only loading refuses "
                              f"({detail.strip()})") from e
    except Exception as e:  # torch.load reports damaged files with many types: RuntimeError, EOFError, KeyError...
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)})") from e


def read_original(path: str | Path, kind: str) -> dict[str, torch.Tensor]:
    """The weights of an original release file, renamed to the hub layout of `kind` ("prior", "decoder" or
    "vqgan"), read with load_weights_only."""
    _check_kind(kind)
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"missing checkpoint file: {path}")
    return to_hub_names(_pick_state(load_weights_only(path), kind, path), kind, str(path))


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _pick_state(payload: Any, kind: str, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(payload, Mapping):
        for key in STATE_KEYS[kind]:
            if _is_state_dict(payload.get(key)):
                return payload[key]
        if _is_state_dict(payload):  # a bare state dict
            return payload
    found = f"keys {sorted(map(str, payload))[:8]}" if isinstance(payload, Mapping) else type(payload).__name__
    raise CheckpointError(f"{path} holds no state dict: expected a dict of tensors under "
                          f"{' or '.join(STATE_KEYS[kind])}, or a bare one; found {found}")


def to_hub_names(state: Mapping[str, torch.Tensor], kind: str, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename an original state dict to the hub layout: strip wrapper prefixes, then apply RENAMES[kind]."""
    _check_kind(kind)
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        pieces = {name: tensor}
        for old, new in RENAMES[kind].items():
            if name == old or name.endswith("." + old):
                stem = name[: len(name) - len(old)]
                if tensor.ndim == 0 or tensor.shape[0] % len(new):
                    raise CheckpointError(f"{source}: tensor '{name}' of shape {tuple(tensor.shape)} does not split "
                                          f"into {len(new)} equal parts along dim 0")
                pieces = {stem + n: t for n, t in zip(new, tensor.chunk(len(new), dim=0), strict=True)}
                break
        for hub_name, piece in pieces.items():
            if hub_name in renamed:
                raise CheckpointError(f"{source}: two tensors become '{hub_name}' (once wrapper prefixes are removed)")
            renamed[hub_name] = piece
    if MARKERS[kind] not in renamed:
        raise CheckpointError(f"{source} does not hold a Würstchen {kind}: it lacks the tensor '{MARKERS[kind]}'")
    return renamed


# ---------------------------------------------------------------------------------------------------------
# Configs


def published_config(kind: str) -> dict[str, Any]:
    """The hub config.json of the published model of `kind` (a fresh dict, the caller's to change)."""
    _check_kind(kind)
    packaged = importlib.resources.files(__package__).joinpath(PUBLISHED_CONFIGS)
    return json.loads(packaged.read_text(encoding="utf-8"))[kind]


def _shape(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    if name not in state:
        raise CheckpointError(f"cannot infer the config: the state dict lacks the tensor '{name}'")
    return tuple(state[name].shape)


def _first_shape(state: Mapping[str, torch.Tensor], suffix: str) -> tuple[int, ...] | None:
    return next((tuple(t.shape) for name, t in state.items() if name.endswith(suffix)), None)


# The tensor that tells each block kind apart, and how its shape gives the block's width.
_BLOCK_SIGNS = {"C": ("depthwise.weight", 1), "T": ("mapper.weight", 2), "A": ("attention.to_q.weight", 1)}


def _level_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> tuple[str, int]:
    """The block letters under `prefix` (C ResBlock, T TimestepBlock, A AttnBlock; resamplers skipped), in order,
    and the width of the first block."""
    found: dict[int, tuple[str, int]] = {}
    for name, tensor in state.items():
        index, _, leaf = name[len(prefix) :].partition(".")
        for letter, (sign, divisor) in _BLOCK_SIGNS.items():
            if name.startswith(prefix) and index.isdigit() and leaf == sign:
                found[int(index)] = (letter, tensor.shape[0] // divisor)
    if not found:
        raise CheckpointError(f"cannot infer the config: the state dict has no blocks under '{prefix}'")
    ordered = [found[i] for i in sorted(found)]
    return "".join(letter for letter, _ in ordered), ordered[0][1]


def _period(letters: str) -> str:
    """The shortest unit that `letters` repeats ("CTACTA" -> "CTA"). "CT" x 2 and "CTCT" x 1 build the same model."""
    return next(letters[:n] for n in range(1, len(letters) + 1) if letters == letters[:n] * (len(letters) // n))


def _heads(width: int, published_width: int | None, published_heads: int) -> int:
    # Head counts leave no trace in the weights: nn.MultiheadAttention splits one matrix at run time.
    if width == published_width:
        return published_heads
    raise ConfigError(f"attention {width} wide is not the published model's, and its head count cannot be read "
                      f"from the weights: pass nhead= to original_config")


def _prior_fields(state: Mapping[str, torch.Tensor], published: dict[str, Any]) -> dict[str, Any]:
    c_in, c = _shape(state, "projection.weight")[1], _shape(state, "projection.weight")[0]
    triples, _ = _level_blocks(state, "blocks.")
    if triples != "CTA" * (len(triples) // 3):
        raise CheckpointError(f"cannot infer the config: the prior's blocks are {triples[:9]}..., not C, T, A triples")
    mapper = _first_shape(state, ".mapper.weight")
    return {"c_in": c_in, "c": c, "c_cond": _shape(state, "cond_mapper.0.weight")[1],
            "c_r": mapper[1] if mapper else published["c_r"], "depth": len(triples) // 3}


def _decoder_fields(state: Mapping[str, torch.Tensor], published: dict[str, Any], patch: int) -> dict[str, Any]:
    levels = 1 + max((int(n.split(".")[1]) for n in state if n.startswith("down_blocks.")), default=-1)
    level_config, blocks, c_hidden = [], [], []
    for i in range(levels):
        letters, width = _level_blocks(state, f"down_blocks.{i}.")
        level_config.append(_period(letters))
        blocks.append(len(letters) // len(level_config[-1]))
        c_hidden.append(width)
    inject = [f"effnet_mappers.{i}.weight" in state for i in range(levels)]
    c_cond, clip_embd = _shape(state, "clip_mapper.weight")
    stem_in, head_out = _shape(state, "embedding.1.weight")[1], _shape(state, "clf.1.weight")[0]
    if stem_in % patch**2 or head_out % (2 * patch**2):
        raise ConfigError(f"patch_size {patch} fits neither the stem ({stem_in} inputs) nor the head ({head_out})")
    mapper, depthwise = _first_shape(state, ".mapper.weight"), _first_shape(state, ".depthwise.weight")
    return {"c_in": stem_in // patch**2, "c_out": head_out // (2 * patch**2),
            "c_r": mapper[1] if mapper else published["c_r"], "c_cond": c_cond, "c_hidden": c_hidden,
            "blocks": blocks, "level_config": level_config, "inject_effnet": inject,
            "effnet_embd": _shape(state, f"effnet_mappers.{inject.index(True)}.weight")[1] if any(inject)
            else published["effnet_embd"],
            "clip_embd": clip_embd, "kernel_size": depthwise[-1] if depthwise else published["kernel_size"]}


def _vqgan_fields(state: Mapping[str, torch.Tensor], scale: int) -> dict[str, Any]:
    # One mixing block per level on the way down; on the way up, the bottleneck stack and one per finer level.
    levels = sum(1 for n in state if n.startswith("down_blocks.") and n.endswith(".gammas"))
    mixing_up = sum(1 for n in state if n.startswith("up_blocks.") and n.endswith(".gammas"))
    codebook_size, latent_channels = _shape(state, "vquantizer.embedding.weight")
    return {"in_channels": _shape(state, "in_block.1.weight")[1] // scale**2,
            "out_channels": _shape(state, "out_block.0.weight")[0] // scale**2, "levels": levels,
            "bottleneck_blocks": mixing_up - (levels - 1), "embed_dim": _shape(state, "up_blocks.0.0.weight")[0],
            "latent_channels": latent_channels, "num_vq_embeddings": codebook_size}


def original_config(
    kind: str, state: Mapping[str, torch.Tensor], base: Mapping[str, Any] | None = None, **overrides: Any
) -> dict[str, Any]:
    """The hub config.json dict for `state` (hub-named, as read_original returns it). Widths, depth, block counts
    and channel counts are read from tensor shapes. The rest comes from `base` (a config of the same model, such
    as the repository converted alongside) over the published config (configs/warp-ai, packaged): dropout, the VQGAN
    scale factor, the pixel-(un)shuffle factors (the weights only fix their product with a channel count), and head
    counts, which are known only for the base's widths. `overrides` replace any field; models of other widths
    need `nhead=`."""
    published = {**published_config(kind), **(base or {})}
    unknown = set(overrides) - set(published)
    if unknown:
        raise ConfigError(f"original_config: the {kind} config has no field {', '.join(sorted(unknown))}")
    if kind == "prior":
        fields = _prior_fields(state, published)
    elif kind == "decoder":
        fields = _decoder_fields(state, published, overrides.get("patch_size", published["patch_size"]))
    else:
        fields = _vqgan_fields(state, overrides.get("up_down_scale_factor", published["up_down_scale_factor"]))
    if kind == "prior" and "nhead" not in overrides:
        fields["nhead"] = _heads(fields["c"], published["c"], published["nhead"])
    elif kind == "decoder" and "nhead" not in overrides:
        # Level by level, against the published level of the same index; -1 marks a level without attention.
        same_levels = len(fields["c_hidden"]) == len(published["c_hidden"])
        widths = published["c_hidden"] if same_levels else [None] * len(fields["c_hidden"])
        fields["nhead"] = [
            _heads(width, widths[i], published["nhead"][i] if same_levels else -1) if "A" in letters else -1
            for i, (width, letters) in enumerate(zip(fields["c_hidden"], fields["level_config"], strict=True))
        ]
    return {**published, **fields, **overrides}


# ---------------------------------------------------------------------------------------------------------
# Interpolation


def interpolate(
    state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * a + alpha * b for every floating tensor (computed in at least fp32, returned in the promoted
    dtype of the pair). Other tensors (BatchNorm counters) must be equal in both and are copied."""
    if state_a.keys() != state_b.keys():
        only_a, only_b = sorted(state_a.keys() - state_b.keys()), sorted(state_b.keys() - state_a.keys())
        raise CheckpointError(f"cannot interpolate state dicts with different tensors: {len(only_a)} only in the "
                              f"first {only_a[:1]}, {len(only_b)} only in the second {only_b[:1]}")
    blended: dict[str, torch.Tensor] = {}
    for name, a in state_a.items():
        b = state_b[name]
        if a.shape != b.shape:
            raise CheckpointError(f"cannot interpolate '{name}': shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        if a.is_floating_point() and b.is_floating_point():
            out_dtype = torch.promote_types(a.dtype, b.dtype)
            work = torch.promote_types(out_dtype, torch.float32)
            blended[name] = ((1 - alpha) * a.to(work) + alpha * b.to(work)).to(out_dtype)
        elif a.dtype == b.dtype and torch.equal(a, b):
            blended[name] = a.clone()
        else:
            raise CheckpointError(f"cannot interpolate '{name}': only floating tensors blend, and this "
                                  f"{a.dtype}/{b.dtype} pair differs")
    return blended
