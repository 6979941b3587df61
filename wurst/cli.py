"""`python -m wurst PROMPT [options]`: generate images and write them as PNGs carrying their settings.

Everything that can be checked is checked before a model is loaded. Bad input ends in one line on stderr and a
non-zero exit, never a traceback; files are written atomically (a temporary name, then a rename).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from wurst.files import png_metadata, write_png_atomically

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
# The WEIGHT of --lora REF:WEIGHT (infinities and NaN too, so that they are refused rather than read as paths).
LORA_WEIGHT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see python -m wurst --help)")


def add_generation_options(
    p: argparse.ArgumentParser, seed_help: str = "torch.Generator('cpu').manual_seed(SEED); random if unset"
) -> None:
    """The options of one generation, shared with `python -m wurst.batch` (where they are the job's defaults)."""
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (guided stages only)")
    p.add_argument("--height", type=int, default=1024, help="image height, a multiple of 128 (default 1024)")
    p.add_argument("--width", type=int, default=1024, help="image width, a multiple of 128 (default 1024)")
    p.add_argument("--seed", type=int, default=None, help=seed_help)
    p.add_argument("--num-images", type=int, default=1, help="images for the prompt (default 1)")
    p.add_argument("--prior-steps", type=int, default=None,
                   help="Stage C steps (default: the 29-step DEFAULT_STAGE_C_TIMESTEPS schedule)")
    p.add_argument("--decoder-steps", type=int, default=12, help="Stage B steps (default 12)")
    p.add_argument("--prior-guidance", type=float, default=4.0, help="Stage C guidance scale (default 4)")
    p.add_argument("--decoder-guidance", type=float, default=0.0, help="Stage B guidance scale (default 0: off)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Which models, where and how: shared with `python -m wurst.batch`."""
    p.add_argument("--prior", default="warp-ai/wuerstchen-prior", help="prior: hub id, or a hub or converted folder")
    p.add_argument("--decoder", default="warp-ai/wuerstchen", help="decoder: hub id, or a hub or converted folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: bfloat16 on cuda and on cpus with native bfloat16 (avx512_bf16, amx), "
                        "else float32")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--low-memory", dest="low_memory", action="store_true",
                      help="load each model only while it runs (the default on cpu): about 5 GB at 1024x1024")
    mode.add_argument("--resident", dest="low_memory", action="store_false",
                      help="keep all five models loaded (the default on GPUs): about 13 GB in float32 at 512x512")
    p.set_defaults(low_memory=None)
    p.add_argument("--force", action="store_true",
                   help="run even when the memory estimate says the device has too little")
    p.add_argument("--lora", action="append", default=[], metavar="REF[:WEIGHT]",
                   help="a LoRA for the prior: a .safetensors file, a folder holding one, a hub id user/repo or "
                        "user/repo/FILE.safetensors; WEIGHT default 1 (repeat for several)")


def add_image_options(p: argparse.ArgumentParser) -> None:
    """Image to image (wurst/pipeline_img2img.py): --strength 0 gives variations of the image."""
    p.add_argument("--image", action="append", metavar="PATH",
                   help="start from this image (repeat for several); the prompt is then optional")
    p.add_argument("--strength", type=float, default=None,
                   help="with --image: how far Stage C re-noises it, 0 to 1 (default 0.8; 0: variations)")
    p.add_argument("--image-encoder", default=None, metavar="REF",
                   help="Stage C's image encoder: model_v2_stage_b.pt or a converted folder (default: the prior's, "
                        "else dome272/wuerstchen's, through the Hugging Face cache)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m wurst", description="Würstchen v2 text-to-image, in pure PyTorch.")
    p.add_argument("prompt", nargs="?", default=None, help="what to draw (optional with --image)")
    add_generation_options(p)
    add_model_options(p)
    add_image_options(p)
    p.add_argument("--output", default=None, help="PNG path (default: built from the prompt and seed, here)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files instead of refusing")
    return p


def check_generation_options(args: argparse.Namespace) -> None:
    """The cheap checks of add_generation_options' values (and of the prompt, where there is one), under the
    options' names."""
    from wurst.pipelines import checks

    checks.check_size("--height", args.height), checks.check_size("--width", args.width)
    checks.check_count("--num-images", args.num_images)
    if args.seed is not None:
        checks.check_seed("--seed", args.seed)
    for name, text in (("prompt", getattr(args, "prompt", None)), ("--negative-prompt", args.negative_prompt)):
        if text is not None:
            checks.as_prompt_list(text, name)
    checks.check_guidance("--prior-guidance", args.prior_guidance)
    checks.check_guidance("--decoder-guidance", args.decoder_guidance)
    for name, steps in (("--prior-steps", args.prior_steps), ("--decoder-steps", args.decoder_steps)):
        if steps is not None:
            checks.check_count(name, steps)


def lora_options(values: list[str]) -> list[tuple[str, float]]:
    """--lora REF[:WEIGHT] as (REF, WEIGHT): only a trailing ':<number>' is a weight, so REF may hold ':' itself
    (a REF that ends in ':<number>' is given as REF:1)."""
    pairs = []
    for value in values:
        reference, colon, tail = value.rpartition(":")
        pairs.append((reference, float(tail)) if colon and LORA_WEIGHT.fullmatch(tail) else (value, 1.0))
    return pairs


def device_and_dtype(args: argparse.Namespace):
    """The torch device and dtype that add_model_options' --device and --dtype ask for (or the defaults)."""
    import torch

    from wurst.runtime.devices import default_device, default_dtype, parse_device

    device = parse_device(args.device, "--device", allow_meta=False) if args.device else default_device()
    return device, getattr(torch, DTYPES[args.dtype]) if args.dtype else default_dtype(device)


def read_input_images(args: argparse.Namespace) -> list:
    """The --image files read (each (3, H, W) in [0, 1]), after the checks of the options that go with them."""
    if not args.image:
        if args.prompt is None:
            raise UsageError("the following arguments are required: prompt (see python -m wurst --help)")
        for option in ("strength", "image_encoder"):
            if getattr(args, option) is not None:
                raise UsageError(f"--{option.replace('_', '-')} needs --image")
        return []
    from wurst.pipelines.img2img import check_strength
    from wurst.pipelines.preprocess import to_tensor

    if args.strength is not None:
        check_strength(args.strength, "--strength")
    return [to_tensor(path, f"--image {path}") for path in args.image]


def check_memory(pipe, args: argparse.Namespace, *, height: int, width: int, num_images: int) -> None:
    """Refuse a generation whose estimated peak memory the device cannot give (unless --force), saying what
    would fit, under the options' names."""
    from wurst.runtime import memory

    if not args.force:
        memory.check_fits(pipe, height=height, width=width, images_per_prompt=num_images,
                          prior_guidance_scale=args.prior_guidance, decoder_guidance_scale=args.decoder_guidance,
                          names=memory.CLI_NAMES)


def slug(prompt: str, length: int = 60) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return words[:length].rstrip("-") or "image"


def output_paths(output: str | None, prompt: str, seed: int, count: int) -> list[Path]:
    """One path per image: numbered (-1, -2, ...) when there are several."""
    base = Path(output) if output else Path(f"{slug(prompt)}-{seed}.png")
    if base.suffix.lower() != ".png":
        raise UsageError(f"--output {base} must end in .png")
    if count == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i + 1}{base.suffix}") for i in range(count)]


def numbered_outputs_taken(base: Path, count: int) -> list[Path]:
    """Those of output_paths(..., count)'s numbered paths that exist, from one listing of the folder (so that a
    huge --num-images costs nothing before the memory check refuses it)."""
    pattern = re.compile(re.escape(base.stem) + r"-([1-9][0-9]*)" + re.escape(base.suffix) + "$")
    try:
        names = os.listdir(base.parent)
    except OSError:
        return []
    numbers = sorted(int(m.group(1)) for name in names if (m := pattern.match(name)))
    return [base.with_name(f"{base.stem}-{n}{base.suffix}") for n in numbers if n <= count]


def check_outputs(output: str | None, prompt: str, seed: int, count: int, overwrite: bool) -> None:
    """check_writable for the paths output_paths gives, without listing them (only those that exist matter)."""
    base = output_paths(output, prompt, seed, 1)[0]
    if count == 1:
        return check_writable([base], overwrite)
    first = base.with_name(f"{base.stem}-1{base.suffix}")
    check_writable([first, *numbered_outputs_taken(base, count)], overwrite)


def check_writable(paths: list[Path], overwrite: bool) -> None:
    """Fail before any model is loaded, so minutes of compute are not thrown away at the end."""
    for path in paths:
        if path.exists() and not overwrite:
            raise UsageError(f"{path} already exists: pass --overwrite to replace it, or choose another --output")
        if path.is_dir():
            raise UsageError(f"--output {path} is a directory")
    folder = paths[0].parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".wurst-probe-"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to {folder}: {e.strerror or e}") from e


def generation_settings(args: argparse.Namespace, *, prompt: str, negative_prompt: str | None, seed: int,
                        height: int, width: int, num_images: int, device, dtype, loras: Sequence = ()) -> dict:
    """What made an image, as recorded in its PNG (and in batch manifests); `loras` (ChosenLora) when there are
    any."""
    import wurst

    return {
        "prompt": prompt, "negative_prompt": negative_prompt or "", "seed": seed,
        "height": height, "width": width, "num_images": num_images,
        "prior_steps": args.prior_steps if args.prior_steps else "default", "decoder_steps": args.decoder_steps,
        "prior_guidance": args.prior_guidance, "decoder_guidance": args.decoder_guidance,
        "prior": str(args.prior), "decoder": str(args.decoder), "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "wurst_version": wurst.__version__,
        **({"loras": [lora.record() for lora in loras]} if loras else {}),
    }


def run(argv: list[str]) -> list[Path]:
    args = build_parser().parse_args(argv)
    import torch

    from wurst.api import load_pipeline, prior_schedule
    from wurst.pipelines import checks
    from wurst.weights.lora_refs import choose_loras

    # Cheap checks first: arguments, the input images, then the output location. A size warning waits for the
    # memory check, which may refuse the size outright.
    with warnings.catch_warnings(record=True) as size_warnings:
        warnings.simplefilter("always")
        check_generation_options(args)
    inputs = read_input_images(args)  # the --image files, read
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    count = args.num_images * max(1, len(inputs))
    name = args.prompt or Path(args.image[0]).stem
    check_outputs(args.output, name, seed, count, args.overwrite)
    loras = choose_loras(lora_options(args.lora), hashes=True, name="--lora")  # load_pipeline checks them
    device, dtype = device_and_dtype(args)
    load_options = dict(prior=args.prior, decoder=args.decoder, device=device, dtype=dtype,
                        low_memory=args.low_memory, force=args.force, loras=[lora.spec for lora in loras])

    # Loading reads the configs and maps the weights; nothing is computed before the memory check, which comes
    # before the numbered outputs are listed (an absurd --num-images is refused, not listed).
    if inputs:
        from wurst.api import load_img2img_pipeline

        pipe = load_img2img_pipeline(image_encoder=args.image_encoder, **load_options)
        image_options = {"image": inputs, "strength": 0.8 if args.strength is None else args.strength}
    else:
        pipe = load_pipeline(**load_options)
        image_options = {}
    check_memory(pipe, args, height=args.height, width=args.width, num_images=count)
    paths = output_paths(args.output, name, seed, count)
    for warning in size_warnings:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", checks.LargeSizeWarning)  # already said above, under the option's name
        images = pipe(
            args.prompt, height=args.height, width=args.width, negative_prompt=args.negative_prompt,
            num_images_per_prompt=args.num_images, prior_guidance_scale=args.prior_guidance,
            num_inference_steps=args.decoder_steps, decoder_guidance_scale=args.decoder_guidance,
            generator=torch.Generator("cpu").manual_seed(seed), **prior_schedule(args.prior_steps), **image_options,
        ).images

    settings = generation_settings(args, prompt=args.prompt or "", negative_prompt=args.negative_prompt, seed=seed,
                                   height=args.height, width=args.width, num_images=args.num_images,
                                   device=device, dtype=dtype, loras=loras)
    if inputs:
        settings.update(image=" ".join(args.image), strength=image_options["strength"],
                        image_encoder=args.image_encoder or "default")
    command = ["python", "-m", "wurst", *argv, *(["--seed", str(seed)] if args.seed is None else [])]
    for index, (image, path) in enumerate(zip(images, paths, strict=True)):
        write_png_atomically(image, path, png_metadata(settings, image_index=index, command=command))
        print(path)
    return paths


def run_command(prog: str, run: Callable[[list[str]], object], argv: list[str] | None, *, interrupted: str,
                said_once: tuple[type[BaseException], ...] = ()) -> int:
    """An app's `run(argv)` (argv: sys.argv[1:] by default) as a command: each refusal line as `PROG: error: ...`
    with exit code 2, an interrupt with 130, warnings as `PROG: warning: ...`. Under torchrun only rank 0 warns;
    usage errors, errors of the kinds in `said_once` (which every process reaches alike) and refusals rank 0 decided
    for all (ReportedByRankZero) are said by rank 0 alone, other errors by each process, naming its rank."""
    from wurst.errors import WurstError
    from wurst.runtime.distributed import ReportedByRankZero, rank_and_world

    argv = sys.argv[1:] if argv is None else argv
    rank, world = rank_and_world()
    who = f"{prog} (rank {rank})" if world > 1 else prog
    warnings.showwarning = lambda message, *rest: rank == 0 and print(f"{prog}: warning: {message}",
                                                                      file=sys.stderr)
    try:
        run(argv)
    except ReportedByRankZero:
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{who}: interrupted; {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, WurstError, OSError) as e:
        once = isinstance(e, (UsageError, *said_once))
        if once and rank != 0:
            return EXIT_ERROR
        if isinstance(e, OSError) and e.strerror:  # without the "[Errno N]" prefix
            e = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        for line in str(e).splitlines() or [""]:
            print(f"{prog if once else who}: error: {line}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("wurst", run, argv, interrupted="no image was written")
