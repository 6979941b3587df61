"""Convert Würstchen checkpoints into wurst's own compact layout: one folder per repository, holding wurst.json
(every config), one safetensors file per model under wurst's module names, and the tokenizer files.

    python tools/convert_weights.py --out converted       # from warp-ai/wuerstchen-prior and warp-ai/wuerstchen
    python tools/convert_weights.py --prior DIR --decoder DIR --out converted --dtype bfloat16
    python tools/convert_weights.py --out converted --stage-c model_v2_stage_c.pt --stage-b model_v2_stage_b.pt \\
        --stage-a vqgan_f4_v1_500k.pt                                      # the original dome272 release files
    python tools/convert_weights.py --out blend --interpolate base.pt aesthetic.pt --alpha 0.5
    python tools/convert_weights.py --out converted --image-encoder model_v2_stage_b.pt   # for image to image

The text encoders and tokenizers always come from --prior and --decoder (hub ids or directories in hub or wurst
layout). --stage-c/-b/-a replace a stage's weights with those of an original-format .pt file or a hub component
folder (prior/, decoder/, vqgan/). --interpolate A B --alpha W makes Stage C (1 - W)·A + W·B (the published
prior is the 50% blend of v2-base and v2-aesthetic). The output loads with wurst.Pipeline.from_pretrained(
prior="OUT/prior", decoder="OUT/decoder"); the converter reloads it and checks every tensor before it finishes.

Stage C's image encoder (image to image) is written into OUT/prior as stage_c_encoder.safetensors: from
--image-encoder (an original .pt holding effnet_state_dict, or a converted folder), else from a --stage-b release
file that holds one, else carried over from a converted --prior that has one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import struct
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import wurst  # noqa: E402
from wurst.weights import image_encoder as encoder_files  # noqa: E402
from wurst.weights import original as original_format  # noqa: E402
from wurst.weights.configs import config_from_dict
from wurst.weights.load import load_module
from wurst.weights.repository import CONVERTED_INDEX, KINDS, MODEL_CARD, Repository, read_repository  # noqa: E402
from wurst.weights.safetensors_io import ALIGNMENT, read_weights, weight_files  # noqa: E402
from wurst.weights.spec import COMPONENTS  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_stage(source: str, kind: str, base: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(hub config dict, state dict under hub names) from an original .pt file or a hub component folder. An
    original file's config is read from its tensor shapes, with `base` (the config of the model it replaces)
    supplying what the weights do not fix, such as head counts."""
    path = Path(source)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        return config, read_weights(weight_files(path, "diffusion_pytorch_model"))
    state = original_format.read_original(path, kind)
    return original_format.original_config(kind, state, base), state


def load_stage(source: str, kind: str, replaced: torch.nn.Module) -> torch.nn.Module:
    config, state = read_stage(source, kind, dataclasses.asdict(replaced.config))
    spec = COMPONENTS[kind]
    cfg = config_from_dict(spec.config_cls, config, source)
    return load_module(lambda: spec.model_cls(cfg), state, spec.key_map, source)


def interpolated_stage_c(a: str, b: str, alpha: float, replaced: torch.nn.Module) -> torch.nn.Module:
    base = dataclasses.asdict(replaced.config)
    (config_a, state_a), (config_b, state_b) = read_stage(a, "prior", base), read_stage(b, "prior", base)
    spec = COMPONENTS["prior"]
    cfg_a, cfg_b = config_from_dict(spec.config_cls, config_a, a), config_from_dict(spec.config_cls, config_b, b)
    if cfg_a != cfg_b:
        raise wurst.ConfigError(f"cannot interpolate {a} and {b}: their Stage C configs differ")
    blended = original_format.interpolate(state_a, state_b, alpha)
    return load_module(lambda: spec.model_cls(cfg_a), blended, spec.key_map, f"{a} + {b}")


def read_image_encoder(args: argparse.Namespace, prior: Repository) -> torch.nn.Module | None:
    """Stage C's image encoder: --image-encoder, else the one a --stage-b release file or converted prior holds."""
    if args.image_encoder:
        return encoder_files.load_image_encoder(args.image_encoder, torch.float32, "cpu")
    if args.stage_b and Path(args.stage_b).is_file():
        try:
            return encoder_files.load_original(args.stage_b, torch.float32, "cpu")
        except wurst.CheckpointError:  # a Stage B file without the encoder: image to image needs it elsewhere
            pass
    if encoder_files.has_converted(prior.folder):
        return encoder_files.load_converted(prior.folder, torch.float32, "cpu")
    return None


def cast_state(module: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in module.state_dict().items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    return state


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def save_aligned(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a standard .safetensors file whose tensors start on 64-byte boundaries wherever their sizes
    allow (see loader.ALIGNMENT), so vector loads of the weights never straddle a cache line.

    safetensors forbids gaps between tensors, so the header is padded with spaces (which the format allows)
    and the tensors whose byte size is a multiple of 64 go first; the few odd-sized ones follow."""
    order = sorted(tensors, key=lambda name: tensors[name].nbytes % ALIGNMENT != 0)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def write_repo(out: Path, repo: Repository, models: dict[str, torch.nn.Module], dtype: torch.dtype | None,
               image_encoder: torch.nn.Module | None = None) -> dict:
    """Write one converted folder under a temporary name and swap it in only when complete, so a failure
    leaves neither a half-made folder nor a lost old one. `image_encoder` (Stage C's) goes with the prior."""
    target, partial, old = out / repo.kind, out / f".{repo.kind}.partial", out / f".{repo.kind}.old"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    written = {}
    for name, model in models.items():
        written[name] = cast_state(model, dtype)
        save_aligned(written[name], partial / f"{COMPONENTS[name].converted_name}.safetensors")
    index = {
        "format": "wurst", "version": 1, "kind": repo.kind,
        "pipeline": dataclasses.asdict(repo.pipeline_config), "scheduler": dataclasses.asdict(repo.scheduler),
        "models": {COMPONENTS[name].converted_name: dataclasses.asdict(model.config) for name, model in models.items()},
    }
    if image_encoder is not None:
        written[encoder_files.CONVERTED_NAME] = cast_state(image_encoder, dtype)
        save_aligned(written[encoder_files.CONVERTED_NAME], partial / f"{encoder_files.CONVERTED_NAME}.safetensors")
        index["models"][encoder_files.CONVERTED_NAME] = dataclasses.asdict(image_encoder.config)
    (partial / CONVERTED_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if repo.kind == "decoder":  # the model card that names the prior, as the hub's does (a path from here)
        (partial / MODEL_CARD).write_text("---\nprior:\n- ../prior\n---\n")
    shutil.copytree(repo.folder / "tokenizer", partial / "tokenizer")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    try:
        partial.rename(target)
    except OSError:
        if old.exists():  # put the previous output back
            old.rename(target)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return written


def verify(folder: Path, kind: str, written: dict[str, dict[str, torch.Tensor]]) -> None:
    reread = read_repository(folder, kind)
    for name, state in written.items():
        if name == encoder_files.CONVERTED_NAME:
            reloaded = encoder_files.load_converted(folder).state_dict()
        else:
            reloaded = reread.load(name, dtype=None, device="cpu").state_dict()
        for key, tensor in state.items():
            if not torch.equal(reloaded[key].to(tensor.dtype), tensor):
                raise wurst.CheckpointError(f"{folder}: {name} tensor {key!r} did not survive reloading")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", default="warp-ai/wuerstchen-prior", help="prior repository (hub id or directory)")
    parser.add_argument("--decoder", default="warp-ai/wuerstchen", help="decoder repository (hub id or directory)")
    parser.add_argument("--out", required=True, help="output folder; gets prior/ and decoder/")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep)")
    parser.add_argument("--stage-c", help="Stage C weights: original .pt file or hub prior/ folder")
    parser.add_argument("--stage-b", help="Stage B weights: original .pt file or hub decoder/ folder")
    parser.add_argument("--stage-a", help="Stage A weights: original .pt file or hub vqgan/ folder")
    parser.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="Stage C = (1 - alpha) A + alpha B")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of B in --interpolate (default 0.5)")
    parser.add_argument("--image-encoder", help="Stage C's image encoder for image to image: an original .pt "
                        "holding effnet_state_dict (model_v2_stage_b.pt) or a converted folder (default: from "
                        "--stage-b or a converted --prior, when they hold one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        convert(args)
    except (wurst.WurstError, ValueError, OSError) as e:
        print(f"convert_weights: error: {e}", file=sys.stderr)
        return 2
    return 0


def convert(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for kind in ("prior", "decoder"):
        if (out / kind).exists() and not args.overwrite:
            raise ValueError(f"{out / kind} already exists: pass --overwrite to replace it")
    if args.interpolate and args.stage_c:
        raise ValueError("give --stage-c or --interpolate, not both")
    if not 0 <= args.alpha <= 1:
        raise ValueError(f"--alpha must lie within [0, 1], got {args.alpha}")
    dtype = DTYPES[args.dtype] if args.dtype else None

    # Read and check every input before writing anything, so that a bad file leaves no half conversion.
    # Weights stay memory-mapped until written, so holding both repositories costs little memory.
    repos = {"prior": read_repository(args.prior, "prior"), "decoder": read_repository(args.decoder, "decoder")}
    models = {kind: {name: repo.load(name, dtype=torch.float32, device="cpu") for name in KINDS[kind].components}
              for kind, repo in repos.items()}
    if args.stage_c:
        models["prior"]["prior"] = load_stage(args.stage_c, "prior", models["prior"]["prior"])
    elif args.interpolate:
        models["prior"]["prior"] = interpolated_stage_c(*args.interpolate, args.alpha, models["prior"]["prior"])
    if args.stage_b:
        models["decoder"]["decoder"] = load_stage(args.stage_b, "decoder", models["decoder"]["decoder"])
    if args.stage_a:
        models["decoder"]["vqgan"] = load_stage(args.stage_a, "vqgan", models["decoder"]["vqgan"])

    image_encoder = read_image_encoder(args, repos["prior"])

    for kind, repo in repos.items():
        written = write_repo(out, repo, models.pop(kind), dtype, image_encoder if kind == "prior" else None)
        verify(out / kind, kind, written)
        print(out / kind)
        del written


if __name__ == "__main__":
    raise SystemExit(main())
