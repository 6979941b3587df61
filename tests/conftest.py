import importlib.util
import os

import pytest
import torch

from tools import hub_fixtures
from wurst import Pipeline

# The 2-core machine this runs on: keep the thread count fixed so timings and reductions are repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def import_torchvision_beside_cpu_torch() -> None:
    """torchvision is a test-only dependency (the image encoder's reference). PyPI's Linux wheel is built for CUDA
    torch: beside the CPU torch its C extension does not load, and its import then fails registering fakes for
    two detection ops, which also breaks transformers (it imports torchvision when installed). Declaring those two
    ops first lets the import succeed; nothing here uses torchvision's C operators."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision_beside_cpu_torch.library = library  # the definitions live as long as it does
        import torchvision  # noqa: F401


import_torchvision_beside_cpu_torch()


@pytest.fixture(scope="session")
def tiny_prior_repo():
    return hub_fixtures.ensure("tiny", "prior")


@pytest.fixture(scope="session")
def tiny_decoder_repo():
    return hub_fixtures.ensure("tiny", "decoder")


@pytest.fixture(scope="module")
def pipe(tiny_prior_repo, tiny_decoder_repo):
    """The tiny pipeline in float32 on the CPU, shared by the tests of one module."""
    return Pipeline.from_pretrained(tiny_prior_repo, tiny_decoder_repo, device="cpu", dtype=torch.float32)


@pytest.fixture
def out_dir(tmp_path):
    """An output folder that does not exist yet: a test that writes nothing leaves it absent or empty."""
    return tmp_path / "out"
