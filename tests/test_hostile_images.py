"""Hostile image files through `python -m wurst --image`: a named pipe, a link to /dev/zero, decompression bombs
(refused from the header's size, before anything is decoded), and strips of absurd aspect ratio (accepted: the
center is cut out before it is scaled, so that a 20000x1 image at 1024x1024 no longer asks for 141 GB).

Each case runs in a fresh process whose address space is capped (tests.helpers.run_module): where these checks are
missing, a hang fails the test at its time guard and a huge allocation fails at once, without taking the machine's
memory. A refusal is one line naming the image, exit 2, no output file, the input folder unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import ONE_STEP, SHORT_PROMPT, assert_one_line_error, fingerprint, not_a_regular_file, run_module
from tests.support.image_fixtures import decompression_bomb, photo

SECONDS = 60  # the hang guard: a refusal takes about 3 s, a strip's whole 1024x1024 run about 10 s
MEMORY = 4 * 2**30  # the address space of each run: wurst with the tiny models needs about 1.2 GB
LIMIT = Image.MAX_IMAGE_PIXELS  # Pillow's default, 89478485 pixels


def named_pipe(folder: Path) -> Path:
    return not_a_regular_file(folder / "pipe.png", "pipe")


def link_to_dev_zero(folder: Path) -> Path:
    return not_a_regular_file(folder / "zero.png", "zero")


def bomb(width: int, height: int):
    return lambda folder: decompression_bomb(folder / "bomb.png", width, height)


# case: (make the image in a folder, the text the one error line must hold; {path} is the image)
HOSTILE = {
    "named-pipe": (named_pipe, "image {path} is not a regular file (a named pipe)"),
    "link-to-dev-zero": (link_to_dev_zero, "image {path} is not a regular file (a character device)"),
    # Pillow refuses these on opening, with an exception of its own
    "bomb-past-twice-the-limit": (bomb(100_000, 100_000), f"image {{path}} is over the limit of {LIMIT} pixels"),
    # Pillow only warns about these, then decodes them
    "bomb-past-the-limit": (bomb(10_000, 10_000), f"image {{path}} is 10000x10000 pixels, over the limit of {LIMIT}"),
    "strip-past-the-limit": (bomb(LIMIT + 1, 1), f"is {LIMIT + 1}x1 pixels, over the limit of {LIMIT}"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_images_are_refused_in_one_line(case, tmp_path, tiny_prior_repo, tiny_decoder_repo):
    make, template = HOSTILE[case]
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    image = make(inputs)
    before = fingerprint(inputs)
    result = run_module(["-m", "wurst", SHORT_PROMPT, "--image", image, *ONE_STEP, "--prior", tiny_prior_repo,
                         "--decoder", tiny_decoder_repo, "--output", out / "x.png"], timeout=SECONDS, memory=MEMORY)
    assert_one_line_error(result.returncode, result.stdout, result.stderr, template.format(path=image), out)
    assert fingerprint(inputs) == before


# The encoder's input is the center of the target's aspect, cut out of the strip in its own pixels (one pixel
# here) and scaled: every pixel of the 768x768 input of a 1024x1024 request is the strip's center pixel.
STRIP_CHECK = """
import sys
import torch
from wurst.pipelines.preprocess import normalize, preprocess, to_tensor
path = sys.argv[1]
source = to_tensor(path)
h, w = source.shape[-2:]
center = source[:, (h - 1) // 2, (w - 1) // 2]
encoded = preprocess([path], 768, 768)
assert encoded.shape == (1, 3, 768, 768), encoded.shape
assert torch.allclose(encoded[0], normalize(center.view(3, 1, 1).expand(3, 768, 768)), atol=1e-6)
print("center")
"""


@pytest.mark.parametrize("height, width", [(1, 20000), (20000, 1)], ids=["wide", "tall"])
def test_a_strip_is_cut_to_the_target_before_it_is_scaled(height, width, tmp_path, tiny_prior_repo,
                                                          tiny_decoder_repo, encoder_folder):
    """Accepted, in bounded memory and time: the whole CLI run at 1024x1024, and the encoder's input checked."""
    strip = tmp_path / "strip.png"
    Image.fromarray(photo(height, width)).save(strip)
    check = run_module(["-c", STRIP_CHECK, strip], timeout=SECONDS, memory=MEMORY)
    assert check.returncode == 0 and check.stdout == "center\n", check.stderr
    out = tmp_path / "out"
    result = run_module(["-m", "wurst", SHORT_PROMPT, "--image", strip, "--prior-steps", "1", "--decoder-steps", "1",
                         "--prior", tiny_prior_repo, "--decoder", tiny_decoder_repo, "--image-encoder",
                         encoder_folder, "--output", out / "x.png"], timeout=SECONDS, memory=MEMORY)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out / 'x.png'}\n" and "Traceback" not in result.stderr
    assert Image.open(out / "x.png").size == (1024, 1024) and sorted(os.listdir(out)) == ["x.png"]
