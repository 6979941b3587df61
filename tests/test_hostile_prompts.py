"""Hostile prompts files through `python -m wurst.batch` (and prompts on the CLI): image counts and lines far past
what a job can hold, prompts far past what CLIP reads (100 MB of text aborts the tokenizer), a named pipe, a link to
/dev/zero; each refused in one line naming the file and line, exit 2, before any model loads or anything is written,
the prompts file unchanged. A byte-order mark and Unicode line separators are accepted, and read as written.

Each case runs in a fresh process whose address space is capped (tests.helpers.run_module): where these checks are
missing, a hang fails the test at its time guard and memory running out fails it at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import ONE_STEP, assert_one_line_error, fingerprint, not_a_regular_file, run_module

SECONDS = 60  # the hang guard: a refusal takes about 3 s, a tiny job about 10 s
MEMORY = 4 * 2**30  # the address space of each run: wurst with the tiny models needs about 1.2 GB
LONG = "a cat " * 3400  # 20400 characters: CLIP reads 77 tokens of them


def text(content: str, name: str = "prompts.txt"):
    def make(folder: Path) -> Path:
        (folder / name).write_text(content, encoding="utf-8")
        return folder / name

    return make


def jsonl(*lines: dict):
    return text("".join(json.dumps(line) + "\n" for line in lines), "prompts.jsonl")


def named_pipe(folder: Path) -> Path:
    return not_a_regular_file(folder / "prompts.txt", "pipe")


def link_to_dev_zero(folder: Path) -> Path:
    return not_a_regular_file(folder / "prompts.txt", "zero")


def one_line_of_100_mb(folder: Path) -> Path:
    with open(folder / "prompts.txt", "w") as f:
        for _ in range(100):
            f.write("a cat " * 174_763)  # 1 MiB, no line end
    return folder / "prompts.txt"


# case: (make the prompts file in a folder, options, the text the one error line must hold; {path} is the file)
HOSTILE = {
    "a-billion-images-on-a-line": (jsonl({"prompt": "a cat", "num_images": 10**9}), [],
                                   "{path}:1: num_images 1000000000 takes the job past 1000000 images"),
    "a-billion-images-by-default": (text("a cat\n"), ["--num-images", str(10**9)],
                                    "{path}:1: num_images 1000000000 takes the job past 1000000 images"),
    "lines-past-a-million-images": (text("a cat\n" * 500_001), ["--num-images", "2"],
                                    "{path}:500001: num_images 2 takes the job past 1000000 images"),
    "a-line-of-100-mb": (one_line_of_100_mb, [], "{path}:1: the line is over 262144 characters long"),
    "a-prompt-past-the-limit": (text(f"a dog\n{LONG}\n"), [],
                                "{path}:2: prompt is 20399 characters, over the limit of 10000"),
    "a-negative-prompt-past-the-limit": (jsonl({"prompt": "a cat", "negative_prompt": LONG}), [],
                                         "{path}:1: negative_prompt is 20400 characters, over the limit of 10000"),
    "the-negative-prompt-option-past-the-limit": (text("a cat\n"), ["--negative-prompt", LONG],
                                                  "--negative-prompt is 20400 characters, over the limit of 10000"),
    "named-pipe": (named_pipe, [], "cannot read the prompts file {path}: not a regular file (a named pipe)"),
    "link-to-dev-zero": (link_to_dev_zero, [],
                         "cannot read the prompts file {path}: not a regular file (a character device)"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_prompts_files_are_refused_in_one_line(case, tmp_path, tiny_prior_repo, tiny_decoder_repo):
    make, options, template = HOSTILE[case]
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    prompts = make(inputs)
    before = fingerprint(inputs)
    result = run_module(["-m", "wurst.batch", prompts, "--out", out, *ONE_STEP, "--prior", tiny_prior_repo,
                         "--decoder", tiny_decoder_repo, *options], timeout=SECONDS, memory=MEMORY)
    assert_one_line_error(result.returncode, result.stdout, result.stderr, template.format(path=prompts), out,
                          prefix="wurst.batch: error: ")
    assert fingerprint(inputs) == before


def test_a_prompt_past_the_limit_on_the_command_line(tmp_path, tiny_prior_repo, tiny_decoder_repo):
    out = tmp_path / "out"
    result = run_module(["-m", "wurst", LONG, *ONE_STEP, "--prior", tiny_prior_repo, "--decoder", tiny_decoder_repo,
                         "--output", out / "x.png"], timeout=SECONDS, memory=MEMORY)
    assert_one_line_error(result.returncode, result.stdout, result.stderr,
                          "prompt is 20400 characters, over the limit of 10000", out)


# case: (file name, its bytes, the prompts the job must draw, one image each)
ACCEPTED = {
    "byte-order-mark-txt": ("prompts.txt", "\ufeffa cat\na dog\n".encode(), ["a cat", "a dog"]),
    "byte-order-mark-jsonl": ("prompts.jsonl", '\ufeff{"prompt": "a cat"}\n'.encode(), ["a cat"]),
    # str.splitlines() splits at these too; an editor and the file's line numbers do not
    "unicode-line-separators": ("prompts.txt", "a cat\u2028in a hat\nsea\x0bsky\x0cstars\x1c\x85\n".encode(),
                                ["a cat\u2028in a hat", "sea\x0bsky\x0cstars"]),
    # JSON escapes it, then the journal holds it raw: its records must not be split there either
    "a-line-separator-in-json": ("prompts.jsonl", b'{"prompt": "a cat\\u2028in a hat"}\n', ["a cat\u2028in a hat"]),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_what_a_prompts_file_says_is_what_is_drawn(case, tmp_path, tiny_prior_repo, tiny_decoder_repo):
    name, data, expected = ACCEPTED[case]
    prompts, out = tmp_path / name, tmp_path / "out"
    prompts.write_bytes(data)
    result = run_module(["-m", "wurst.batch", prompts, "--out", out, *ONE_STEP, "--prior", tiny_prior_repo,
                         "--decoder", tiny_decoder_repo], timeout=SECONDS, memory=MEMORY)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").split("\n")[:-1]]
    assert [(r["prompt"], r["line"]) for r in records] == [(p, n) for n, p in enumerate(expected, start=1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(["job.json", "manifest.jsonl",
                                                            *(r["file"] for r in records)])
    assert prompts.read_bytes() == data
