"""heap.kept_heap: while a model runs, large freed blocks are reused instead of coming back as fresh (faulting)
pages; afterwards the free memory goes back to the system; pipelines run every model inside it."""

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wurst
from wurst.runtime import heap

pytestmark = pytest.mark.skipif(heap._LIBC is None, reason="glibc's malloc only")

BLOCK = 64 << 20  # above glibc's largest mmap threshold (32 MiB) by default
PAGES = BLOCK // 4096
ROOT = Path(__file__).resolve().parents[2]
REPEATS = 8  # without kept_heap, up to 8 * PAGES faults
KEPT = 3 * PAGES  # inside: the heap may grow a time or two before a freed block fits the next; then none


def faults_of_repeated_blocks(repeats: int = REPEATS) -> int:
    """Page faults of allocating, filling and freeing a BLOCK `repeats` times, after one such block first."""
    torch.ones(BLOCK // 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        torch.ones(BLOCK // 4)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


# Outside, in a fresh interpreter; then inside; then inside, after a nested kept_heap has left (which must not
# restore anything). In this interpreter, where earlier tests left free memory decides whether glibc maps a block
# afresh outside.
SCRIPT = """
from tests.runtime.test_heap import faults_of_repeated_blocks, heap
print(faults_of_repeated_blocks())
with heap.kept_heap():
    print(faults_of_repeated_blocks())
    with heap.kept_heap():
        pass
    print(faults_of_repeated_blocks())
"""


def test_freed_blocks_are_reused_inside_and_mapped_afresh_outside():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=120)
    outside, inside, after_nested = (int(line) for line in run.stdout.split())
    assert outside > REPEATS * PAGES * 3 // 4
    assert inside < KEPT
    assert after_nested < KEPT


def test_free_memory_goes_back_to_the_system_on_leaving():
    with heap.kept_heap():
        blocks = [torch.ones(BLOCK // 4) for _ in range(4)]
        del blocks
        kept = resident_bytes()
    assert resident_bytes() < kept - 3 * BLOCK


def test_pipelines_run_every_model_inside_it(tiny_prior_repo, tiny_decoder_repo, monkeypatch):
    pipe = wurst.WuerstchenCombinedPipeline.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo)
    pipe.set_progress_bar_config(disable=True)
    depths = {}

    def record(name):
        depths.setdefault(name, heap._depth)

    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            module.register_forward_pre_hook(lambda module, args, name=name: record(name))
    decode = pipe.vqgan.decode
    monkeypatch.setattr(pipe.vqgan, "decode", lambda latents: record("vqgan") or decode(latents))
    pipe("a cat", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2, output_type="pt")
    assert set(depths) == {"prior_text_encoder", "prior_prior", "text_encoder", "decoder", "vqgan"}
    assert all(depth >= 1 for depth in depths.values()), depths
    assert heap._depth == 0
