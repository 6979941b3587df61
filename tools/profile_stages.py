"""Where one forward pass of each model spends its time, by kind of work, at the default workload's shapes.

    .venv/bin/python tools/profile_stages.py                     # bfloat16, Stage C, Stage B, the VQGAN
    .venv/bin/python tools/profile_stages.py --dtype float32 --models c --ops 25

One warm forward pass per model on the published-size random-weight checkpoints, at 1024x1024's shapes (Stage C:
the CFG batch of 2 at the 24x24 latent; Stage B: batch 1 at the 256x256 latent; the VQGAN decoding that latent),
inside `heap.kept_heap` as the pipelines run them. It prints the warm time of a few calls, then, from one call under
torch.profiler, each kind of work with its self time: the linear layers and the attention's matmuls with their
rate (FLOPs from the recorded shapes) against a 2048x2048 matmul measured here; every other kind with the bytes
its operators read and write (from the shapes) and the bandwidth that makes. The kind comes from the operator and
the wurst module it runs in (GRN, LayerNorm, modulation, ...).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools import hub_fixtures  # noqa: E402
from tools.bench import matmul_gflops  # noqa: E402
from wurst.models import blocks  # noqa: E402
from wurst.runtime.heap import kept_heap  # noqa: E402
from wurst.weights.spec import load_hub_component  # noqa: E402

MATMULS = {"mkldnn::_linear_pointwise", "aten::addmm", "aten::mm"}  # aten::linear: only calls addmm
# Operators that return a view (or nothing): they move no data, so their shapes say nothing of memory traffic.
VIEWS = {"aten::view", "aten::_unsafe_view", "aten::reshape", "aten::permute", "aten::transpose", "aten::t",
         "aten::select", "aten::slice", "aten::unflatten", "aten::flatten", "aten::expand", "aten::as_strided",
         "aten::unsqueeze", "aten::squeeze", "aten::chunk", "aten::split", "aten::narrow", "aten::detach",
         "aten::alias", "aten::empty", "aten::empty_strided", "aten::resize_", "aten::lift_fresh"}
LABELLED = (blocks.GlobalResponseNorm, blocks.TimestepBlock, blocks.AttnBlock, blocks.ResBlock)


def model_and_call(which: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if which == "c":
        model = load_hub_component("prior", hub_fixtures.ensure("published", "prior") / "prior", dtype=dtype)
        x, r = randn(2, 16, 24, 24), torch.full((2,), 0.5, dtype=dtype)
        text = model.condition(randn(2, 77, 1280))
        return model, lambda: model(x, r, text)
    if which == "b":
        model = load_hub_component("decoder", hub_fixtures.ensure("published", "decoder") / "decoder", dtype=dtype)
        x, r = randn(1, 4, 256, 256), torch.full((1,), 0.5, dtype=dtype)
        cond = model.condition(randn(1, 16, 24, 24), randn(1, 77, 1024), (256, 256))
        return model, lambda: model(x, r, cond)
    model = load_hub_component("vqgan", hub_fixtures.ensure("published", "decoder") / "vqgan", dtype=dtype)
    latent = randn(1, 4, 256, 256)
    return model, lambda: model.decode(latent)


def label_modules(model: torch.nn.Module) -> None:
    """A profiler range named after each block and GRN, so that an operator can be told by where it runs."""
    for module in model.modules():
        if isinstance(module, LABELLED):
            name = type(module).__name__

            def enter(module, args, name=name):
                module._range = record_function(name)
                module._range.__enter__()

            def leave(module, args, output):
                module._range.__exit__(None, None, None)

            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave)


def kind(op: str, where: str) -> str:
    if op in MATMULS:
        return "linear layers"
    if op == "aten::bmm":
        return "attention matmuls" if where == "AttnBlock" else "other matmuls"
    if op in {"aten::_softmax", "aten::softmax"}:
        return "attention softmax"
    if "convolution" in op:
        return "convolutions"
    if op == "aten::native_layer_norm":
        return "LayerNorm"
    if op in {"aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::empty", "aten::to"}:
        return "copies and allocation"
    if where == "GlobalResponseNorm":
        return "GRN"
    if where == "TimestepBlock":
        return "timestep modulation"
    if where in {"ResBlock", "AttnBlock"} and op in {"aten::add", "aten::add_"}:
        return "residual adds"
    return "other elementwise"


def numel(shape) -> int:
    return math.prod(shape) if shape else 1


def matmul_flops(op: str, shapes: list) -> int:
    if op == "aten::bmm":
        (b, n, k), (_, _, m) = shapes[0], shapes[1]
        return 2 * b * n * k * m
    if op == "aten::mm":
        (n, k), (_, m) = shapes[0], shapes[1]
        return 2 * n * k * m
    if op == "aten::addmm":
        (n, k), (_, m) = shapes[1], shapes[2]
        return 2 * n * k * m
    x, weight = shapes[0], shapes[1]  # _linear_pointwise: weight (out, in)
    return 2 * numel(x[:-1]) * weight[0] * weight[1]


def enclosing(event, names: set[str]) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in names:
            return parent.name
        parent = parent.cpu_parent
    return ""


def breakdown(prof, itemsize: int) -> dict[str, dict[str, float]]:
    names = {cls.__name__ for cls in LABELLED}
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in prof.events():
        if event.name in names or event.name.startswith("## "):
            continue
        seconds = event.self_cpu_time_total / 1e6
        if seconds <= 0:
            continue
        category = kind(event.name, enclosing(event, names))
        row = out[category]
        row["seconds"] += seconds
        shapes = [s for s in (event.input_shapes or []) if isinstance(s, list | tuple) and s]
        if category.endswith("matmuls") or category == "linear layers":
            try:
                row["flops"] += matmul_flops(event.name, shapes)
            except (ValueError, IndexError):
                pass
        elif event.name not in VIEWS:  # roughly: each input read once, an output the size of the largest written
            sizes = [numel(s) for s in shapes]
            row["bytes"] += (sum(sizes) + max(sizes, default=0)) * itemsize
        row["calls"] += 1
    return out


def report(which: str, dtype: torch.dtype, calls: int, rate: float, top_ops: int) -> None:
    name = {"c": "Stage C (batch 2, 24x24)", "b": "Stage B (batch 1, 256x256)", "a": "VQGAN (decoding 256x256)"}
    model, run = model_and_call(which, dtype)
    with torch.no_grad(), kept_heap():
        run()  # first touch of the weights
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        label_modules(model)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run()
    rows = breakdown(prof, torch.tensor([], dtype=dtype).element_size())
    total = sum(row["seconds"] for row in rows.values())
    print(f"\n{name[which]}, {str(dtype).removeprefix('torch.')}: warm {', '.join(f'{t:.2f}' for t in times)} s; "
          f"under the profiler {total:.2f} s of operator time")
    print("| kind of work | seconds | share | calls | rate |")
    print("|---|---|---|---|---|")
    for category, row in sorted(rows.items(), key=lambda item: -item[1]["seconds"]):
        if "flops" in row:
            speed = f"{row['flops'] / 1e12:.2f} TFLOP at {row['flops'] / row['seconds'] / 1e9:.0f} GFLOP/s " \
                    f"({row['flops'] / row['seconds'] / 1e9 / rate:.0%} of the matmul rate)"
        else:
            speed = f"{row['bytes'] / 1e9:.2f} GB at {row['bytes'] / row['seconds'] / 1e9:.1f} GB/s"
        print(f"| {category} | {row['seconds']:.3f} | {row['seconds'] / total:.0%} | {int(row['calls'])} | {speed} |")
    flops = sum(row.get("flops", 0) for row in rows.values())
    print(f"matmul FLOPs {flops / 1e12:.2f} TFLOP: {flops / rate / 1e9:.2f} s at the matmul rate, "
          f"{flops / rate / 1e9 / min(times):.0%} of the best warm time")
    if top_ops:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top_ops))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--models", default="cba", help="any of c (Stage C), b (Stage B), a (the VQGAN)")
    parser.add_argument("--calls", type=int, default=3, help="warm calls timed before the profiled one")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--ops", type=int, default=0, help="also print the profiler's table of the N costliest ops")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rate = matmul_gflops(args.threads, args.dtype)
    print(f"2048x2048 matmul: {rate:.0f} GFLOP/s in {args.dtype} on {args.threads} threads")
    for which in args.models:
        report(which, getattr(torch, args.dtype), args.calls, rate, args.ops)


if __name__ == "__main__":
    main()
