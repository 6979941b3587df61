"""LoRAs as wurst's front ends take them (`--lora` of `python -m wurst` and `python -m wurst.batch`, `loras=` of
wurst.generate and wurst.load_pipeline): a reference and a weight each, resolved to a file, checked against the
prior's models before any of them loads, and described, with the file's sha256, in an image's settings and a batch
job's job.json.

A reference is what lora_files.find_lora_file takes (a .safetensors file, a folder holding one, or a hub id
`user/repo` holding diffusers' pytorch_lora_weights.safetensors, through the Hugging Face cache), or
`user/repo/<path in the repository>.safetensors` for another file of a hub repository, where no local file is
spelled so."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wurst.errors import ArgumentError, ModelNotFoundError
from wurst.files import file_sha256
from wurst.weights.lora_files import find_lora_file, parse_lora, read_lora
from wurst.weights.repository import read_repository

# A LoRA as wurst.generate and wurst.load_pipeline take it: a reference (weight 1.0), or (reference, weight).
LoraSpec = str | os.PathLike | tuple[str | os.PathLike, float]
# user/repo/<file in the repository>: no part of it may start with a dot (no '..' to climb out of the repository).
HUB_FILE = re.compile(r"^([A-Za-z0-9][\w.-]*/(?!\.)[\w.-]+)/((?:(?!\.)[\w.-]+/)*(?!\.)[\w.-]+\.safetensors)$")


@dataclass(frozen=True)
class ChosenLora:
    """A LoRA of a run: its reference as given, its weight, the file it names and (when asked for) its sha256."""

    reference: str
    weight: float
    file: Path
    sha256: str | None = None

    @property
    def spec(self) -> tuple[Path, float]:
        """The LoRA as load_pipeline takes it: its file, found already, and its weight."""
        return self.file, self.weight

    def record(self) -> dict:
        """What an image's settings and a job's job.json say of it."""
        return {"lora": self.reference, "file": str(self.file), "weight": self.weight, "sha256": self.sha256}


def lora_requests(loras: Sequence[LoraSpec], name: str = "loras") -> list[tuple[str, float]]:
    """(reference, weight) for each of `loras`, or one line naming `name` and the entry that is wrong."""
    if isinstance(loras, (str, os.PathLike, dict)) or not isinstance(loras, (list, tuple)):
        raise ArgumentError(f"{name} must be a list of LoRA references or (reference, weight) pairs, got {loras!r}")
    requests = []
    for item in loras:
        reference, weight = (item, 1.0) if isinstance(item, (str, os.PathLike)) else (
            item if isinstance(item, tuple) and len(item) == 2 else (None, None))
        if not isinstance(reference, (str, os.PathLike)):
            raise ArgumentError(f"{name}: {item!r} is not a LoRA reference (a file, a folder or a hub id) or a "
                                "(reference, weight) pair")
        if not str(reference):
            raise ArgumentError(f"{name}: an empty reference names no LoRA")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ArgumentError(f"{name}: the weight of {str(reference)!r} must be a finite number, got {weight!r}")
        requests.append((str(reference), float(weight)))
    return requests


def find_lora(reference: str) -> Path:
    """The file a reference names (see the module's docstring)."""
    hub_file = HUB_FILE.match(reference)
    if hub_file is None or Path(reference).expanduser().exists():
        return find_lora_file(reference)
    try:
        return find_lora_file(hub_file[1], weight_name=hub_file[2])
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"LoRA not found: {reference} is no local file, and {e}") from e


def choose_loras(loras: Sequence[LoraSpec], *, prior: str | os.PathLike | None = None, hashes: bool = False,
                 name: str = "loras") -> list[ChosenLora]:
    """`loras` checked and resolved to their files; with `hashes`, each file's sha256 (read once per file); with
    `prior` (a prior repository), refused unless every file fits its models, from the configs alone, before any
    model loads. Errors are one line, naming `name` where the argument itself is wrong."""
    requests = lora_requests(loras, name)
    files = [find_lora(reference) for reference, _ in requests]
    digests = {file: file_sha256(file) for file in dict.fromkeys(files)} if hashes else {}
    if prior is not None and files:
        configs = read_repository(prior, "prior").configs
        for file in dict.fromkeys(files):
            parse_lora(read_lora(file), configs=configs)
    return [ChosenLora(reference, weight, file, digests.get(file))
            for (reference, weight), file in zip(requests, files, strict=True)]
