"""What a training run (python -m wurst.train) needs at its peak, estimated before it starts, and the one-line
refusal of a run that cannot fit, naming what would.

The peak of a training step is the weights, the state kept for the trained parameters, and the step's working
memory: the tensors autograd keeps from one micro-batch's forward pass for its backward pass, plus the backward
pass's own working set (or, where larger, the optimizer step's scratch).

What autograd keeps was read off the code and measured: the bytes of the tensors a Stage C training forward hands
to torch.autograd.graph.saved_tensors_hooks, each storage once, the parameters left out (they are the weights), at
widths 32-256, depths 1-4, latents 4x4-32x32, batches 1-2, float32 and bfloat16, LoRA (on the attention and on every
layer), --full, --train-text-encoder and the frozen graph alone; the estimate's kept part came within 5% of it (up to
19% over at the tiny prior's 4x4 latent). tests/runtime/test_training_memory.py::test_kept_tensors_match_the_constants
repeats that measurement on the tiny prior. The counts below, per sample, are in values of the width c per latent
pixel (or per text token) in the compute dtype. None grows with the square of the pixel count: SDPA with gradients
keeps q, k, v, its output and the log-sum-exp, never the probabilities (the fused CPU kernel and CUDA's flash and
memory-efficient kernels alike). The whole estimate against the peak RSS of a training step of the published-size
prior: pytest -m slow tests/runtime/test_training_memory.py (LoRA in bfloat16 and float32, 512x512 to 1024x1024,
batches 1-2, with and without checkpointing, EMA and the text encoder: within 3%). No GPU was measured: on CUDA the
activations are the tensors' bytes, with nothing for the caching allocator's own slack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from wurst.errors import InsufficientMemoryError
from wurst.runtime import memory
from wurst.runtime.memory import TOKENS, amount, largest_fitting, model_bytes

BLOCK_KEPT = {"lora": (10, 0, 5), "full": (15, 1, 7)}  # per pixel, a ResBlock, TimestepBlock, AttnBlock that
# gradients pass through. ResBlock: the depthwise conv's input, the norm's input, the 4c GELU's input and output;
# AttnBlock: the norm's input, SDPA's q, k, v (their pixel half) and output; TimestepBlock: only its 1 + a, (B, c).
# --full also keeps the inputs of the linear layers (mlp_in 1, mlp_out 4, q/k/v 1 shared, out_proj none: it is
# SDPA's output) and the TimestepBlock's input (its mapper needs the gradient of a).
FIRST_BLOCK_KEPT = (8, 0, 4)  # a LoRA's first trained block: no gradient goes above it, so not its norm's input;
# the blocks before it keep nothing
KEPT_BLOCK_TEXT = 2  # per text token, every AttnBlock gradients pass through: the text half of SDPA's keys and values
KEPT_HEAD = 2  # per pixel, once: the final norm's and the head's inputs
KEPT_LATENT = 5  # per pixel, values of c_in, float32 at most: the projection's input, the head's outputs, the loss
TEXT_PATH_BLOCK = 2  # --full (or a LoRA on the text path), per text token, every AttnBlock: cond_proj's input, output
TEXT_PATH = 3  # the same, once: cond_in's input, the leaky ReLU's input, cond_out's input
CHECKPOINTED = 1  # --gradient-checkpointing, per pixel, each block gradients pass through: its input, kept to
# recompute it; while a recomputed block's backward runs, it keeps what it would keep without checkpointing
BACKWARD = 12  # per pixel: the backward pass's own working set at its widest (gradients of a ResBlock's 4c tensors
# while its kept tensors are still alive). Measured as the allocator's peak over a forward and backward pass (glibc's
# mallinfo2 uordblks + hblkhd, read before and after every aten op by a TorchDispatchMode) less what the forward
# kept: at widths 128-256, 8-14 with a LoRA on the attention or --full, 7 with one on every layer
TEXT_LAYER_KEPT = 6  # --train-text-encoder, per token, a CLIP layer, of its hidden width: the two norms' inputs,
# SDPA's q, k, v and output; and one of its MLP width (the GELU's input), and the 77x77 mask SDPA keeps
STATE_BYTES = {"gradient": 4, "adam": 8, "ema": 4, "factors": 4, "ddp": 4}  # per trained parameter, float32: the
# gradient, AdamW's two moments, the EMA copy (--ema-decay), a LoRA's factors themselves (--full's weights are counted
# as weights), and DistributedDataParallel's gradient buckets (more than one process)
CPU_HEAP = 1.5  # on the CPU, RSS over the tensors' own bytes: glibc keeps the holes the freed temporaries leave
# between kept tensors. On the published-size prior (LoRA, bfloat16, one step, measured as for BACKWARD) the estimated
# activations matched the live malloc bytes within 2%, and the process's RssAnon grew by 1.45-1.5x that (512x512
# batch 1 and 2, 1024x1024 batch 1)
OPTIMIZER_SCRATCH = 4  # per trained parameter on CUDA: AdamW's foreach step computes sqrt(v) for all of them at once
LATENT_STRIDE = 32  # the image encoder's downsampling: the latent of a WxH bucket is W/32 x H/32


@dataclass(frozen=True)
class TrainingEstimate:
    weights: int  # the prior pipeline's models as loaded
    trained: int  # gradients, optimizer moments, EMA and LoRA factors of the trained parameters
    activations: int  # a micro-batch's kept tensors and backward working set, or the optimizer step's scratch
    micro_batch: int
    latent: tuple[int, int]  # the largest bucket's latent (height, width)

    @property
    def total(self) -> int:
        return self.weights + self.trained + self.activations


@dataclass(frozen=True)
class _Plan:
    """What the estimate depends on that a refusal may suggest changing."""

    full: bool
    checkpointing: bool
    batch: int
    resolution: int


def _rows(attr: str, pixels: int) -> tuple[int, int]:
    """(latent pixels, text tokens) a Stage C linear layer sees per sample, by the last part of its name."""
    if attr in ("k_proj", "v_proj"):
        return pixels, TOKENS
    if attr in ("cond_in", "cond_out", "cond_proj"):
        return 0, TOKENS
    return (1 if attr == "mapper" else pixels), 0


def _lora_kept(layers: dict, *, rank: int, pixels: int, e: int) -> tuple[dict[str, int], int]:
    """What a LoRA's factors keep per sample (TrainableLora: up(down(x.float()))): each layer's input in float32 (in a
    float32 model the input itself, shared by the layers that read it: q, k and v read the same tokens, k and v the
    same text, and out_proj reads SDPA's output, kept already) and the rank-wide product. Returns (bytes on the
    pixels by the block that recomputes them, bytes on the text tokens)."""
    by_block: dict[str, int] = {}
    text = 0
    counted: set = set()
    for name, layer in layers.items():
        parent, _, attr = name.rpartition(".")
        for part, rows in enumerate(_rows(attr, pixels)):
            if not rows:
                continue
            shared = (parent, part) if attr in ("q_proj", "k_proj", "v_proj") else (name, part)
            kept = rows * rank * 4
            if (e != 4 or shared not in counted) and not (e == 4 and attr == "out_proj"):
                counted.add(shared)
                kept += rows * layer.in_features * 4
            if part:
                text += kept
            else:
                by_block[parent] = by_block.get(parent, 0) + kept
    return by_block, text


def _text_path(attrs: set[str]) -> bool:
    return bool(attrs & {"cond_in", "cond_out", "cond_proj"})


def _stage_c_kept(cfg, plan: _Plan, *, pixels: int, e: int, lora: dict, rank: int) -> int:
    """Bytes one sample's Stage C forward keeps for the backward pass, and the backward's working set."""
    c, depth = cfg.c, cfg.depth
    blocks, text = _lora_kept(lora, rank=rank, pixels=pixels, e=e) if not plan.full else ({}, 0)
    attrs = {name.rpartition(".")[2] for name in lora}
    text_path = plan.full or _text_path(attrs)
    # The first block that gradients pass through: the first with a trained layer (the first AttnBlock where the
    # text path is trained: the text reaches the pixels there)
    starts = [int(name.split(".")[1]) for name in lora if name.startswith("blocks.")]
    first = 0 if plan.full else min([*starts, *([2] if text_path else [])], default=3 * depth)
    kinds = BLOCK_KEPT["full" if plan.full else "lora"]
    per_block = {i: (kinds[i % 3] if plan.full or i > first else FIRST_BLOCK_KEPT[i % 3]) * pixels * c * e
                 + blocks.get(f"blocks.{i}", 0) for i in range(first, 3 * depth)}
    attention = sum(1 for i in per_block if i % 3 == 2)
    kept = KEPT_HEAD * pixels * c * e + KEPT_LATENT * pixels * cfg.c_in * 4 + text
    kept += attention * KEPT_BLOCK_TEXT * TOKENS * c * e
    if text_path:
        kept += (depth * TEXT_PATH_BLOCK + TEXT_PATH) * TOKENS * c * e
    if plan.checkpointing:
        kept += len(per_block) * CHECKPOINTED * pixels * c * e + max(per_block.values(), default=0)
    else:
        kept += sum(per_block.values())
    return kept + BACKWARD * pixels * c * e


def _text_encoder_kept(cfg, layers: dict, *, rank: int, e: int) -> int:
    """Bytes one sample's text encoder forward keeps for the backward pass (--train-text-encoder)."""
    per_layer = TOKENS * (TEXT_LAYER_KEPT * cfg.hidden_size + cfg.intermediate_size) * e + TOKENS * TOKENS * e
    counted: set = set()
    lora = 0
    for name, layer in layers.items():
        parent, _, attr = name.rpartition(".")
        lora += TOKENS * rank * 4
        shared = parent if attr in ("q_proj", "k_proj", "v_proj") else name
        if (e != 4 or shared not in counted) and not (e == 4 and attr == "out_proj"):
            counted.add(shared)
            lora += TOKENS * layer.in_features * 4
    return cfg.num_hidden_layers * per_layer + TOKENS * cfg.hidden_size * e + lora


def _largest_latent(samples, resolution: int, current: int) -> tuple[int, int]:
    """The largest bucket's latent at `resolution`: the buckets as they are at the run's own resolution, else each
    bucket's aspect bucketed again at the other one."""
    from wurst.train.data import bucket_size

    sides = {(s.height, s.width) for s in samples} or {(current, current)}
    if resolution != current:
        sides = {bucket_size(h, w, resolution) for h, w in sides}
    h, w = max(sides, key=lambda side: (side[0] // LATENT_STRIDE) * (side[1] // LATENT_STRIDE))
    return h // LATENT_STRIDE, w // LATENT_STRIDE


def training_estimate(args, *, pipe, samples, device: torch.device, dtype: torch.dtype, world: int,
                      plan: _Plan | None = None) -> TrainingEstimate:
    """The peak of a training run of `args` (python -m wurst.train's options) on `pipe` (the prior pipeline as
    loaded) over `samples`, before any LoRA is attached; `plan` estimates the same run with other choices."""
    from wurst.train.loop import TEXT_TARGETS, chosen_layers

    plan = plan or _Plan(args.full, args.gradient_checkpointing, args.batch_size, args.resolution)
    micro = max(1, plan.batch // (args.gradient_accumulation * world))
    latent = _largest_latent(samples, plan.resolution, args.resolution)
    e = torch.empty((), dtype=dtype).element_size()
    loaded = torch.float32 if plan.full else dtype  # --full loads the prior pipeline in float32
    # A text encoder that is not trained is loaded only while it fills the cache, before the prior's first step.
    weights = model_bytes(pipe.prior, loaded) + (model_bytes(pipe.text_encoder, loaded) if args.train_text_encoder
                                                 else 0)
    prior_lora, text_lora = {}, {}
    if plan.full:
        trained = sum(p.numel() for p in pipe.prior.parameters() if p.is_floating_point())
    else:
        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        prior_lora = chosen_layers("prior", pipe.prior, targets)
        if args.train_text_encoder:
            text_lora = chosen_layers("text_encoder", pipe.text_encoder, list(TEXT_TARGETS))
        trained = sum(args.lora_rank * (m.in_features + m.out_features)
                      for m in [*prior_lora.values(), *text_lora.values()])
    state = STATE_BYTES["gradient"] + STATE_BYTES["adam"]
    state += STATE_BYTES["ema"] if args.ema_decay is not None else 0
    state += STATE_BYTES["factors"] if not plan.full else 0
    state += STATE_BYTES["ddp"] if world > 1 else 0
    sample = _stage_c_kept(pipe.prior.config, plan, pixels=latent[0] * latent[1], e=e, lora=prior_lora,
                           rank=args.lora_rank)
    if text_lora:
        sample += _text_encoder_kept(pipe.text_encoder.config, text_lora, rank=args.lora_rank, e=e)
    activations = micro * sample
    if plan.full and dtype != torch.float32:  # autocast keeps a copy of every weight in `dtype` for the whole pass
        activations += model_bytes(pipe.prior, dtype)
    if device.type == "cuda":
        activations = max(activations, OPTIMIZER_SCRATCH * trained)
    elif device.type == "cpu":
        activations = math.ceil(activations * CPU_HEAP)
    return TrainingEstimate(weights=weights, trained=trained * state, activations=activations, micro_batch=micro,
                            latent=latent)


def check_training_memory(args, *, pipe, samples, device: torch.device, dtype: torch.dtype,
                          world: int) -> TrainingEstimate | None:
    """Refuse, in one line, a training run whose estimated peak is over what the device has (python -m wurst.train):
    what it needs, what there is, and what would fit. It runs after the models are loaded: on a GPU they are there
    already, out of the free memory, so their bytes are added back to it; on the CPU they are mapped from their
    files and take RAM only as they are first used, so the available memory still holds them, and every process of
    the run on this machine needs its own. Returns the estimate (None where the device cannot say what it has)."""
    import os

    have = memory.available_memory(device)
    if have is None:
        return None
    if device.type != "cpu":
        counted = (pipe.prior, pipe.text_encoder) if args.train_text_encoder else (pipe.prior,)  # as the weights
        have += sum(model_bytes(m, next(m.parameters()).dtype) for m in counted)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if device.type == "cpu" else 1

    asked = _Plan(args.full, args.gradient_checkpointing, args.batch_size, args.resolution)

    def need(**changes) -> TrainingEstimate:
        return training_estimate(args, pipe=pipe, samples=samples, device=device, dtype=dtype, world=world,
                                 plan=replace(asked, **changes))

    def fits(**changes) -> bool:
        return processes * need(**changes).total <= have

    estimate = need()
    if processes * estimate.total <= have:
        return estimate
    per_step = args.gradient_accumulation * world
    step = 128 if args.resolution % 128 == 0 else 32

    def smaller_batch(**changes) -> int:
        limit = args.batch_size // per_step - 1
        return per_step * largest_fitting(lambda k: fits(batch=k * per_step, **changes), limit)

    def smaller_resolution(**changes) -> int:
        return step * largest_fitting(lambda k: fits(resolution=k * step, **changes), args.resolution // step - 1)

    names = {"full": "LoRA (without --full)", "checkpointing": "--gradient-checkpointing",
             "batch": "--batch-size {}", "resolution": "--resolution {}"}
    ways = []  # each change that fits alone, in this order
    if args.full and fits(full=False):
        ways.append(names["full"])
    if not args.gradient_checkpointing and fits(checkpointing=True):
        ways.append(names["checkpointing"])
    # Where neither of the changes that keep the batch and the resolution fits alone: the changes together, in this
    # order, as far as needed
    together = [] if ways else _together(args, fits, smaller_batch, smaller_resolution, names, per_step)
    if len(together) > 1:
        ways.append(f"{together[0]} with {' and '.join(together[1:])}")
    if batch := smaller_batch():
        ways.append(names["batch"].format(batch))
    if resolution := smaller_resolution():
        ways.append(names["resolution"].format(resolution))
    where = "RAM" if device.type == "cpu" else f"memory on {device}"
    fits_text = f"would fit: {' or '.join(ways)}" if ways else "nothing smaller fits either"
    mode = "--full" if args.full else f"LoRA rank {args.lora_rank}"
    micro = f" in micro-batches of {estimate.micro_batch}" if estimate.micro_batch != args.batch_size else ""
    height, width = (side * LATENT_STRIDE for side in estimate.latent)
    many = f" in each of its {processes} processes" if processes > 1 else ""
    raise InsufficientMemoryError(
        f"training ({mode}, --batch-size {args.batch_size}{micro}, images up to {height}x{width}) needs about "
        f"{amount(estimate.total)} of {where}{many} at its peak ({amount(estimate.weights)} of weights, "
        f"{amount(estimate.trained)} of trained state, {amount(estimate.activations)} of activations) and "
        f"{amount(have)} is available; {fits_text} (--force tries anyway)"
    )


def _together(args, fits, smaller_batch, smaller_resolution, names: dict[str, str], per_step: int) -> list[str]:
    """LoRA, gradient checkpointing, the largest batch that fits then, the largest resolution that fits then, each
    added while the run does not fit yet: the changes, or none where even all of them leave it too large."""
    changes, said = {}, []
    if args.full:
        changes["full"] = False
        said.append(names["full"])
    if not args.gradient_checkpointing and not fits(**changes):
        changes["checkpointing"] = True
        said.append(names["checkpointing"])
    if fits(**changes):
        return said
    if batch := smaller_batch(**changes):
        return [*said, names["batch"].format(batch)]
    if args.batch_size > per_step:
        changes["batch"] = per_step
        said.append(names["batch"].format(per_step))
    resolution = smaller_resolution(**changes)
    return [*said, names["resolution"].format(resolution)] if resolution else []
