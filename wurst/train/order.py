"""Which samples make up each step's global batch: a fixed function of the dataset, the batch size, the seed and the
step, so that a resumed run (or one on another number of processes) sees the same batches.

Every batch comes from one aspect bucket (its latents must stack). An epoch shuffles each bucket, cuts it into
batches (the last one filled up from the start of the bucket's shuffled order), and shuffles the batches."""

from __future__ import annotations

import functools
import math

import torch

from wurst.train.data import Sample
from wurst.train.objective import sample_seed


class DataOrder:
    def __init__(self, samples: list[Sample], *, batch_size: int, seed: int):
        self.batch_size, self.seed = batch_size, seed
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for sample in samples:
            self.buckets.setdefault((sample.height, sample.width), []).append(sample.index)
        self.steps_per_epoch = sum(math.ceil(len(b) / batch_size) for b in self.buckets.values())

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one order per run, two epochs at a time at most
    def epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, -1 - epoch, -1))  # steps are >= 0
        batches = []
        for bucket in sorted(self.buckets):
            members = self.buckets[bucket]
            shuffled = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            filled = math.ceil(len(shuffled) / self.batch_size) * self.batch_size
            shuffled = [shuffled[i % len(shuffled)] for i in range(filled)]
            batches += [shuffled[i : i + self.batch_size] for i in range(0, filled, self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def batch(self, step: int) -> list[int]:
        """The sample indices of step `step` (0-based), in the order of k, their place in the global batch."""
        epoch, position = divmod(step, self.steps_per_epoch)
        return self.epoch(epoch)[position]
