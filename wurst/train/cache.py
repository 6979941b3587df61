"""The encoders' outputs, computed once and kept on disk under the output folder: each sample's Stage C latent and,
while the text encoder is frozen, its caption's text states (and those of the empty caption that caption dropout
trains on). Later epochs, and a resumed run, read these files instead of running the encoders.

Each file is written atomically, so a killed run leaves whole files or none; a rerun encodes only what is missing.
The processes of a torchrun job share the work: process r encodes samples r, r + N, ..."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from wurst.train.data import Sample, load_pixels
from wurst.train.objective import image_latent
from wurst.weights.converted import save_weights
from wurst.weights.safetensors_io import read_safetensors

EMPTY_CAPTION = "empty-caption"


class EncodedCache:
    def __init__(self, folder: Path, *, with_text: bool):
        self.folder, self.with_text = folder, with_text

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def fill(self, samples: list[Sample], *, rank: int, world: int,
             encode_image: Callable[[torch.Tensor], torch.Tensor],
             encode_text: Callable[[list[str]], torch.Tensor], progress: Callable = iter) -> None:
        """Encode this process's share of the samples that have no file yet (and, on rank 0, the empty caption)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.with_text and rank == 0 and not self.path(EMPTY_CAPTION).exists():
            save_weights(self.path(EMPTY_CAPTION), {"text": encode_text([""])[0]})
        mine = [s for s in samples[rank::world] if not self.path(f"{s.index:06d}").exists()]
        for sample in progress(mine):
            tensors = {"latent": image_latent(encode_image(load_pixels(sample)[None]))[0]}
            if self.with_text:
                tensors["text"] = encode_text([sample.caption])[0]
            save_weights(self.path(f"{sample.index:06d}"), {k: v.float() for k, v in tensors.items()})

    def latent(self, index: int) -> torch.Tensor:
        return read_safetensors(self.path(f"{index:06d}"))["latent"]

    def text(self, index: int | None) -> torch.Tensor:
        """A sample's text states, or the empty caption's for None."""
        return read_safetensors(self.path(EMPTY_CAPTION if index is None else f"{index:06d}"))["text"]

