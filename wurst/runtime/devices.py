"""Devices: which this machine has, parsing a device argument, and wurst's default device and dtype."""

from __future__ import annotations

import torch

from wurst.errors import ArgumentError


def parse_device(device: torch.device | str | int, argument: str = "device", allow_meta: bool = True) -> torch.device:
    """A device torch knows and this machine has; otherwise one line naming the devices that are there. The meta
    device (no data: it stands in for an accelerator in tests) only where `allow_meta`."""
    shown = repr(str(device) if isinstance(device, torch.device) else device)  # 'cuda:1', not device(type=...)
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ArgumentError(f"{argument} {shown} is not a device torch knows; {available_devices()}") from e
    if parsed.type == "meta" and allow_meta:
        return parsed
    count = device_counts().get(parsed.type, 0)
    if count == 0 or (parsed.index or 0) >= count:
        raise ArgumentError(f"{argument} {shown} is not on this machine; {available_devices()}")
    return parsed


def device_counts() -> dict[str, int]:
    """The kinds of device this machine has, and how many of each."""
    counts = {"cpu": 1}
    if torch.cuda.is_available():
        counts["cuda"] = torch.cuda.device_count()
    if torch.backends.mps.is_available():
        counts["mps"] = 1
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        counts["xpu"] = xpu.device_count()
    return counts


def available_devices() -> str:
    names = [kind if kind in ("cpu", "mps") else f"{kind}:{i}" for kind, n in device_counts().items() for i in range(n)]
    return "devices here: " + ", ".join(names)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware, read from the CPUID flags that PyTorch's cpuinfo
    reports: AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake) or AMX tiles (Intel Sapphire Rapids and later,
    whose AMX-BF16 comes with them); and oneDNN, whose kernels use them, is in this build. Elsewhere bfloat16 is
    emulated and slower than float32 (Arm CPUs included: not measured, so not assumed)."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # a PyTorch without these private probes
        return False
    return bool(native) and torch.backends.mkldnn.is_available()


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA and on CPUs with native bfloat16 matmuls (about 2.4x float32's rate there), else float32."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bfloat16()):
        return torch.bfloat16
    return torch.float32
