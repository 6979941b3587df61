"""The converter behind tools/convert_weights.py: two Würstchen repositories (hub ids or folders, either layout),
some stages optionally replaced by original-format .pt files, hub component folders or a Stage C blend, written in
wurst's converted layout (wurst.weights.converted) as OUT/prior and OUT/decoder, each reloaded and checked tensor by
tensor before it counts as done."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from wurst.errors import ArgumentError, CheckpointError, ConfigError
from wurst.weights import image_encoder as encoder_files
from wurst.weights import original as original_format
from wurst.weights.configs import config_from_dict, read_json
from wurst.weights.converted import replace_folder, save_weights, write_index
from wurst.weights.load import load_module
from wurst.weights.repository import KINDS, MODEL_CARD, Repository, read_repository
from wurst.weights.safetensors_io import read_weights, weight_files
from wurst.weights.spec import COMPONENTS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_stage(source: str, kind: str, base: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(hub config dict, state dict under hub names) from an original .pt file or a hub component folder. An
    original file's config is read from its tensor shapes, with `base` (the config of the model it replaces)
    supplying what the weights do not fix, such as head counts."""
    path = Path(source)
    if path.is_dir():
        return read_json(path / "config.json"), read_weights(weight_files(path, "diffusion_pytorch_model"))
    state = original_format.read_original(path, kind)
    return original_format.original_config(kind, state, base), state


def load_stage(source: str, kind: str, replaced: nn.Module) -> nn.Module:
    """The model of `kind` from `source` (see read_stage), in place of `replaced`."""
    config, state = read_stage(source, kind, dataclasses.asdict(replaced.config))
    spec = COMPONENTS[kind]
    cfg = config_from_dict(spec.config_cls, config, source)
    return load_module(lambda: spec.model_cls(cfg), state, spec.key_map, source)


def interpolated_stage_c(a: str, b: str, alpha: float, replaced: nn.Module) -> nn.Module:
    """Stage C with the weights (1 - alpha)·a + alpha·b, in place of `replaced`."""
    base = dataclasses.asdict(replaced.config)
    (config_a, state_a), (config_b, state_b) = read_stage(a, "prior", base), read_stage(b, "prior", base)
    spec = COMPONENTS["prior"]
    cfg_a, cfg_b = config_from_dict(spec.config_cls, config_a, a), config_from_dict(spec.config_cls, config_b, b)
    if cfg_a != cfg_b:
        raise ConfigError(f"cannot interpolate {a} and {b}: their Stage C configs differ")
    blended = original_format.interpolate(state_a, state_b, alpha)
    return load_module(lambda: spec.model_cls(cfg_a), blended, spec.key_map, f"{a} + {b}")


def read_image_encoder(image_encoder: str | None, stage_b: str | None, prior: Repository) -> nn.Module | None:
    """Stage C's image encoder: `image_encoder` (a .pt file or converted folder), else the one a Stage B release
    file or a converted prior holds, else None."""
    if image_encoder:
        return encoder_files.load_image_encoder(image_encoder, torch.float32, "cpu")
    if stage_b and Path(stage_b).is_file():
        try:
            return encoder_files.load_original(stage_b, torch.float32, "cpu")
        except CheckpointError:  # a Stage B file without the encoder: image to image needs it elsewhere
            pass
    if encoder_files.has_converted(prior.folder):
        return encoder_files.load_converted(prior.folder, torch.float32, "cpu")
    return None


def converted_models(models: Mapping[str, nn.Module], image_encoder: nn.Module | None) -> dict[str, nn.Module]:
    """The models of one output folder under their weight files' stems; Stage C's image encoder goes with the
    prior."""
    named = {COMPONENTS[name].converted_name: model for name, model in models.items()}
    if image_encoder is not None:
        named[encoder_files.CONVERTED_NAME] = image_encoder
    return named


def write_repository(out: Path, repo: Repository, models: Mapping[str, nn.Module], dtype: torch.dtype | None) -> Path:
    """OUT/<kind> in the converted layout, `models` under their stems (converted_models) with floating weights cast
    to `dtype` (when given). Written whole under a temporary name, verified, and swapped in only then, so that a
    failure leaves neither a half-made or wrong folder nor a lost old one."""
    with replace_folder(out / repo.kind) as partial:
        for stem, model in models.items():
            save_weights(partial / f"{stem}.safetensors", model.state_dict(), dtype)
        write_index(partial, kind=repo.kind, pipeline=repo.pipeline_config, scheduler=repo.scheduler,
                    models={stem: model.config for stem, model in models.items()})
        if repo.kind == "decoder":  # the model card that names the prior, as the hub's does (a path from here)
            (partial / MODEL_CARD).write_text("---\nprior:\n- ../prior\n---\n")
        shutil.copytree(repo.folder / "tokenizer", partial / "tokenizer")
        verify(partial, repo.kind, models, dtype, destination=out / repo.kind)
    return out / repo.kind


def verify(folder: Path, kind: str, models: Mapping[str, nn.Module], dtype: torch.dtype | None, *,
           destination: Path) -> None:
    """Reload `folder` as wurst loads it and check that every tensor of `models` (by stem, as written) survived,
    cast as it was written. One cast tensor at a time is in memory. `destination`, where the folder is going, is
    the one a failure names."""
    reread = read_repository(folder, kind)
    components = {COMPONENTS[name].converted_name: name for name in KINDS[kind].components}
    for stem, model in models.items():
        if stem == encoder_files.CONVERTED_NAME:
            reloaded = encoder_files.load_converted(folder).state_dict()
        else:
            reloaded = reread.load(components[stem], dtype=None, device="cpu").state_dict()
        for key, tensor in model.state_dict().items():
            expected = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            if key not in reloaded or not torch.equal(reloaded[key], expected):
                raise CheckpointError(f"{destination}: the {stem} tensor {key!r} did not survive writing and "
                                      f"reloading (nothing was replaced)")


def check_out(out: Path, inputs: list[tuple[str, str | Path | None]]) -> None:
    """--overwrite may replace an earlier output, never an input: the output folder must not be, contain or lie
    inside any of `inputs` ((option, file or folder), None where not given), symlinks resolved."""
    target = out.resolve()
    for option, source in inputs:
        where = Path(source).resolve() if source is not None else None
        if where is not None and (target.is_relative_to(where) or where.is_relative_to(target)):
            relation = "is" if target == where else "lies inside" if target.is_relative_to(where) else "contains"
            raise ArgumentError(f"--out {out} {relation} the input {option} {source}: choose another output folder")


def convert(out: str | Path, *, prior: str = KINDS["prior"].default, decoder: str = KINDS["decoder"].default,
            dtype: torch.dtype | None = None, stage_c: str | None = None, stage_b: str | None = None,
            stage_a: str | None = None, interpolate: tuple[str, str] | None = None, alpha: float = 0.5,
            image_encoder: str | None = None, overwrite: bool = False,
            on_written: Callable[[Path], None] = lambda folder: None) -> list[Path]:
    """Write OUT/prior and OUT/decoder (see tools/convert_weights.py for the options), calling `on_written` with
    each folder once it is written and verified. Returns both folders."""
    out = Path(out)
    for kind in ("prior", "decoder"):
        if (out / kind).exists() and not overwrite:
            raise ValueError(f"{out / kind} already exists: pass --overwrite to replace it")
    if interpolate and stage_c:
        raise ValueError("give --stage-c or --interpolate, not both")
    if not 0 <= alpha <= 1:
        raise ValueError(f"--alpha must lie within [0, 1], got {alpha}")

    # Read and check every input before writing anything, so that a bad file leaves no half conversion.
    # Weights stay memory-mapped until written, so holding both repositories costs little memory.
    repos = {"prior": read_repository(prior, "prior"), "decoder": read_repository(decoder, "decoder")}
    check_out(out, [("--prior", repos["prior"].folder), ("--decoder", repos["decoder"].folder),
                    ("--stage-c", stage_c), ("--stage-b", stage_b), ("--stage-a", stage_a),
                    ("--image-encoder", image_encoder), *(("--interpolate", source) for source in interpolate or ())])
    models = {kind: {name: repo.load(name, dtype=torch.float32, device="cpu") for name in KINDS[kind].components}
              for kind, repo in repos.items()}
    if stage_c:
        models["prior"]["prior"] = load_stage(stage_c, "prior", models["prior"]["prior"])
    elif interpolate:
        models["prior"]["prior"] = interpolated_stage_c(*interpolate, alpha, models["prior"]["prior"])
    if stage_b:
        models["decoder"]["decoder"] = load_stage(stage_b, "decoder", models["decoder"]["decoder"])
    if stage_a:
        models["decoder"]["vqgan"] = load_stage(stage_a, "vqgan", models["decoder"]["vqgan"])
    encoder = read_image_encoder(image_encoder, stage_b, repos["prior"])

    written = []
    for kind, repo in repos.items():
        named = converted_models(models.pop(kind), encoder if kind == "prior" else None)  # pop: freed once written
        written.append(write_repository(out, repo, named, dtype))
        on_written(written[-1])
        del named
    return written
