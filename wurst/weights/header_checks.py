"""What a checkpoint holds, read from its safetensors header alone, against what a model config says.

Before a model is built (even on the meta device, where a depth of 10^9 would take forever), the counts and
widths a config gives are compared with those the tensor names and shapes of the file imply, and the first
disagreement is one line naming the config field and what the file holds. Each function here takes a config and
the checkpoint's shapes under module names and yields (field, config's value, file's value, evidence); a value
the file cannot tell (a tensor is missing) is skipped, and the tensor-by-tensor comparison that follows names the
damage.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

Shapes = dict[str, list[int]]  # module name -> shape
Held = Iterator[tuple[str, object, object, str]]


def _dim(shapes: Shapes, name: str, dim: int) -> tuple[int | None, str]:
    shape = shapes.get(name)
    if shape is None or len(shape) <= dim:
        return None, ""
    return shape[dim], f"'{name}' has shape ({', '.join(map(str, shape))})"


def _widths(shapes: Shapes, config, table: list[tuple[str, str, int]]) -> Held:
    """(field, tensor, dim): the field's value is that tensor's size along dim."""
    for field, tensor, dim in table:
        held, evidence = _dim(shapes, tensor, dim)
        if held is not None:
            yield field, getattr(config, field), held, evidence


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    """The distinct numbers `{}` takes in the names matching pattern (a regex with one group)."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for name in shapes if (m := regex.match(name))})


def _run(found: list[int]) -> list[int]:
    """0, 1, 2, ... as far as they go: what the file holds as a stack of layers. A stray number past a gap is an
    extra tensor, which the tensor-by-tensor comparison names."""
    run = 0
    while run < len(found) and found[run] == run:
        run += 1
    return found[:run]


def _first(shapes: Shapes, pattern: str) -> str | None:
    regex = re.compile(pattern)
    return next((name for name in shapes if regex.match(name)), None)


def _count_evidence(prefix: str, found: list[int]) -> str:
    return f"{prefix}.{found[0]} to {prefix}.{found[-1]}" if found else f"no {prefix}.N tensors"


def stage_c_fields(config, shapes: Shapes) -> Held:
    blocks = _run(_indices(shapes, r"^blocks\.(\d+)\."))  # ResBlock, TimestepBlock, AttnBlock per depth
    yield "depth", config.depth, len(blocks) // 3, f"{len(blocks)} blocks: {_count_evidence('blocks', blocks)}"
    yield from _widths(shapes, config, [("c", "projection.weight", 0), ("c_in", "projection.weight", 1),
                                        ("c_cond", "cond_in.weight", 1)])
    mapper = _first(shapes, r"^blocks\.\d+\.mapper\.weight$")
    if mapper:
        yield from _widths(shapes, config, [("c_r", mapper, 1)])


def _block_kinds(shapes: Shapes, prefix: str) -> str:
    """The letters (C: ResBlock, T: TimestepBlock, A: AttnBlock, R: resampler) of a Stage B level, in order."""
    kinds = {"depthwise.weight": "C", "mapper.weight": "T", "q_proj.weight": "A", "conv.weight": "R"}
    letters = []
    for j in _run(_indices(shapes, rf"^{re.escape(prefix)}\.(\d+)\.")):
        letters += [kinds[k] for k in kinds if f"{prefix}.{j}.{k}" in shapes][:1]
    return "".join(letters)


def stage_b_fields(config, shapes: Shapes) -> Held:
    levels = _run(_indices(shapes, r"^down_levels\.(\d+)\."))
    yield "c_hidden", f"{len(config.c_hidden)} levels", f"{len(levels)} levels", _count_evidence("down_levels", levels)
    for i, (letters, repeats) in enumerate(zip(config.level_config, config.blocks, strict=True)):
        held = _block_kinds(shapes, f"down_levels.{i}").removeprefix("R")
        evidence = f"down_levels.{i} holds the blocks {held or 'none'}"
        if len(held) % len(letters) or held != letters * (len(held) // len(letters)):
            yield f"level_config[{i}]", repr(letters), repr(held), evidence
        yield f"blocks[{i}]", repeats, len(held) // len(letters), evidence
        first = _first(shapes, rf"^down_levels\.{i}\.\d+\.depthwise\.weight$")
        if first:
            held_width, width_evidence = _dim(shapes, first, 0)
            yield f"c_hidden[{i}]", config.c_hidden[i], held_width, width_evidence
        injected = any(name.startswith(f"effnet_proj.{i}.") for name in shapes)
        there = "there" if injected else "absent"
        yield f"inject_effnet[{i}]", config.inject_effnet[i], injected, f"effnet_proj.{i} is {there}"
    yield from _widths(shapes, config, [("c_cond", "text_proj.weight", 0), ("clip_embd", "text_proj.weight", 1)])
    for field, pattern, dim in [("effnet_embd", r"^effnet_proj\.\d+\.weight$", 1),
                                ("c_r", r"^(down|up)_levels\.\d+\.\d+\.mapper\.weight$", 1),
                                ("kernel_size", r"^(down|up)_levels\.\d+\.\d+\.depthwise\.weight$", 2)]:
        tensor = _first(shapes, pattern)
        if tensor:
            yield from _widths(shapes, config, [(field, tensor, dim)])


def stage_a_fields(config, shapes: Shapes) -> Held:
    down = _indices(shapes, r"^down\.(\d+)\.gammas$")  # one mixing block per level in the encoder
    yield "levels", config.levels, len(down), f"encoder mixing blocks: {_count_evidence('down', down)}"
    up = _indices(shapes, r"^up\.(\d+)\.gammas$")  # the bottleneck blocks, then one per finer level
    bottleneck = len(up) - (len(down) - 1)
    evidence = f"decoder mixing blocks: {_count_evidence('up', up)}"
    yield "bottleneck_blocks", config.bottleneck_blocks, bottleneck, evidence
    yield from _widths(shapes, config, [("embed_dim", "up.0.weight", 0), ("latent_channels", "up.0.weight", 1),
                                        ("num_vq_embeddings", "codebook.weight", 0)])


def clip_text_fields(config, shapes: Shapes) -> Held:
    layers = _run(_indices(shapes, r"^layers\.(\d+)\."))
    yield "num_hidden_layers", config.num_hidden_layers, len(layers), _count_evidence("layers", layers)
    yield from _widths(shapes, config, [("vocab_size", "token_embedding.weight", 0),
                                        ("hidden_size", "token_embedding.weight", 1),
                                        ("max_position_embeddings", "position_embedding.weight", 0),
                                        ("intermediate_size", "layers.0.fc1.weight", 0)])


# component -> what its checkpoint header says of each config field
FIELDS_IN_HEADER = {"prior": stage_c_fields, "decoder": stage_b_fields, "vqgan": stage_a_fields,
                    "text_encoder": clip_text_fields}
