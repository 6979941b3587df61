"""wurst/pipelines/preprocess.py: every accepted input becomes the (3, H, W) picture a user sees in it, in [0, 1];
resizing covers the target and keeps its center; normalisation is ImageNet's; bad inputs get one line naming them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.support.image_fixtures import photo, write_png16
from wurst.errors import ArgumentError
from wurst.pipelines import preprocess

RED, BLUE = (255, 0, 0), (0, 0, 255)


def test_rgb_pil_numpy_and_tensor_agree():
    array = photo(20, 30)
    expected = torch.from_numpy(array).permute(2, 0, 1).double() / 255
    for image in (Image.fromarray(array), array, torch.from_numpy(array).permute(2, 0, 1),
                  array.astype(np.float32) / 255, torch.from_numpy(array).permute(2, 0, 1).float() / 255):
        x = preprocess.to_tensor(image)
        assert x.dtype == torch.float32 and x.shape == (3, 20, 30)
        assert (x.double() - expected).abs().max() < 1e-6, type(image)


def test_grayscale_becomes_three_equal_channels():
    gray = photo(10, 12)[..., 0]
    for image in (Image.fromarray(gray), gray, gray[..., None], torch.from_numpy(gray)[None]):
        x = preprocess.to_tensor(image)
        assert x.shape == (3, 10, 12)
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
        assert torch.allclose(x[0], torch.from_numpy(gray).float() / 255)


def test_transparent_pixels_show_over_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = RED
    rgba[0, :, 3] = 0  # row 0 transparent, row 1 opaque red, pixel (1, 2) half transparent
    rgba[1, :, 3] = 255
    rgba[1, 2, 3] = 128
    for image in (Image.fromarray(rgba, "RGBA"), rgba, rgba.astype(np.float32) / 255):
        x = preprocess.to_tensor(image)
        assert torch.allclose(x[:, 0], torch.ones(3, 3))  # white
        assert torch.allclose(x[:, 1, 0], torch.tensor([1.0, 0, 0]))  # red
        assert torch.allclose(x[:, 1, 2], torch.tensor([1.0, 127 / 255, 127 / 255]), atol=1 / 255)  # pink


def test_a_palette_image_with_a_transparent_index():
    image = Image.new("P", (2, 1))
    image.putpalette([*RED, *BLUE])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    x = preprocess.to_tensor(image)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 0, 0])) and torch.allclose(x[:, 0, 1], torch.ones(3))


def test_sixteen_bit_pngs_keep_their_brightness(tmp_path):
    gray = np.full((4, 5, 1), 40000, np.uint16)
    gray[0, 0] = 65535
    x = preprocess.to_tensor(write_png16(tmp_path / "gray16.png", gray))  # Pillow's "I;16": not clipped to white
    assert torch.allclose(x[:, 1, 1], torch.full((3,), 40000 / 65535)) and torch.allclose(x[:, 0, 0], torch.ones(3))
    rgb = np.zeros((4, 5, 3), np.uint16)
    rgb[..., 0], rgb[..., 1] = 65535, 30000
    x = preprocess.to_tensor(write_png16(tmp_path / "rgb16.png", rgb))
    assert torch.allclose(x[:, 2, 3], torch.tensor([1.0, 30000 / 65535, 0]), atol=1 / 255)
    x = preprocess.to_tensor(gray[..., 0])  # a uint16 numpy array
    assert torch.allclose(x[:, 1, 1], torch.full((3,), 40000 / 65535))


def test_an_exif_rotated_jpeg_stands_as_the_camera_meant(tmp_path):
    """Stored 40 wide and 20 high, red on the left and blue on the right, with orientation 6 ("rotate 90°
    clockwise to view"): seen upright it is 20 wide and 40 high, red on top, blue below."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20], stored[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    for image in (path, str(path), Image.open(path)):
        x = preprocess.to_tensor(image)
        assert x.shape == (3, 40, 20)
        assert torch.allclose(x[:, 5, 10], torch.tensor([1.0, 0, 0]), atol=0.1)
        assert torch.allclose(x[:, 35, 10], torch.tensor([0.0, 0, 1]), atol=0.1)


def test_resize_covers_the_target_and_keeps_the_center():
    """A 100x300 image, black at the sides and white in the middle third: a square crop keeps the middle."""
    image = torch.zeros(3, 100, 300)
    image[:, :, 100:200] = 1
    x = preprocess.resize_and_crop(image, 64, 64)
    assert x.shape == (3, 64, 64)
    assert x[:, :, 2:-2].min() > 0.99  # the borders of the white third may be blurred by the filter
    tall = preprocess.resize_and_crop(torch.rand(3, 37, 101), 96, 64)  # odd sizes: grown to cover, then cut
    assert tall.shape == (3, 96, 64) and 0 <= tall.min() and tall.max() <= 1
    one = preprocess.resize_and_crop(torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1), 32, 64)
    assert torch.allclose(one, torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1).expand(3, 32, 64))
    same = torch.rand(3, 64, 96)
    assert torch.equal(preprocess.resize_and_crop(same, 64, 96), same)


@pytest.mark.parametrize("target", [(768, 768), (96, 96), (768, 1152), (384, 96)])
def test_images_are_scaled_whole_then_cut_bit_for_bit_as_before(target):
    """Only strips (tests/test_hostile_images.py) have their center cut out before they are scaled; every image of
    an ordinary aspect is scaled whole to cover the target and then cut, exactly as F.interpolate gives it."""
    height, width = target
    generator = torch.Generator().manual_seed(0)
    for h, w in [(480, 640), (1080, 1920), (37, 101), (300, 1200), (1200, 300), (100, 401), (768, 768)]:
        x = torch.rand(3, h, w, generator=generator)
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        whole = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        expected = (whole if size != (h, w) else x)[:, top : top + height, left : left + width].clamp(0, 1)
        assert torch.equal(preprocess.resize_and_crop(x, height, width), expected), (h, w)


def test_normalisation_is_imagenets():
    batch = preprocess.preprocess([np.full((8, 8, 3), 0.5, np.float32)] * 2, 32, 32)
    assert batch.shape == (2, 3, 32, 32)
    for c, (mean, std) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)):
        assert torch.allclose(batch[:, c], torch.tensor((0.5 - mean) / std))


def test_batches_and_lists():
    assert len(preprocess.as_list(np.zeros((3, 8, 8, 3), np.uint8))) == 3
    assert len(preprocess.as_list(torch.zeros(2, 3, 8, 8))) == 2
    assert len(preprocess.as_list([photo(8, 8), Image.fromarray(photo(16, 9))])) == 2
    assert len(preprocess.as_list(Image.fromarray(photo(8, 8)))) == 1


@pytest.mark.parametrize(
    "image, message",
    [
        (np.full((4, 4, 3), 1.5, np.float32), "image holds values outside [0, 1]"),
        (torch.full((3, 4, 4), float("nan")), "image holds values outside [0, 1]"),
        (np.zeros((4, 4, 2), np.uint8), "image is a numpy array of shape (4, 4, 2)"),
        (torch.zeros(5, 4, 4), "image is a tensor of shape (5, 4, 4)"),
        (np.zeros((4, 4, 3), np.int64), "image has dtype int64"),
        (np.zeros((0, 4, 3), np.uint8), "image is empty"),
        ("no/such/file.png", "image no/such/file.png does not exist"),
        (12, "image must be a PIL image, a numpy array, a tensor or a file path, got int"),
    ],
)
def test_bad_images_are_named_in_one_line(image, message):
    with pytest.raises(ArgumentError) as caught:
        preprocess.to_tensor(image)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_unreadable_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is no image")
    buffer = io.BytesIO()
    Image.fromarray(photo(64, 64)).save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    for path, message in ((garbage, "is not an image Pillow can read"), (truncated, "cannot be read"),
                          (tmp_path, "is a directory")):
        with pytest.raises(ArgumentError) as caught:
            preprocess.to_tensor(path)
        assert str(path) in str(caught.value) and message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ArgumentError, match="image must not be an empty list"):
        preprocess.as_list([])
    with pytest.raises(ArgumentError, match="image 2 of 2 holds values outside"):
        preprocess.preprocess([photo(8, 8), np.full((8, 8, 3), 2.0)], 32, 32)
