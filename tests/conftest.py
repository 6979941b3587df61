import os

import pytest
import torch

from tools import hub_fixtures

# The 2-core machine this runs on: keep the thread count fixed so timings and reductions are repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_prior_repo():
    return hub_fixtures.ensure("tiny", "prior")


@pytest.fixture(scope="session")
def tiny_decoder_repo():
    return hub_fixtures.ensure("tiny", "decoder")


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((ours.double() - ref).norm() / ref.norm()).item()


def parity_bound(ref32: torch.Tensor, ref64: torch.Tensor) -> float:
    """The tolerance the issues set: the reference's own fp32-vs-fp64 distance, or 1e-5 if that is larger."""
    return max(relative_error(ref32, ref64), 1e-5)
