"""What `torch.compile` of a denoiser gains and costs on this machine, at the default workload's shapes.

    .venv/bin/python tools/compile_bench.py                          # Stage C and Stage B, bfloat16
    .venv/bin/python tools/compile_bench.py --models c --freezing    # also inductor's CPU freezing mode

The documentation's recipe compiles the prior and the decoder. For each model (the published-size random-weight
checkpoints; Stage C: the CFG batch of 2 at 24x24, Stage B: batch 1 at 256x256, as in tools/profile_stages.py),
each in a fresh process on the same threads:
- eager: the best of 3 warm forward passes;
- compiled, with an empty inductor cache: the first call (tracing and compiling) and the best of 3 later calls;
- compiled again in a new process that shares that cache: its first call, what every later run pays.
`--freezing` adds the same two compiled rows with `torch._inductor.config.freezing` on (inductor folds the weights
into the graph as constants and can pack them for its CPU matmuls, at the cost of a second copy of them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.profile_stages import model_and_call  # noqa: E402
from wurst.runtime.heap import kept_heap  # noqa: E402

NAMES = {"c": "Stage C", "b": "Stage B"}


def worker(which: str, dtype_name: str, compiled: bool, freezing: bool, threads: int) -> dict:
    torch.set_num_threads(threads)
    model, call = model_and_call(which, getattr(torch, dtype_name))
    if compiled:
        torch._inductor.config.freezing = freezing
        model.forward = torch.compile(model.forward)  # the same module, so `call` runs the compiled forward
    times = []
    with torch.no_grad(), kept_heap():
        for _ in range(4):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return {"first": times[0], "later": min(times[1:])}


def run(which: str, args: argparse.Namespace, mode: str, cache: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--dtype", args.dtype, "--threads", str(args.threads),
           "--mode", mode]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="c,b", help="any of c (Stage C), b (Stage B)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--freezing", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="eager", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.dtype, args.mode != "eager", args.mode == "freezing", args.threads)
        print(json.dumps(result))
        return

    print(f"torch {torch.__version__}, {args.dtype}, {args.threads} threads\n")
    print("| model | mode | first call, empty cache | later calls | first call, new process, warm cache |")
    print("|---|---|---|---|---|")
    for which in args.models.split(","):
        eager = run(which, args, "eager", tempfile.mkdtemp())
        print(f"| {NAMES[which]} | eager | {eager['first']:.2f} s | {eager['later']:.2f} s | - |", flush=True)
        for mode in ["compile", "freezing"] if args.freezing else ["compile"]:
            cache = tempfile.mkdtemp(prefix="inductor-")
            cold, warm = run(which, args, mode, cache), run(which, args, mode, cache)
            label = "torch.compile" + (" (freezing)" if mode == "freezing" else "")
            print(f"| {NAMES[which]} | {label} | {cold['first']:.1f} s | {cold['later']:.2f} s "
                  f"({eager['later'] / cold['later']:.2f}x eager) | {warm['first']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
