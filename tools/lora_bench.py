"""What a LoRA costs at generation time: Stage C (the only stage LoRA adapts, with its text encoder) on the
published-size random-weight prior, 1024x1024, guidance 4, in one process, without a LoRA, with one unfused and with
it fused, alternating A B C A B C.

    .venv/bin/python tools/lora_bench.py                      # bfloat16, rank 4 on diffusers' script targets
    .venv/bin/python tools/lora_bench.py --dtype float32 --targets all --rank 16 --steps 6 --repeats 3

The LoRA is diffusers' training script's (to_q, to_k, to_v, to_out.0 of every attention block: 128 layers), or every
linear layer of the prior and its text encoder (`--targets all`). The pipeline is resident, so the times are the
compute of Stage C alone; the LoRA's share of a whole generation (Stages B and A added) is smaller still. Prints the
median time per run and the overhead against the run without a LoRA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Anthropomorphic cat dressed as a fire fighter"
SCRIPT_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj")  # diffusers' to_q, to_k, to_v, to_out.0


def make_lora(pipe, rank: int, all_layers: bool) -> dict:
    import torch

    from wurst.models.lora import lora_layers
    from wurst.weights.spec import COMPONENTS

    generator = torch.Generator().manual_seed(0)
    state = {}
    for component in ("prior", "text_encoder") if all_layers else ("prior",):
        key_map = COMPONENTS[component].key_map
        for name, layer in lora_layers(getattr(pipe, component)).items():
            if not all_layers and not (name.startswith("blocks.") and name.endswith(SCRIPT_TARGETS)):
                continue
            file_name = key_map.checkpoint_layer(name)
            state[f"{component}.{file_name}.lora_A.weight"] = torch.randn(rank, layer.in_features,
                                                                          generator=generator) * 0.01
            state[f"{component}.{file_name}.lora_B.weight"] = torch.randn(layer.out_features, rank,
                                                                          generator=generator) * 0.01
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="Stage C steps per run (each costs the same)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", choices=("script", "all"), default="script")
    args = parser.parse_args()

    import torch

    import wurst
    from tools import hub_fixtures

    torch.set_num_threads(min(2, torch.get_num_threads()))
    dtype = getattr(torch, args.dtype)
    pipe = wurst.WuerstchenPriorPipeline.from_pretrained(hub_fixtures.ensure("published", "prior"), torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    lora = make_lora(pipe, args.rank, args.targets == "all")
    print(f"{args.dtype}, {args.size}x{args.size}, {args.steps} Stage C steps, rank {args.rank} on "
          f"{len(lora) // 2} layers ({sum(t.numel() for t in lora.values()) / 1e6:.2f}M parameters), "
          f"{torch.get_num_threads()} threads", flush=True)

    def run() -> float:
        start = time.perf_counter()
        pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=4.0,
             generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - start

    def with_state(state: str) -> float:
        pipe.unload_lora_weights()
        if state != "none":
            pipe.load_lora_weights(lora)
        if state == "fused":
            pipe.fuse_lora()
        return run()

    run()  # warm-up: page cache, oneDNN's kernels
    times: dict[str, list[float]] = {"none": [], "unfused": [], "fused": []}
    for _ in range(args.repeats):
        for state in times:
            times[state].append(with_state(state))
            print(f"  {state:8s} {times[state][-1]:7.2f} s", flush=True)
    base = statistics.median(times["none"])
    for state, values in times.items():
        median = statistics.median(values)
        print(f"{state:8s} median {median:7.2f} s  ({(median / base - 1) * 100:+.1f}% against no LoRA)")


if __name__ == "__main__":
    main()
