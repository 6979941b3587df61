"""Images into the Stage C image encoder as training fed it: resized (bilinear, antialiased) to cover the
encoder's input size, center-cropped to it, then normalised with ImageNet's mean and std.

The input size is 32x the Stage C latent size of the requested image, so the encoder's output is exactly that
latent: a 1024x1024 request encodes a 768x768 view into 24x24.

Accepted: PIL images (EXIF orientation applied; grayscale, palette, CMYK and 16-bit images converted; transparent
pixels shown over white), numpy arrays (H, W), (H, W, C) or (N, H, W, C) and tensors (C, H, W) or (N, C, H, W),
with C in 1, 3 or 4 (the fourth channel is alpha), as uint8, uint16 or floats in [0, 1]; file paths; or a list
of any of these.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wurst.errors import ArgumentError
from wurst.files import NotRegularFileError, open_regular

# Images are scaled to cover their target before its center is cut out. Where that would take more than
# COVER_LIMIT times the target's pixels and more than COVER_PIXELS (an aspect ratio over 4:1 against the target's,
# and over 200 MB of float pixels), the center is cut out first (see resize_and_crop).
COVER_LIMIT, COVER_PIXELS = 4, 2**24
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's 16-bit grayscale PNG modes


def open_image(path: str | os.PathLike):
    """A PIL image read from `path`, fully decoded now, so that a damaged file fails here with one line. It must be a
    regular file (a named pipe would block, a device never end), and its size, read from its header, at most
    Pillow's MAX_IMAGE_PIXELS (about 89 million pixels) before anything is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open_regular(path) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
            with Image.open(f) as image:
                limit = Image.MAX_IMAGE_PIXELS  # None: the user lifted Pillow's limit
                if limit and image.width * image.height > limit:
                    raise ArgumentError(f"image {path} is {image.width}x{image.height} pixels, over the limit of "
                                        f"{limit} (PIL.Image.MAX_IMAGE_PIXELS)")
                image.load()
                return image
    except ArgumentError:
        raise
    except FileNotFoundError as e:
        raise ArgumentError(f"image {path} does not exist") from e
    except IsADirectoryError as e:
        raise ArgumentError(f"image {path} is a directory, not an image file") from e
    except NotRegularFileError as e:
        raise ArgumentError(f"image {path} is {e.strerror}") from e
    except Image.DecompressionBombError as e:  # over twice the limit: Pillow refuses it on opening
        raise ArgumentError(f"image {path} is over the limit of {Image.MAX_IMAGE_PIXELS} pixels "
                            f"(PIL.Image.MAX_IMAGE_PIXELS): {e}") from e
    except UnidentifiedImageError as e:
        raise ArgumentError(f"image {path} is not an image Pillow can read") from e
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise ArgumentError(f"image {path} cannot be read ({str(e).splitlines()[0] if str(e) else e!r})") from e


def as_list(image: Any) -> list:
    """One image, or a list of them, as a list; a 4-d array or tensor is a batch."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ArgumentError("image must not be an empty list")
        return list(image)
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        return list(image)
    return [image]


def _from_pil(image) -> torch.Tensor:
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)  # a phone photo's rotation lives in its EXIF tag
    if image.mode in SIXTEEN_BIT_MODES:  # convert("RGB") would clip these to white
        array = np.asarray(image).astype(np.float32) / 65535.0
        return torch.from_numpy(array.clip(0, 1)).expand(3, -1, -1).clone()
    if image.mode == "F":
        return _from_float(torch.from_numpy(np.asarray(image, dtype=np.float32))[None], "image")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def _from_float(x: torch.Tensor, name: str) -> torch.Tensor:
    x = x.float()
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ArgumentError(f"{name} holds values outside [0, 1] (min {x.min().item():.3g}, max "
                            f"{x.max().item():.3g}); float images are expected in [0, 1]")
    return x


def _from_channels_first(x: torch.Tensor, name: str) -> torch.Tensor:
    """(C, H, W) of any accepted dtype -> float (3, H, W) in [0, 1], alpha shown over white."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.dtype == torch.uint16:
        x = x.to(torch.int32).float() / 65535.0
    elif x.dtype == torch.bool:
        x = x.float()
    elif x.is_floating_point():
        x = _from_float(x, name)
    else:
        raise ArgumentError(f"{name} has dtype {x.dtype}; use uint8, uint16 or floats in [0, 1]")
    if x.shape[0] == 4:
        x = x[:3] * x[3:] + (1 - x[3:])
    elif x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x


def to_tensor(image: Any, name: str = "image") -> torch.Tensor:
    """One image -> a float32 (3, H, W) tensor in [0, 1] on the CPU."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = open_image(Path(image))
    if isinstance(image, Image.Image):
        x = _from_pil(image)
    elif isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ArgumentError(f"{name} is a numpy array of shape {image.shape}; expected (H, W), (H, W, C) or "
                                "(N, H, W, C) with C = 1, 3 or 4")
        if image.dtype not in (np.uint8, np.uint16, np.bool_) and image.dtype.kind != "f":
            raise ArgumentError(f"{name} has dtype {image.dtype}; use uint8, uint16 or floats in [0, 1]")
        x = _from_channels_first(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), name)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ArgumentError(f"{name} is a tensor of shape {tuple(image.shape)}; expected (C, H, W) or "
                                "(N, C, H, W) with C = 1, 3 or 4")
        x = _from_channels_first(image.detach().cpu(), name)
    else:
        raise ArgumentError(f"{name} must be a PIL image, a numpy array, a tensor or a file path, got "
                            f"{type(image).__name__}")
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ArgumentError(f"{name} is empty (size {x.shape[-1]}x{x.shape[-2]})")
    return x.float().contiguous()


def resize_and_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, H, W) -> (3, height, width): scaled (bilinear, antialiased when shrinking) until it covers the
    target, then the center cut out.

    Where covering would take more than COVER_LIMIT times the target's pixels and more than COVER_PIXELS (a
    20000x1 strip scaled to cover 768x768 is 768x15360000, 141 GB), the center of the target's aspect is cut out
    of the source first, in its own pixels, and scaled to the target: the same view to within a source pixel, in
    the memory of the source and the target."""
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if new_h * new_w > max(COVER_LIMIT * height * width, COVER_PIXELS):
        keep_h, keep_w = min(h, max(1, round(w * height / width))), min(w, max(1, round(h * width / height)))
        top, left = (h - keep_h) // 2, (w - keep_w) // 2
        x, h, w, new_h, new_w = x[:, top : top + keep_h, left : left + keep_w], keep_h, keep_w, height, width
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return x[:, top : top + height, left : left + width].clamp(0, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def preprocess(images: Sequence[Any], height: int, width: int) -> torch.Tensor:
    """Images -> the encoder's float32 (N, 3, height, width) input on the CPU."""
    count = len(images)
    names = [f"image {i + 1} of {count}" if count > 1 else "image" for i in range(count)]
    return torch.stack([normalize(resize_and_crop(to_tensor(image, name), height, width))
                        for image, name in zip(images, names, strict=True)])
