"""Time and size one LoRA training step of Stage C: wurst's trainer (python -m wurst.train) against diffusers'
formulation with peft, on the published-size random-weight prior, on this CPU.

    .venv/bin/python tools/train_bench.py                           # every configuration, table to stdout
    .venv/bin/python tools/train_bench.py --configs bf16-512-1,bf16-768-4 --steps 2 --output docs/bench-train.txt
    .venv/bin/python tools/train_bench.py --tiny                    # the tiny fixture: checks the script end to end

A configuration is DTYPE-RESOLUTION-BATCH: bf16 or fp32, 512 or 768 pixels (a 16x16 or 24x24 latent), batch 1 or
4. Both sides train a rank-4 LoRA (alpha 4, a scale of 1) on to_q, to_k, to_v and to_out.0 of every attention
block (128 layers, 1.57M float32 parameters) on a frozen prior in the configuration's dtype.

- wurst: the trainer's own code: the prior pipeline as wurst.train.loop.load_prior_pipeline loads it (the frozen
  text encoder only while it fills the cache, which this benchmark does not run), the LoRA and Objective of
  wurst.train.loop.trainable_objective, and Trainer.step (the Objective's forward, backward, clip_grad_norm_,
  AdamW, the learning-rate schedule) with the diffusers recipe (uniform t, plain MSE). Its encoded cache is
  replaced by the same random tensors in memory.
- diffusers: WuerstchenPrior.from_pretrained(prior, subfolder="prior", torch_dtype=dtype) in train mode, with
  peft's LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]) added by add_adapter,
  the trainable parameters upcast to float32 (diffusers' script upcasts them for fp16 only, and keeps them bfloat16
  under bf16: upcast here so that both sides train the same float32 factors), DDPMWuerstchenScheduler.add_noise,
  F.mse_loss, backward, clip_grad_norm_, AdamW, as train_text_to_image_lora_prior.py's loop does it, without
  accelerate (whose bf16 autocast would only change the LoRA's dtype). Its dropout (0.1 in the config) is active,
  as in the script; wurst's prior has none.

Both sides see the same random image latents and text states (the encoders are not part of a step: the trainer
encodes the dataset once into its cache before the first step); noise and t are random. Each side runs in a fresh
process per configuration: load, one warm-up step, then --steps timed steps (the median is reported), and its peak
RSS (VmHWM) over the whole process, the load included. Before every process the checkpoint files are read once, so
that all start from the same warm page cache.

FLOPs: the step's matmul FLOPs (linear layers, convolutions, attention) are counted with
torch.utils.flop_counter on the meta device (no compute) for the model's config and the batch's shapes: the
forward pass, and the backward pass as autograd runs it. A LoRA step's backward costs about one forward (the
frozen weights get no weight gradient), not two, so the step is about 2x the forward; the table gives the share of
the matmul rate for the counted FLOPs and, as the usual rule of thumb, for 3x the forward's. The rate is the best
2048x2048 matmul in the dtype (tools/bench.py's matmul_gflops), measured in the same run.

Results accumulate in --results (a JSON file outside the repository), so the configurations can be measured one
invocation at a time; the table lists every configuration, and those not measured as such (with --deadline, the
ones skipped for time as "not measured (time)").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tools.hub_fixtures and tools.bench

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
CONFIGS = [f"{d}-{r}-{b}" for d in DTYPES for r in (512, 768) for b in (1, 4)]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 4
TEXT_TOKENS = 77
SEED = 0


def parse_config(name: str) -> tuple[str, int, int]:
    """'bf16-768-4' -> ('bfloat16', 768, 4)."""
    dtype, resolution, batch = name.split("-")
    return DTYPES[dtype], int(resolution), int(batch)


def peak_rss_gib() -> float:
    return status_gib("VmHWM")


def reset_peak_rss() -> float | None:
    """The process's peak RSS so far (the load's), then restart the count from the current RSS (Linux's
    clear_refs 5), so that the final VmHWM is the peak of the steps alone; None where that cannot be done."""
    loaded = peak_rss_gib()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return loaded


def status_gib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def prior_repo(tiny: bool) -> Path:
    from tools import hub_fixtures

    return hub_fixtures.ensure("tiny" if tiny else "published", "prior")


def prior_config(repo: Path) -> dict:
    return json.loads((repo / "prior" / "config.json").read_text())


def batch_tensors(repo: Path, resolution: int, batch: int) -> tuple:
    """The step's image latents (B, 16, r/32, r/32) and text states (B, 77, c_cond), float32, the same for both
    sides (the trainer's cache holds float32)."""
    import torch

    cfg = prior_config(repo)
    side = resolution // 32
    generator = torch.Generator().manual_seed(SEED)
    latents = torch.randn(batch, cfg["c_in"], side, side, generator=generator)
    text = torch.randn(batch, TEXT_TOKENS, cfg["c_cond"], generator=generator)
    return latents, text


# -- the two sides, each in its own process --------------------------------------------------------------------


class MemoryCache:
    """Stands in for wurst.train.cache.EncodedCache: the latents and text states by sample index, in memory."""

    def __init__(self, latents, text):
        self.latents, self.texts = latents, text

    def latent(self, index: int):
        return self.latents[index]

    def text(self, index: int | None):
        return self.texts[0 if index is None else index]


def wurst_worker(repo: Path, dtype, resolution: int, batch: int, steps: int) -> dict:
    import torch

    from wurst.train.app import build_parser
    from wurst.train.data import Sample
    from wurst.train.loop import Trainer, load_prior_pipeline, trainable_objective

    args = build_parser().parse_args(
        ["unused-data", "--out", "unused-out", "--prior", str(repo), "--recipe", "diffusers", "--lora-rank",
         str(RANK), "--lora-targets", ",".join(TARGETS), "--batch-size", str(batch), "--resolution", str(resolution),
         "--steps", str(steps + 1), "--seed", str(SEED)])
    start = time.perf_counter()
    pipe = load_prior_pipeline(args, torch.device("cpu"), dtype)  # the trainer's: the text encoder not resident
    objective, trained = trainable_objective(args, pipe, dtype)
    load = time.perf_counter() - start
    latents, text = batch_tensors(repo, resolution, batch)
    samples = [Sample(index=i, image=Path(f"{i}.png"), caption="", height=resolution, width=resolution)
               for i in range(batch)]
    trainer = Trainer(args, samples=samples, pipe=pipe, objective=objective, trained=trained,
                      cache=MemoryCache(latents, text), device=torch.device("cpu"), rank=0, world=1)
    rss_loaded, load_peak = status_gib("VmRSS"), reset_peak_rss()
    times, losses = [], []
    for step in range(1, steps + 2):  # step 1 is the warm-up
        began = time.perf_counter()
        losses.append(trainer.step(step))
        times.append(time.perf_counter() - began)
    return {"load": load, "times": times, "losses": losses, "trained_params": sum(p.numel() for p in trained.values()),
            **peaks(rss_loaded, load_peak)}


def diffusers_worker(repo: Path, dtype, resolution: int, batch: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior
    from peft import LoraConfig

    torch.manual_seed(SEED)
    start = time.perf_counter()
    prior = WuerstchenPrior.from_pretrained(repo, subfolder="prior", torch_dtype=dtype)
    prior.requires_grad_(False)
    prior.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS))
    for parameter in prior.parameters():  # the script's cast_training_params: the LoRA factors in float32
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.float32)
    prior.train()
    params = [p for p in prior.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    scheduler = DDPMWuerstchenScheduler()
    load = time.perf_counter() - start
    latents, text = batch_tensors(repo, resolution, batch)
    image_embeds, prompt_embeds = latents.to(dtype), text.to(dtype)  # the script's encoders run in weight_dtype
    rss_loaded, load_peak = status_gib("VmRSS"), reset_peak_rss()
    times, losses = [], []
    for _ in range(steps + 1):
        began = time.perf_counter()
        noise = torch.randn_like(image_embeds)
        timesteps = torch.rand((batch,)).to(dtype=dtype)
        noisy_latents = scheduler.add_noise(image_embeds, noise, timesteps)
        pred_noise = prior(noisy_latents, timesteps, prompt_embeds)
        loss = F.mse_loss(pred_noise.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - began)
    return {"load": load, "times": times, "losses": losses, "trained_params": sum(p.numel() for p in params),
            **peaks(rss_loaded, load_peak)}


def peaks(rss_loaded: float, load_peak: float | None) -> dict:
    """RSS after the load, and the peaks: the load's, the steps', the whole process's."""
    if load_peak is None:
        return {"rss_loaded_gib": rss_loaded, "peak_rss_gib": peak_rss_gib()}
    steps_peak = peak_rss_gib()
    return {"rss_loaded_gib": rss_loaded, "load_peak_rss_gib": load_peak, "steps_peak_rss_gib": steps_peak,
            "peak_rss_gib": max(load_peak, steps_peak)}


# -- counting ----------------------------------------------------------------------------------------------------


def step_flops(repo: Path, resolution: int, batch: int, dtype) -> dict:
    """The matmul FLOPs of wurst's Objective forward and of its backward, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from wurst.models.lora import attach_trainable_lora
    from wurst.models.stage_c import StageC, StageCConfig
    from wurst.train.loop import chosen_layers
    from wurst.train.objective import RECIPES, Objective

    cfg = prior_config(repo)
    fields = {k: cfg[k] for k in ("c_in", "c", "c_cond", "c_r", "depth", "nhead")}
    with torch.device("meta"):
        model = StageC(StageCConfig(**fields)).to(dtype).requires_grad_(False)
    attach_trainable_lora(chosen_layers("prior", model, TARGETS), rank=RANK, alpha=RANK)
    objective = Objective(model, None, recipe=RECIPES["diffusers"])
    side = resolution // 32
    latents = torch.empty(batch, cfg["c_in"], side, side, device="meta")
    inputs = dict(latents=latents, noise=torch.empty_like(latents), t=torch.empty(batch, device="meta"),
                  text=torch.empty(batch, TEXT_TOKENS, cfg["c_cond"], device="meta"))
    with FlopCounterMode(display=False) as forward:
        losses = objective(**inputs)
    with FlopCounterMode(display=False) as backward:
        losses.sum().backward()

    def attention(counter) -> int:  # on the meta device SDPA runs its math form: the bmm are the attention's
        return sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) == "aten.bmm")

    return {"forward": forward.get_total_flops(), "backward": backward.get_total_flops(),
            "attention_forward": attention(forward), "attention_backward": attention(backward)}


def check_flops_on_tiny(repo: Path, dtype, resolution: int, batch: int) -> None:
    """--tiny: the meta-device count against a real step of wurst's objective. The counter does not see SDPA's
    fused CPU kernel, so the real step's count is the linear layers and convolutions alone; the attention's is
    checked against its formula: 2 matmuls of 2·N·(N + 77)·c per sample and block forward, 4 backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import wurst.models.blocks
    from wurst.pipelines.prior import WuerstchenPriorPipeline
    from wurst.train.app import build_parser
    from wurst.train.loop import trainable_objective

    wurst.models.blocks._ONEDNN_DTYPES = frozenset()  # the counter knows aten's matmuls, not oneDNN's
    args = build_parser().parse_args(["d", "--out", "o", "--recipe", "diffusers", "--lora-targets", ",".join(TARGETS)])
    pipe = WuerstchenPriorPipeline.from_pretrained(repo, torch_dtype=dtype)
    objective, _ = trainable_objective(args, pipe, dtype)
    latents, text = batch_tensors(repo, resolution, batch)
    with FlopCounterMode(display=False) as counter:
        objective(latents=latents, noise=torch.randn_like(latents), t=torch.rand(batch), text=text).sum().backward()
    meta = step_flops(repo, resolution, batch, dtype)
    cfg, n = prior_config(repo), (resolution // 32) ** 2
    attention = 2 * 2 * batch * n * (n + TEXT_TOKENS) * cfg["c"] * cfg["depth"]
    rest = meta["forward"] + meta["backward"] - meta["attention_forward"] - meta["attention_backward"]
    if (counter.get_total_flops(), meta["attention_forward"], meta["attention_backward"]) != (
            rest, attention, 2 * attention):
        sys.exit(f"train_bench: the meta-device count {meta} disagrees with a real step's "
                 f"{counter.get_total_flops()} or the attention's formula {attention}")
    print(f"FLOP count checked on the tiny prior: {meta}", file=sys.stderr)


# -- the driver --------------------------------------------------------------------------------------------------


def warm_page_cache(repo: Path, dtype_name: str) -> None:
    """Read every file either side maps once: the checkpoints and, in bfloat16, wurst's cast copies."""
    import torch

    from tools.bench import read_through
    from wurst.weights.cast_copies import files_in_dtype

    files = sorted(repo.rglob("*.safetensors"))
    if dtype_name != "float32":
        files += files_in_dtype(files, getattr(torch, dtype_name))
    read_through(files)


def run_worker(side: str, config: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--configs", config, "--steps", str(args.steps),
           "--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}",
                "stderr": out.stderr[-3000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(config: str, args: argparse.Namespace, rates: dict) -> dict:
    import torch

    from tools.bench import matmul_gflops

    dtype_name, resolution, batch = parse_config(config)
    repo = prior_repo(args.tiny)
    if dtype_name not in rates:
        rates[dtype_name] = matmul_gflops(args.threads, dtype_name)
    result = {"when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "steps": args.steps,
              "threads": args.threads, "rate_gflops": rates[dtype_name],
              "flops": step_flops(repo, resolution, batch, getattr(torch, dtype_name))}
    for side in ("wurst", "diffusers"):
        warm_page_cache(repo, dtype_name)
        result[side] = run_worker(side, config, args)
        print(f"{config} {side}: {json.dumps(result[side])}", file=sys.stderr, flush=True)
    return result


def failure(error: str) -> str:
    return "killed by SIGKILL (out of memory)" if error == "exit -9" else f"failed: {error}"


def steps_peaks(r: dict) -> str:
    """The peak RSS from the first step on (after the load), where the workers could measure it."""
    w, d = (r[side].get("steps_peak_rss_gib") for side in ("wurst", "diffusers"))
    return f"{w:.2f} / {d:.2f} GiB ({w / d:.2f})" if w and d else "-"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}"


def row(config: str, r: dict) -> tuple[str, tuple[float, float] | None]:
    """A configuration's table row, and its (time, peak RSS) ratios where both sides ran."""
    ok = {side: "error" not in r[side] for side in ("wurst", "diffusers")}
    t = {side: statistics.median(r[side]["times"][1:]) for side in ok if ok[side]}
    m = {side: r[side]["peak_rss_gib"] for side in ok if ok[side]}
    counted, rule = r["flops"]["forward"] + r["flops"]["backward"], 3 * r["flops"]["forward"]

    def cell(side: str, value: dict, unit: str = "") -> str:
        return f"{value[side]:.2f}{unit}" if ok[side] else failure(r[side]["error"])

    def pair(flops: float) -> str:
        return " / ".join(f"{flops / t[side] / (r['rate_gflops'] * 1e9):.0%}" if ok[side] else "-" for side in ok)

    both = all(ok.values())
    line = (f"| {config} | {cell('wurst', t)} | {cell('diffusers', t)} | "
            f"{ratio(t['wurst'], t['diffusers']) if both else '-'} | {cell('wurst', m, ' GiB')} | "
            f"{cell('diffusers', m, ' GiB')} | {ratio(m['wurst'], m['diffusers']) if both else '-'} | "
            f"{pair(counted)} | {pair(rule)} | {r['flops']['forward'] / 1e12:.2f} + "
            f"{r['flops']['backward'] / 1e12:.2f} | {steps_peaks(r) if both else '-'} |")
    return line, ((t["wurst"] / t["diffusers"], m["wurst"] / m["diffusers"]) if both else None)


def table(results: dict, skipped: set[str], tiny: bool) -> list[str]:
    lines = ["| config | wurst s/step | diffusers s/step | time ratio | wurst peak RSS | diffusers peak RSS | "
             "RSS ratio | wurst / diffusers of matmul rate (counted) | (3x forward) | step TFLOP (fwd + bwd) | "
             "peak RSS of the steps alone, wurst / diffusers |",
             "|---" * 11 + "|"]
    verdicts = []
    for config in CONFIGS:
        if config not in results:
            lines.append(f"| {config} | not measured{' (time)' if config in skipped else ''} |" + " |" * 9)
            continue
        line, verdict = row(config, results[config])
        lines.append(line)
        if verdict and config.startswith("bf16"):
            verdicts.append((config, *verdict))
    lines.append("")
    if tiny:
        lines.append("(tiny fixture: a check of the script, not a measurement)")
    elif verdicts:
        lines.append("Goal (bfloat16): at most 0.6x diffusers' step time and at most 0.6x its peak memory.")
        for config, t, m in verdicts:
            lines.append(f"- {config}: time {t:.2f}x ({'met' if t <= 0.6 else 'NOT met'}), peak RSS {m:.2f}x "
                         f"({'met' if m <= 0.6 else 'NOT met'})")
        missing = [c for c in CONFIGS if c.startswith("bf16") and c not in results]
        if missing:
            lines.append(f"- not measured: {', '.join(missing)}")
    else:
        lines.append("Goal (bfloat16): no bfloat16 configuration measured, so not shown to be met.")
    return lines


def host_lines(threads: int) -> list[str]:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    return [f"host: {model}, {os.cpu_count()} cores visible, {threads} threads used; torch {torch.__version__}, "
            f"Python {platform.python_version()}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, from {', '.join(CONFIGS)} (default: all, in this order)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step (default 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    parser.add_argument("--tiny", action="store_true", help="the tiny fixture prior: a quick end-to-end check")
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    parser.add_argument("--results", type=Path, default=None,
                        help="a JSON file that keeps the measured configurations between invocations (default: "
                             "none, only this invocation's)")
    parser.add_argument("--deadline", default=None, help="HH:MM (UTC): start no configuration after it")
    parser.add_argument("--worker", choices=("wurst", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if unknown := [c for c in configs if c not in CONFIGS]:
        sys.exit(f"train_bench: unknown --configs {', '.join(unknown)}: choose from {', '.join(CONFIGS)}")
    if args.steps < 1:
        sys.exit("train_bench: --steps must be 1 or more")

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        dtype_name, resolution, batch = parse_config(configs[0])
        run = wurst_worker if args.worker == "wurst" else diffusers_worker
        result = run(prior_repo(args.tiny), getattr(torch, dtype_name), resolution, batch, args.steps)
        print(json.dumps(result))
        return

    repo = prior_repo(args.tiny)  # built outside the timing, if needed
    if args.tiny:
        check_flops_on_tiny(repo, torch.float32, 64, 2)
    results = json.loads(args.results.read_text()) if args.results and args.results.exists() else {}
    rates: dict[str, float] = {}
    skipped: set[str] = set()
    deadline = None
    if args.deadline:
        hours, minutes = map(int, args.deadline.split(":"))
        deadline = datetime.datetime.now(datetime.UTC).replace(hour=hours, minute=minutes, second=0, microsecond=0)
    for config in configs:
        if deadline and datetime.datetime.now(datetime.UTC) > deadline:
            skipped.add(config)
            print(f"{config}: not started, past the deadline {args.deadline} UTC", file=sys.stderr)
            continue
        results[config] = measure(config, args, rates)
        if args.results:
            args.results.write_text(json.dumps(results, indent=1))
    if deadline and datetime.datetime.now(datetime.UTC) > deadline:  # what is still missing will not be measured
        skipped |= {c for c in CONFIGS if c not in results}

    threads = {r["threads"] for r in results.values()} or {args.threads}
    steps = {r["steps"] for r in results.values()} or {args.steps}
    rate_by_dtype: dict[str, list[float]] = {}
    for config, r in results.items():
        rate_by_dtype.setdefault(parse_config(config)[0], []).append(r["rate_gflops"])
    rates_text = ", ".join(f"{dtype} {min(v):.0f}-{max(v):.0f} GFLOP/s" for dtype, v in rate_by_dtype.items())
    lines = [f"LoRA training step of Stage C ({'tiny fixture' if args.tiny else 'published-size random-weight prior'}"
             f"), rank {RANK} on {', '.join(TARGETS)}; median of {'/'.join(map(str, sorted(steps)))} timed steps "
             "after 1 warm-up step, one fresh process per side and configuration; peak RSS = VmHWM of that process "
             "(load included), and from the first step on; 2048² matmul rate measured in the same run: "
             + (rates_text or "-"),
             *host_lines(max(threads)), ""]
    lines += table(results, skipped, args.tiny)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        args.output.write_text(report)


if __name__ == "__main__":
    main()
