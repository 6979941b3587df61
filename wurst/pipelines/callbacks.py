"""diffusers' step callbacks: `callback_on_step_end(pipeline, step index, timestep, {name: tensor})` runs after
each step, sees the tensors named in `callback_on_step_end_tensor_inputs`, and may return replacements."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from wurst.sampler import Step

StepCallback = Callable[[Any, int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]


class StepEnd:
    """The callback of one denoising run. `tensors` are the named tensors it may see besides the latents; what it
    returns replaces them, and `on_edit` hears of the replaced ones other than the latents (the pipeline then
    recomputes what depends on them)."""

    def __init__(self, pipe: Any, callback: StepCallback | None, inputs: list[str],
                 tensors: dict[str, torch.Tensor | None],
                 on_edit: Callable[[dict[str, torch.Tensor]], None] = lambda edited: None) -> None:
        self.pipe, self.callback, self.inputs, self.tensors, self.on_edit = pipe, callback, inputs, tensors, on_edit

    def __call__(self, step: Step) -> None:
        if self.callback is None:
            return
        offered = {"latents": step.latents, **self.tensors}
        edited = dict(self.callback(self.pipe, step.index, step.t, {k: offered[k] for k in self.inputs}) or {})
        step.latents = edited.pop("latents", step.latents)
        self.tensors.update(edited)
        self.on_edit(edited)
