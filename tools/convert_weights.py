"""Convert Würstchen checkpoints into wurst's own compact layout: one folder per repository, holding wurst.json
(every config), one safetensors file per model under wurst's module names, and the tokenizer files.

    python tools/convert_weights.py --out converted       # from warp-ai/wuerstchen-prior and warp-ai/wuerstchen
    python tools/convert_weights.py --prior DIR --decoder DIR --out converted --dtype bfloat16
    python tools/convert_weights.py --out converted --stage-c model_v2_stage_c.pt --stage-b model_v2_stage_b.pt \\
        --stage-a vqgan_f4_v1_500k.pt                                      # the original dome272 release files
    python tools/convert_weights.py --out blend --interpolate base.pt aesthetic.pt --alpha 0.5

The text encoders and tokenizers always come from --prior and --decoder (hub ids or directories in hub or wurst
layout). --stage-c/-b/-a replace a stage's weights with those of an original-format .pt file or a hub component
folder (prior/, decoder/, vqgan/). --interpolate A B --alpha W makes Stage C (1 - W)·A + W·B (the published
prior is the 50% blend of v2-base and v2-aesthetic). The output loads with wurst.Pipeline.from_pretrained(
prior="OUT/prior", decoder="OUT/decoder"); the converter reloads it and checks every tensor before it finishes.
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
from tools import original_format  # noqa: E402
from wurst import pipeline as wp  # noqa: E402
from wurst import stage_a, stage_b, stage_c  # noqa: E402
from wurst.loader import ALIGNMENT, config_from_dict, load_module, read_weights, resolve, weight_files  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# kind -> (wurst model name, module file, hub component folder)
STAGES = {"prior": ("stage_c", stage_c, "prior"), "decoder": ("stage_b", stage_b, "decoder"),
          "vqgan": ("stage_a", stage_a, "vqgan")}  # fmt: skip
CONFIG_CLASSES = {"prior": stage_c.StageCConfig, "decoder": stage_b.StageBConfig, "vqgan": stage_a.StageAConfig}
MODEL_CLASSES = {"prior": stage_c.StageC, "decoder": stage_b.StageB, "vqgan": stage_a.StageA}


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
    _, module, _ = STAGES[kind]
    cfg = config_from_dict(CONFIG_CLASSES[kind], config, source)
    return load_module(lambda: MODEL_CLASSES[kind](cfg), state, module.CHECKPOINT_KEYS, source)


def interpolated_stage_c(a: str, b: str, alpha: float, replaced: torch.nn.Module) -> torch.nn.Module:
    base = dataclasses.asdict(replaced.config)
    (config_a, state_a), (config_b, state_b) = read_stage(a, "prior", base), read_stage(b, "prior", base)
    cfg_a = config_from_dict(stage_c.StageCConfig, config_a, a)
    cfg_b = config_from_dict(stage_c.StageCConfig, config_b, b)
    if cfg_a != cfg_b:
        raise wurst.ConfigError(f"cannot interpolate {a} and {b}: their Stage C configs differ")
    blended = original_format.interpolate(state_a, state_b, alpha)
    return load_module(lambda: stage_c.StageC(cfg_a), blended, stage_c.CHECKPOINT_KEYS, f"{a} + {b}")


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
                        "data_offsets": [offset, offset + t.nbytes]}  # fmt: skip
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def write_repo(out: Path, kind: str, models: dict[str, torch.nn.Module], pipeline_config: object,
               scheduler: wp.SchedulerConfig, tokenizer_dir: Path, dtype: torch.dtype | None) -> dict:  # fmt: skip
    """Write one converted folder through a temporary name, so a failure leaves no half-made folder."""
    target, partial = out / kind, out / f".{kind}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    written = {}
    for name, model in models.items():
        written[name] = cast_state(model, dtype)
        save_aligned(written[name], partial / f"{name}.safetensors")
    index = {
        "format": "wurst", "version": 1, "kind": kind,
        "pipeline": dataclasses.asdict(pipeline_config), "scheduler": dataclasses.asdict(scheduler),
        "models": {name: dataclasses.asdict(model.config) for name, model in models.items()},
    }  # fmt: skip
    (partial / wp.CONVERTED_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    shutil.copytree(tokenizer_dir, partial / "tokenizer")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return written


def verify(folder: Path, kind: str, written: dict[str, dict[str, torch.Tensor]]) -> None:
    loaded = (wurst.Prior if kind == "prior" else wurst.Decoder).from_pretrained(folder, device="cpu", dtype=None)
    if kind == "prior":
        models = {"stage_c": loaded.model, "text_encoder": loaded.text_encoder}
    else:
        models = {"stage_b": loaded.model, "stage_a": loaded.vqgan, "text_encoder": loaded.text_encoder}
    for name, state in written.items():
        reloaded = models[name].state_dict()
        for key, tensor in state.items():
            if not torch.equal(reloaded[key].to(tensor.dtype), tensor):
                raise wurst.CheckpointError(f"{folder}: {name}.safetensors tensor {key!r} did not survive reloading")


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
    prior = wurst.Prior.from_pretrained(args.prior, device="cpu", dtype=torch.float32)
    if args.stage_c:
        prior.model = load_stage(args.stage_c, "prior", prior.model)
    elif args.interpolate:
        prior.model = interpolated_stage_c(*args.interpolate, args.alpha, prior.model)
    decoder = wurst.Decoder.from_pretrained(args.decoder, device="cpu", dtype=torch.float32)
    if args.stage_b:
        decoder.model = load_stage(args.stage_b, "decoder", decoder.model)
    if args.stage_a:
        decoder.vqgan = load_stage(args.stage_a, "vqgan", decoder.vqgan)

    written = write_repo(out, "prior", {"stage_c": prior.model, "text_encoder": prior.text_encoder}, prior.config,
                         prior.scheduler, resolve(args.prior) / "tokenizer", dtype)  # fmt: skip
    verify(out / "prior", "prior", written)
    print(out / "prior")
    del prior, written

    models = {"stage_b": decoder.model, "stage_a": decoder.vqgan, "text_encoder": decoder.text_encoder}
    written = write_repo(out, "decoder", models, decoder.config, decoder.scheduler,
                         resolve(args.decoder) / "tokenizer", dtype)  # fmt: skip
    verify(out / "decoder", "decoder", written)
    print(out / "decoder")

if __name__ == "__main__":
    raise SystemExit(main())
