"""What the pipelines return: diffusers' output classes, and images in the requested output type."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


class BaseOutput:
    """diffusers' outputs: fields by name, or by position as in the tuple `return_dict=False` gives."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]

    def __getitem__(self, key: int | str):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


@dataclass
class WuerstchenPriorPipelineOutput(BaseOutput):
    image_embeddings: torch.Tensor | np.ndarray


@dataclass
class ImagePipelineOutput(BaseOutput):
    images: list | np.ndarray | torch.Tensor


def as_output(result, return_dict: bool, output_class: type[BaseOutput]):
    return output_class(result) if return_dict else (result,)


def convert_images(images: torch.Tensor, output_type: str):
    """(N, 3, H, W) images in [0, 1] -> a list of PIL images ("pil"), a float32 (N, H, W, 3) numpy array
    ("np") or the tensor itself ("pt")."""
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray(image) for image in (array * 255).round().astype(np.uint8)]
