"""Throughput of `python -m wurst.batch` on the published-size random-weight checkpoints: images per minute for one
job run several ways (processes x threads each, batch size), each in fresh processes, timed from launch to exit
(model loading included, as a user waits for it).

    .venv/bin/python tools/batch_bench.py              # the issue-14 CPU run: 8 prompts, 512x512, 3+3 steps, float32;
                                                       # 1 process x 2 threads against torchrun 2 x 1, batch 1 and 4
    .venv/bin/python tools/batch_bench.py --device cuda --dtype bfloat16 --size 1024 --default-steps \
        --prompts 32 --runs 1x16:1,1x16:4,1x16:8     # a GPU: images per second at the default workload

A run is PROCESSESxTHREADS:BATCH. Several processes run under `torchrun --standalone` (gloo on CPU, nccl on CUDA).
Every run writes its own folder, which is then checked to hold all the images; before each run the checkpoint files
are read once, so every run starts from the same warm page cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tools.bench and tools.hub_fixtures
from tools import hub_fixtures  # noqa: E402
from tools.bench import read_through  # noqa: E402

PROMPTS = [
    "Anthropomorphic cat dressed as a fire fighter", "a lighthouse on a cliff at night, oil painting",
    "a bowl of ramen, studio photograph", "an astronaut riding a horse on the moon",
    "a watercolor map of an imaginary island", "a robot reading a newspaper in a cafe",
    "a snowy mountain village at dawn", "a close-up of a hummingbird, macro photograph",
]


def repos(fixtures: str) -> tuple[Path, Path]:
    return hub_fixtures.ensure(fixtures, "prior"), hub_fixtures.ensure(fixtures, "decoder")


def warm_page_cache(fixtures: str) -> None:
    """Read every checkpoint file once (tools/bench.py's read_through)."""
    read_through(path for repo in repos(fixtures) for path in sorted(repo.rglob("*.safetensors")))


def command(processes: int, batch_size: int, prompts: Path, out: Path, args: argparse.Namespace) -> list[str]:
    prior, decoder = repos(args.fixtures)
    job = ["-m", "wurst.batch", str(prompts), "--out", str(out), "--batch-size", str(batch_size),
           "--height", str(args.size), "--width", str(args.size), "--prior", str(prior), "--decoder", str(decoder),
           "--device", args.device, "--dtype", args.dtype, "--seed", "0"]
    if not args.default_steps:
        job += ["--prior-steps", str(args.prior_steps), "--decoder-steps", str(args.decoder_steps)]
    if args.low_memory:
        job += ["--low-memory"]
    if processes == 1:
        return [sys.executable, *job]
    return [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc-per-node={processes}", *job]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="1x2:1,2x1:1,1x2:4,2x1:4", help="PROCESSESxTHREADS:BATCH, comma-separated")
    p.add_argument("--prompts", type=int, default=8, help="images in the job (the 8 prompts, repeated)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--prior-steps", type=int, default=3)
    p.add_argument("--decoder-steps", type=int, default=3)
    p.add_argument("--default-steps", action="store_true", help="the defaults: 29 guided Stage C + 12 Stage B steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--low-memory", action="store_true", help="pass --low-memory to every run")
    p.add_argument("--fixtures", default="published", choices=["published", "tiny"], help="tiny: a smoke test")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wurst-batch-bench-"))
    prompts = work / "prompts.txt"
    prompts.write_text("".join(PROMPTS[i % len(PROMPTS)] + "\n" for i in range(args.prompts)), encoding="utf-8")
    steps = "29 guided Stage C + 12 Stage B" if args.default_steps else f"{args.prior_steps}+{args.decoder_steps}"
    print(f"{args.prompts} images, {args.size}x{args.size}, {steps} steps, {args.dtype} on {args.device}, "
          f"torch threads as listed{', low memory' if args.low_memory else ''}\n")
    print("| processes x threads | batch size | wall (s) | images/min | images/s |")
    print("|---|---|---|---|---|")
    try:
        for run in args.runs.split(","):
            shape, batch_size = run.split(":")
            processes, threads = (int(n) for n in shape.split("x"))
            out = work / run.replace(":", "-")
            warm_page_cache(args.fixtures)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
            start = time.perf_counter()
            done = subprocess.run(command(processes, int(batch_size), prompts, out, args), env=env,
                                  capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0 or len(list(out.glob("*.png"))) != args.prompts:
                sys.exit(f"run {run} failed:\n{done.stderr[-3000:]}")
            print(f"| {processes} x {threads} | {batch_size} | {wall:.1f} | {args.prompts / wall * 60:.2f} | "
                  f"{args.prompts / wall:.3f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
