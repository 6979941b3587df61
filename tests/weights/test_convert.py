"""tools/convert_weights.py: the compact wurst layout loads through the pipelines' from_pretrained and gives identical
images; casts, Stage C interpolation and refusals: an existing output, and original-format .pt files that are not
plain tensors (weights-only loading refuses them in one line, runs nothing and writes nothing)."""

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import PROMPT, ROOT, RunsCode, files_in, run_module
from tools import convert_weights, hub_fixtures
from wurst import ModelNotFoundError, WuerstchenCombinedPipeline, WuerstchenPriorPipeline
from wurst.weights import convert as convert_module
from wurst.weights.convert import load_stage
from wurst.weights.repository import read_repository

RUN = dict(height=256, width=128, prior_num_inference_steps=4, num_inference_steps=12, output_type="pt")


def images(prior, decoder, seed=3):
    pipe = WuerstchenCombinedPipeline.from_pretrained(decoder, prior_repo=prior, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **RUN).images


def stage_c(repo):
    return read_repository(repo, "prior").load("prior", dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_prior_repo, tiny_decoder_repo):
    out = tmp_path_factory.mktemp("converted")
    assert convert_weights.main(["--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo),
                                 "--out", str(out)]) == 0
    return out


def test_converted_layout_gives_identical_images(converted, tiny_prior_repo, tiny_decoder_repo):
    assert torch.equal(images(converted / "prior", converted / "decoder"), images(tiny_prior_repo, tiny_decoder_repo))


def to_release_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub names -> the dome272 release names: q, k, v fused into nn.MultiheadAttention's in_proj, the
    codebook under its original name. The inverse of what wurst.weights.original undoes."""
    out = {}
    for name, tensor in state.items():
        stem, _, leaf = name.partition("attention.")
        if leaf.startswith("to_q."):
            kind = leaf.split(".")[-1]
            parts = [state[f"{stem}attention.to_{p}.{kind}"] for p in "qkv"]
            out[f"{stem}attention.attn.in_proj_{kind}"] = torch.cat(parts)
        elif leaf.startswith("to_out.0."):
            out[f"{stem}attention.attn.out_proj.{leaf.split('.')[-1]}"] = tensor
        elif not leaf.startswith(("to_k.", "to_v.")):
            out[name.replace("vquantizer.embedding.", "vquantizer.codebook.")] = tensor
    return out


def test_original_release_files_give_identical_images(tmp_path, converted, tiny_prior_repo, tiny_decoder_repo):
    files = {}
    for flag, folder, repo, key in [("--stage-c", "prior", tiny_prior_repo, "ema_state_dict"),
                                    ("--stage-b", "decoder", tiny_decoder_repo, "state_dict"),
                                    ("--stage-a", "vqgan", tiny_decoder_repo, "state_dict")]:
        release = to_release_layout(load_file(repo / folder / "diffusion_pytorch_model.safetensors"))
        assert any("in_proj" in k or "codebook" in k for k in release)
        files[flag] = tmp_path / f"{folder}.pt"
        torch.save({key: release, "iter": 1}, files[flag])
    out = tmp_path / "from-release"
    argv = ["--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo), "--out", str(out)]
    assert convert_weights.main(argv + [x for flag, path in files.items() for x in (flag, str(path))]) == 0
    assert torch.equal(images(out / "prior", out / "decoder"), images(converted / "prior", converted / "decoder"))


def test_converted_layout_is_one_file_per_model(converted):
    common = ["text_encoder.safetensors", "tokenizer", "wurst.json"]
    assert sorted(p.name for p in (converted / "prior").iterdir()) == ["stage_c.safetensors", *common]
    assert sorted(p.name for p in (converted / "decoder").iterdir()) == [
        "README.md", "stage_a.safetensors", "stage_b.safetensors", *common]
    index = json.loads((converted / "decoder" / "wurst.json").read_text())
    assert index["kind"] == "decoder" and index["models"]["stage_b"]["c_hidden"] == [16, 32, 32, 32]
    with safe_open(converted / "prior" / "stage_c.safetensors", "pt") as f:
        assert "blocks.2.q_proj.weight" in f.keys()  # wurst's own module names


def test_cast_to_bfloat16(tmp_path, tiny_prior_repo, tiny_decoder_repo, converted):
    assert convert_weights.main(["--prior", str(converted / "prior"), "--decoder", str(tiny_decoder_repo),
                                 "--out", str(tmp_path), "--dtype", "bfloat16"]) == 0
    with safe_open(tmp_path / "decoder" / "stage_b.safetensors", "pt") as f:
        assert f.get_tensor("head.weight").dtype == torch.bfloat16
    prior = WuerstchenPriorPipeline.from_pretrained(tmp_path / "prior", torch_dtype=torch.bfloat16)
    assert prior.prior.head.weight.dtype == torch.bfloat16


def test_interpolate_two_stage_c_checkpoints(tmp_path, tiny_prior_repo, tiny_decoder_repo):
    other = tmp_path / "other"
    model = WuerstchenPrior(**hub_fixtures.component_config("prior", "prior", "tiny")).eval()
    hub_fixtures.randomize_(model, 99, hub_fixtures.HEAD_GAIN)
    model.save_pretrained(other)
    a = stage_c(tiny_prior_repo).state_dict()
    b = load_stage(str(other), "prior", stage_c(tiny_prior_repo)).state_dict()
    for alpha in (0.0, 0.25):
        out = tmp_path / f"blend-{alpha}"
        assert convert_weights.main(["--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo),
                                     "--out", str(out), "--interpolate", str(tiny_prior_repo / "prior"), str(other),
                                     "--alpha", str(alpha)]) == 0
        blended = stage_c(out / "prior").state_dict()
        for name in ("head.weight", "blocks.0.grn.gamma", "blocks.2.q_proj.bias"):
            torch.testing.assert_close(blended[name], (1 - alpha) * a[name] + alpha * b[name], rtol=0, atol=1e-7)
        assert not torch.equal(a["head.weight"], b["head.weight"])


def test_existing_output_is_refused(tmp_path, tiny_prior_repo, tiny_decoder_repo, capsys):
    (tmp_path / "prior").mkdir()
    code = convert_weights.main(["--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo),
                                 "--out", str(tmp_path)])
    assert code == 2 and "already exists: pass --overwrite" in capsys.readouterr().err


def test_converted_kinds_are_not_mixed_up(converted):
    with pytest.raises(ModelNotFoundError, match="holds a converted decoder, not the prior"):
        WuerstchenPriorPipeline.from_pretrained(converted / "decoder")


# ---------------------------------------------------------------------------------------------------------
# Original-format .pt files through tools/convert_weights.py: weights-only loading, one line, nothing written


def code_running_checkpoint(folder: Path, form: str) -> tuple[Path, Path]:
    """A .pt file that would run a shell command when unpickled without weights_only: a plain pickle, or a
    torch.save zip file whose state dict is real but which carries one more object. Returns (file, marker)."""
    marker, path = folder / "code-ran", folder / f"{form}.pt"
    if form == "plain":
        with open(path, "wb") as f:
            pickle.dump({"state_dict": RunsCode(marker)}, f)
    else:
        torch.save({"ema_state_dict": {"projection.weight": torch.zeros(1)}, "extra": RunsCode(marker)}, path)
    return path, marker


def convert_args(prior, decoder, out, flag, path):
    return ["--prior", str(prior), "--decoder", str(decoder), "--out", str(out), flag, str(path)]


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch notes the unusual protocol of a plain pickle
@pytest.mark.parametrize("form", ["plain", "zip"])
def test_convert_refuses_code_running_pickles(form, tmp_path, tiny_prior_repo, tiny_decoder_repo, capsys):
    path, marker = code_running_checkpoint(tmp_path, form)
    out = tmp_path / "converted"
    code = convert_weights.main(convert_args(tiny_prior_repo, tiny_decoder_repo, out, "--stage-c", path))
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("convert_weights: error: ")
    assert f"{path} is corrupt or holds more than tensors, which weights-only loading refuses" in captured.err
    assert not marker.exists()
    assert files_in(out) == []


@pytest.mark.parametrize("form", ["plain", "zip"])
def test_convert_refusal_is_one_line_in_a_real_process(form, tmp_path, tiny_prior_repo, tiny_decoder_repo):
    path, marker = code_running_checkpoint(tmp_path, form)
    out = tmp_path / "converted"
    result = run_module([ROOT / "tools" / "convert_weights.py",
                         *convert_args(tiny_prior_repo, tiny_decoder_repo, out, "--stage-c", path)])
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert str(path) in result.stderr and not marker.exists()
    assert files_in(out) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("form", ["plain", "zip"])
def test_convert_refusal_names_the_refused_callable(form, tmp_path, tiny_prior_repo, tiny_decoder_repo, capsys):
    path, _ = code_running_checkpoint(tmp_path, form)
    code = convert_weights.main(convert_args(tiny_prior_repo, tiny_decoder_repo, tmp_path / "out", "--stage-c", path))
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"\b(posix|nt|os)\.system\b", err) and "will likely succeed" not in err, err


@pytest.mark.parametrize("flag", ["--stage-b", "--stage-a"])
def test_convert_refuses_a_bad_decoder_file_before_writing(flag, tmp_path, tiny_prior_repo, tiny_decoder_repo,
                                                           capsys):
    path, marker = code_running_checkpoint(tmp_path, "zip")
    out = tmp_path / "converted"
    code = convert_weights.main(convert_args(tiny_prior_repo, tiny_decoder_repo, out, flag, path))
    captured = capsys.readouterr()
    assert code == 2 and str(path) in captured.err and not marker.exists()
    assert files_in(out) == [] and captured.out == ""


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(tmp_path, tiny_prior_repo, tiny_decoder_repo,
                                                                     monkeypatch):
    """--overwrite swaps the new folder in only once it is complete; if the swap itself fails, the old output is
    put back, never lost."""
    argv = ["--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo), "--out", str(tmp_path),
            "--overwrite"]
    assert convert_weights.main(argv) == 0
    before = (tmp_path / "prior" / "stage_c.safetensors").read_bytes()
    real_rename = type(tmp_path).rename

    def failing_rename(self, target):
        if self.name == ".prior.partial":
            raise OSError(5, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(type(tmp_path), "rename", failing_rename)
    assert convert_weights.main(argv) == 2
    assert (tmp_path / "prior" / "stage_c.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder", "prior"]  # nothing half-made left behind


def test_a_tensor_that_does_not_survive_writing_replaces_nothing(tmp_path, tiny_prior_repo, tiny_decoder_repo,
                                                                 monkeypatch, capsys):
    """Each folder is reloaded and checked tensor by tensor before it is swapped in: a wrong one never is."""
    argv = ["--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo), "--out", str(tmp_path),
            "--overwrite", "--dtype", "bfloat16"]
    assert convert_weights.main(argv) == 0
    before = (tmp_path / "decoder" / "stage_b.safetensors").read_bytes()
    real_save = convert_module.save_weights

    def save_wrong_head(path, tensors, dtype=None):
        if path.name == "stage_b.safetensors":
            tensors = {**tensors, "head.weight": tensors["head.weight"] + 1}
        real_save(path, tensors, dtype)

    monkeypatch.setattr(convert_module, "save_weights", save_wrong_head)
    capsys.readouterr()
    assert convert_weights.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"convert_weights: error: {tmp_path / 'decoder'}: the stage_b tensor 'head.weight' did not survive "
                   f"writing and reloading (nothing was replaced)\n")
    assert (tmp_path / "decoder" / "stage_b.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder", "prior"]
