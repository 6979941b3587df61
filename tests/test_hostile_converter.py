"""tools/convert_weights.py never writes over its own inputs: with --overwrite, an output folder that is, contains or
lies inside an input (--prior, --decoder, --stage-a/b/c, --interpolate, --image-encoder), symlinks resolved, is
refused in one line, exit 2, before anything is written, every input unchanged. (Without this, --out equal to the
hub-layout prior, or to its parent, replaced its prior/ folder with the converted one.)

Each case runs in a fresh process whose address space is capped (tests.helpers.run_module)."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import ROOT, assert_one_line_error, fingerprint, run_module

SECONDS = 60  # the hang guard: a refusal takes about 3 s, a conversion of the tiny models about 10 s
MEMORY = 4 * 2**30  # the address space of each run: wurst with the tiny models needs about 1.2 GB


@pytest.fixture
def inputs(tmp_path, tiny_prior_repo, tiny_decoder_repo, encoder_folder):
    """Copies of the inputs a user converts, in one folder: models/prior and models/decoder in hub layout, a hub
    component folder parts/vqgan, and the image encoder in wurst's layout."""
    shutil.copytree(tiny_prior_repo, tmp_path / "models" / "prior")
    shutil.copytree(tiny_decoder_repo, tmp_path / "models" / "decoder")
    shutil.copytree(tiny_decoder_repo / "vqgan", tmp_path / "parts" / "vqgan")
    shutil.copytree(encoder_folder, tmp_path / "encoder")
    (tmp_path / "link").symlink_to(tmp_path / "models" / "prior")
    return tmp_path


# case: (--out, other options, the text the one error line must hold), paths relative to the inputs' folder
HOSTILE = {
    "out-is-the-prior": ("models/prior", [], "--out {out} is the input --prior {root}/models/prior: choose another"),
    "out-is-the-decoder": ("models/decoder", [], "--out {out} is the input --decoder {root}/models/decoder"),
    "out-holds-the-inputs": ("models", [], "--out {out} contains the input --prior {root}/models/prior"),
    "out-inside-the-prior": ("models/prior/converted", [], "--out {out} lies inside the input --prior"),
    "out-a-link-to-the-prior": ("link", [], "--out {out} is the input --prior"),
    "out-holds-a-stage": ("parts", ["--stage-a", "parts/vqgan"], "--out {out} contains the input --stage-a "
                                                                 "{root}/parts/vqgan"),
    "out-inside-a-stage": ("parts/vqgan/new", ["--stage-a", "parts/vqgan"], "lies inside the input --stage-a"),
    "out-inside-the-image-encoder": ("encoder/converted", ["--image-encoder", "encoder"],
                                     "--out {out} lies inside the input --image-encoder {root}/encoder"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_the_converter_refuses_to_write_over_its_inputs(case, inputs):
    out, options, template = HOSTILE[case]
    out = inputs / out
    options = [str(inputs / value) if value.startswith(("parts", "encoder")) else value for value in options]
    before = fingerprint(inputs)
    result = run_module([ROOT / "tools" / "convert_weights.py", "--prior", inputs / "models" / "prior",
                         "--decoder", inputs / "models" / "decoder", "--out", out, "--overwrite", *options],
                        timeout=SECONDS, memory=MEMORY)
    assert_one_line_error(result.returncode, result.stdout, result.stderr, template.format(out=out, root=inputs),
                          None, prefix="convert_weights: error: ")
    assert fingerprint(inputs) == before  # nothing written, no input changed
