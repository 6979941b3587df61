"""Saving pipelines in diffusers' hub layout (their save_pretrained): per repository model_index.json, each model's
config.json and weights under the hub's checkpoint names (the key maps read backwards), tokenizer/ and
scheduler/scheduler_config.json, and a decoder's model card naming its prior. What the readers of the published
repositories read: wurst, diffusers' model loaders and transformers' CLIP classes.

A save fills a temporary folder beside its target, which replaces the target only when complete
(converted.replace_folder): a failure leaves the old folder as it was. Saving over an earlier save replaces what
this one writes (model_index.json, every config, the tokenizer and scheduler folders, the model card and the
weights of the variant written, stale shards of it included) and keeps the rest, other variants' weights among
them. A folder that holds files but no saved pipeline is refused, not replaced."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wurst.errors import ArgumentError, CheckpointError
from wurst.models.tokenizer import CLIPTokenizer
from wurst.weights.converted import CONVERTED_INDEX, replace_folder, save_weights
from wurst.weights.model_card import card_text
from wurst.weights.repository import (
    KINDS,
    MODEL_CARD,
    DecoderPipelineConfig,
    PriorPipelineConfig,
    SchedulerConfig,
    check_variant,
)
from wurst.weights.spec import COMPONENTS
from wurst.weights.tokenizer_files import write_tokenizer

PRIOR_FOLDER = "prior"  # where a combined pipeline's save puts the prior repository: inside the decoder's
DIFFUSERS_VERSION = "0.21.0.dev0"  # the published repositories' `_diffusers_version`, whose format this writes
VARIANT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # other variants: no cast

# model_index.json's entry for each component (library, class), as the published repositories name them.
MODEL_INDEX_ENTRIES = {
    "prior": ["wuerstchen", "WuerstchenPrior"], "decoder": ["wuerstchen", "WuerstchenDiffNeXt"],
    "vqgan": ["wuerstchen", "PaellaVQModel"], "text_encoder": ["transformers", "CLIPTextModel"],
    "scheduler": ["diffusers", "DDPMWuerstchenScheduler"], "tokenizer": ["transformers", "CLIPTokenizerFast"],
}
# The fields of each config.json that wurst's models do not use, at the published repositories' values.
UNUSED_FIELDS: dict[str, dict[str, Any]] = {
    "prior": {"dropout": 0.1},
    "decoder": {"dropout": 0.1},
    "vqgan": {},
    "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0,
                     "dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                     "initializer_factor": 1.0, "initializer_range": 0.02},
}

# A context that yields a model's config and state dict (module names) for the time its files are written.
ModelState = Callable[[], AbstractContextManager[tuple[Any, Mapping[str, torch.Tensor]]]]


@dataclass(frozen=True)
class RepositoryContents:
    """What one saved repository holds."""

    kind: str  # "prior" or "decoder"
    pipeline_config: PriorPipelineConfig | DecoderPipelineConfig
    scheduler: SchedulerConfig
    tokenizer: CLIPTokenizer
    models: Mapping[str, ModelState]  # one per component of the kind
    prior: str | None = None  # what a decoder's model card names as its prior; no card without one


def save_repositories(save_directory: str | os.PathLike, *, repositories: Mapping[str, RepositoryContents],
                      variant: str | None = None, safe_serialization: bool = True) -> Path:
    """Write each repository at its path inside `save_directory` ("." for the folder itself), all in one atomic
    replacement of the folder (see the module's docstring). `variant` names the weight files as diffusers does,
    `<stem>.<variant>.safetensors`; "fp16", "bf16" and "fp32" also cast the floating tensors as they are written.
    Returns the folder."""
    if safe_serialization is not True:
        raise ArgumentError("safe_serialization=False would write pickled .bin weights, and wurst writes only "
                            "safetensors: leave it True")
    check_variant(variant)
    for contents in repositories.values():
        check_contents(contents)
    target = checked_target(save_directory)
    try:
        cards = {where: card_text(target / where / MODEL_CARD, contents.prior)
                 for where, contents in repositories.items() if contents.prior is not None}
        keep = functools.partial(kept, repositories=repositories, variant=variant)
        with replace_folder(target, keep=keep) as partial:
            for where, contents in repositories.items():
                write_repository(partial / where, contents, variant=variant, card=cards.get(where))
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise OSError(e.errno, f"cannot save to {target}: {reason}") from e
    return target


def check_contents(contents: RepositoryContents) -> None:
    if not isinstance(contents.tokenizer, CLIPTokenizer):
        raise ArgumentError(f"cannot save the tokenizer: it is a {type(contents.tokenizer).__name__}, not wurst's "
                            "CLIPTokenizer")
    if not isinstance(contents.scheduler, SchedulerConfig):
        raise ArgumentError(f"cannot save the scheduler: it is a {type(contents.scheduler).__name__}, not wurst's "
                            "SchedulerConfig")


def checked_target(save_directory: str | os.PathLike) -> Path:
    """The folder to save to, as an absolute path: new, empty, or one that holds a saved pipeline."""
    if not isinstance(save_directory, (str, os.PathLike)) or not os.fspath(save_directory):
        raise ArgumentError(f"save_directory must be a folder path, got {save_directory!r}")
    target = Path(os.path.abspath(save_directory))
    if target.exists() and not target.is_dir():
        raise ArgumentError(f"save_directory {target} is a file, not a folder")
    saved = any((target / name).is_file() for name in ("model_index.json", CONVERTED_INDEX))
    if target.is_dir() and not saved and any(target.iterdir()):
        raise ArgumentError(f"save_directory {target} holds files but no saved pipeline (no model_index.json): "
                            "saving replaces the folder, so give a new or empty one, or an earlier save")
    return target


def kept(relative: Path, *, repositories: Mapping[str, RepositoryContents], variant: str | None) -> bool:
    """Whether a file at `relative` in the folder saved over survives the save (replace_folder's `keep`). What the
    save writes replaces its old copy in any case; besides, the tokenizer and scheduler folders go whole, and so do
    the written variant's weight files (an earlier save's shards of it) and a converted layout's index."""
    for where, contents in sorted(repositories.items(), key=lambda item: -len(Path(item[0]).parts)):
        root = Path(where).parts
        if relative.parts[:len(root)] != root:
            continue
        inside = relative.parts[len(root):]
        if not inside:
            return True
        if inside == (CONVERTED_INDEX,) or inside[0] in ("tokenizer", "scheduler"):
            return False
        if len(inside) == 2 and inside[0] in contents.models:
            return not is_weight_file(inside[1], stem=COMPONENTS[inside[0]].file_stem, variant=variant)
        return True
    return True


def is_weight_file(name: str, *, stem: str, variant: str | None) -> bool:
    """Whether `name` is a weight file of `variant` (None: the plain one): single, shard or index, safetensors or
    pickle, as diffusers and transformers name them (`<stem>.fp16-00001-of-00002.safetensors`,
    `<stem>.safetensors.index.fp16.json`)."""
    match = re.fullmatch(rf"{re.escape(stem)}(?:\.(\w+))?(?:-\d+-of-\d+)?\.(?:safetensors|bin)"
                         r"(?:\.index(?:\.(\w+))?\.json)?", name)
    return match is not None and (match[1] or match[2]) == variant


def write_repository(folder: Path, contents: RepositoryContents, *, variant: str | None, card: str | None) -> None:
    kind = KINDS[contents.kind]
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": kind.pipeline_class, "_diffusers_version": DIFFUSERS_VERSION,
             **dataclasses.asdict(contents.pipeline_config)}
    index.update({name: MODEL_INDEX_ENTRIES[name] for name in (*kind.components, "scheduler", "tokenizer")})
    write_json(folder / "model_index.json", index)
    (folder / "scheduler").mkdir()
    write_json(folder / "scheduler" / "scheduler_config.json",
               {"_class_name": MODEL_INDEX_ENTRIES["scheduler"][1], "_diffusers_version": DIFFUSERS_VERSION,
                **dataclasses.asdict(contents.scheduler)})
    write_tokenizer(folder / "tokenizer", contents.tokenizer)
    for name in kind.components:
        with contents.models[name]() as (config, state):
            write_model(folder / COMPONENTS[name].folder, name, config=config, state=state, variant=variant)
    if card is not None:
        (folder / MODEL_CARD).write_text(card, encoding="utf-8")


def write_model(folder: Path, component: str, *, config: Any, state: Mapping[str, torch.Tensor],
                variant: str | None) -> None:
    """One component folder: config.json and the weights, cast to the variant's dtype where it has one."""
    tensors = checkpoint_tensors(component, state)
    cast = VARIANT_DTYPES.get(variant or "")
    dtype = cast or next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", hub_model_config(component, config, dtype=dtype))
    stem = COMPONENTS[component].file_stem + (f".{variant}" if variant else "")
    save_weights(folder / f"{stem}.safetensors", tensors, dtype=cast)


def checkpoint_tensors(component: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (module names) under the hub checkpoint's names: the component's key map read backwards, each name
    checked to read forwards again."""
    key_map = COMPONENTS[component].key_map
    named = {}
    for name, tensor in state.items():
        hub_name = key_map.to_checkpoint(name)
        if key_map.to_module(hub_name) != name:
            raise CheckpointError(f"cannot save the {component}: its tensor {name!r} has no name in the hub "
                                  "checkpoint")
        named[hub_name] = tensor
    return named


def hub_model_config(component: str, config: Any, *, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json of a component: wurst's config fields, the unused ones at the published values, and the
    class (diffusers) or model type and dtype (transformers) that its loader reads."""
    fields = {name: list(value) if isinstance(value, tuple) else value
              for name, value in {**dataclasses.asdict(config), **UNUSED_FIELDS[component]}.items()}
    library, class_name = MODEL_INDEX_ENTRIES[component]
    if library == "transformers":
        # projection_dim sizes the projection of CLIPTextModelWithProjection, which these encoders lack (the
        # published prior's says 512; here it is the width).
        return {**fields, "projection_dim": config.hidden_size, "torch_dtype": str(dtype).removeprefix("torch.")}
    return {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **fields}


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
