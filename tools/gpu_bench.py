"""Speed, memory and parity on one CUDA device, in one script and one run.

    python tools/gpu_bench.py                       # 1024x1024, default steps (29 Stage C with guidance 4, 12 Stage B)
    python tools/gpu_bench.py --size 512 --no-diffusers --no-compile   # a quick smoke run

It needs the published-size random-weight checkpoints (`python -m tools.hub_fixtures --size published`, which needs
diffusers and transformers, i.e. `make install`) and, for the diffusers rows and the parity check, diffusers
0.42.1 and transformers 5.x importable. On a machine without them, build the checkpoints elsewhere, copy the cache
folder (`$WURST_FIXTURES`, default ~/.cache/wurst/fixtures), and `pip install` wheels of diffusers, transformers,
accelerate and their dependencies fetched with `pip download`.

What it prints:
- A timing table for bfloat16: wurst eager, wurst compiled (torch.compile(fullgraph=True) on both denoisers),
  diffusers eager, diffusers compiled (its prior and decoder models), all with the published 29-step Stage C
  schedule, each as the median of --repeats timed runs after one warm-up run (which pays the compile time,
  reported separately), with peak device memory.
- wurst's memory-saving modes in bfloat16, each with its time and peak device memory: low-memory (each model
  loaded from disk when its stage runs), enable_model_cpu_offload and enable_sequential_cpu_offload.
- Parity: wurst against diffusers at float32 (largest absolute pixel difference), and wurst bfloat16 and float16
  against wurst float32 (mean absolute pixel difference); float16 must end in a finite image or a NumericalError,
  never NaN pixels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPT = "Anthropomorphic cat dressed as a fire fighter"


def timed_runs(run, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(first run's seconds, median of the next `repeats`, last images), synchronising around each run."""
    times, images = [], None
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        images = run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:]), images


def wurst_pipeline(prior, decoder, dtype, compiled=False, low_memory=False, offload=None):
    """offload: None, "model" or "sequential" (enable_model_cpu_offload / enable_sequential_cpu_offload)."""
    import wurst

    pipe = wurst.load_pipeline(prior=prior, decoder=decoder, device="cpu" if offload else "cuda", dtype=dtype,
                               low_memory=low_memory)
    pipe.set_progress_bar_config(disable=True)
    if offload:
        getattr(pipe, f"enable_{offload}_cpu_offload")()
    if compiled:  # the documentation's way: the compiled modules replace the denoisers
        pipe.prior_prior = torch.compile(pipe.prior_prior, fullgraph=True)
        pipe.decoder = torch.compile(pipe.decoder, fullgraph=True)
    return pipe


def wurst_run(pipe, size: int):
    from wurst import DEFAULT_STAGE_C_TIMESTEPS

    return lambda: pipe(PROMPT, height=size, width=size, prior_timesteps=DEFAULT_STAGE_C_TIMESTEPS,
                        generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images


def diffusers_pipeline(prior, decoder, dtype, compiled=False):
    from tests.support import reference

    pipe = reference.combined_pipeline(prior, decoder, dtype).to("cuda")
    if compiled:
        pipe.prior_prior = torch.compile(pipe.prior_prior, fullgraph=True)
        pipe.decoder = torch.compile(pipe.decoder, fullgraph=True)
        pipe.prior_pipe.prior, pipe.decoder_pipe.decoder = pipe.prior_prior, pipe.decoder
    return pipe


def diffusers_run(pipe, size: int):
    from diffusers.pipelines.wuerstchen import DEFAULT_STAGE_C_TIMESTEPS

    return lambda: pipe(PROMPT, height=size, width=size, prior_timesteps=DEFAULT_STAGE_C_TIMESTEPS,
                        generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up run (default 3)")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers rows and parity")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device here; run this on a machine with one")
    from tools import hub_fixtures

    prior, decoder = hub_fixtures.ensure("published", "prior"), hub_fixtures.ensure("published", "decoder")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 parity means float32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.size}x{args.size}, default steps\n")

    rows, images = [], {}
    variants = [("wurst eager", lambda: wurst_pipeline(prior, decoder, torch.bfloat16), wurst_run)]
    if not args.no_compile:
        variants.append(("wurst compiled", lambda: wurst_pipeline(prior, decoder, torch.bfloat16, True), wurst_run))
    if not args.no_diffusers:
        variants.append(("diffusers eager", lambda: diffusers_pipeline(prior, decoder, torch.bfloat16),
                         diffusers_run))
        if not args.no_compile:
            variants.append(("diffusers compiled", lambda: diffusers_pipeline(prior, decoder, torch.bfloat16, True),
                             diffusers_run))
    for name, build, run in variants:
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        pipe = build()
        load = time.perf_counter() - start
        first, median, images[name] = timed_runs(run(pipe, args.size), args.repeats)
        rows.append((name, load, first, median, torch.cuda.max_memory_allocated() / 2**30))
        del pipe
        torch.cuda.empty_cache()

    memory_rows = []
    for name, options in (("wurst low-memory", dict(low_memory=True)), ("wurst model offload", dict(offload="model")),
                          ("wurst sequential offload", dict(offload="sequential"))):
        pipe = wurst_pipeline(prior, decoder, torch.bfloat16, **options)
        torch.cuda.reset_peak_memory_stats()
        _, median, _ = timed_runs(wurst_run(pipe, args.size), 1)
        memory_rows.append((name, median, torch.cuda.max_memory_allocated() / 2**30))
        del pipe
        torch.cuda.empty_cache()

    print("| bfloat16 | load | first run (compiles) | end to end, median | peak device memory |")
    print("|---|---|---|---|---|")
    for name, load, first, median, peak in rows:
        print(f"| {name} | {load:.1f} s | {first:.2f} s | {median:.3f} s | {peak:.2f} GiB |")
    for name, median, peak in memory_rows:
        print(f"| {name} | | | {median:.3f} s | {peak:.2f} GiB |")
    base = {name: median for name, _, _, median, _ in rows}
    if "diffusers eager" in base:
        print(f"\nwurst eager is {base['diffusers eager'] / base['wurst eager']:.2f}x diffusers eager")
    if "diffusers compiled" in base and "wurst compiled" in base:
        print(f"wurst compiled is {base['diffusers compiled'] / base['wurst compiled']:.2f}x diffusers compiled")

    # Parity and precision, on fresh eager pipelines.
    import wurst

    reference = wurst_run(wurst_pipeline(prior, decoder, torch.float32), args.size)()
    print(f"\nwurst bf16 vs wurst fp32: mean |diff| {(images['wurst eager'] - reference).abs().mean():.4f}")
    try:
        half = wurst_run(wurst_pipeline(prior, decoder, torch.float16), args.size)()
        print(f"wurst fp16 vs wurst fp32: mean |diff| {(half - reference).abs().mean():.4f}, "
              f"finite: {bool(torch.isfinite(half).all())}")
    except wurst.NumericalError as e:
        print(f"wurst fp16: stopped cleanly: {e}")
    if not args.no_diffusers:
        theirs = diffusers_run(diffusers_pipeline(prior, decoder, torch.float32), args.size)()
        print(f"wurst fp32 vs diffusers fp32: max |diff| {(reference - theirs).abs().max():.2e}")


if __name__ == "__main__":
    main()
