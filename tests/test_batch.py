"""python -m wurst.batch: each image is what `python -m wurst` draws from its seed; torchrun writes exactly the files
of one process; a job killed with SIGKILL and rerun ends byte-identical to an uninterrupted one; batching changes
no image beyond float rounding; bad input is refused, naming the file and line, before any model loads."""

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import ROOT, assert_one_line_error, contents, files_in, run_batch, run_cli
from wurst.api import load_pipeline
from wurst.batch import app, plan
from wurst.batch import folder as job_folder

# Eight images of two sizes: unseeded lines (image k draws from BASE + k), a seeded line of two images (one
# generator draws both, as `--num-images 2` does), a seeded single image and a negative prompt.
LINES = [
    {"prompt": "a cat"},
    {"prompt": "a dog", "negative_prompt": "blurry", "num_images": 2},
    {"prompt": "a ship", "seed": 77, "num_images": 2},
    {"prompt": "a tall tower", "height": 256},
    {"prompt": "a lamp", "seed": 5},
    {"prompt": "Würstchen 🌭, with mustard"},
]
JOB = ["--height", "128", "--width", "128", "--prior-steps", "2", "--decoder-steps", "3", "--seed", "100"]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in LINES), encoding="utf-8")
    return path


@pytest.fixture
def repos(tiny_prior_repo, tiny_decoder_repo):
    return ["--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo)]




def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def test_each_image_is_what_the_cli_draws_from_its_seed(prompts, repos, out_dir, tmp_path, capsys):
    code, out, err = run_batch([prompts, "--out", out_dir, *JOB, *repos], capsys)  # batch size 1: exact equality
    assert code == 0, err
    assert out.strip() == str(out_dir / "manifest.jsonl")
    names = [f"{k:06d}.png" for k in range(8)]
    assert files_in(out_dir) == [*names, "job.json", "manifest.jsonl"]
    records = [json.loads(line) for line in (out_dir / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in records] == list(range(8)) and [r["file"] for r in records] == names
    assert [r["seed"] for r in records] == [100, 101, 102, 77, 77, 105, 5, 107]
    assert [r["prompt"] for r in records] == ["a cat", "a dog", "a dog", "a ship", "a ship", "a tall tower", "a lamp",
                                              LINES[5]["prompt"]]
    for record in records:
        data = (out_dir / record["file"]).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
    # One progress line for the job, and no per-stage bars.
    assert "8/8 images" in err and "images/min" in err and "prior" not in err

    # Each PNG's recorded command, run by the CLI, draws the same pixels (same process, same thread count).
    for k in (0, 1, 3, 4, 5, 6, 7):
        png = Image.open(out_dir / names[k])
        settings = json.loads(png.text["wurst"])
        assert settings["seed"] == records[k]["seed"] and settings["height"] == (256 if k == 5 else 128)
        command = shlex.split(png.text["command"])[3:]
        target = tmp_path / f"cli-{k}.png"
        code, _, err = run_cli([*command, "--output", target], capsys)
        assert code == 0, err
        if settings["num_images"] > 1:  # the CLI numbers the images of one seed: -1, -2, ...
            target = target.with_name(f"cli-{k}-{settings['image_index'] + 1}.png")
        assert np.array_equal(pixels(target), pixels(out_dir / names[k])), k


def test_rerun_skips_what_is_done_and_redoes_what_is_not(prompts, repos, out_dir, capsys, monkeypatch):
    args = [prompts, "--out", out_dir, *JOB, *repos]
    assert run_batch(args, capsys)[0] == 0
    finished = contents(out_dir)

    # Complete: nothing is loaded, nothing changes.
    loads = []
    monkeypatch.setattr("wurst.api.load_pipeline", lambda **kw: loads.append(kw) or load_pipeline(**kw))
    assert run_batch(args, capsys)[0] == 0
    assert loads == [] and contents(out_dir) == finished

    # A missing image, and one whose file no longer matches its record: exactly those are drawn again.
    (out_dir / "000002.png").unlink()
    (out_dir / "000006.png").write_bytes(b"not the image")
    drawn = []
    generate_group = app.generate_group
    monkeypatch.setattr(app, "generate_group",
                        lambda pipe, group, *a, **k: drawn.append([i.index for i in group]) or generate_group(
                            pipe, group, *a, **k))
    assert run_batch(args, capsys)[0] == 0
    assert sorted(drawn) == [[2], [6]]
    assert contents(out_dir) == finished


def test_another_job_into_the_same_folder_is_refused_naming_the_difference(prompts, repos, out_dir, capsys):
    assert run_batch([prompts, "--out", out_dir, *JOB, *repos], capsys)[0] == 0
    finished = contents(out_dir)
    code, out, err = run_batch([prompts, "--out", out_dir, *JOB, *repos, "--decoder-steps", "4"], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip() == f"wurst.batch: error: --out {out_dir} holds another job (job.json): decoder_steps is 3 " \
                          "there, 4 here"
    prompts.write_text('{"prompt": "something else"}\n', encoding="utf-8")
    code, out, err = run_batch([prompts, "--out", out_dir, *JOB, *repos], capsys)
    assert code == 2 and "prompts_sha256 is" in err and len(err.splitlines()) == 1
    assert contents(out_dir) == finished


def test_batch_size_4_matches_batch_size_1(prompts, tiny_prior_repo, tiny_decoder_repo):
    """Four prompts in one forward pass, one generator each, against four single runs: equal within the
    parity tolerance (batched matrix products round differently; nothing else may differ)."""
    args = app.build_parser().parse_args([str(prompts), "--out", "unused", *JOB])
    images = [i for i in plan.read_prompts(prompts, args) if i.drawn_with == 1 and i.height == 128]
    groups = plan.plan_groups(images, 4)
    assert [len(g) for g in groups] == [4, 1]
    pipe = load_pipeline(prior=tiny_prior_repo, decoder=tiny_decoder_repo, device="cpu", dtype=torch.float32)
    together = app.generate_group(pipe, groups[0], args, output_type="pt")
    for image, got in zip(groups[0], together, strict=True):
        alone = app.generate_group(pipe, [image], args, output_type="pt")[0]
        assert (got - alone).abs().max().item() <= 1e-5, image.index


def test_groups_are_fixed_by_the_job(prompts):
    args = app.build_parser().parse_args([str(prompts), "--out", "unused", *JOB])
    images = plan.read_prompts(prompts, args)
    as_indices = lambda size: [[i.index for i in g] for g in plan.plan_groups(images, size)]  # noqa: E731
    # The seeded line of two (3, 4) is one group at every batch size; the 256-high image (5) batches alone.
    assert as_indices(1) == [[0], [1], [2], [3, 4], [5], [6], [7]]
    assert as_indices(2) == [[0, 1], [2, 6], [3, 4], [5], [7]]
    assert as_indices(4) == [[0, 1, 2, 6], [3, 4], [5], [7]]


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and line, exit 2, before any model loads, nothing written


BAD_JOBS = {
    "malformed line": ('{"prompt": "a cat"}\n{"prompt": "a dog",\n', "prompts.jsonl:2: not valid JSON"),
    "off the grid": ('{"prompt": "a"}\n\n{"prompt": "b", "height": 200}\n',
                     "prompts.jsonl:3: height must be a multiple of 128, got 200: use 128 or 256"),
    "empty file": ("\n  \n", "holds no prompts"),
    "not an object": ('["a cat"]\n', "prompts.jsonl:1: a line must be a JSON object, got list"),
    "unknown key": ('{"prompt": "a", "sed": 3}\n', "prompts.jsonl:1: unknown key 'sed'"),
    "no prompt": ('{"negative_prompt": "a"}\n', "prompts.jsonl:1: 'prompt' must be a string"),
    "negative seed": ('{"prompt": "a", "seed": -1}\n', "prompts.jsonl:1: seed must be at least 0, got -1"),
    "huge seed": ('{"prompt": "a", "seed": 9223372036854775808}\n', "prompts.jsonl:1: seed must be below 2**63"),
    "zero images": ('{"prompt": "a", "num_images": 0}\n', "prompts.jsonl:1: num_images must be at least 1, got 0"),
    "float size": ('{"prompt": "a", "width": 128.0}\n', "prompts.jsonl:1: width must be an integer, got 128.0"),
}


@pytest.fixture
def no_model_loads(monkeypatch):
    monkeypatch.setattr("wurst.api.load_pipeline", lambda **kw: pytest.fail("a model loaded"))


@pytest.mark.parametrize("case", BAD_JOBS, ids=list(BAD_JOBS))
def test_bad_prompt_files_are_refused_with_file_and_line(case, tmp_path, out_dir, capsys, no_model_loads):
    text, culprit = BAD_JOBS[case]
    path = tmp_path / "prompts.jsonl"
    path.write_text(text, encoding="utf-8")
    code, out, err = run_batch([path, "--out", out_dir, *JOB], capsys)
    assert_one_line_error(code, out, err, culprit, out_dir, prefix="wurst.batch: error: ")


def test_bad_files_and_folders_are_refused(tmp_path, out_dir, capsys, no_model_loads):
    text = tmp_path / "prompts.txt"
    text.write_text("a cat\n", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a caf\xe9\n".encode("latin-1"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        ([tmp_path / "missing.txt", "--out", out_dir], "missing.txt: No such file or directory", out_dir),
        ([latin1, "--out", out_dir], "latin1.txt: not UTF-8 text", out_dir),
        ([text, "--out", a_file / "out"], f"cannot write to --out {a_file / 'out'}: Not a directory", a_file / "out"),
        ([text, "--out", a_file], f"--out {a_file} is a file", out_dir),
        ([text, "--out", out_dir, "--batch-size", "0"], "--batch-size must be a positive integer, got 0", out_dir),
        ([text, "--out", out_dir, "--width", "100"], "--width must be a multiple of 128", out_dir),
        ([text, "--out", out_dir, "--seed", "-1"], "--seed must be at least 0 and below 2**63, got -1", out_dir),
    ]
    for args, culprit, folder in cases:
        code, out, err = run_batch([*JOB[4:], *args], capsys)
        assert_one_line_error(code, out, err, culprit, folder, prefix="wurst.batch: error: ")
    # A folder holding something else is not taken over.
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"precious")
    code, out, err = run_batch([text, "--out", other, *JOB[4:]], capsys)
    assert code == 2 and "holds other files (holiday.jpg" in err and len(err.splitlines()) == 1
    assert files_in(other) == ["holiday.jpg"]


def test_a_job_that_cannot_fit_in_memory_is_refused_before_anything_is_written(tmp_path, out_dir, repos, capsys):
    """One line with what the largest forward pass needs; no folder, no job.json; --force would try anyway."""
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "height": 65536, "width": 65536}\n', encoding="utf-8")
    code, out, err = run_batch([path, "--out", out_dir, *JOB, *repos], capsys)
    assert_one_line_error(code, out, err, "65536x65536 needs about", out_dir, prefix="wurst.batch: error: ")


# ---------------------------------------------------------------------------------------------------------
# Journals


def test_a_record_cut_short_by_a_kill_is_no_record(tmp_path):
    (tmp_path / ".journal").mkdir()
    path = tmp_path / ".journal" / "rank-0.jsonl"
    path.write_bytes(b'{"index": 0, "file": "000000.png"}\n{"index": 1, "fi')
    assert set(job_folder.read_records(tmp_path)) == {0}
    journal = job_folder.Journal(path)
    journal.append({"index": 2})
    assert path.read_bytes() == b'{"index": 0, "file": "000000.png"}\n{"index": 2}\n'


# ---------------------------------------------------------------------------------------------------------
# Several processes, and kills: real torchrun (gloo) and real SIGKILL, in subprocesses


def batch_command(prompts: Path, out: Path, repos: list[str], processes: int) -> list[str]:
    job = ["-m", "wurst.batch", str(prompts), "--out", str(out), *JOB, *repos, "--batch-size", "2"]
    if processes == 1:
        return [sys.executable, *job]
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", f"--nproc-per-node={processes}", *job]


# torchrun gives each process one thread; the single process gets one too, since the thread count changes how
# float sums round (and so, now and then, a pixel by 1/255).
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_prior_repo, tiny_decoder_repo):
    """The reference: the job run once, uninterrupted, by one process."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in LINES), encoding="utf-8")
    repos = ["--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo)]
    done = subprocess.run(batch_command(prompts, folder / "out", repos, 1), env=ENV, capture_output=True, text=True,
                          timeout=300, cwd=folder)
    assert done.returncode == 0, done.stderr
    return prompts, repos, contents(folder / "out")


def test_torchrun_two_processes_write_the_files_of_one(uninterrupted, tmp_path):
    prompts, repos, expected = uninterrupted
    done = subprocess.run(batch_command(prompts, tmp_path / "out", repos, 2), env=ENV, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert contents(tmp_path / "out") == expected
    assert "8/8 images" in done.stderr and "rank" not in done.stderr


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


# torchrun runs this in place of `-m wurst.batch`: rank 0 is held back after loading until rank 1 starts its first
# group (or for at most the seconds of its first argument, if rank 1 waits for rank 0), and rank 1 notes whether
# job.json was there by then.
RANK_ZERO_LOADS_LAST = """
import os, sys, time
from pathlib import Path
from wurst.batch import app

rank, hold = int(os.environ["RANK"]), float(sys.argv.pop(1))
note = Path(sys.argv[sys.argv.index("--out") + 1]).parent / "job-json-when-rank-1-rendered"
load_for, render = app.load_for, app.render

def held_load_for(*args, **kwargs):
    pipe = load_for(*args, **kwargs)
    deadline = time.monotonic() + hold
    while rank == 0 and not note.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return pipe

def noted_render(pipe, job, group, journal):
    if rank == 1 and not note.exists():
        note.write_text("there" if (job.out / "job.json").exists() else "missing")
    render(pipe, job, group, journal)

app.load_for, app.render = held_load_for, noted_render
sys.exit(app.main(sys.argv[1:]))
"""


def test_no_process_writes_an_image_before_job_json(uninterrupted, tmp_path):
    """With rank 0 the last to finish loading, rank 1 still starts only once job.json is written: a job stopped
    before that would leave images without it, a folder that no rerun accepts (a first run on a cold page cache
    once made rank 0 that slow)."""
    prompts, repos, expected = uninterrupted
    wrapper = tmp_path / "rank_zero_loads_last.py"
    wrapper.write_text(RANK_ZERO_LOADS_LAST)
    command = batch_command(prompts, tmp_path / "out", repos, 2)
    command[command.index("-m"):command.index("wurst.batch") + 1] = [str(wrapper), "15"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "job-json-when-rank-1-rendered").read_text() == "there"
    assert contents(tmp_path / "out") == expected


@pytest.mark.parametrize("processes", [1, 2])
def test_sigkill_then_rerun_ends_byte_identical(processes, uninterrupted, tmp_path):
    """Kill a worker the moment its first record is written (the other worker, if any, mid-batch), check that
    nothing partial is left, rerun the same command, and compare with the uninterrupted run."""
    prompts, repos, expected = uninterrupted
    out = tmp_path / "out"
    job = subprocess.Popen(batch_command(prompts, out, repos, processes), env=ENV, cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size for p in (out / ".journal").glob("rank-*.jsonl")):
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.005)
    worker = job.pid if processes == 1 else children(job.pid)[0]
    os.kill(worker, signal.SIGKILL)
    job.communicate(timeout=60)
    assert job.returncode != 0
    left = files_in(out)
    assert "manifest.jsonl" not in left and 0 < sum(name.endswith(".png") for name in left) < 8
    for name in left:  # whole images and whole records only, no temporary files
        if name.endswith(".png"):
            Image.open(out / name).load()
        else:
            assert name == "job.json" or name.startswith(".journal/rank-"), name
    for journal in (out / ".journal").glob("*.jsonl"):
        assert all(json.loads(line) for line in journal.read_text(encoding="utf-8").splitlines())

    rerun = subprocess.run(batch_command(prompts, out, repos, processes), env=ENV, capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert contents(out) == expected
