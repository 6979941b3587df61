"""CLIP text encoder parity with transformers' CLIPTextModel, on the hub-layout fixtures."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel

from tests.helpers import RSS_PROBE, parity_bound, relative_error
from tests.prompts import PROMPTS
from tools import hub_fixtures
from wurst import PromptTruncatedWarning, load_clip_text_encoder
from wurst.weights.tokenizer_files import read_tokenizer

SAMPLE = ["", "a photo of a cat", "Anthropomorphic cat dressed as a fire fighter", PROMPTS[20], PROMPTS[-4]]


def tokens(repo_dir, prompts=SAMPLE):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return read_tokenizer(repo_dir / "tokenizer")(prompts)


@torch.no_grad()
def check_parity(text_encoder_dir, ids, mask, ours=None):
    ours = ours or load_clip_text_encoder(text_encoder_dir)
    got = ours(ids, mask)
    ref = CLIPTextModel.from_pretrained(text_encoder_dir).eval()
    ref32 = ref(ids, attention_mask=mask).last_hidden_state
    ref64 = ref.double()(ids, attention_mask=mask).last_hidden_state
    del ref
    assert got.shape == ref32.shape and got.dtype == torch.float32
    # Pad positions must differ from one another (the mask reaches them); otherwise the test sees less.
    assert not torch.allclose(got[0, 5], got[0, 6])
    error, bound = relative_error(got, ref32), parity_bound(ref32, ref64)
    assert error <= bound, f"relative error {error:.2e} > bound {bound:.2e}"
    return error, bound


@pytest.mark.parametrize("repo", ["prior", "decoder"])
def test_tiny_parity(repo, tiny_prior_repo, tiny_decoder_repo):
    repo_dir = tiny_prior_repo if repo == "prior" else tiny_decoder_repo
    ids, mask = tokens(repo_dir)
    check_parity(repo_dir / "text_encoder", ids, mask)


def test_mask_matters(tiny_prior_repo):
    """Without the padding mask the pad positions change, so passing it is not a no-op."""
    ids, mask = tokens(tiny_prior_repo, ["a photo of a cat"])
    model = load_clip_text_encoder(tiny_prior_repo / "text_encoder")
    with torch.no_grad():
        masked, unmasked = model(ids, mask), model(ids)
    assert torch.equal(masked[:, :7], unmasked[:, :7])
    assert not torch.allclose(masked[:, 7:], unmasked[:, 7:])


def test_transformers5_sharded_layout_loads(tmp_path, tiny_prior_repo):
    """transformers 5 writes names without the "text_model." prefix, and shards with an index."""
    config = hub_fixtures.component_config("prior", "text_encoder", "tiny")
    hub_fixtures.write_text_encoder(tmp_path, config, seed=11, key_style="transformers5:2MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids, mask = tokens(tiny_prior_repo)
    check_parity(tmp_path, ids, mask)


def test_fp16_variant_and_dtype(tmp_path, tiny_prior_repo):
    src = tiny_prior_repo / "text_encoder"
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    reference = load_clip_text_encoder(src)
    state = {"text_model." + k: v for k, v in hub_fixtures_state(src).items()}
    save_file({k: v.half() for k, v in state.items()}, tmp_path / "model.fp16.safetensors")
    half = load_clip_text_encoder(tmp_path)
    assert half.token_embedding.weight.dtype == torch.float16
    upcast = load_clip_text_encoder(tmp_path, dtype=torch.float32)
    assert upcast.token_embedding.weight.dtype == torch.float32
    assert torch.equal(upcast.token_embedding.weight, reference.token_embedding.weight.half().float())
    bf16 = load_clip_text_encoder(src, dtype=torch.bfloat16)
    ids, mask = tokens(tiny_prior_repo, ["a photo of a cat"])
    with torch.no_grad():
        assert relative_error(bf16(ids, mask).float(), reference(ids, mask)) < 0.05


def hub_fixtures_state(folder):
    from safetensors.torch import load_file

    return {k.removeprefix("text_model."): v for k, v in load_file(folder / "model.safetensors").items()}


def test_every_weight_is_randomised(tiny_prior_repo, tiny_decoder_repo):
    """The fixture's LayerNorms are not at their 1/0 init, so a swapped or dropped norm would show."""
    for repo_dir in (tiny_prior_repo, tiny_decoder_repo):
        state = hub_fixtures_state(repo_dir / "text_encoder")
        for name, tensor in state.items():
            assert not torch.all(tensor == tensor.flatten()[0]), name


# ---------------------------------------------------------------------------------------------------------
# Published sizes (bigG: 1280 wide, 32 layers, 20 heads; H: 1024 wide, 24 layers, 16 heads)


@pytest.mark.slow
@pytest.mark.parametrize("repo,width,layers", [("prior", 1280, 32), ("decoder", 1024, 24)])
def test_published_parity(repo, width, layers):
    repo_dir = hub_fixtures.ensure("published", repo, ("text_encoder", "tokenizer"))
    config = json.loads((repo_dir / "text_encoder" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (width, layers)
    ids, mask = tokens(repo_dir, SAMPLE[1:4])
    error, bound = check_parity(repo_dir / "text_encoder", ids, mask)
    print(f"{repo} text encoder: relative error {error:.2e}, fp32-vs-fp64 bound {bound:.2e}")


LOAD_AND_RUN = RSS_PROBE + """
import sys, torch, wurst
before = rss("VmRSS")
model = wurst.load_clip_text_encoder(sys.argv[1])
assert not any(p.is_meta for p in model.parameters())
with torch.no_grad():
    model(torch.tensor([[49406, 320, 1125, 49407]]))
print(rss("VmHWM") - before)
"""


@pytest.mark.slow
def test_published_load_keeps_one_copy():
    """Peak RSS of loading bigG and running it once stays near one copy of its weights: no random init first,
    no second copy while loading."""
    folder = hub_fixtures.ensure("published", "prior", ("text_encoder",)) / "text_encoder"
    weight_bytes = (folder / "model.safetensors").stat().st_size
    out = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(folder)], capture_output=True, text=True,
                         check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    print(f"weights {weight_bytes / 2**30:.2f} GiB, peak RSS growth {growth / 2**30:.2f} GiB")
    assert growth <= 1.2 * weight_bytes
