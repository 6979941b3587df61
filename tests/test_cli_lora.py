"""LoRAs in the front ends: `--lora REF[:WEIGHT]` of python -m wurst and python -m wurst.batch, `loras=` of
wurst.generate. The CLI's image is the documented API's (load_lora_weights, set_adapters) bit for bit; the PNG and
job.json record each LoRA with its file's sha256, and the stored command redraws the image; a resumed job with other
LoRAs is refused; bad LoRAs are refused in one line before any model loads."""

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import wurst
from tests.helpers import (
    ONE_STEP,
    ROOT,
    SHORT_PROMPT,
    assert_one_line_error,
    contents,
    make_prior_lora,
    run_batch,
    run_cli,
)
from wurst.cli import lora_options
from wurst.errors import ArgumentError
from wurst.runtime.devices import default_dtype
from wurst.weights import lora_refs

SEED = 3
HUB_ID, COMMIT = "someone/style", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    """A LoRA file, a folder in diffusers' layout (a LoRA of the text encoder too), and a Hugging Face hub cache
    holding HUB_ID with diffusers' file and another."""
    root = tmp_path_factory.mktemp("loras")
    save_file(make_prior_lora(1), root / "a.safetensors")
    (root / "folder").mkdir()
    save_file(make_prior_lora(2, text_encoder=True), root / "folder" / "pytorch_lora_weights.safetensors")
    snapshot = root / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(COMMIT)
    save_file(make_prior_lora(3), snapshot / "pytorch_lora_weights.safetensors")
    save_file(make_prior_lora(4), snapshot / "extra.safetensors")
    return {"a": root / "a.safetensors", "folder": root / "folder", "hub": root / "hub", "snapshot": snapshot}


@pytest.fixture
def offline_hub(loras, monkeypatch):
    """HF_HUB_OFFLINE=1 with the hub cache of `loras`."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(loras["hub"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads the environment at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(loras["hub"]))


@pytest.fixture
def repos(tiny_prior_repo, tiny_decoder_repo):
    return ["--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo)]


@pytest.fixture(scope="module")
def api(tiny_prior_repo, tiny_decoder_repo):
    """The API's pipeline in the CLI's default dtype."""
    pipe = wurst.load_pipeline(prior=tiny_prior_repo, decoder=tiny_decoder_repo, device="cpu",
                               dtype=default_dtype(torch.device("cpu")), low_memory=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def api_image(pipe, loras: list[tuple[Path, float]], prompt: str = SHORT_PROMPT, seed: int = SEED) -> np.ndarray:
    """The image of ONE_STEP through diffusers' documented LoRA methods, each LoRA its own adapter."""
    names = [f"adapter_{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras, strict=True):
        pipe.load_lora_weights(path, adapter_name=name)
    if names:
        pipe.set_adapters(names, [weight for _, weight in loras])
    try:
        return np.asarray(pipe(prompt, height=128, width=128, prior_num_inference_steps=1, num_inference_steps=1,
                               generator=torch.Generator("cpu").manual_seed(seed)).images[0])
    finally:
        pipe.unload_lora_weights()


def generated(loras, tiny_prior_repo, tiny_decoder_repo) -> np.ndarray:
    images = wurst.generate(SHORT_PROMPT, 128, 128, prior=tiny_prior_repo, decoder=tiny_decoder_repo, device="cpu",
                            loras=loras, prior_num_inference_steps=1, num_inference_steps=1,
                            generator=torch.Generator("cpu").manual_seed(SEED))
    return np.asarray(images[0])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# References and weights


def test_lora_option_syntax():
    """Only a trailing ':<number>' is a weight; infinities and NaN are read as weights, to be refused."""
    cases = {
        "a.safetensors": ("a.safetensors", 1.0),
        "a.safetensors:0.5": ("a.safetensors", 0.5),
        "dir:with:colons/a.safetensors:-1.5e-1": ("dir:with:colons/a.safetensors", -0.15),
        "dir:with:colons/a.safetensors": ("dir:with:colons/a.safetensors", 1.0),
        "user/repo:2": ("user/repo", 2.0),
        "user/repo/sub/file.safetensors:.25": ("user/repo/sub/file.safetensors", 0.25),
        "odd:name:1": ("odd:name", 1.0),
        "a:b": ("a:b", 1.0),
        "a:1x": ("a:1x", 1.0),
    }
    assert lora_options(list(cases)) == list(cases.values())
    reference, weight = lora_options(["a:inf"])[0]
    assert reference == "a" and weight == float("inf")
    assert np.isnan(lora_options(["a:NaN"])[0][1])


def test_references_resolve_to_files_and_each_file_is_hashed_once(loras, offline_hub, monkeypatch):
    hashed = []
    monkeypatch.setattr(lora_refs, "file_sha256", lambda path: hashed.append(path) or sha256(path))
    chosen = lora_refs.choose_loras(
        [str(loras["a"]), (loras["folder"], 0.5), HUB_ID, (f"{HUB_ID}/extra.safetensors", 2), (str(loras["a"]), 3)],
        hashes=True)
    files = [loras["a"], loras["folder"] / "pytorch_lora_weights.safetensors",
             loras["snapshot"] / "pytorch_lora_weights.safetensors", loras["snapshot"] / "extra.safetensors",
             loras["a"]]
    assert [c.file for c in chosen] == files
    assert [c.weight for c in chosen] == [1.0, 0.5, 1.0, 2.0, 3.0]
    assert [c.reference for c in chosen] == [str(loras["a"]), str(loras["folder"]), HUB_ID,
                                             f"{HUB_ID}/extra.safetensors", str(loras["a"])]
    assert [c.sha256 for c in chosen] == [sha256(f) for f in files]
    assert sorted(hashed) == sorted(set(files))  # a.safetensors, named twice, is read once


@pytest.mark.parametrize("bad,culprit", [
    ("style.safetensors", "loras must be a list of LoRA references or (reference, weight) pairs"),
    ({"style.safetensors": 0.5}, "loras must be a list"),
    ([("style.safetensors", "heavy")], "loras: the weight of 'style.safetensors' must be a finite number"),
    ([("style.safetensors", True)], "must be a finite number, got True"),
    ([("style.safetensors", float("nan"))], "must be a finite number, got nan"),
    ([3], "loras: 3 is not a LoRA reference"),
    ([""], "loras: an empty reference names no LoRA"),
    ([("a", 1, 2)], "loras: ('a', 1, 2) is not a LoRA reference"),
])
def test_generate_refuses_bad_loras_before_loading(bad, culprit, monkeypatch):
    monkeypatch.setattr(wurst.api, "_cached_pipeline", lambda *a: pytest.fail("a pipeline was loaded"))
    with pytest.raises(ArgumentError) as caught:
        wurst.generate(SHORT_PROMPT, 128, 128, loras=bad)
    assert culprit in str(caught.value) and "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------------------
# python -m wurst and wurst.generate


def test_cli_lora_is_the_api_image_and_its_png_redraws_it(loras, api, repos, tmp_path, capsys, tiny_prior_repo,
                                                          tiny_decoder_repo):
    target = tmp_path / "cat.png"
    given = f"{loras['a']}:0.5"
    code, out, err = run_cli([SHORT_PROMPT, *repos, *ONE_STEP, "--seed", SEED, "--lora", given, "--output", target],
                             capsys)
    assert code == 0, err
    pixels = np.asarray(Image.open(target))
    # The documented API with the same LoRA and weight, bit for bit; and wurst.generate's loras=.
    assert np.array_equal(pixels, api_image(api, [(loras["a"], 0.5)]))
    assert np.array_equal(pixels, generated([(str(loras["a"]), 0.5)], tiny_prior_repo, tiny_decoder_repo))
    # The LoRA and its weight matter.
    assert np.abs(pixels.astype(int) - api_image(api, [])).max() > 20
    assert np.abs(pixels.astype(int) - api_image(api, [(loras["a"], 1.0)])).max() > 20

    png = Image.open(target)
    record = {"lora": str(loras["a"]), "file": str(loras["a"]), "weight": 0.5, "sha256": sha256(loras["a"])}
    assert json.loads(png.text["wurst"])["loras"] == [record]
    assert json.loads(png.text["loras"]) == [record]
    command = shlex.split(png.text["command"])[3:]
    assert command[command.index("--lora") + 1] == given
    again = tmp_path / "again.png"
    command[command.index("--output") + 1] = str(again)
    code, _, err = run_cli(command, capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(again)), pixels)


def test_two_loras_from_a_folder_and_the_hub(loras, offline_hub, api, repos, tmp_path, capsys):
    target = tmp_path / "two.png"
    code, out, err = run_cli([SHORT_PROMPT, *repos, *ONE_STEP, "--seed", SEED, "--lora", loras["folder"],
                              "--lora", f"{HUB_ID}:0.7", "--output", target], capsys)
    assert code == 0, err
    folder_file, hub_file = loras["folder"] / "pytorch_lora_weights.safetensors", loras["snapshot"] / \
        "pytorch_lora_weights.safetensors"
    pixels = np.asarray(Image.open(target))
    assert np.array_equal(pixels, api_image(api, [(folder_file, 1.0), (hub_file, 0.7)]))
    assert np.abs(pixels.astype(int) - api_image(api, [(folder_file, 1.0)])).max() > 20
    records = json.loads(Image.open(target).text["loras"])
    assert records == [
        {"lora": str(loras["folder"]), "file": str(folder_file), "weight": 1.0, "sha256": sha256(folder_file)},
        {"lora": HUB_ID, "file": str(hub_file), "weight": 0.7, "sha256": sha256(hub_file)},
    ]


def test_generate_applies_exactly_the_loras_of_each_call(loras, api, tiny_prior_repo, tiny_decoder_repo):
    """The cached pipeline is reused across calls; each call's LoRAs replace the last call's."""
    wurst.generate.cache_clear()
    base = api_image(api, [])
    with_lora = generated([loras["a"]], tiny_prior_repo, tiny_decoder_repo)
    assert np.array_equal(with_lora, api_image(api, [(loras["a"], 1.0)]))
    assert np.array_equal(generated([], tiny_prior_repo, tiny_decoder_repo), base)
    assert np.array_equal(generated([(loras["a"], 1)], tiny_prior_repo, tiny_decoder_repo), with_lora)
    wurst.generate.cache_clear()


def test_image_to_image_takes_the_loras(loras, api, repos, encoder_folder, tmp_path, capsys):
    from tests.support.image_fixtures import photo
    from wurst.weights import image_encoder

    source = tmp_path / "fox.png"
    Image.fromarray(photo(96, 128)).save(source)
    target = tmp_path / "fox-out.png"
    code, out, err = run_cli([SHORT_PROMPT, "--image", source, *repos, *ONE_STEP, "--image-encoder", encoder_folder,
                              "--seed", SEED, "--lora", f"{loras['a']}:0.5", "--output", target], capsys)
    assert code == 0, err
    pipe = wurst.WuerstchenImg2ImgPipeline.from_pipes(api.prior_pipe, api.decoder_pipe,
                                                      image_encoder.load_converted(encoder_folder))

    def drawn() -> np.ndarray:
        return np.asarray(pipe(SHORT_PROMPT, image=str(source), strength=0.8, height=128, width=128,
                               prior_num_inference_steps=1, num_inference_steps=1,
                               generator=torch.Generator("cpu").manual_seed(SEED)).images[0])

    base = drawn()
    pipe.load_lora_weights(loras["a"], adapter_name="style")
    pipe.set_adapters(["style"], [0.5])
    try:
        pixels = np.asarray(Image.open(target))
        assert np.array_equal(pixels, drawn())
        assert np.abs(pixels.astype(int) - base).max() > 20
    finally:
        pipe.unload_lora_weights()
    assert json.loads(Image.open(target).text["loras"])[0]["sha256"] == sha256(loras["a"])


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the LoRAs were checked")

    for cls in (wurst.WuerstchenCombinedPipeline, wurst.WuerstchenPriorPipeline, wurst.WuerstchenDecoderPipeline,
                wurst.WuerstchenImg2ImgPipeline):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def bad_lora_files(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    nowhere = make_prior_lora(5)
    nowhere["prior.blocks.9.attention.to_q.lora_A.weight"] = nowhere.pop("prior.blocks.2.attention.to_q.lora_A.weight")
    save_file(nowhere, folder / "nowhere.safetensors")
    save_file(make_prior_lora(5), folder / "lora.bin")
    (folder / "empty").mkdir()
    return {"nowhere": folder / "nowhere.safetensors", "bin": folder / "lora.bin", "empty": folder / "empty"}


@pytest.mark.parametrize("case,culprit", [
    ("missing", "LoRA not found: {missing}"),
    ("bin", "{bin} is not a .safetensors file"),
    ("nowhere", "{nowhere}: 'prior.blocks.9.attention.to_q.lora_A.weight' names no layer"),
    ("empty", "{empty} holds no LoRA file"),
    ("infinite", "--lora: the weight of '{nowhere}' must be a finite number, got inf"),
    ("no reference", "--lora: an empty reference names no LoRA"),
    ("hub", "the LoRA someone/other (pytorch_lora_weights.safetensors) is not in the Hugging Face cache"),
    ("hub file", "LoRA not found: someone/style/missing.safetensors is no local file"),
    ("climbing", "LoRA not found: someone/style/../style/pytorch_lora_weights.safetensors (not a file"),
    ("invalid hub id", "cannot fetch pytorch_lora_weights.safetensors from a--b/c: Cannot have -- or .. in repo_id"),
])
def test_cli_refuses_bad_loras_before_loading(case, culprit, tmp_path, repos, out_dir, capsys, no_loading,
                                              offline_hub):
    paths = {**bad_lora_files(tmp_path / "bad"), "missing": tmp_path / "missing.safetensors"}
    given = {"infinite": f"{paths['nowhere']}:inf", "no reference": ":0.5", "hub": "someone/other",
             "hub file": "someone/style/missing.safetensors", "invalid hub id": "a--b/c",
             "climbing": "someone/style/../style/pytorch_lora_weights.safetensors"}.get(case) or str(paths[case])
    code, out, err = run_cli([SHORT_PROMPT, *repos, *ONE_STEP, "--lora", given, "--output", out_dir / "x.png"],
                             capsys)
    assert_one_line_error(code, out, err, culprit.format(**paths), out_dir)


# ---------------------------------------------------------------------------------------------------------
# python -m wurst.batch




@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\na dog\n", encoding="utf-8")
    return path


def test_batch_job_records_its_loras_and_refuses_other_ones(loras, prompts, repos, tmp_path, out_dir, capsys):
    lora = tmp_path / "mine.safetensors"
    lora.write_bytes(loras["a"].read_bytes())
    job = [prompts, "--out", out_dir, *repos, *ONE_STEP, "--lora", f"{lora}:0.5"]
    code, out, err = run_batch(job, capsys)
    assert code == 0, err
    record = {"lora": str(lora), "file": str(lora), "weight": 0.5, "sha256": sha256(lora)}
    assert json.loads((out_dir / "job.json").read_text())["loras"] == [record]
    # Image 1's recorded command draws it again, the LoRA included.
    png = Image.open(out_dir / "000001.png")
    assert json.loads(png.text["loras"]) == [record]
    command = shlex.split(png.text["command"])[3:]
    code, _, err = run_cli([*command, "--output", tmp_path / "cli.png"], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli.png")), np.asarray(png))
    finished = contents(out_dir)

    # The same job resumes (there is nothing left to do); another set of LoRAs does not.
    assert run_batch(job, capsys)[0] == 0 and contents(out_dir) == finished
    other = [*job[:-1], f"{lora}:0.6"], [*job[:-2]], [*job, "--lora", loras["a"]], [*job[:-1], f"{loras['a']}:0.5"]
    for changed in other:
        code, out, err = run_batch(changed, capsys)
        assert code == 2 and out == "" and len(err.splitlines()) == 1, err
        assert err.startswith(f"wurst.batch: error: --out {out_dir} holds another job (job.json): loras is ")
        assert contents(out_dir) == finished
    # Nor does the same path with other content.
    save_file(make_prior_lora(9), lora)
    code, out, err = run_batch(job, capsys)
    assert code == 2 and f"'sha256': '{sha256(lora)}'" in err and len(err.splitlines()) == 1, err
    assert contents(out_dir) == finished


def test_batch_refuses_a_bad_lora_before_anything_is_written(tmp_path, prompts, repos, out_dir, capsys):
    nowhere = bad_lora_files(tmp_path / "bad")["nowhere"]
    for given, culprit in [(tmp_path / "missing.safetensors", "LoRA not found"), (nowhere, "names no layer")]:
        code, out, err = run_batch([prompts, "--out", out_dir, *repos, *ONE_STEP, "--lora", given], capsys)
        assert_one_line_error(code, out, err, culprit, out_dir, prefix="wurst.batch: error: ")


def torchrun_batch(args: list, cwd: Path) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "wurst.batch", *map(str, args)],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_under_torchrun_a_bad_lora_is_one_line(tmp_path, prompts, repos, out_dir):
    nowhere = bad_lora_files(tmp_path / "bad")["nowhere"]
    done = torchrun_batch([prompts, "--out", out_dir, *repos, *ONE_STEP, "--lora", nowhere], tmp_path)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("wurst.batch") and "error:" in line]
    assert errors == [f"wurst.batch: error: {nowhere}: 'prior.blocks.9.attention.to_q.lora_A.weight' names no layer "
                      "of the prior (Stage C)"], done.stderr
    assert not out_dir.exists()


def test_every_torchrun_worker_loads_the_loras(loras, prompts, repos, tmp_path, capsys, api):
    """Two processes, one image each: both are the API's image with the LoRA, up to the 1/255 that a different
    thread count may round to."""
    out = tmp_path / "out"
    done = torchrun_batch([prompts, "--out", out, *repos, *ONE_STEP, "--lora", f"{loras['a']}:0.5"], tmp_path)
    assert done.returncode == 0, done.stderr
    for index, prompt in enumerate(["a cat", "a dog"]):
        pixels = np.asarray(Image.open(out / f"{index:06d}.png")).astype(int)
        assert np.abs(pixels - api_image(api, [(loras["a"], 0.5)], prompt, seed=index)).max() <= 1, index
        assert np.abs(pixels - api_image(api, [], prompt, seed=index)).max() > 20, index
