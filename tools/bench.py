"""Time wurst against diffusers on the published-size random-weight checkpoints, each run in a fresh process,
interleaved (wurst, diffusers, wurst, diffusers, ...), and print a table of medians.

    .venv/bin/python tools/bench.py decoder            # Stages B + A at 512x512, 12 steps, no guidance
    .venv/bin/python tools/bench.py decoder --repeats 3 --steps 12 --size 512

Each process reports its load time, the time of each stage, and its peak RSS (VmHWM). Both sides run on the
same threads (default: all cores), on CPU, in float32. diffusers and transformers come from the test extras.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.hub_fixtures and tests.reference
PROMPT = "Anthropomorphic cat dressed as a fire fighter"


def peak_rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def decoder_worker(impl: str, size: int, steps: int, prior_steps: int) -> dict:
    """One Stages B + A run: text encoding and the Stage B chain ("stage_b"), then the VQGAN ("stage_a")."""
    import torch

    from tests import hub_fixtures

    repo = hub_fixtures.ensure("published", "decoder")
    side = math.ceil(size / 42.67)  # the Stage C embedding size for this image size
    embeddings = 3 * torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(5))
    times = {}
    start = time.perf_counter()
    if impl == "wurst":
        import wurst

        decoder = wurst.Decoder.from_pretrained(repo, device="cpu", dtype=torch.float32)
        times["load"] = time.perf_counter() - start

        def stage_b():
            return decoder(embeddings, PROMPT, num_inference_steps=steps, output_type="latent",
                           generator=torch.Generator().manual_seed(7))  # fmt: skip

        def stage_a(latents):
            return decoder.decode(latents)
    else:
        from tests import reference

        pipe = reference.decoder_pipeline(repo)
        times["load"] = time.perf_counter() - start

        def stage_b():
            return pipe(embeddings, PROMPT, num_inference_steps=steps, output_type="latent",
                        generator=torch.Generator().manual_seed(7)).images  # fmt: skip

        def stage_a(latents):
            with torch.no_grad():
                return pipe.vqgan.decode(latents * pipe.vqgan.config.scale_factor).sample.clamp(0, 1)

    start = time.perf_counter()
    latents = stage_b()
    times["stage_b"] = time.perf_counter() - start
    start = time.perf_counter()
    images = stage_a(latents)
    times["stage_a"] = time.perf_counter() - start
    return {**times, "peak_rss_gib": peak_rss_gib(), "shape": list(images.shape)}


def pipeline_worker(impl: str, size: int, steps: int, prior_steps: int = 3) -> dict:
    """The whole text-to-image run of issue 6: Stage C with guidance 4 ("prior", text encoding included), Stage B
    without guidance ("decoder", its text encoding included) and the VQGAN ("stage_a")."""
    import torch

    from tests import hub_fixtures

    prior_repo, decoder_repo = hub_fixtures.ensure("published", "prior"), hub_fixtures.ensure("published", "decoder")
    generator = torch.Generator().manual_seed(0)
    times = {}
    start = time.perf_counter()
    if impl == "wurst":
        import wurst

        pipe = wurst.Pipeline.from_pretrained(prior_repo, decoder_repo, device="cpu", dtype=torch.float32)
        prior = lambda: pipe.prior(PROMPT, size, size, num_inference_steps=prior_steps, guidance_scale=4.0,  # noqa: E731
                                   generator=generator)  # fmt: skip
        decoder = lambda emb: pipe.decoder(emb, PROMPT, num_inference_steps=steps, generator=generator,  # noqa: E731
                                           output_type="latent")  # fmt: skip
        stage_a = pipe.decoder.decode
    else:
        from tests import reference

        pipe = reference.combined_pipeline(prior_repo, decoder_repo)
        prior = lambda: pipe.prior_pipe(PROMPT, height=size, width=size, num_inference_steps=prior_steps,  # noqa: E731
                                        guidance_scale=4.0, generator=generator, output_type="pt").image_embeddings
        decoder = lambda emb: pipe.decoder_pipe(emb, PROMPT, num_inference_steps=steps, generator=generator,  # noqa: E731
                                                output_type="latent").images  # fmt: skip

        def stage_a(latents):
            with torch.no_grad():
                return pipe.vqgan.decode(latents * pipe.vqgan.config.scale_factor).sample.clamp(0, 1)

    times["load"] = time.perf_counter() - start

    def timed(name, run, *args):
        start = time.perf_counter()
        with torch.no_grad():
            out = run(*args)
        times[name] = time.perf_counter() - start
        return out

    images = timed("stage_a", stage_a, timed("decoder", decoder, timed("prior", prior)))
    return {**times, "peak_rss_gib": peak_rss_gib(), "shape": list(images.shape),
            "checksum": float(images.double().sum())}  # fmt: skip


WORKERS = {"decoder": decoder_worker, "pipeline": pipeline_worker}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", choices=sorted(WORKERS))
    parser.add_argument("--size", type=int, default=512, help="image height and width (default 512)")
    parser.add_argument("--steps", type=int, default=3, help="Stage B steps (default 3)")
    parser.add_argument("--prior-steps", type=int, default=3, help="Stage C steps, pipeline run (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per implementation (default 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", choices=("wurst", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(WORKERS[args.run](args.worker, args.size, args.steps, args.prior_steps)))
        return

    from tests import hub_fixtures

    hub_fixtures.ensure("published", "prior"), hub_fixtures.ensure("published", "decoder")  # outside the timing
    results: dict[str, list[dict]] = {"wurst": [], "diffusers": []}
    for repeat in range(args.repeats):
        for impl in results:
            cmd = [sys.executable, __file__, args.run, "--worker", impl, "--size", str(args.size),
                   "--steps", str(args.steps), "--prior-steps", str(args.prior_steps),
                   "--threads", str(args.threads)]  # fmt: skip
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{impl} worker failed:\n{out.stderr[-3000:]}")
            results[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"run {repeat + 1} {impl}: {results[impl][-1]}", file=sys.stderr)

    columns = [k for k in results["wurst"][0] if k not in ("shape", "checksum")]
    print(f"\n{args.run}, {args.size}x{args.size}, {args.steps} steps, {args.threads} threads, "
          f"median of {args.repeats} processes each\n")  # fmt: skip
    print("| | " + " | ".join(columns) + " | total (load + stages) |")
    print("|---" * (len(columns) + 2) + "|")
    totals = {}
    for impl, runs in results.items():
        medians = {k: statistics.median(r[k] for r in runs) for k in columns}
        totals[impl] = sum(v for k, v in medians.items() if k != "peak_rss_gib")
        cells = [f"{medians[k]:.2f} GiB" if k == "peak_rss_gib" else f"{medians[k]:.1f} s" for k in columns]
        print(f"| {impl} | " + " | ".join(cells) + f" | {totals[impl]:.1f} s |")
    print(f"\nwurst / diffusers total time: {totals['wurst'] / totals['diffusers']:.2f}")


if __name__ == "__main__":
    main()
