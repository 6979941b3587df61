"""Time wurst against diffusers on the published-size random-weight checkpoints and print a table.

    .venv/bin/python tools/bench.py                  # the issue-6 run: 512x512, 3 Stage C steps (guidance 4),
                                                     # 3 Stage B steps, 3 processes per side, A B A B
    .venv/bin/python tools/bench.py --default-workload   # what users run: 1024x1024, the 29-step Stage C
                                                     # schedule (guidance 4), 12 Stage B steps, one run each of
                                                     # wurst and diffusers in float32 and in bfloat16
    .venv/bin/python tools/bench.py --size 1024 --prior-steps 1 --steps 1 --impls wurst,wurst-resident,diffusers
    make bench                                       # both: the first with wurst's two memory modes, then the second

"wurst" is wurst's default on the CPU (low-memory: each model loaded while it runs), "wurst-resident" keeps all
five models loaded (low_memory=False), "wurst-low-memory" asks for low-memory explicitly.

Each run is a fresh process that loads the pipeline and generates one image; runs alternate between the
implementations. Before every run the weight files it maps are read once, outside the timing, so every run
starts from the same warm page cache. Each process reports its load time, the time of each stage ("prior":
both text encodings' first half, Stage C; "decoder": Stage B and its text encoding; "stage_a": the VQGAN)
and its peak RSS (VmHWM). The table gives medians, the ratio of total times, and the achieved fraction of this
machine's matmul rate: the FLOPs the implementation does for the run (counted once per implementation with
torch.utils.flop_counter, from 1- and 2-step runs at the same size, extrapolated per step, since every step has
the same shapes), over the generation time, over the rate of a 2048x2048 matmul in the row's dtype (through
torch.mm or oneDNN's linear, whichever is faster, the best of ten products). A shared host's speed drifts by 5-10%
over minutes, so that rate is measured just before each run's process starts and just after it ends, and the
run's fraction is taken against the higher of the two; the table prints both. A second table gives that
fraction per stage (its FLOPs over its time), so that a regression shows where it happened. After all runs the rate
is measured once more, also kept up for 5 s, for reference. Same thread count for both sides.
For wurst in bfloat16 the cast copies of the float32 files ($WURST_CACHE/bfloat16) are made before the timed runs,
as a user's first run makes them once; the time that took is printed. diffusers and transformers come from the test
extras (`make install`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tools.hub_fixtures and tools.reference
PROMPT = "Anthropomorphic cat dressed as a fire fighter"
IMPLS = ("wurst", "wurst-resident", "wurst-low-memory", "diffusers")
STAGES = ("load", "prior", "decoder", "stage_a")


def peak_rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def repos() -> tuple[Path, Path]:
    from tools import hub_fixtures

    return hub_fixtures.ensure("published", "prior"), hub_fixtures.ensure("published", "decoder")


def weight_files(impl: str, dtype: str) -> list[Path]:
    """Every weight file a run maps: the checkpoints (diffusers, and wurst in float32), or wurst's cast copies."""
    import torch

    from wurst.weights.cast_copies import files_in_dtype

    files = [path for repo in repos() for path in sorted(repo.rglob("*.safetensors"))]
    return files if impl == "diffusers" or dtype == "float32" else files_in_dtype(files, getattr(torch, dtype))


def read_through(paths: Iterable[Path]) -> None:
    """Read each file once, so that it is in the page cache: the benchmarks' runs then map their weights without
    paying for the disk, and all start alike."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def warm_page_cache(impl: str, dtype: str) -> None:
    """Read every file the run maps once, just before it (reading the other runs' files too would leave this
    one's in competition with them for the page cache)."""
    read_through(weight_files(impl, dtype))


def worker(impl: str, size: int, steps: int, prior_steps: int | None, dtype_name: str = "float32",
           count_flops: bool = False) -> dict:
    """One text-to-image run; returns the stage times, the peak RSS and a checksum of the image. prior_steps None:
    the published 29-step Stage C schedule (DEFAULT_STAGE_C_TIMESTEPS) on both sides."""
    import torch

    from wurst import DEFAULT_STAGE_C_TIMESTEPS

    dtype = getattr(torch, dtype_name)
    prior_repo, decoder_repo = repos()
    schedule = dict(num_inference_steps=prior_steps) if prior_steps else dict(timesteps=DEFAULT_STAGE_C_TIMESTEPS)
    generator = torch.Generator().manual_seed(0)
    times: dict[str, float] = {}
    start = time.perf_counter()
    if impl.startswith("wurst"):
        import wurst

        low_memory = {"wurst": None, "wurst-resident": False, "wurst-low-memory": True}[impl]  # None: the default
        pipe = wurst.load_pipeline(prior=prior_repo, decoder=decoder_repo, device="cpu", dtype=dtype,
                                   low_memory=low_memory)
        pipe.set_progress_bar_config(disable=True)
        prior = lambda: pipe.prior_pipe(PROMPT, height=size, width=size, **schedule,  # noqa: E731
                                        guidance_scale=4.0, generator=generator).image_embeddings
        decoder = lambda emb: pipe.decoder_pipe(emb, PROMPT, num_inference_steps=steps, generator=generator,  # noqa: E731
                                                output_type="latent").images
        stage_a = pipe.decoder_pipe.decode
    else:
        from tests.support import reference

        pipe = reference.combined_pipeline(prior_repo, decoder_repo, dtype)
        prior = lambda: pipe.prior_pipe(PROMPT, height=size, width=size, **schedule,  # noqa: E731
                                        guidance_scale=4.0, generator=generator, output_type="pt").image_embeddings
        decoder = lambda emb: pipe.decoder_pipe(emb, PROMPT, num_inference_steps=steps, generator=generator,  # noqa: E731
                                                output_type="latent").images

        def stage_a(latents):
            return pipe.vqgan.decode(latents * pipe.vqgan.config.scale_factor).sample.clamp(0, 1)

    times["load"] = time.perf_counter() - start

    def timed(name, run, *args):
        start = time.perf_counter()
        with torch.no_grad():
            out = run(*args)
        times[name] = time.perf_counter() - start
        return out

    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        import wurst.models.blocks

        wurst.models.blocks._ONEDNN_DTYPES = frozenset()  # the counter knows aten's matmuls, not oneDNN's (same FLOPs)

        def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            *batch, queries, width = query_shape
            return 2 * math.prod(batch) * queries * key_shape[-2] * (width + value_shape[-1])

        # SDPA on the CPU (wurst's float32 attention, diffusers' in every dtype) runs as an operator the counter has
        # no formula for, so without this its two matmuls would not count (issue 27's first figures missed them).
        cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops}

        def counted(run, *args):
            with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
                out = run(*args)
            return out, counter.get_total_flops()

        flops = {}
        for n in (1, 2):  # each step has the same shapes: FLOPs(n steps) = fixed + n * per step
            schedule, steps = dict(num_inference_steps=n), n
            embeddings, flops[f"prior_{n}"] = counted(prior)
            latents, flops[f"decoder_{n}"] = counted(decoder, embeddings)
            _, flops[f"stage_a_{n}"] = counted(stage_a, latents)
        return flops
    images = timed("stage_a", stage_a, timed("decoder", decoder, timed("prior", prior)))
    return {**times, "peak_rss_gib": peak_rss_gib(), "checksum": float(images.double().sum())}


def matmul_gflops(threads: int, dtype_name: str = "float32", sustained: bool = False) -> float:
    """The best of several 2048x2048 matmuls in `dtype_name` on `threads` threads, in GFLOP/s, through torch.mm and
    through oneDNN's linear (which wurst's layers call), whichever is faster: on some CPUs the two differ by 2x in
    float32 (190 against 425 GFLOP/s on an AMD Zen 5), and a rate below what the run's own kernels reach would
    put the fraction over 100%. sustained: instead, the rate of the faster kernel repeated for 5 s (on a shared
    host it can be 10% below the best single product, and a run of minutes sees that rate, not the best)."""
    import torch

    from wurst.models.blocks import _ONEDNN_DTYPES  # where wurst's layers use oneDNN's linear (probed per dtype)

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a, b = (torch.randn(2048, 2048).to(dtype) for _ in range(2))
    kernels = [lambda: torch.mm(a, b)]
    if dtype in _ONEDNN_DTYPES:
        bias = torch.zeros(2048, dtype=dtype)
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], ""))
    best, fastest = float("inf"), kernels[0]
    for kernel in kernels:
        for _ in range(10):
            start = time.perf_counter()
            kernel()
            if (elapsed := time.perf_counter() - start) < best:
                best, fastest = elapsed, kernel
    if not sustained:
        return 2 * 2048**3 / best / 1e9
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 5:
        fastest()
        calls += 1
    return 2 * 2048**3 * calls / (time.perf_counter() - start) / 1e9


def run_worker(args: argparse.Namespace, impl: str, dtype: str = "float32", flops: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--size", str(args.size), "--steps", str(args.steps),
           "--prior-steps", str(args.prior_steps or 0), "--threads", str(args.threads), "--dtype", dtype]
    cmd += ["--flops"] if flops else []
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{impl} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image height and width (default 512)")
    parser.add_argument("--steps", type=int, default=3, help="Stage B steps (default 3)")
    parser.add_argument("--prior-steps", type=int, default=3,
                        help="Stage C steps, guidance 4 (default 3; 0: the published 29-step schedule)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per implementation (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--impls", default="wurst,wurst-resident,diffusers",
                        help=f"comma-separated, from {', '.join(IMPLS)}")
    parser.add_argument("--dtypes", default="float32", help="comma-separated, from float32, bfloat16 (default float32)")
    parser.add_argument("--default-workload", action="store_true",
                        help="1024x1024, the 29-step Stage C schedule, 12 Stage B steps, one run each of wurst and "
                             "diffusers in float32 and bfloat16")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting run")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.default_workload:
        args.size, args.prior_steps, args.steps, args.repeats = 1024, 0, 12, 1
        args.impls, args.dtypes = "wurst,diffusers", "float32,bfloat16"

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.size, args.steps, args.prior_steps or None, args.dtype, args.flops)))
        return

    impls, dtypes = args.impls.split(","), args.dtypes.split(",")
    if unknown := set(impls) - set(IMPLS):
        sys.exit(f"bench: unknown --impls {', '.join(sorted(unknown))}: choose from {', '.join(IMPLS)}")
    if unknown := set(dtypes) - {"float32", "bfloat16"}:
        sys.exit(f"bench: unknown --dtypes {', '.join(sorted(unknown))}: choose from float32, bfloat16")
    repos()  # build the checkpoints, if needed, outside the timing
    for dtype in dtypes:  # wurst's cast copies, made once as a user's first run makes them
        start = time.perf_counter()
        weight_files("wurst", dtype)
        print(f"{dtype} files ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    rows = [(impl, dtype) for dtype in dtypes for impl in impls]
    results: dict[tuple[str, str], list[dict]] = {row: [] for row in rows}
    for repeat in range(args.repeats):
        for impl, dtype in rows:
            warm_page_cache(impl, dtype)
            # The rate around the run, measured here rather than in the run's process, which then does only what a
            # user's run does.
            rate_before = matmul_gflops(args.threads, dtype)
            run = run_worker(args, impl, dtype)
            results[impl, dtype].append({**run, "rate_before": rate_before,
                                         "rate_after": matmul_gflops(args.threads, dtype)})
            print(f"run {repeat + 1} {impl} {dtype}: {results[impl, dtype][-1]}", file=sys.stderr)
    # Each implementation's own FLOPs: wurst computes some terms once per generation that diffusers computes at
    # every step (the text keys and values, Stage B's injected-embedding terms), so it does less work for the
    # same image. The wurst variants differ only in where the weights live, so they share one count.
    def family(impl: str) -> str:
        return "diffusers" if impl == "diffusers" else "wurst"

    stage_flops: dict[str, dict[str, float]] = {}
    if not args.no_flops:
        per_stage = {"prior": args.prior_steps or 29, "decoder": args.steps, "stage_a": 1}
        for counted_impl in sorted({family(impl) for impl in impls}):
            counts = run_worker(args, counted_impl, flops=True)
            stage_flops[counted_impl] = {
                stage: counts[f"{stage}_1"] + (n - 1) * (counts[f"{stage}_2"] - counts[f"{stage}_1"])
                for stage, n in per_stage.items()}
    flops = {name: sum(stages.values()) for name, stages in stage_flops.items()}
    rates = {dtype: matmul_gflops(args.threads, dtype) for dtype in dtypes}
    sustained = {dtype: matmul_gflops(args.threads, dtype, sustained=True) for dtype in dtypes}

    def share(run: dict, run_flops: float, seconds: float) -> float:
        """The fraction of the matmul rate of FLOPs done in `seconds` of one run: against the higher of the two
        rates measured around that run, so that a dip of the host's speed at either end does not raise it."""
        return run_flops / seconds / (max(run["rate_before"], run["rate_after"]) * 1e9)

    def generation(run: dict) -> float:
        return sum(run[stage] for stage in STAGES[1:])

    prior_steps = args.prior_steps or "29 (DEFAULT_STAGE_C_TIMESTEPS)"
    counted = "".join(f"{name} {total / 1e12:.1f} TFLOP per run; " for name, total in flops.items())
    print(f"\n{args.size}x{args.size}, {prior_steps} Stage C steps (guidance 4), {args.steps} Stage B steps, "
          f"{args.threads} threads, median of {args.repeats} processes each; {counted}2048² matmul after all runs: "
          + ", ".join(f"{rate:.0f} GFLOP/s in {dtype} (sustained for 5 s: {sustained[dtype]:.0f})"
                      for dtype, rate in rates.items()) + "\n")
    print("| | dtype | " + " | ".join(STAGES) + " | total | peak RSS | matmul rate before / after | of matmul rate |")
    print("|---" * (len(STAGES) + 6) + "|")
    totals, peaks = {}, {}
    for (impl, dtype), runs in results.items():
        medians = {k: statistics.median(r[k] for r in runs)
                   for k in (*STAGES, "peak_rss_gib", "rate_before", "rate_after")}
        totals[impl, dtype] = sum(medians[k] for k in STAGES)
        cells = [f"{medians[k]:.1f} s" for k in STAGES]
        peaks[impl, dtype] = medians["peak_rss_gib"]
        fraction = (f"{statistics.median(share(r, flops[family(impl)], generation(r)) for r in runs):.0%}"
                    if flops else "-")
        print(f"| {impl} | {dtype} | " + " | ".join(cells)
              + f" | {totals[impl, dtype]:.1f} s | {peaks[impl, dtype]:.2f} GiB"
              + f" | {medians['rate_before']:.0f} / {medians['rate_after']:.0f} GFLOP/s | {fraction} |")
    print()
    for impl, dtype in totals:
        for ref in [("diffusers", d) for d in dtypes if ("diffusers", d) in totals and impl != "diffusers"]:
            print(f"{impl} {dtype} / diffusers {ref[1]}: total time {totals[impl, dtype] / totals[ref]:.2f}, "
                  f"peak RSS {peaks[impl, dtype] / peaks[ref]:.2f}")
    if flops:  # where a regression happened: each stage's FLOPs over its own time
        generation_stages = STAGES[1:]
        print("\nshare of the matmul rate per stage (its FLOPs: " + "; ".join(
            f"{name} " + ", ".join(f"{stage} {stages[stage] / 1e12:.2f}" for stage in generation_stages)
            for name, stages in stage_flops.items()) + " TFLOP)\n")
        print("| | dtype | " + " | ".join(generation_stages) + " |")
        print("|---" * (len(generation_stages) + 2) + "|")
        for (impl, dtype), runs in results.items():
            cells = [f"{statistics.median(share(r, stage_flops[family(impl)][stage], r[stage]) for r in runs):.0%}"
                     for stage in generation_stages]
            print(f"| {impl} | {dtype} | " + " | ".join(cells) + " |")
        print()
    sums = {f"{impl} {dtype}": sorted({round(r["checksum"], 1) for r in runs})
            for (impl, dtype), runs in results.items()}
    print(f"image checksums: {sums}")


if __name__ == "__main__":
    main()
