"""Stage C's image encoder, as shipped in the original release (`effnet_state_dict` of model_v2_stage_b.pt,
hub dome272/wuerstchen): the EfficientNetV2-S feature extractor, then a 1x1 conv (1280 -> 16, no bias) and a
BatchNorm, the "mapper". Inference only: BatchNorm uses its running statistics, stochastic depth is off.

An ImageNet-normalised image (B, 3, 32h, 32w) becomes (B, 16, h, w) in Stage B's conditioning range, the range
of the prior pipeline's output; Stage C's own latents are (x + 1) / 42 of it (training's map, which the
pipelines' x * 42 - 1 undoes).

Where the weights come from: an original .pt file (read with weights_only=True), or wurst's converted layout, a
folder whose wurst.json lists `stage_c_encoder` beside a `stage_c_encoder.safetensors` (a converted prior folder,
or what `fetch_image_encoder` extracts from the hub file once).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError, ModelNotFoundError
from .loader import SAME_NAMES, KeyMap, cache_root, config_from_dict, load_module, read_json, read_safetensors

CONVERTED_NAME = "stage_c_encoder"  # the weight file stem and wurst.json key in wurst's converted layout
HUB_REPO, HUB_FILE = "dome272/wuerstchen", "model_v2_stage_b.pt"
STATE_KEY = "effnet_state_dict"


@dataclass(frozen=True)
class EfficientNetConfig:
    """EfficientNetV2-S by default. Stages run at `widths`; the first `fused_stages` are Fused-MBConv stages
    (a 3x3 conv instead of expansion, depthwise conv and squeeze-excitation), the rest MBConv stages."""

    stem: int = 24
    widths: tuple[int, ...] = (24, 48, 64, 128, 160, 256)
    depths: tuple[int, ...] = (2, 4, 4, 6, 9, 15)
    expand_ratios: tuple[int, ...] = (1, 4, 4, 4, 6, 6)
    strides: tuple[int, ...] = (1, 2, 2, 2, 1, 2)  # of each stage's first block; with the stem's 2: 32x in all
    fused_stages: int = 3
    c_cond: int = 1280  # the 1x1 head's width, the mapper's input
    c_latent: int = 16
    eps: float = 1e-3  # EfficientNet's BatchNorm
    mapper_eps: float = 1e-5  # the mapper's BatchNorm2d keeps PyTorch's default

    def __post_init__(self) -> None:
        lengths = {len(self.widths), len(self.depths), len(self.expand_ratios), len(self.strides)}
        if len(lengths) != 1:
            raise ConfigError("widths, depths, expand_ratios and strides must have one entry per stage")
        if not 0 <= self.fused_stages <= len(self.widths):
            raise ConfigError(f"fused_stages must lie within [0, {len(self.widths)}], got {self.fused_stages}")

    @property
    def downsampling(self) -> int:
        factor = 2  # the stem
        for stride in self.strides:
            factor *= stride
        return factor


class BatchNorm(nn.Module):
    """BatchNorm2d at inference: the running statistics, never updated (no num_batches_tracked)."""

    def __init__(self, c: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvNorm(nn.Module):
    """A bias-free conv ("same" padding), BatchNorm, then SiLU unless `act` is False."""

    def __init__(self, c_in: int, c_out: int, kernel: int, *, stride: int = 1, groups: int = 1, eps: float,
                 act: bool = True):  # fmt: skip
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
        self.norm = BatchNorm(c_out, eps)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.silu(x) if self.act else x


class SqueezeExcite(nn.Module):
    """Channel gates from the spatial mean: sigmoid(fc2(silu(fc1(mean))))."""

    def __init__(self, c: int, c_squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c_squeeze, 1)
        self.fc2 = nn.Conv2d(c_squeeze, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class FusedMBConv(nn.Module):
    """A 3x3 conv to c_in·expand channels, then (when it expanded) a 1x1 projection; residual when shapes allow."""

    def __init__(self, c_in: int, c_out: int, *, expand: int, stride: int, eps: float):
        super().__init__()
        hidden = c_in * expand
        self.conv = ConvNorm(c_in, hidden if expand != 1 else c_out, 3, stride=stride, eps=eps)
        self.project = ConvNorm(hidden, c_out, 1, eps=eps, act=False) if expand != 1 else None
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.project is not None:
            h = self.project(h)
        return x + h if self.residual else h


class MBConv(nn.Module):
    """1x1 expansion, 3x3 depthwise conv, squeeze-excitation (squeezed to c_in / 4), 1x1 projection; residual
    when shapes allow."""

    def __init__(self, c_in: int, c_out: int, *, expand: int, stride: int, eps: float):
        super().__init__()
        hidden = c_in * expand
        self.expand = ConvNorm(c_in, hidden, 1, eps=eps) if expand != 1 else None
        self.depthwise = ConvNorm(hidden, hidden, 3, stride=stride, groups=hidden, eps=eps)
        self.se = SqueezeExcite(hidden, max(1, c_in // 4))
        self.project = ConvNorm(hidden, c_out, 1, eps=eps, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x) if self.expand is not None else x
        h = self.project(self.se(self.depthwise(h)))
        return x + h if self.residual else h


class EfficientNetEncoder(nn.Module):
    def __init__(self, cfg: EfficientNetConfig):
        super().__init__()
        self.config = cfg
        self.stem = ConvNorm(3, cfg.stem, 3, stride=2, eps=cfg.eps)
        self.stages = nn.ModuleList()
        c_in = cfg.stem
        for i, (width, depth, expand, stride) in enumerate(zip(cfg.widths, cfg.depths, cfg.expand_ratios,
                                                               cfg.strides, strict=True)):  # fmt: skip
            block = FusedMBConv if i < cfg.fused_stages else MBConv
            self.stages.append(nn.ModuleList(
                block(c_in if j == 0 else width, width, expand=expand, stride=stride if j == 0 else 1, eps=cfg.eps)
                for j in range(depth)
            ))  # fmt: skip
            c_in = width
        self.head = ConvNorm(c_in, cfg.c_cond, 1, eps=cfg.eps)
        self.mapper = ConvNorm(cfg.c_cond, cfg.c_latent, 1, eps=cfg.mapper_eps, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) ImageNet-normalised images -> (B, c_latent, ceil(H / 32), ceil(W / 32))."""
        x = self.stem(x)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.mapper(self.head(x))


# ---------------------------------------------------------------------------------------------------------
# The original key layout: `backbone.` is torchvision's efficientnet_v2_s().features (index 0 the stem, 1..n
# the stages, n + 1 the head), each conv-norm pair a Sequential (0 conv, 1 BatchNorm); `mapper.0`/`mapper.1`.


def checkpoint_keys(cfg: EfficientNetConfig) -> KeyMap:
    pairs, ignore = [], []

    def conv_norm(checkpoint: str, module: str) -> None:
        pairs.append((f"{checkpoint}.0.weight", f"{module}.conv.weight"))
        pairs.append((f"{checkpoint}.1.{{}}", f"{module}.norm.{{}}"))
        ignore.append(f"{checkpoint}.1.num_batches_tracked")

    conv_norm("backbone.0", "stem")
    for i, expand in enumerate(cfg.expand_ratios):
        block, ours = f"backbone.{i + 1}.{{}}.block", f"stages.{i}.{{}}"
        if i < cfg.fused_stages:
            parts = ["conv", "project"] if expand != 1 else ["conv"]
        else:
            parts = ["expand", "depthwise", "se", "project"] if expand != 1 else ["depthwise", "se", "project"]
        for k, part in enumerate(parts):
            if part == "se":
                pairs.append((f"{block}.{k}.{{}}.{{}}", f"{ours}.se.{{}}.{{}}"))  # fc1, fc2: weight, bias
            else:
                conv_norm(f"{block}.{k}", f"{ours}.{part}")
    conv_norm(f"backbone.{len(cfg.widths) + 1}", "head")
    conv_norm("mapper", "mapper")
    return KeyMap(pairs, ignore)


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
                              f"{len(default.strides)}")  # fmt: skip
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
                              c_latent=shape("mapper.0.weight")[0])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Reading and writing


def read_original(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `effnet_state_dict` of an original release file, unpickled with weights_only=True (it cannot run
    code) and memory-mapped, so that Stage B's weights beside it are never read."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"image encoder file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} is corrupt or holds more than tensors, which weights-only loading "
                              "refuses") from e  # fmt: skip
    except Exception as e:  # torch.load reports damaged files with many types
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from e
    state = payload.get(STATE_KEY) if isinstance(payload, Mapping) else None
    if not (isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"{path} holds no Stage C image encoder: expected a dict of tensors under "
                              f"'{STATE_KEY}', as {HUB_FILE} of {HUB_REPO} has")  # fmt: skip
    return {name.removeprefix("module."): tensor for name, tensor in state.items()}


def load_original(path: str | os.PathLike, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> EfficientNetEncoder:  # fmt: skip
    state = read_original(path)
    cfg = original_config(state, str(path))
    return load_module(lambda: EfficientNetEncoder(cfg), state, checkpoint_keys(cfg), str(path), dtype, device)


def has_converted(folder: str | os.PathLike) -> bool:
    """Whether `folder` is in wurst's converted layout and holds the image encoder."""
    index = Path(folder) / "wurst.json"
    try:
        return index.is_file() and CONVERTED_NAME in json.loads(index.read_text()).get("models", {})
    except (OSError, ValueError, AttributeError):
        return False


def load_converted(folder: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> EfficientNetEncoder:  # fmt: skip
    folder = Path(folder)
    index = read_json(folder / "wurst.json")
    models = index.get("models")
    if not isinstance(models, dict) or CONVERTED_NAME not in models:
        raise ModelNotFoundError(f"{folder / 'wurst.json'} lists no image encoder ('{CONVERTED_NAME}')")
    cfg = config_from_dict(EfficientNetConfig, models[CONVERTED_NAME], f"{folder / 'wurst.json'} "
                           f"(models.{CONVERTED_NAME})")  # fmt: skip
    files = folder / f"{CONVERTED_NAME}.safetensors"
    state = read_safetensors(files)
    return load_module(lambda: EfficientNetEncoder(cfg), state, SAME_NAMES, str(files), dtype, device)


def load_image_encoder(ref: str | os.PathLike, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> EfficientNetEncoder:  # fmt: skip
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
    Written under temporary names and renamed, so an interruption leaves the folder as it was."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / "wurst.json"
    index = read_json(index_path) if index_path.is_file() else {"format": "wurst", "version": 1,
                                                                  "kind": "image_encoder"}  # fmt: skip
    index.setdefault("models", {})[CONVERTED_NAME] = dataclasses.asdict(model.config)
    weights = folder / f"{CONVERTED_NAME}.safetensors"
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(weights) + ".partial", metadata={"format": "pt"})
    (folder / "wurst.json.partial").write_text(json.dumps(index, indent=2) + "\n")
    os.replace(str(weights) + ".partial", weights)
    os.replace(folder / "wurst.json.partial", index_path)
    return folder


# ---------------------------------------------------------------------------------------------------------
# The published encoder, through the Hugging Face cache


def fetch_image_encoder(dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> EfficientNetEncoder:  # fmt: skip
    """The published encoder: extracted once from model_v2_stage_b.pt of dome272/wuerstchen (fetched through
    the Hugging Face cache) into $WURST_CACHE/image_encoder (default ~/.cache/wurst), and read from there
    afterwards, without the hub."""
    extracted = cache_root() / "image_encoder" / HUB_REPO.replace("/", "--")
    if has_converted(extracted):
        return load_converted(extracted, dtype, device)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        path = hf_hub_download(HUB_REPO, HUB_FILE)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise ModelNotFoundError(f"the Stage C image encoder is missing: {HUB_FILE} of {HUB_REPO} is not in the "
                                 f"Hugging Face cache and the hub cannot be reached (offline): run `hf download "
                                 f"{HUB_REPO} {HUB_FILE}` on a connected machine, or pass image_encoder= (--image-"
                                 f"encoder) a local {HUB_FILE} or converted folder") from e  # fmt: skip
    except HfHubHTTPError as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelNotFoundError(f"cannot fetch {HUB_FILE} from {HUB_REPO}: {first_line}") from e
    model = load_original(path, torch.float32, "cpu")
    partial = extracted.with_name(extracted.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_converted(model, partial)
    shutil.rmtree(extracted, ignore_errors=True)
    partial.rename(extracted)
    return load_converted(extracted, dtype, device)
