"""wurst.weights.save: what save_pretrained writes. The files against the fixtures diffusers and transformers wrote
(tensors under the hub's names, configs against the published ones), read back by diffusers' and transformers'
own loaders, variants (written and read, diffusers' sharded variant naming), and the folder rules: one atomic
replacement, an earlier save's files replaced or kept, foreign folders and bad arguments refused."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel
from transformers import CLIPTokenizer as HFCLIPTokenizer

import wurst
from tests.helpers import files_in
from tests.prompts import PROMPTS
from tools.hub_fixtures import CONFIGS
from wurst import ArgumentError, CheckpointError, ModelNotFoundError
from wurst.weights import save
from wurst.weights.configs import read_config
from wurst.weights.convert import convert
from wurst.weights.model_card import card_prior
from wurst.weights.repository import KINDS
from wurst.weights.spec import COMPONENTS
from wurst.weights.tokenizer_files import read_tokenizer

# Each saved model file (relative to the combined save) and the fixture file it must equal.
MODEL_FILES = {
    "prior/prior/diffusion_pytorch_model": ("prior", "prior/diffusion_pytorch_model"),
    "prior/text_encoder/model": ("prior", "text_encoder/model"),
    "decoder/diffusion_pytorch_model": ("decoder", "decoder/diffusion_pytorch_model"),
    "vqgan/diffusion_pytorch_model": ("decoder", "vqgan/diffusion_pytorch_model"),
    "text_encoder/model": ("decoder", "text_encoder/model"),
}


@pytest.fixture(scope="module")
def combined(tiny_prior_repo, tiny_decoder_repo):
    return wurst.WuerstchenCombinedPipeline.from_pretrained(tiny_decoder_repo, prior_repo=tiny_prior_repo)


@pytest.fixture(scope="module")
def saved(combined, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "wuerstchen"
    combined.save_pretrained(folder)
    return folder


def fixture_file(kind, stem, tiny_prior_repo, tiny_decoder_repo, variant=""):
    return (tiny_prior_repo if kind == "prior" else tiny_decoder_repo) / f"{stem}{variant}.safetensors"


# ---------------------------------------------------------------------------------------------------------
# The files


@pytest.mark.parametrize("saved_stem", list(MODEL_FILES))
def test_weights_are_the_fixtures_tensors_under_the_hub_names(saved_stem, saved, tiny_prior_repo, tiny_decoder_repo):
    kind, stem = MODEL_FILES[saved_stem]
    expected = load_file(fixture_file(kind, stem, tiny_prior_repo, tiny_decoder_repo))
    path = saved / f"{saved_stem}.safetensors"
    got = load_file(path)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_the_layout_the_combined_pipeline_reads_back(saved):
    """The decoder repository at the top, the prior repository in prior/, named by the model card."""
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == "WuerstchenDecoderPipeline"
    assert json.loads((saved / "prior" / "model_index.json").read_text())["_class_name"] == "WuerstchenPriorPipeline"
    assert card_prior(saved) == "prior"
    assert files_in(saved / "scheduler") == ["scheduler_config.json"]
    assert files_in(saved / "tokenizer") == ["merges.txt", "special_tokens_map.json", "tokenizer.json",
                                             "tokenizer_config.json", "vocab.json"]


@pytest.mark.parametrize("repo", ["wuerstchen-prior", "wuerstchen"])
def test_configs_are_the_published_ones(repo):
    """Every config.json written from the published configs equals the published file (the prior's text encoder
    but in projection_dim, which these encoders do not use); model_index.json and the scheduler's too."""
    published = CONFIGS / repo
    kind = "prior" if repo == "wuerstchen-prior" else "decoder"
    for component in KINDS[kind].components:
        expected = json.loads((published / component / "config.json").read_text())
        config = read_config(COMPONENTS[component].config_cls, published / component / "config.json")
        got = save.hub_model_config(component, config, dtype=torch.float32)
        if repo == "wuerstchen-prior" and component == "text_encoder":
            assert (got.pop("projection_dim"), expected.pop("projection_dim")) == (1280, 512)
        assert got == expected, component


@pytest.mark.parametrize("kind", ["prior", "decoder"])
def test_model_index_scheduler_and_tokenizer_configs_are_the_published_ones(kind, saved):
    folder, published = (saved / "prior", CONFIGS / "wuerstchen-prior") if kind == "prior" else (
        saved, CONFIGS / "wuerstchen")
    for name in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json",
                 "tokenizer/special_tokens_map.json"):
        assert json.loads((folder / name).read_text()) == json.loads((published / name).read_text()), name


# ---------------------------------------------------------------------------------------------------------
# diffusers' and transformers' loaders


DIFFUSERS_MODELS = {"prior/prior": WuerstchenPrior, "decoder": WuerstchenDiffNeXt, "vqgan": PaellaVQModel}


def forward(model, generator):
    """One forward pass of a diffusers Würstchen model on random inputs."""
    if isinstance(model, WuerstchenPrior):
        c = model.config
        return model(torch.randn(1, c.c_in, 4, 4, generator=generator), torch.rand(1, generator=generator),
                     torch.randn(1, 77, c.c_cond, generator=generator))
    if isinstance(model, WuerstchenDiffNeXt):
        c = model.config
        return model(torch.randn(1, c.c_in, 16, 16, generator=generator), torch.rand(1, generator=generator),
                     torch.randn(1, c.effnet_embd, 2, 2, generator=generator),
                     torch.randn(1, 77, c.clip_embd, generator=generator))
    return model(torch.rand(1, 3, 32, 32, generator=generator)).sample


@pytest.mark.parametrize("where", list(DIFFUSERS_MODELS))
@torch.no_grad()
def test_diffusers_loads_each_model(where, saved, tiny_prior_repo, tiny_decoder_repo):
    repo, component = (tiny_prior_repo, "prior") if where == "prior/prior" else (tiny_decoder_repo, where)
    model_cls = DIFFUSERS_MODELS[where]
    parent, _, subfolder = str(saved / where).rpartition("/")
    got = model_cls.from_pretrained(parent, subfolder=subfolder).eval()
    expected = model_cls.from_pretrained(repo, subfolder=component).eval()
    own = ("_diffusers_version", "_name_or_path")  # who wrote the file, and where it was read from
    assert {k: v for k, v in got.config.items() if k not in own} == {
        k: v for k, v in expected.config.items() if k not in own}
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert sorted(got_state) == sorted(expected_state)
    assert all(torch.equal(got_state[k], v) for k, v in expected_state.items())
    # Equal tensors, but wurst starts them on 64-byte boundaries and safetensors on 8-byte ones, and the CPU
    # kernels' rounding can follow the alignment of a memory-mapped weight: one float32 ulp, not bit for bit.
    torch.testing.assert_close(forward(got, torch.Generator().manual_seed(0)),
                               forward(expected, torch.Generator().manual_seed(0)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("where", ["prior", "."])
@pytest.mark.filterwarnings("ignore::wurst.models.tokenizer.PromptTruncatedWarning")
def test_transformers_loads_the_text_encoder_and_tokenizer(where, saved, tiny_prior_repo, tiny_decoder_repo):
    repo, folder = (tiny_prior_repo, saved / "prior") if where == "prior" else (tiny_decoder_repo, saved)
    got_tokenizer = HFCLIPTokenizer.from_pretrained(folder / "tokenizer")
    expected_tokenizer = HFCLIPTokenizer.from_pretrained(repo / "tokenizer")
    settings = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    got_tokens, expected_tokens = got_tokenizer(PROMPTS, **settings), expected_tokenizer(PROMPTS, **settings)
    assert torch.equal(got_tokens.input_ids, expected_tokens.input_ids)
    assert torch.equal(got_tokens.attention_mask, expected_tokens.attention_mask)
    got, expected = (CLIPTextModel.from_pretrained(f / "text_encoder").eval() for f in (folder, repo))
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert sorted(got_state) == sorted(expected_state)
    assert all(torch.equal(got_state[k], v) for k, v in expected_state.items())
    with torch.no_grad():
        assert torch.equal(got(expected_tokens.input_ids).last_hidden_state,
                           expected(expected_tokens.input_ids).last_hidden_state)
    # and wurst's own reader, of both tokenizer layouts (the prior fixture's tokenizer.json, the decoder's vocab)
    ours, original = read_tokenizer(folder / "tokenizer"), read_tokenizer(repo / "tokenizer")
    for got_ids, expected_ids in zip(ours(PROMPTS), original(PROMPTS), strict=True):
        assert torch.equal(got_ids, expected_ids)


def test_diffusers_loads_the_scheduler(saved):
    scheduler = DDPMWuerstchenScheduler.from_pretrained(saved, subfolder="scheduler")
    assert (scheduler.config.s, scheduler.config.scaler) == (0.008, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Variants


@pytest.mark.parametrize(("variant", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_variant_files_are_cast_and_read_back(variant, dtype, combined, tmp_path, tiny_prior_repo,
                                              tiny_decoder_repo):
    combined.save_pretrained(tmp_path / "v", variant=variant)
    for saved_stem, (kind, stem) in MODEL_FILES.items():
        assert not (tmp_path / "v" / f"{saved_stem}.safetensors").exists()
        got = load_file(tmp_path / "v" / f"{saved_stem}.{variant}.safetensors")
        expected = load_file(fixture_file(kind, stem, tiny_prior_repo, tiny_decoder_repo))
        assert all(torch.equal(got[k], v.to(dtype)) for k, v in expected.items()), saved_stem
        assert sorted(got) == sorted(expected)
    assert json.loads((tmp_path / "v" / "text_encoder" / "config.json").read_text())["torch_dtype"] == str(dtype)[6:]
    back = wurst.WuerstchenCombinedPipeline.from_pretrained(tmp_path / "v", variant=variant, torch_dtype=dtype)
    for name in ("prior_prior", "prior_text_encoder", "decoder", "vqgan", "text_encoder"):
        for key, tensor in getattr(combined, name).state_dict().items():
            assert torch.equal(getattr(back, name).state_dict()[key], tensor.to(dtype)), (name, key)
    # diffusers and transformers read the same files
    prior = WuerstchenPrior.from_pretrained(tmp_path / "v" / "prior", subfolder="prior", variant=variant,
                                            torch_dtype=dtype)
    assert torch.equal(prior.state_dict()["out.1.weight"], combined.prior_prior.head.weight.to(dtype))
    text = CLIPTextModel.from_pretrained(tmp_path / "v" / "text_encoder", variant=variant)
    assert torch.equal(text.state_dict()["final_layer_norm.weight"].to(dtype),
                       combined.text_encoder.final_norm.weight.to(dtype))


def test_a_variant_saved_beside_the_plain_weights_keeps_them(combined, tmp_path):
    """As hub repositories hold them: fp32 files and fp16 ones side by side, each read by its variant."""
    combined.save_pretrained(tmp_path / "both")
    combined.save_pretrained(tmp_path / "both", variant="fp16")
    assert (tmp_path / "both" / "decoder" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "both" / "decoder" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    plain = wurst.WuerstchenDecoderPipeline.from_pretrained(tmp_path / "both")
    half = wurst.WuerstchenDecoderPipeline.from_pretrained(tmp_path / "both", variant="fp16")
    weight = combined.decoder.head.weight
    assert torch.equal(plain.decoder.head.weight, weight)
    assert torch.equal(half.decoder.head.weight, weight.half().float())


def test_missing_or_bad_variants_are_named(saved, tmp_path, tiny_prior_repo):
    with pytest.raises(ModelNotFoundError, match="diffusion_pytorch_model.bf16.safetensors"):
        wurst.WuerstchenPriorPipeline.from_pretrained(saved / "prior", variant="bf16")
    with pytest.raises(ArgumentError, match="variant"):
        wurst.WuerstchenPriorPipeline.from_pretrained(saved / "prior", variant="../fp16")
    convert(tmp_path / "converted", prior=tiny_prior_repo, decoder=saved)
    with pytest.raises(ArgumentError, match="converted layout"):
        wurst.WuerstchenPriorPipeline.from_pretrained(tmp_path / "converted" / "prior", variant="fp16")


def test_sharded_variant_as_diffusers_names_it(tmp_path, tiny_prior_repo):
    """diffusers names a sharded variant's index `<stem>.safetensors.index.fp16.json`."""
    ref = WuerstchenPrior.from_pretrained(tiny_prior_repo / "prior")
    folder = tmp_path / "repo"
    folder.mkdir()
    for name in ("model_index.json", "text_encoder", "tokenizer", "scheduler"):
        (folder / name).symlink_to(tiny_prior_repo / name)
    ref.half().save_pretrained(folder / "prior", variant="fp16", max_shard_size="40KB")
    assert (folder / "prior" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    pipe = wurst.WuerstchenPriorPipeline.from_pretrained(folder, variant="fp16")
    assert torch.equal(pipe.prior.head.weight, ref.state_dict()["out.1.weight"].float())


# ---------------------------------------------------------------------------------------------------------
# The folder: atomic, what an earlier save's files become, refusals


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in files_in(folder)}


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupted"])
@pytest.mark.parametrize("over_an_earlier_save", [False, True], ids=["new", "over-earlier"])
def test_a_failed_save_leaves_nothing_half_written(error, over_an_earlier_save, combined, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    if over_an_earlier_save:
        combined.save_pretrained(folder, variant="bf16")
    before = snapshot(folder) if over_an_earlier_save else None
    written = []

    def failing(path, tensors, dtype=None):
        if len(written) == 2:  # the third model: the decoder and the VQGAN are written, with their configs
            raise error
        written.append(path)
        return real(path, tensors, dtype)

    real = save.save_weights
    monkeypatch.setattr(save, "save_weights", failing)
    with pytest.raises(type(error)) as info:
        combined.save_pretrained(folder)
    if isinstance(error, OSError):
        assert str(info.value) == f"[Errno {errno.ENOSPC}] cannot save to {folder}: No space left on device"
    assert files_in(tmp_path) == (sorted(f"out/{name}" for name in before) if before else [])
    if before:
        assert snapshot(folder) == before


def test_an_unwritable_place_is_named(combined, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError, match=f"cannot save to {tmp_path / 'file' / 'out'}: Not a directory"):
        combined.save_pretrained(tmp_path / "file" / "out")
    assert files_in(tmp_path) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_named(combined, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        with pytest.raises(OSError, match=f"cannot save to {tmp_path / 'ro' / 'out'}: Permission denied"):
            combined.save_pretrained(tmp_path / "ro" / "out")
        assert files_in(tmp_path / "ro") == []
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_saving_over_an_earlier_save_replaces_what_it_writes_and_keeps_the_rest(combined, tmp_path):
    folder = tmp_path / "out"
    combined.save_pretrained(folder)
    combined.save_pretrained(folder, variant="fp16")
    extra = {  # files an earlier save, a user or a hub clone left, and whether they survive
        ".gitattributes": True, "notes/run.txt": True, "prior/notes.txt": True,
        "decoder/diffusion_pytorch_model-00001-of-00002.safetensors": False,  # stale shards of the plain weights
        "decoder/diffusion_pytorch_model.safetensors.index.json": False,
        "decoder/diffusion_pytorch_model.fp16.safetensors": True,  # another variant's
        "prior/prior/diffusion_pytorch_model.safetensors.index.json": False,
        "tokenizer/added_tokens.json": False, "scheduler/old.json": False, "wurst.json": False,
    }
    for name in extra:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("old")
    (folder / "README.md").write_text("---\nlicense: mit\nprior:\n- somewhere/else\n---\n\nMy own card.\n")
    weights = folder / "vqgan" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"stale")
    combined.save_pretrained(folder)
    for name, survives in extra.items():
        assert (folder / name).exists() == survives, name
        assert not survives or (folder / name).read_text() == "old"
    assert card_prior(folder) == "prior" and "My own card." in (folder / "README.md").read_text()
    assert "license: mit" in (folder / "README.md").read_text()
    assert weights.read_bytes() != b"stale"
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    wurst.WuerstchenCombinedPipeline.from_pretrained(folder)  # reads what was written


def test_a_decoder_keeps_the_hub_prior_its_card_named(tiny_decoder_repo, tmp_path):
    decoder = wurst.WuerstchenDecoderPipeline.from_pretrained(tiny_decoder_repo)
    decoder.save_pretrained(tmp_path / "decoder")
    assert card_prior(tmp_path / "decoder") == "warp-ai/wuerstchen-prior"
    again = wurst.WuerstchenDecoderPipeline.from_pretrained(tmp_path / "decoder")
    again.save_pretrained(tmp_path / "again")
    assert card_prior(tmp_path / "again") == "warp-ai/wuerstchen-prior"
    built = wurst.WuerstchenDecoderPipeline(**decoder.components)  # built from parts: it names no prior
    built.save_pretrained(tmp_path / "built")
    assert not (tmp_path / "built" / "README.md").exists()


@pytest.mark.parametrize(("call", "culprit"), [
    (dict(safe_serialization=False), "safe_serialization=False"),
    (dict(variant="fp16/../x"), "variant must be a name"),
    (dict(variant=16), "variant must be a name"),
    (dict(save_directory=3), "save_directory must be a folder path"),
])
def test_bad_arguments_are_refused_before_anything_is_written(call, culprit, combined, tmp_path):
    kwargs = {"save_directory": tmp_path / "out", **call}
    with pytest.raises(ArgumentError) as info:
        combined.save_pretrained(**kwargs)
    assert culprit in str(info.value) and "\n" not in str(info.value)
    assert files_in(tmp_path) == []


def test_a_folder_of_other_files_or_a_file_is_refused(combined, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ArgumentError, match="holds files but no saved pipeline"):
        combined.save_pretrained(tmp_path / "mine")
    assert files_in(tmp_path) == ["mine/thesis.tex"]
    with pytest.raises(ArgumentError, match="is a file"):
        combined.save_pretrained(tmp_path / "mine" / "thesis.tex")
    (tmp_path / "empty").mkdir()
    combined.prior_pipe.save_pretrained(tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "model_index.json").is_file()


def test_a_tensor_without_a_hub_name_is_refused_and_nothing_written(tiny_prior_repo, tmp_path):
    pipe = wurst.WuerstchenPriorPipeline.from_pretrained(tiny_prior_repo)
    pipe.prior.register_buffer("extra", torch.zeros(1))
    with pytest.raises(CheckpointError, match="cannot save the prior: its tensor 'extra' has no name"):
        pipe.save_pretrained(tmp_path / "out")
    assert files_in(tmp_path) == []
