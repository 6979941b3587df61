"""Damaged and hostile job folders under `python -m wurst.batch --out`: a job.json that is not an object, is too
large, or is a named pipe or a link to /dev/zero, and a manifest or journal that is one; each refused in one line,
exit 2, before any model loads, the folder unchanged. An image file that is a pipe or a link to a device is a
damaged image: it is drawn again. A `.partial` file that a SIGKILL left on a file system without O_TMPFILE is
removed by the next write of its file. Either way the folder ends byte for byte as an uninterrupted run leaves it.

Each case runs in a fresh process whose address space is capped (tests.helpers.run_module): where these checks are
missing, a hang fails the test at its time guard and memory running out fails it at once."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.helpers import ONE_STEP, assert_one_line_error, fingerprint, run_module

SECONDS = 60  # the hang guard: a refusal takes about 3 s, a tiny job about 10 s
MEMORY = 4 * 2**30  # the address space of each run: wurst with the tiny models needs about 1.2 GB
THREADS = {"OMP_NUM_THREADS": "1"}  # the same float sums in every run, so that redrawn images are byte-identical
WITHOUT_O_TMPFILE = "import os, runpy; del os.O_TMPFILE; runpy.run_module('wurst.batch', run_name='__main__')"
KILLED_WHILE_WRITING = """
import os, signal, sys
del os.O_TMPFILE
from wurst.files import atomic_file
with atomic_file(sys.argv[1]) as f:
    f.write(b"half a picture")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def batch(prompts: Path, out: Path, repos, *, python=("-m", "wurst.batch")):
    return run_module([*python, prompts, "--out", out, *ONE_STEP, "--prior", repos[0], "--decoder", repos[1]],
                      env=THREADS, timeout=SECONDS, memory=MEMORY)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_prior_repo, tiny_decoder_repo):
    """(prompts file, the folder of the finished job, the repositories)."""
    folder = tmp_path_factory.mktemp("job")
    prompts = folder / "prompts.txt"
    prompts.write_text("a cat\na dog\n", encoding="utf-8")
    repos = (tiny_prior_repo, tiny_decoder_repo)
    result = batch(prompts, folder / "out", repos)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(folder / "out")) == ["000000.png", "000001.png", "job.json", "manifest.jsonl"]
    return prompts, folder / "out", repos


def replace_with(name: str, kind: str):
    """A damage: the file `name` of the folder replaced by a named pipe, a link to /dev/zero, or text."""

    def damage(out: Path) -> Path:
        (out / name).unlink()
        if kind == "pipe":
            os.mkfifo(out / name)
        elif kind == "zero":
            (out / name).symlink_to("/dev/zero")
        else:
            (out / name).write_text(kind, encoding="utf-8")
        return out / name

    return damage


def unfinished(out: Path) -> Path:
    """A damage: the job as a kill leaves it, every image done but its records still in a journal."""
    (out / ".journal").mkdir()
    (out / "manifest.jsonl").rename(out / ".journal" / "rank-0.jsonl")
    return out / ".journal" / "rank-0.jsonl"


def journal_replaced_with(kind: str):
    def damage(out: Path) -> Path:
        unfinished(out)
        return replace_with(".journal/rank-0.jsonl", kind)(out)

    return damage


def padded_job(out: Path) -> Path:
    """A damage: job.json as it was, followed by 17 MiB of spaces (valid JSON, and more than any job.json holds)."""
    with open(out / "job.json", "a") as f:
        f.write(" " * 17 * 2**20)
    return out / "job.json"


# case: (damage the finished folder, the text the one error line must hold; {path} is the damaged file)
HOSTILE = {
    "job-json-a-list": (replace_with("job.json", "[]"), "{path} must hold a JSON object: use a new --out folder"),
    "job-json-a-string": (replace_with("job.json", '"done"'), "{path} must hold a JSON object: use a new --out"),
    "job-json-a-named-pipe": (replace_with("job.json", "pipe"),
                              "{path} cannot be read: not a regular file (a named pipe): use a new --out folder"),
    "job-json-a-link-to-dev-zero": (replace_with("job.json", "zero"),
                                    "{path} cannot be read: not a regular file (a character device): use a new"),
    "job-json-past-the-limit": (padded_job, "{path} cannot be read: larger than 16 MiB: use a new --out folder"),
    "manifest-a-named-pipe": (replace_with("manifest.jsonl", "pipe"), "not a regular file (a named pipe): {path}"),
    "manifest-a-link-to-dev-zero": (replace_with("manifest.jsonl", "zero"),
                                    "not a regular file (a character device): {path}"),
    "journal-a-named-pipe": (journal_replaced_with("pipe"), "not a regular file (a named pipe): {path}"),
    "journal-a-link-to-dev-zero": (journal_replaced_with("zero"), "not a regular file (a character device): {path}"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_job_folders_are_refused_in_one_line(case, finished, tmp_path):
    prompts, done, repos = finished
    out = tmp_path / "out"
    shutil.copytree(done, out, symlinks=True)
    damage, template = HOSTILE[case]
    path = damage(out)
    before = fingerprint(out)
    result = batch(prompts, out, repos)
    assert_one_line_error(result.returncode, result.stdout, result.stderr, template.format(path=path), None,
                          prefix="wurst.batch: error: ")
    assert fingerprint(out) == before


# case: damage whose image is drawn again
REDRAWN = {
    "image-a-named-pipe": replace_with("000000.png", "pipe"),
    "image-a-link-to-dev-zero": replace_with("000001.png", "zero"),
}


@pytest.mark.parametrize("case", list(REDRAWN))
def test_an_image_that_is_no_file_is_drawn_again(case, finished, tmp_path):
    prompts, done, repos = finished
    out = tmp_path / "out"
    shutil.copytree(done, out, symlinks=True)
    REDRAWN[case](out)
    result = batch(prompts, out, repos)
    assert result.returncode == 0 and result.stdout == f"{out / 'manifest.jsonl'}\n", result.stderr
    assert fingerprint(out) == fingerprint(done)


def test_a_partial_file_a_kill_left_without_o_tmpfile_is_removed_by_the_next_write(finished, tmp_path):
    prompts, done, repos = finished
    out = tmp_path / "out"
    shutil.copytree(done, out, symlinks=True)
    unfinished(out)
    (out / "000000.png").unlink()
    killed = run_module(["-c", KILLED_WHILE_WRITING, out / "000000.png"], timeout=SECONDS, memory=MEMORY)
    assert killed.returncode == -signal.SIGKILL
    assert [name for name in os.listdir(out) if name.endswith(".partial")], os.listdir(out)  # what the kill left
    result = batch(prompts, out, repos, python=("-c", WITHOUT_O_TMPFILE))
    assert result.returncode == 0 and result.stdout == f"{out / 'manifest.jsonl'}\n", result.stderr
    assert fingerprint(out) == fingerprint(done)  # hidden files included: no partial file, no journal
