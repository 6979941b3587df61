"""What a generation needs at its peak, estimated from the model configs before any work starts, and whether the
device has it.

Each stage needs the weights resident while it runs (every model in the resident mode, only its own in low-memory
mode; on the CPU, the running denoiser's packed linear weights besides: runtime/packing.py) plus its largest working
set of activations. The activation terms count the tensors alive at the widest point of each model's largest block,
per image, from the config's widths and the latent sizes; the counts were read off the code (blocks.py,
stage_a.py) and checked against measured peak RSS at 512x512 and 1024x1024 (tests/runtime/test_memory.py). The
process's own footprint (Python, torch, the tokenizers) is not part of the estimate: on the CPU it is already spent
when the available memory is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from wurst.errors import ArgumentError, InsufficientMemoryError
from wurst.models.stage_b import StageBConfig
from wurst.runtime.offload import OnDemand
from wurst.runtime.packing import packing_applies
from wurst.weights.spec import COMPONENTS, expected_state

GB = 1e9
MB = 1e6
TOKENS = 77  # the text states every stage attends to
# Tensors of a block's width alive at its widest point, per pixel (see the module docstring):
RESBLOCK = 10  # input, normed (and concatenated) input, the 4c MLP activation and its GRN output
MIXING_BLOCK = 8  # Stage A: input, residual, normed input, the 4c MLP activation and its output
TEXT_LAYER = 8  # CLIP: residual stream, normed, q, k, v, attention output, and the 4x MLP (per hidden width)


@dataclass(frozen=True)
class StageNeed:
    name: str
    weights: int  # bytes resident while the stage runs
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.activations


@dataclass(frozen=True)
class Estimate:
    stages: tuple[StageNeed, ...]

    @property
    def peak(self) -> StageNeed:
        return max(self.stages, key=lambda s: s.total)


STAGES = ("prior text encoder", "Stage C", "decoder text encoder", "Stage B", "Stage A")
DENOISERS = ("Stage C", "Stage B")  # the models that run a loop, with their linear weights packed on the CPU


def _models(pipe) -> tuple:
    """The five models of a combined pipeline, in the order of STAGES."""
    prior, decoder = pipe.prior_pipe, pipe.decoder_pipe
    return prior.text_encoder, prior.prior, decoder.text_encoder, decoder.decoder, decoder.vqgan


def _tensors(model) -> dict[str, torch.Tensor]:
    """A model's parameters and buffers by name, as meta tensors built from its config when it is not loaded (low
    memory)."""
    if isinstance(model, OnDemand):
        spec = next(s for s in COMPONENTS.values() if isinstance(model.config, s.config_cls))
        return expected_state(spec.model_cls, model.config)
    return dict(model.state_dict(keep_vars=True))


def model_bytes(model, dtype: torch.dtype) -> int:
    """The bytes of a model's weights in `dtype`."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in _tensors(model).values())


# The denoisers' layers that map the text states: they run before the loop (StageC.condition, StageB.condition),
# once, so their weights are never packed.
TEXT_LAYERS = frozenset({"cond_in", "cond_out", "text_proj", "cond_proj"})


def packed_bytes(model, dtype: torch.dtype) -> int:
    """The packed copies of a denoiser's linear weights that its loop keeps on the CPU (runtime/packing.py): its
    2-D weights (all of them linear layers' in Stage C and Stage B) but the text layers', less the columns of
    Stage B's ResBlocks that read the injected embedding, whose terms are computed once before the loop from the
    plain weights."""
    size = torch.empty((), dtype=dtype).element_size()
    total = sum(t.numel() for name, t in _tensors(model).items()
                if t.dim() == 2 and name.split(".")[-2] not in TEXT_LAYERS) * size
    cfg = model.config
    if isinstance(cfg, StageBConfig):
        for i, c in enumerate(cfg.c_hidden):
            if cfg.inject_effnet[i]:
                resblocks = 2 * cfg.blocks[i] * cfg.level_config[i].count("C")  # down and up path
                total -= resblocks * 4 * c * cfg.c_cond * size
    return total


def _text(cfg, batch: int, e: int) -> int:
    return batch * TOKENS * (TEXT_LAYER * cfg.hidden_size + cfg.intermediate_size) * e


def _stage_c(cfg, pixels: int, batch: int, e: int) -> int:
    blocks = RESBLOCK * batch * pixels * cfg.c * e
    text_kv = cfg.depth * 2 * batch * TOKENS * cfg.c * e  # every attention block's keys and values, kept all run
    return blocks + text_kv


def _stage_b(cfg, side: tuple[int, int], batch: int, e: int) -> int:
    h, w = side[0] // cfg.patch_size, side[1] // cfg.patch_size
    working, kept = 0, 0
    for i, c in enumerate(cfg.c_hidden):
        pixels = (h >> i) * (w >> i)
        working = max(working, batch * pixels * (RESBLOCK + 1) * c * e)  # + the U-Net skip the up path concatenates
        kept += batch * pixels * c * e  # the level's output, for that skip
        if cfg.inject_effnet[i]:  # each ResBlock's 4c-wide share of the injected embedding (StageB.condition)
            resblocks = 2 * cfg.blocks[i] * cfg.level_config[i].count("C")  # down and up path
            kept += resblocks * batch * pixels * 4 * c * e
        attention_blocks = 2 * cfg.blocks[i] * cfg.level_config[i].count("A")  # down and up path
        kept += attention_blocks * 2 * batch * TOKENS * c * e  # their text keys and values
    return working + kept


def _stage_a(cfg, side: tuple[int, int], images: int, e: int) -> int:
    pixels = side[0] * side[1]
    widths = cfg.widths[::-1]  # from the latent end
    blocks = max(MIXING_BLOCK * images * widths[i] * pixels * 4**i * e for i in range(len(widths)))
    out = 3 * images * 3 * pixels * 4 ** (len(widths) - 1) * cfg.up_down_scale_factor**2 * 4  # image, clamped, float
    return blocks + out


def estimate(pipe, *, height: int, width: int, prompts: int = 1, images_per_prompt: int = 1,
             prior_guidance_scale: float = 4.0, decoder_guidance_scale: float = 0.0,
             low_memory: bool | None = None) -> Estimate:
    """The peak of each stage of `pipe` (a WuerstchenCombinedPipeline) for this request, in `pipe`'s dtype.
    low_memory=None takes the pipeline's own mode; True or False estimates the other mode."""
    prior, decoder = pipe.prior_pipe, pipe.decoder_pipe
    dtype = prior.dtype
    e = torch.empty((), dtype=dtype).element_size()
    models = dict(zip(STAGES, _models(pipe), strict=True))
    if low_memory is None:
        low_memory = isinstance(prior.prior, OnDemand)
    weights = {name: model_bytes(model, dtype) for name, model in models.items()}
    # LoRA adapters (pipelines/lora.py): their factors, and the fused copies of the layers they are fused into.
    weights["prior text encoder"] += prior.lora_bytes("text_encoder", dtype)
    weights["Stage C"] += prior.lora_bytes("prior", dtype)
    configs = {name: model.config for name, model in models.items()}

    images = prompts * images_per_prompt
    c_side = prior.latent_size(height, width)
    b_side = decoder.latent_size(*c_side)
    prior_batch = images * (2 if prior_guidance_scale > 1 else 1)
    decoder_batch = images * (2 if decoder_guidance_scale > 1 else 1)
    activations = {
        "prior text encoder": _text(configs["prior text encoder"], prompts * (2 if prior_guidance_scale > 1 else 1), e),
        "Stage C": _stage_c(configs["Stage C"], c_side[0] * c_side[1], prior_batch, e),
        "decoder text encoder": _text(configs["decoder text encoder"],
                                      prompts * (2 if decoder_guidance_scale > 1 else 1), e),
        "Stage B": _stage_b(configs["Stage B"], b_side, decoder_batch, e),
        "Stage A": _stage_a(configs["Stage A"], b_side, images, e),
    }
    everything = sum(weights.values())
    # Only the running denoiser's packed weights exist at a time, in either mode.
    packing = packing_applies(prior._execution_device, dtype)
    packed = {name: packed_bytes(models[name], dtype) if packing and name in DENOISERS else 0 for name in models}
    return Estimate(tuple(StageNeed(name, (weights[name] if low_memory else everything) + packed[name],
                                    activations[name]) for name in models))


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still give: free CUDA memory, or on the CPU the kernel's MemAvailable (capped by a
    cgroup limit). None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    line = next((line for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None)
    if line is None:
        return None
    available = int(line.split()[1]) * 1024
    for limit, usage in (("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes")):
        try:
            cap = Path("/sys/fs/cgroup", limit).read_text().strip()
            used = int(Path("/sys/fs/cgroup", usage).read_text())
        except (OSError, ValueError):
            continue
        if cap.isdigit():
            available = min(available, int(cap) - used)
    return available


# How a refusal names the ways out, from the CLI or from Python.
CLI_NAMES = {"force": "--force", "low_memory": "--low-memory", "images": "--num-images {}"}
API_NAMES = {"force": "force=True", "low_memory": "low_memory=True", "images": "num_images_per_prompt={}"}


def check_fits(pipe, *, height: int, width: int, prompts: int = 1, images_per_prompt: int = 1,
               prior_guidance_scale: float = 4.0, decoder_guidance_scale: float = 0.0,
               names: dict[str, str] = API_NAMES) -> Estimate | None:
    """Refuse, in one line, a request whose estimated peak is over what the pipeline's device has: what it needs,
    what there is, and what would fit. Returns the estimate (None where the device cannot say what it has)."""
    device = pipe.prior_pipe._execution_device
    free = available_memory(device)
    if free is None:
        return None
    request = dict(prompts=prompts, prior_guidance_scale=prior_guidance_scale,
                   decoder_guidance_scale=decoder_guidance_scale)
    low_memory = isinstance(pipe.prior_pipe.prior, OnDemand)
    if device.type == "cuda" and not low_memory:  # resident weights are on the device already: free excludes them
        free += sum(model_bytes(m, pipe.dtype) for m in _models(pipe))

    def peak(h: int, w: int, n: int, low: bool | None = None) -> StageNeed:
        return estimate(pipe, height=h, width=w, images_per_prompt=n, low_memory=low, **request).peak

    need = peak(height, width, images_per_prompt)
    if need.total <= free:
        check_latent_grid(pipe, height=height, width=width)
        return estimate(pipe, height=height, width=width, images_per_prompt=images_per_prompt, **request)
    ways = []
    longest = max(height, width) // 128 - 1
    side = _smallest(lambda k: peak(*_scaled(height, width, k), images_per_prompt).total <= free, longest)
    while 0 < side <= longest and not on_latent_grid(pipe, *_scaled(height, width, side)):
        side += 1
    if 0 < side <= longest:
        ways.append("{}x{}".format(*_scaled(height, width, side)))
    count = largest_fitting(lambda n: peak(height, width, n).total <= free, images_per_prompt - 1)
    if count:
        ways.append(names["images"].format(count))
    if not low_memory and peak(height, width, images_per_prompt, low=True).total <= free:
        ways.append(names["low_memory"])
    where = "RAM" if device.type == "cpu" else f"memory on {device}"
    fits = f"would fit: {' or '.join(ways)}" if ways else "nothing smaller fits either"
    images = prompts * images_per_prompt
    request_text = f"{height}x{width}" + (f" with {images} images" if images > 1 else "")
    raise InsufficientMemoryError(
        f"{request_text} needs about {amount(need.total)} of {where} at its peak ({need.name}: "
        f"{amount(need.weights)} of weights, {amount(need.activations)} of activations) and "
        f"{amount(free)} is available; {fits} ({names['force']} tries anyway)"
    )


def amount(size: float) -> str:
    """Bytes for a message: GB to one decimal, or whole MB below 1 GB (Stage A's 37 MB are not "0.0 GB")."""
    return f"{size / GB:.1f} GB" if size >= GB else f"{max(size, 0) / MB:.0f} MB"


def on_latent_grid(pipe, height: int, width: int) -> bool:
    """Stage B halves its latent once per level below the first: past about 12800 pixels the latent the decoder's
    scale gives stops being a multiple of that, and the size cannot run."""
    cfg = pipe.decoder_pipe.decoder.config
    factor = cfg.patch_size * 2 ** (len(cfg.c_hidden) - 1)
    side = pipe.decoder_pipe.latent_size(*pipe.prior_pipe.latent_size(height, width))
    return side[0] % factor == 0 and side[1] % factor == 0


def check_latent_grid(pipe, *, height: int, width: int) -> None:
    if not on_latent_grid(pipe, height, width):
        cfg = pipe.decoder_pipe.decoder.config
        side = pipe.decoder_pipe.latent_size(*pipe.prior_pipe.latent_size(height, width))
        raise ArgumentError(f"{height}x{width} gives a Stage B latent of {side[0]}x{side[1]}, and the decoder needs "
                            f"sides that are multiples of {cfg.patch_size * 2 ** (len(cfg.c_hidden) - 1)}: choose a "
                            "smaller size")


def check_weights_fit(pipe, device: torch.device, names: dict[str, str] = API_NAMES) -> None:
    """Refuse, in one line, resident models whose weights alone are over the free memory of `device` (checked
    before they are moved there)."""
    if isinstance(pipe.prior_pipe.prior, OnDemand):
        return
    free = available_memory(device)
    need = sum(model_bytes(m, pipe.dtype) for m in _models(pipe))
    if free is not None and need > free:
        raise InsufficientMemoryError(
            f"the five models need {amount(need)} of memory on {device} to stay loaded and {amount(free)} "
            f"is free; {names['low_memory']} loads one at a time ({names['force']} tries anyway)"
        )


def _scaled(height: int, width: int, k: int) -> tuple[int, int]:
    """The size whose longer side is k multiples of 128 smaller, keeping the aspect ratio on the 128 grid."""
    long_side = max(height, width)
    steps = long_side // 128 - k
    scale = steps * 128 / long_side
    return max(128, math.floor(height * scale / 128) * 128), max(128, math.floor(width * scale / 128) * 128)


def _smallest(fits, limit: int) -> int:
    """The smallest k in 1..limit with fits(k), where fits holds for every k above one it holds for; else 0."""
    lo, hi = 1, limit + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo if lo <= limit else 0


def largest_fitting(fits, limit: int) -> int:
    """The largest n in 1..limit with fits(n), where fits holds for every n below one it holds for; else 0."""
    lo, hi = 0, max(limit, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
