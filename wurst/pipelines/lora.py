"""diffusers' LoRA loader methods (`load_lora_weights`, `set_adapters`, `fuse_lora`, ...) for the prior pipeline,
which the combined and image-to-image pipelines reach through their `prior_pipe`, without peft.

The pipeline keeps the adapters (`Adapters`): which are loaded, active, weighted and fused. After every change it
describes to each model what its layers must carry (models.lora.apply_lora), and the models' placement applies that
to the model wherever it is: in memory now, to each fresh load in low-memory mode, and across offloading."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from wurst.errors import ArgumentError, NumericalError
from wurst.models.lora import LayerLora, LoraFactors, apply_lora
from wurst.weights.lora_files import parse_lora, peft_state_dict, read_lora, write_lora

COMPONENTS = ("prior", "text_encoder")  # diffusers' _lora_loadable_modules of the prior pipeline
ALIASES = {"unet": "prior"}  # diffusers' generic name for the denoiser, the default of its fuse_lora
# diffusers' other keywords of load_lora_weights: those wurst takes (low_cpu_mem_usage is always so, and only
# safetensors are read), and those it refuses rather than ignore (hub files come through the default cache).
TAKEN_OPTIONS = {"subfolder", "low_cpu_mem_usage", "use_safetensors", "hotswap"}
REFUSED_OPTIONS = {"local_files_only", "cache_dir", "force_download", "proxies", "token", "revision", "unet_config"}


@dataclass
class Adapters:
    """The LoRA state of a prior pipeline."""

    layers: dict[str, dict[str, dict[str, LoraFactors]]] = field(default_factory=dict)  # name -> component -> layer
    active: list[str] = field(default_factory=list)
    weights: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> component -> weight
    enabled: bool = True
    fused: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # component -> (name, weight) fused

    def weight(self, name: str, component: str) -> float:
        return self.weights.get(name, {}).get(component, 1.0)

    def wanted(self, component: str) -> dict[str, LayerLora]:
        """What each layer of `component` must carry: its fused adapters, and the active adapters not fused."""
        result: dict[str, LayerLora] = {}
        fused = self.fused.get(component, [])
        for name, weight in fused:
            for layer, factors in self.layers[name].get(component, {}).items():
                result.setdefault(layer, LayerLora([], [])).fused.append((factors, weight))
        if self.enabled:
            fused_names = {name for name, _ in fused}
            for name in self.active:
                if name in fused_names:
                    continue
                for layer, factors in self.layers[name].get(component, {}).items():
                    result.setdefault(layer, LayerLora([], [])).unfused.append((factors, self.weight(name, component)))
        return result


def _names(adapter_names: str | list[str]) -> list[str]:
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


def _components(components: list[str] | None) -> list[str]:
    chosen = [ALIASES.get(c, c) for c in (components if components is not None else COMPONENTS)]
    unknown = [c for c in chosen if c not in COMPONENTS]
    if unknown:
        raise ArgumentError(f"components: {unknown[0]!r} is not one of the LoRA components {list(COMPONENTS)}")
    return chosen


class LoraLoaderMixin:
    """diffusers' LoRA methods. A pipeline using it provides `_lora_pipe()`: the prior pipeline that holds the
    adapters and the models they adapt."""

    def _lora_pipe(self):
        return self

    @property
    def _adapters(self) -> Adapters:
        pipe = self._lora_pipe()
        if "_lora_adapters" not in pipe.__dict__:
            pipe.__dict__["_lora_adapters"] = Adapters()
        return pipe.__dict__["_lora_adapters"]

    def _apply_adapters(self) -> None:
        pipe, adapters = self._lora_pipe(), self._adapters
        for component in COMPONENTS:
            pipe.placement.prepare(component, functools.partial(apply_lora, wanted=adapters.wanted(component)))

    def lora_bytes(self, component: str, dtype: torch.dtype) -> int:
        """The memory the adapters add to model `component` in `dtype`: their factors, and a new weight for every
        layer with fused adapters (the base weight stays, to be put back)."""
        adapters = self._adapters
        total = sum(f.down.numel() + f.up.numel() for layers in adapters.layers.values()
                    for f in layers.get(component, {}).values()) * dtype.itemsize
        fused_layers = {name: f for adapter, _ in adapters.fused.get(component, [])
                        for name, f in adapters.layers[adapter].get(component, {}).items()}
        return total + sum(f.up.shape[0] * f.down.shape[1] for f in fused_layers.values()) * dtype.itemsize

    def _check_adapters_exist(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self._adapters.layers]
        if missing:
            raise ArgumentError(f"adapter {missing[0]!r} is not loaded (loaded: {list(self._adapters.layers)})")

    # -- loading and saving ------------------------------------------------------------------------------

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
                          adapter_name: str | None = None, weight_name: str | None = None, **kwargs) -> None:
        """Load a LoRA (a file, a folder, a hub id through the Hugging Face cache, or a state dict; diffusers' or
        kohya's format) into the prior and its text encoder, as adapter `adapter_name` (default `default_<n>`), and
        make it the active adapter. A LoRA that does not fit is refused whole, the pipeline left as it was."""
        unknown = sorted(set(kwargs) - TAKEN_OPTIONS - REFUSED_OPTIONS)
        if unknown:
            raise TypeError(f"load_lora_weights() got an unexpected keyword argument '{unknown[0]}'")
        refused = sorted(set(kwargs) & REFUSED_OPTIONS)
        if refused:
            raise ArgumentError(f"load_lora_weights: {refused[0]}= is not supported: wurst reads hub LoRAs through the "
                                "default Hugging Face cache (`hf download <id>` fills it), or pass a local file")
        if kwargs.get("hotswap"):
            raise ArgumentError("hotswap=True is not supported: load the LoRA under a new adapter_name")
        if kwargs.get("use_safetensors") is False:
            raise ArgumentError("use_safetensors=False: wurst reads LoRA weights in safetensors only")
        source = pretrained_model_name_or_path_or_dict
        if kwargs.get("subfolder") and not isinstance(source, dict):
            if os.path.isdir(source):
                source = os.path.join(source, kwargs["subfolder"])
            else:
                weight_name = f"{kwargs['subfolder']}/{weight_name or 'pytorch_lora_weights.safetensors'}"
        adapters, pipe = self._adapters, self._lora_pipe()
        name = adapter_name if adapter_name is not None else f"default_{len(adapters.layers)}"
        if not isinstance(name, str) or not name:
            raise ArgumentError(f"adapter_name must be a non-empty string, got {name!r}")
        if name in adapters.layers:
            raise ArgumentError(f"adapter name {name!r} is already in use: pass another adapter_name, or "
                                "delete_adapters() it first")
        lora = read_lora(source, weight_name)
        configs = {c: getattr(pipe, c).config for c in COMPONENTS}
        adapters.layers[name] = parse_lora(lora, configs=configs)
        adapters.active = [name]
        self._apply_adapters()

    @classmethod
    def save_lora_weights(cls, save_directory: str | os.PathLike,
                          unet_lora_layers: dict[str, torch.Tensor] | nn.Module | None = None,
                          text_encoder_lora_layers: dict[str, torch.Tensor] | nn.Module | None = None,
                          is_main_process: bool = True, weight_name: str | None = None, save_function=None,
                          safe_serialization: bool = True, unet_lora_adapter_metadata: dict | None = None,
                          text_encoder_lora_adapter_metadata: dict | None = None) -> None:
        """Write LoRA layers (peft-style state dicts: `<module>.lora_A.weight`, ...) in diffusers' format,
        `pytorch_lora_weights.safetensors` by default, under the `prior.` and `text_encoder.` prefixes."""
        if unet_lora_layers is None and text_encoder_lora_layers is None:
            raise ArgumentError("save_lora_weights needs unet_lora_layers or text_encoder_lora_layers")
        if not safe_serialization:
            raise ArgumentError("safe_serialization=False: wurst writes LoRA weights in safetensors only")
        tensors: dict[str, torch.Tensor] = {}
        metadata: dict = {}
        for prefix, layers, config in (("prior", unet_lora_layers, unet_lora_adapter_metadata),
                                       ("text_encoder", text_encoder_lora_layers, text_encoder_lora_adapter_metadata)):
            if layers is None:
                continue
            state = layers.state_dict() if isinstance(layers, nn.Module) else layers
            tensors.update({f"{prefix}.{key}": tensor for key, tensor in state.items()})
            metadata.update({f"{prefix}.{key}": value for key, value in (config or {}).items()})
        if not is_main_process:
            return
        if save_function is not None:
            os.makedirs(save_directory, exist_ok=True)
            save_function(tensors, os.path.join(save_directory, weight_name or "pytorch_lora_weights.safetensors"))
            return
        write_lora(save_directory, tensors, weight_name=weight_name, metadata=metadata or None)

    def get_lora_layers(self, adapter_name: str) -> dict[str, dict[str, torch.Tensor]]:
        """A loaded adapter's layers in the form save_lora_weights takes: {"unet_lora_layers": ...,
        "text_encoder_lora_layers": ...}, each a peft-style state dict under diffusers' module names, its scale folded
        into lora_B (or None where the adapter has no such part)."""
        self._check_adapters_exist([adapter_name])
        result = {}
        for component, argument in (("prior", "unet_lora_layers"), ("text_encoder", "text_encoder_lora_layers")):
            layers = self._adapters.layers[adapter_name].get(component)
            result[argument] = peft_state_dict(component, layers) if layers else None
        return result

    # -- which adapters apply ----------------------------------------------------------------------------

    def set_adapters(self, adapter_names: str | list[str],
                     adapter_weights: float | dict | list[float | dict | None] | None = None) -> None:
        """Make these adapters the active ones, each with its weight (1.0 by default; a dict gives a weight per
        component: {"prior": 0.5, "text_encoder": 1.0})."""
        names = _names(adapter_names)
        self._check_adapters_exist(names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ArgumentError(f"adapter_weights has {len(weights)} entries for {len(names)} adapter names")
        chosen: dict[str, dict[str, float]] = {}
        for name, weight in zip(names, weights, strict=True):
            per_component = weight if isinstance(weight, dict) else dict.fromkeys(COMPONENTS, weight)
            for component, value in per_component.items():
                if ALIASES.get(component, component) not in COMPONENTS:
                    raise ArgumentError(f"adapter_weights: {component!r} is not one of the LoRA components "
                                        f"{list(COMPONENTS)}")
                value = 1.0 if value is None else value
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ArgumentError(f"adapter_weights: the weight of {name!r} must be a finite number, got "
                                        f"{value!r}")
                chosen.setdefault(name, {})[ALIASES.get(component, component)] = float(value)
        self._adapters.active = names
        self._adapters.weights.update(chosen)
        self._apply_adapters()

    def get_active_adapters(self) -> list[str]:
        return list(self._adapters.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Component -> the adapters loaded into it."""
        listed: dict[str, list[str]] = {}
        for name, layers in self._adapters.layers.items():
            for component in layers:
                listed.setdefault(component, []).append(name)
        return listed

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        names = _names(adapter_names)
        self._check_adapters_exist(names)
        adapters = self._adapters
        for name in names:
            del adapters.layers[name]
            adapters.weights.pop(name, None)
        adapters.active = [n for n in adapters.active if n not in names]
        adapters.fused = {c: [(n, w) for n, w in fused if n not in names] for c, fused in adapters.fused.items()}
        self._apply_adapters()

    def disable_lora(self) -> None:
        """Stop applying the (unfused) adapters; they stay loaded. Fused adapters stay fused."""
        self._adapters.enabled = False
        self._apply_adapters()

    def enable_lora(self) -> None:
        self._adapters.enabled = True
        self._apply_adapters()

    # -- fusing ------------------------------------------------------------------------------------------

    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None, **kwargs) -> None:
        """Add the adapters (the active ones by default), times their weights and `lora_scale`, into the weights of
        `components` (default: the prior and the text encoder), so that they cost nothing per step. The base weights
        are kept, untouched, for unfuse_lora."""
        chosen = _components(components)
        if isinstance(lora_scale, bool) or not isinstance(lora_scale, (int, float)) or not math.isfinite(lora_scale):
            raise ArgumentError(f"lora_scale must be a finite number, got {lora_scale!r}")
        adapters = self._adapters
        names = _names(adapter_names) if adapter_names is not None else list(adapters.active)
        self._check_adapters_exist(names)
        for component in chosen:
            already = {n for n, _ in adapters.fused.get(component, [])} & set(names)
            if already:
                raise ArgumentError(f"adapter {sorted(already)[0]!r} is already fused into the {component}: "
                                    "unfuse_lora() first")
        if safe_fusing:
            for name in names:
                for component in chosen:
                    for layer, factors in adapters.layers[name].get(component, {}).items():
                        if not torch.isfinite(factors.delta(adapters.weight(name, component) * lora_scale)).all():
                            raise NumericalError(f"adapter {name!r} holds NaN or inf for {component} layer {layer}: "
                                                 "not fused")
        for component in chosen:
            fused = adapters.fused.setdefault(component, [])
            fused += [(n, adapters.weight(n, component) * lora_scale) for n in names
                      if component in adapters.layers[n]]
        self._apply_adapters()

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Put the base weights of `components` back, exactly; their adapters apply unfused again where active."""
        for component in _components(components):
            self._adapters.fused.pop(component, None)
        self._apply_adapters()

    def unload_lora_weights(self) -> None:
        """Remove every adapter, fused or not: the models are exactly the base models again."""
        self._lora_pipe().__dict__["_lora_adapters"] = Adapters()
        self._apply_adapters()
