"""wurst/weights/header_checks.py: what a checkpoint's safetensors header says of a config. For each component, on
the tiny fixture's header shapes (under module names, as spec.check_against_weights hands them over): the
fixture's own config agrees with the file in every field the file tells, and a config that disagrees in one field
is named by that field, the config's value and the file's value. The values here are the tiny configs'
(tools/hub_fixtures.TINY), written out."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tools import hub_fixtures
from wurst.weights import header_checks
from wurst.weights.safetensors_io import read_header, weight_files
from wurst.weights.spec import COMPONENTS, expected_state, hub_config

REPO_OF = {"prior": "prior", "text_encoder": "prior", "decoder": "decoder", "vqgan": "decoder"}


def fixture(name: str):
    """(config, header shapes under module names) of component `name` of the tiny fixture."""
    folder = hub_fixtures.ensure("tiny", REPO_OF[name]) / name
    spec = COMPONENTS[name]
    (path,) = weight_files(folder, spec.file_stem)
    shapes = {}
    for checkpoint_name, (_, shape) in read_header(path).items():
        module_name = spec.key_map.to_module(checkpoint_name)
        if module_name is not None and not spec.key_map.ignored(checkpoint_name):
            shapes[module_name] = shape
    return hub_config(name, folder), shapes


def held(name: str, config, shapes) -> list[tuple[str, object, object, str]]:
    return list(header_checks.FIELDS_IN_HEADER[name](config, shapes))


def disagreements(name: str, config, shapes) -> list[tuple[str, object, object]]:
    return [(field, wanted, holds) for field, wanted, holds, _ in held(name, config, shapes) if wanted != holds]


def with_field(config, field: str, value):
    """`config` with one field changed: `name` or one entry `name[i]` of a tuple field."""
    match = re.fullmatch(r"(\w+)\[(\d+)\]", field)
    if match is None:
        return dataclasses.replace(config, **{field: value})
    name, index = match[1], int(match[2])
    entries = list(getattr(config, name))
    entries[index] = value
    return dataclasses.replace(config, **{name: tuple(entries)})


# What each component's header tells, and the file's value of each field (the tiny fixture's config).
TOLD = {
    "prior": {"depth": 2, "c": 32, "c_in": 16, "c_cond": 32, "c_r": 16},
    "text_encoder": {"num_hidden_layers": 2, "vocab_size": 49408, "hidden_size": 32, "max_position_embeddings": 77,
                     "intermediate_size": 64},
    "decoder": {"c_hidden": "4 levels", "c_cond": 32, "clip_embd": 24, "effnet_embd": 16, "c_r": 16,
                "kernel_size": 3,
                **{f"blocks[{i}]": n for i, n in enumerate([1, 1, 2, 1])},
                **{f"c_hidden[{i}]": c for i, c in enumerate([16, 32, 32, 32])},
                **{f"inject_effnet[{i}]": b for i, b in enumerate([False, True, True, True])}},
    "vqgan": {"levels": 2, "bottleneck_blocks": 2, "embed_dim": 16, "latent_channels": 4, "num_vq_embeddings": 64},
}


@pytest.mark.parametrize("name", list(TOLD))
def test_the_fixture_config_agrees_with_its_file_in_every_field_told(name):
    config, shapes = fixture(name)
    told = held(name, config, shapes)
    assert {field: holds for field, _, holds, _ in told} == TOLD[name]
    assert disagreements(name, config, shapes) == []
    assert all(evidence for *_, evidence in told)  # each value says where in the file it comes from


# (field, the config's value, the file's value): one field off at a time.
OFF_BY_ONE_FIELD = {
    "prior": [("depth", 3, 2), ("c", 48, 32), ("c_in", 8, 16), ("c_cond", 64, 32), ("c_r", 32, 16)],
    "text_encoder": [("num_hidden_layers", 3, 2), ("vocab_size", 1000, 49408), ("hidden_size", 64, 32),
                     ("max_position_embeddings", 64, 77), ("intermediate_size", 128, 64)],
    "decoder": [("c_hidden[1]", 48, 32), ("blocks[2]", 1, 2), ("blocks[0]", 3, 1), ("inject_effnet[0]", True, False),
                ("inject_effnet[3]", False, True), ("c_cond", 64, 32), ("clip_embd", 48, 24), ("effnet_embd", 8, 16),
                ("c_r", 32, 16), ("kernel_size", 5, 3)],
    "vqgan": [("levels", 3, 2), ("bottleneck_blocks", 5, 2), ("embed_dim", 32, 16), ("latent_channels", 8, 4),
              ("num_vq_embeddings", 128, 64)],
}
CASES = [(name, *case) for name, cases in OFF_BY_ONE_FIELD.items() for case in cases]


@pytest.mark.parametrize("name, field, config_value, file_value", CASES,
                         ids=[f"{name}-{field}" for name, field, *_ in CASES])
def test_a_config_off_in_one_field_is_named(name, field, config_value, file_value):
    config, shapes = fixture(name)
    assert disagreements(name, with_field(config, field, config_value), shapes) == [(field, config_value, file_value)]


# Configs whose widths all differ from one another (the tiny ones share some: Stage C's c and c_cond are both 32,
# so a square tensor could not tell which dimension a field was read from), told by the shapes of the model built
# from them on the meta device.
DISTINCT = {
    "prior": dict(c_in=8, c=48, c_cond=40, c_r=24, depth=3, nhead=2),
    "text_encoder": dict(vocab_size=1000, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=50),
    "decoder": dict(c_in=4, c_out=4, c_r=12, patch_size=2, c_cond=40, c_hidden=(16, 24, 32, 48),
                    nhead=(-1, 2, 2, 2), blocks=(2, 1, 3, 1), level_config=("CT", "CTA", "CT", "CTA"),
                    inject_effnet=(False, True, False, True), effnet_embd=20, clip_embd=28, kernel_size=5),
    "vqgan": dict(levels=3, bottleneck_blocks=3, embed_dim=32, latent_channels=6, num_vq_embeddings=100),
}


@pytest.mark.parametrize("name", list(DISTINCT))
def test_each_field_is_read_from_its_own_dimension(name):
    spec = COMPONENTS[name]
    config = spec.config_cls(**DISTINCT[name])
    shapes = {n: list(t.shape) for n, t in expected_state(spec.model_cls, config).items()}
    told = {field: holds for field, _, holds, _ in held(name, config, shapes)}
    assert disagreements(name, config, shapes) == []
    expected = {field: value for field, value in DISTINCT[name].items() if field in TOLD[name]}
    for field in TOLD[name]:
        if "[" in field:
            base, index = re.fullmatch(r"(\w+)\[(\d+)\]", field).groups()
            expected[field] = DISTINCT[name][base][int(index)]
    if name == "decoder":
        expected["c_hidden"] = "4 levels"
    assert told == expected


def test_a_stage_b_level_of_other_blocks_is_named():
    config, shapes = fixture("decoder")
    other = with_field(config, "level_config[1]", "CT")  # the file's level 1 is ResBlock, TimestepBlock, AttnBlock
    assert disagreements("decoder", other, shapes) == [("level_config[1]", "'CT'", "'CTA'")]


def test_a_stage_b_config_with_another_level_count_is_named():
    config, shapes = fixture("decoder")
    three = dataclasses.replace(config, **{f: getattr(config, f)[:3] for f in ("c_hidden", "nhead", "blocks",
                                                                             "level_config", "inject_effnet")})
    assert disagreements("decoder", three, shapes) == [("c_hidden", "3 levels", "4 levels")]


def test_what_the_file_cannot_tell_is_left_to_the_tensor_comparison():
    """A value whose tensor is missing is not told (the tensor-by-tensor check then names the missing tensor), and
    a stray layer number past a gap does not count as a layer."""
    config, shapes = fixture("prior")
    without = {n: s for n, s in shapes.items() if n != "projection.weight" and ".mapper." not in n}
    assert {field for field, *_ in held("prior", config, without)} == {"depth", "c_cond"}
    stray = {**shapes, "blocks.9.depthwise.weight": [32, 1, 3, 3]}
    assert disagreements("prior", config, stray) == []
    config, shapes = fixture("text_encoder")
    assert disagreements("text_encoder", config, {**shapes, "layers.5.fc1.weight": [64, 32]}) == []
