import os

import pytest
import torch

from tools import hub_fixtures  # first: see tools/__init__.py
from wurst import WuerstchenCombinedPipeline

# The 2-core machine this runs on: keep the thread count fixed so timings and reductions are repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_prior_repo():
    return hub_fixtures.ensure("tiny", "prior")


@pytest.fixture(scope="session")
def tiny_decoder_repo():
    return hub_fixtures.ensure("tiny", "decoder")


@pytest.fixture(scope="module")
def pipe(tiny_prior_repo, tiny_decoder_repo):
    """The tiny combined pipeline in float32 on the CPU, its models resident, no progress bars; shared by the tests
    of one module."""
    pipe = WuerstchenCombinedPipeline.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo,
                                                      torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    """A tiny Stage C image encoder (random weights) in a folder of wurst's converted layout."""
    from tests.support.image_fixtures import tiny_encoder
    from wurst.weights import image_encoder

    return image_encoder.save_converted(tiny_encoder(), tmp_path_factory.mktemp("encoder"))


@pytest.fixture
def out_dir(tmp_path):
    """An output folder that does not exist yet: a test that writes nothing leaves it absent or empty."""
    return tmp_path / "out"
