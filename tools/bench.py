"""Time wurst against diffusers on the published-size random-weight checkpoints and print a table.

    .venv/bin/python tools/bench.py                  # the issue-6 run: 512x512, 3 Stage C steps (guidance 4),
                                                     # 3 Stage B steps, 3 processes per side, A B A B
    .venv/bin/python tools/bench.py --default-workload   # what users run: 1024x1024, the 29-step Stage C
                                                     # schedule (guidance 4), 12 Stage B steps, one run each
    .venv/bin/python tools/bench.py --size 1024 --prior-steps 1 --steps 1 --impls wurst,wurst-resident,diffusers
    make bench                                       # both: the first with wurst's two memory modes, then the second

"wurst" is wurst's default on the CPU (low-memory: each model loaded while it runs), "wurst-resident" keeps all
five models loaded (low_memory=False), "wurst-low-memory" asks for low-memory explicitly.

Each run is a fresh process that loads the pipeline and generates one image; runs alternate between the
implementations. Before every run the checkpoint files are read once, outside the timing, so every run
starts from the same warm page cache. Each process reports its load time, the time of each stage ("prior":
both text encodings' first half, Stage C; "decoder": Stage B and its text encoding; "stage_a": the VQGAN)
and its peak RSS (VmHWM). The table gives medians, the ratio of total times, and the achieved fraction of
this machine's fp32 matmul rate (FLOPs of the run, counted once with torch.utils.flop_counter, over the
generation time, over the rate of a 2048x2048 matmul measured here). Float32 on CPU, same thread count for
both sides. diffusers and transformers come from the test extras (`make install`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
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


def warm_page_cache() -> None:
    """Read every checkpoint file once, so that no run pays for the disk and all start alike."""
    for repo in repos():
        for path in sorted(repo.rglob("*.safetensors")):
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def worker(impl: str, size: int, steps: int, prior_steps: int | None, count_flops: bool = False) -> dict:
    """One text-to-image run; returns the stage times, the peak RSS and a checksum of the image. prior_steps None:
    the published 29-step Stage C schedule (DEFAULT_STAGE_C_TIMESTEPS) on both sides."""
    import torch

    from wurst import DEFAULT_STAGE_C_TIMESTEPS

    prior_repo, decoder_repo = repos()
    schedule = dict(num_inference_steps=prior_steps) if prior_steps else dict(timesteps=DEFAULT_STAGE_C_TIMESTEPS)
    generator = torch.Generator().manual_seed(0)
    times: dict[str, float] = {}
    start = time.perf_counter()
    if impl.startswith("wurst"):
        import wurst

        low_memory = {"wurst": None, "wurst-resident": False, "wurst-low-memory": True}[impl]  # None: the default
        pipe = wurst.load_pipeline(prior=prior_repo, decoder=decoder_repo, device="cpu", dtype=torch.float32,
                                   low_memory=low_memory)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        prior = lambda: pipe.prior_pipe(PROMPT, height=size, width=size, **schedule,  # noqa: E731
                                        guidance_scale=4.0, generator=generator).image_embeddings  # fmt: skip
        decoder = lambda emb: pipe.decoder_pipe(emb, PROMPT, num_inference_steps=steps, generator=generator,  # noqa: E731
                                                output_type="latent").images  # fmt: skip
        stage_a = pipe.decoder_pipe.decode
    else:
        from tools import reference

        pipe = reference.combined_pipeline(prior_repo, decoder_repo)
        prior = lambda: pipe.prior_pipe(PROMPT, height=size, width=size, **schedule,  # noqa: E731
                                        guidance_scale=4.0, generator=generator, output_type="pt").image_embeddings
        decoder = lambda emb: pipe.decoder_pipe(emb, PROMPT, num_inference_steps=steps, generator=generator,  # noqa: E731
                                                output_type="latent").images  # fmt: skip

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

        import wurst.blocks

        wurst.blocks._ONEDNN_LINEAR = False  # the counter knows aten's matmuls, not oneDNN's (same FLOPs)

        with FlopCounterMode(display=False) as counter:
            timed("stage_a", stage_a, timed("decoder", decoder, timed("prior", prior)))
        return {"flops": counter.get_total_flops()}
    images = timed("stage_a", stage_a, timed("decoder", decoder, timed("prior", prior)))
    return {**times, "peak_rss_gib": peak_rss_gib(), "checksum": float(images.double().sum())}


def matmul_gflops(threads: int) -> float:
    """The best of several 2048x2048 float32 matmuls on `threads` threads, in GFLOP/s."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def run_worker(args: argparse.Namespace, impl: str, flops: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--size", str(args.size), "--steps", str(args.steps),
           "--prior-steps", str(args.prior_steps or 0), "--threads", str(args.threads)]  # fmt: skip
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
                        help=f"comma-separated, from {', '.join(IMPLS)}")  # fmt: skip
    parser.add_argument("--default-workload", action="store_true",
                        help="1024x1024, the 29-step Stage C schedule, 12 Stage B steps, one run each of wurst and "
                             "diffusers, no FLOP count (another full run)")  # fmt: skip
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting run")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.default_workload:
        args.size, args.prior_steps, args.steps, args.repeats, args.no_flops = 1024, 0, 12, 1, True
        args.impls = "wurst,diffusers"

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.size, args.steps, args.prior_steps or None, args.flops)))
        return

    impls = args.impls.split(",")
    if unknown := set(impls) - set(IMPLS):
        sys.exit(f"bench: unknown --impls {', '.join(sorted(unknown))}: choose from {', '.join(IMPLS)}")
    repos()  # build the checkpoints, if needed, outside the timing
    results: dict[str, list[dict]] = {impl: [] for impl in impls}
    for repeat in range(args.repeats):
        for impl in impls:
            warm_page_cache()
            results[impl].append(run_worker(args, impl))
            print(f"run {repeat + 1} {impl}: {results[impl][-1]}", file=sys.stderr)
    flops = None if args.no_flops else run_worker(args, "wurst", flops=True)["flops"]
    rate = matmul_gflops(args.threads)

    prior_steps = args.prior_steps or "29 (DEFAULT_STAGE_C_TIMESTEPS)"
    counted = f"{flops / 1e12:.2f} TFLOP per run; " if flops else ""
    print(f"\n{args.size}x{args.size}, {prior_steps} Stage C steps (guidance 4), {args.steps} Stage B steps, "
          f"float32, {args.threads} threads, median of {args.repeats} processes each; "
          f"{counted}2048² matmul: {rate:.0f} GFLOP/s\n")  # fmt: skip
    print("| | " + " | ".join(STAGES) + " | total | peak RSS | of matmul rate |")
    print("|---" * (len(STAGES) + 4) + "|")
    totals, peaks = {}, {}
    for impl, runs in results.items():
        medians = {k: statistics.median(r[k] for r in runs) for k in (*STAGES, "peak_rss_gib")}
        totals[impl] = sum(medians[k] for k in STAGES)
        generation = totals[impl] - medians["load"]
        cells = [f"{medians[k]:.1f} s" for k in STAGES]
        peaks[impl] = medians["peak_rss_gib"]
        share = f"{flops / generation / (rate * 1e9):.0%}" if flops else "-"
        print(f"| {impl} | " + " | ".join(cells) + f" | {totals[impl]:.1f} s | {peaks[impl]:.2f} GiB | {share} |")
    if "diffusers" in totals:
        for impl in totals:
            if impl != "diffusers":
                print(f"\n{impl} / diffusers: total time {totals[impl] / totals['diffusers']:.2f}, peak RSS "
                      f"{peaks[impl] / peaks['diffusers']:.2f}")  # fmt: skip
    sums = {impl: {round(r["checksum"], 1) for r in runs} for impl, runs in results.items()}
    print(f"image checksums: {sums}")


if __name__ == "__main__":
    main()
