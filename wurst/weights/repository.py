"""Reading a Würstchen repository: a hub id (through the Hugging Face cache) or a local folder, in diffusers'
hub layout or in wurst's converted layout. Everything is checked, and every model's config read, before any
weight is loaded."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wurst.errors import ArgumentError, ConfigError, ModelNotFoundError
from wurst.models.tokenizer import CLIPTokenizer
from wurst.models.validation import require_finite
from wurst.weights.configs import config_from_dict, read_config, read_json
from wurst.weights.converted import CONVERTED_INDEX, read_index
from wurst.weights.hub import resolve
from wurst.weights.safetensors_io import weight_files
from wurst.weights.spec import COMPONENTS, check_against_weights, hub_config, load_component
from wurst.weights.tokenizer_files import read_tokenizer


@dataclass(frozen=True)
class PriorPipelineConfig:
    """`model_index.json` of a prior repository. The prior's output is mapped to Stage B's input range with
    `x * latent_mean - latent_std` (the names are diffusers'; the map undoes training's (x + 1) / 42)."""

    latent_mean: float = 42.0
    latent_std: float = 1.0
    resolution_multiple: float = 42.67

    def __post_init__(self):
        require_finite(self, "latent_mean", "latent_std")
        require_finite(self, "resolution_multiple", minimum=1.0)  # the image is larger than its Stage C latent


@dataclass(frozen=True)
class DecoderPipelineConfig:
    """`model_index.json` of a decoder repository: Stage B latents are this many times the Stage C size."""

    latent_dim_scale: float = 10.67

    def __post_init__(self):
        require_finite(self, "latent_dim_scale", minimum=1.0)


@dataclass(frozen=True)
class SchedulerConfig:
    """`scheduler/scheduler_config.json`: the cosine schedule's offset and time scaler."""

    s: float = 0.008
    scaler: float = 1.0

    def __post_init__(self):
        require_finite(self, "s", minimum=0.0)
        require_finite(self, "scaler")
        if self.scaler <= 0:
            raise ConfigError(f"the field 'scaler' must be positive, got {self.scaler}")


@dataclass(frozen=True)
class RepositoryKind:
    pipeline_class: str  # model_index.json's _class_name
    config_cls: type
    components: tuple[str, ...]  # the models it holds, named as in COMPONENTS
    default: str  # the published repository


KINDS = {
    "prior": RepositoryKind("WuerstchenPriorPipeline", PriorPipelineConfig, ("prior", "text_encoder"),
                            "warp-ai/wuerstchen-prior"),
    "decoder": RepositoryKind("WuerstchenDecoderPipeline", DecoderPipelineConfig, ("decoder", "vqgan", "text_encoder"),
                              "warp-ai/wuerstchen"),
}

# wurst's own compact layout (wurst.weights.converted, written by tools/convert_weights.py): one folder per
# repository holding CONVERTED_INDEX (wurst.json: every config), one safetensors file per model under wurst's module
# names, and tokenizer/.
MODEL_CARD = "README.md"

@dataclass
class Repository:
    """A checked repository: its configs, tokenizer and weight files, nothing loaded yet."""

    folder: Path
    kind: str
    pipeline_config: PriorPipelineConfig | DecoderPipelineConfig
    scheduler: SchedulerConfig
    tokenizer: CLIPTokenizer
    configs: dict[str, Any]  # component -> model config
    files: dict[str, list[Path]]  # component -> weight files
    converted: bool  # wurst's layout (module names) rather than the hub's

    def load(self, component: str, *, dtype: torch.dtype | None, device: torch.device | str | None) -> nn.Module:
        return load_component(component, config=self.configs[component], files=self.files[component],
                              converted=self.converted, dtype=dtype, device=device)


def check_variant(variant: str | None) -> str | None:
    """A weight file variant as diffusers names them (`diffusion_pytorch_model.<variant>.safetensors`): letters,
    digits and underscores, so that it cannot reach outside a component's folder."""
    if variant is not None and not (isinstance(variant, str) and re.fullmatch(r"[A-Za-z0-9_]+", variant)):
        raise ArgumentError(f"variant must be a name such as 'fp16' or 'bf16' (letters, digits, _), got {variant!r}")
    return variant


def read_repository(ref: str | os.PathLike, kind: str, variant: str | None = None) -> Repository:
    """Find, check and read a prior or decoder repository (hub id or local directory, either layout). `variant`
    ("fp16", "bf16", ...) reads the hub layout's `<stem>.<variant>.safetensors` weight files."""
    check_variant(variant)
    components = KINDS[kind].components
    patterns = [CONVERTED_INDEX, MODEL_CARD, "model_index.json", "tokenizer/*", "scheduler/*",
                *(f"{COMPONENTS[c].folder}/*" for c in components)]
    folder = resolve(ref, allow_patterns=patterns)
    if (folder / CONVERTED_INDEX).is_file():
        if variant is not None:
            raise ArgumentError(f"{folder} is in wurst's converted layout, which has no variant files: load it "
                                f"without variant={variant!r}")
        return read_converted(folder, kind)
    return read_hub(folder, kind, variant)


def read_hub(folder: Path, kind: str, variant: str | None = None) -> Repository:
    spec = KINDS[kind]
    folders = [COMPONENTS[c].folder for c in spec.components]
    index = check_repo(folder, kind, [*folders, "tokenizer"])
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    configs = {c: hub_config(c, folder / COMPONENTS[c].folder) for c in spec.components}
    files = variant_files(folder, spec.components, variant)
    for c in spec.components:
        check_against_weights(c, config=configs[c], files=files[c],
                              config_source=str(folder / COMPONENTS[c].folder / "config.json"))
    tokenizer = read_tokenizer(folder / "tokenizer")
    check_tokenizer(tokenizer, configs["text_encoder"], str(folder / "text_encoder" / "config.json"))
    return Repository(
        folder=folder,
        kind=kind,
        pipeline_config=config_from_dict(spec.config_cls, index, str(folder / "model_index.json")),
        scheduler=read_config(SchedulerConfig, scheduler_path) if scheduler_path.exists() else SchedulerConfig(),
        tokenizer=tokenizer,
        configs=configs,
        files=files,
        converted=False,
    )


def read_converted(folder: Path, kind: str) -> Repository:
    """A folder written by tools/convert_weights.py."""
    index_path = folder / CONVERTED_INDEX
    index = read_index(folder)
    if index.get("kind") != kind:
        raise ModelNotFoundError(f"{folder} holds a converted {index.get('kind')}, not the {kind}")
    fields = ("pipeline", "scheduler", "models")
    lacking = [f for f in fields if not isinstance(index.get(f), dict)]
    if lacking:
        raise ConfigError(f"{index_path} lacks the field '{lacking[0]}'")
    configs, files = {}, {}
    for component in KINDS[kind].components:
        spec = COMPONENTS[component]
        if spec.converted_name not in index["models"]:
            raise ConfigError(f"{index_path} lacks the model '{spec.converted_name}' ({component})")
        source = f"{index_path} (models.{spec.converted_name})"
        configs[component] = config_from_dict(spec.config_cls, index["models"][spec.converted_name], source)
        files[component] = [folder / f"{spec.converted_name}.safetensors"]
        check_against_weights(component, config=configs[component], files=files[component], converted=True,
                              config_source=source)
    tokenizer = read_tokenizer(folder / "tokenizer")
    check_tokenizer(tokenizer, configs["text_encoder"], f"{index_path} (models.text_encoder)")
    return Repository(
        folder=folder,
        kind=kind,
        pipeline_config=config_from_dict(KINDS[kind].config_cls, index["pipeline"], f"{index_path} (pipeline)"),
        scheduler=config_from_dict(SchedulerConfig, index["scheduler"], f"{index_path} (scheduler)"),
        tokenizer=tokenizer,
        configs=configs,
        files=files,
        converted=True,
    )


def variant_files(folder: Path, components: tuple[str, ...], variant: str | None) -> dict[str, list[Path]]:
    """Each component's weight files: of `variant` where its folder has them, else the plain ones, which is how
    diffusers loads a variant (a mixture, as long as some component has the variant)."""
    def has_variant(component: str) -> bool:
        where, stem = folder / COMPONENTS[component].folder, COMPONENTS[component].file_stem
        return any(where.glob(f"{stem}.{variant}*.safetensors")) or (
            where / f"{stem}.safetensors.index.{variant}.json").is_file()

    chosen = {c: variant if variant is not None and has_variant(c) else None for c in components}
    if variant is not None and not any(chosen.values()):
        first = COMPONENTS[components[0]]
        raise ModelNotFoundError(f"{folder} has no weights of the variant {variant!r} (such as "
                                 f"{first.folder}/{first.file_stem}.{variant}.safetensors)")
    return {c: weight_files(folder / COMPONENTS[c].folder, COMPONENTS[c].file_stem, chosen[c]) for c in components}


def check_tokenizer(tokenizer: CLIPTokenizer, config, source: str) -> None:
    """The text encoder must have a row for every id the tokenizer gives and a position for every token."""
    ids = tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
    if ids > config.vocab_size:
        raise ConfigError(f"{source}: the field 'vocab_size' is {config.vocab_size}, but the tokenizer gives ids up to "
                          f"{ids - 1}")
    if tokenizer.max_length > config.max_position_embeddings:
        raise ConfigError(f"{source}: the field 'max_position_embeddings' is {config.max_position_embeddings}, but the "
                          f"tokenizer pads prompts to {tokenizer.max_length} tokens")


def check_repo(folder: Path, kind: str, folders: list[str]) -> dict:
    """Fail early, naming what is missing, when `folder` is not the hub repository it should be. Returns
    its model_index.json."""
    expected = KINDS[kind].pipeline_class
    index_path = folder / "model_index.json"
    if not index_path.exists():  # a pipe or a device there is refused by read_json, not taken for none
        raise ModelNotFoundError(f"{folder} is not a Würstchen {kind} repository in hub layout: no model_index.json")
    index = read_json(index_path)
    found = index.get("_class_name")
    if found is None:
        raise ModelNotFoundError(f"{index_path} lacks the field '_class_name' (expected {expected})")
    if found != expected:
        other = next((k for k, spec in KINDS.items() if spec.pipeline_class == found), None)
        hint = f" It is the {other} repository: pass it as the {other}." if other else ""
        raise ModelNotFoundError(f"{folder} holds a {found}, not the {kind} ({expected}).{hint}")
    for sub in folders:
        if not (folder / sub).is_dir():
            raise ModelNotFoundError(f"{folder} lacks the {sub}/ folder of a {kind} repository")
    return index
