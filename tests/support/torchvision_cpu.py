"""torchvision is a test-only dependency (the image encoder's reference). The only torchvision wheel for torch
2.13 here is PyPI's, built for CUDA torch: beside the CPU torch its C extension does not load, and its import then
fails registering fakes for two detection ops. transformers imports torchvision whenever it is installed, so that
failure also breaks `from transformers import CLIPTextModel`, and with it every diffusers reference. Declaring the
two ops first lets the import succeed; nothing here uses torchvision's C operators.

allow_import() must run before transformers or diffusers are imported: importing the `tools` package runs it.
"""

from __future__ import annotations

import importlib.util

import torch

_library = None  # the op definitions live as long as this does


def allow_import() -> None:
    global _library
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        _library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            _library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401
