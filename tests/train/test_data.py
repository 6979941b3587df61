"""wurst/train/data.py: both dataset conventions read in order with their captions and aspect buckets; pixels
exactly as the pipelines' image encoder is fed them, EXIF rotation included; every bad file reported at once, one
line each naming it; the fingerprint follows content, not paths."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import not_a_regular_file
from tests.support.image_fixtures import photo
from wurst.errors import ArgumentError
from wurst.files import file_sha256
from wurst.pipelines import preprocess
from wurst.train.data import DatasetError, Sample, bucket_size, dataset_fingerprint, load_pixels, read_dataset


def image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo(height, width, seed)).save(path)
    return path


def pair(root: Path, name: str, caption: str | bytes, width: int = 16, height: int = 16) -> Path:
    """An image and its same-stem .txt caption beside it."""
    path = image(root / name, width, height)
    text = path.with_suffix(".txt")
    text.write_bytes(caption if isinstance(caption, bytes) else caption.encode())
    return path


def problems(folder: Path, resolution: int = 512) -> list[str]:
    with pytest.raises(DatasetError) as caught:
        read_dataset(folder, resolution)
    assert isinstance(caught.value, ArgumentError)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# ---------------------------------------------------------------------------------------------------------
# Buckets


def test_square_images_get_the_resolution_itself():
    assert bucket_size(16, 16, 512) == (512, 512)
    assert bucket_size(3000, 3000, 1024) == (1024, 1024)
    assert bucket_size(7, 7, 480) == (480, 480)  # 480 is off the 128 grid but on the 32 one


def test_two_to_one_keeps_about_the_resolutions_pixels_on_the_128_grid():
    # 2:1 at 512: width 512·√2 = 724.08 = 5.66·128 -> 6·128 = 768; height 512/√2 = 362.04 = 2.83·128 -> 3·128
    # = 384. 768·384 = 294912 pixels against 512² = 262144 (+12.5%; 640x320 would be -22%).
    assert bucket_size(100, 200, 512) == (384, 768)
    assert bucket_size(1000, 500, 512) == (768, 384)  # portrait: the same sides swapped
    # 1:3 at 512: height 512·√3 = 886.8 = 6.93·128 -> 896; width 512/√3 = 295.6 = 2.31·128 -> 256
    assert bucket_size(30, 10, 512) == (896, 256)


def test_off_grid_resolutions_round_to_32():
    # 2:1 at 480: width 480·√2 = 678.8 = 21.2·32 -> 672; height 480/√2 = 339.4 = 10.6·32 -> 352
    assert bucket_size(50, 100, 480) == (352, 672)


def test_aspect_is_clamped_to_four_to_one_and_ties_round_up():
    # 4:1 at 512: width 512·2 = 1024, height 512/2 = 256, exactly; 10:1 and 100:1 get the same bucket
    assert bucket_size(10, 40, 512) == bucket_size(10, 100, 512) == bucket_size(1, 100, 512) == (256, 1024)
    assert bucket_size(100, 1, 512) == (1024, 256)
    # 25:64 at 512: √(25/64) = 0.625, width 512·0.625 = 320 = 2.5·128 exactly -> 3·128 (round() would give 256);
    # height 512/0.625 = 819.2 = 6.4·128 -> 768. And 4:1 at 128: height 64 = 0.5·128 -> 128.
    assert bucket_size(64, 25, 512) == (768, 384)
    assert bucket_size(10, 40, 128) == (128, 256)


@pytest.mark.parametrize("resolution", [0, -128, 500, 100])
def test_resolutions_off_the_32_grid_are_refused(resolution):
    with pytest.raises(ArgumentError, match=f"resolution must be a positive multiple of 32, got {resolution}"):
        bucket_size(10, 10, resolution)


# ---------------------------------------------------------------------------------------------------------
# Reading both conventions


def test_captions_beside_images(tmp_path):
    root = tmp_path / "data"
    cat = pair(root, "b/cat.png", "  a cat\n")
    dog = pair(root, "a/dog.jpg", "a dog", width=20, height=10)
    tall = pair(root, "Z.PNG", "\ufeffa tall one", width=10, height=30)  # suffix in capitals; a byte-order mark
    (root / "notes.txt").write_text("a caption without an image is ignored")
    image(root / ".ipynb_checkpoints" / "cat.png", 8, 8)  # hidden: skipped, so its missing caption is no problem
    (root / "b" / "._cat.png").write_bytes(b"macOS resource fork")
    assert read_dataset(root, 512) == [Sample(0, tall, "a tall one", 896, 256), Sample(1, dog, "a dog", 384, 768),
                                       Sample(2, cat, "a cat", 512, 512)]  # "Z" sorts before "a" and "b"


def test_metadata_jsonl(tmp_path):
    root = tmp_path / "data"
    wide, square = image(root / "imgs" / "wide.webp", 40, 10), image(root / "sq.bmp", 9, 9)
    image(root / "unlisted.png", 8, 8)  # not in metadata.jsonl, and without a caption: ignored
    lines = [{"file_name": "sq.bmp", "text": "a square"}, {}, {"file_name": "./imgs/wide.webp", "text": " wide \n"},
             {"file_name": "sq.bmp", "text": "a square, again\u2028"}]  # U+2028 is a line break to splitlines()
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) if x else "   " for x in lines))
    assert read_dataset(root, 256) == [Sample(0, wide, "wide", 128, 512), Sample(1, square, "a square", 256, 256),
                                       Sample(2, square, "a square, again", 256, 256)]  # by path, then line


def exif_rotated_jpeg(path: Path, width: int, height: int) -> Path:
    """A JPEG stored width x height whose EXIF Orientation 6 says: turn it 90° clockwise to show it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo(height, width)).save(path, quality=95, exif=exif.tobytes())
    return path


def test_exif_rotation_swaps_the_bucket_and_turns_the_pixels(tmp_path):
    path = exif_rotated_jpeg(tmp_path / "phone.jpg", 40, 20)
    (tmp_path / "phone.txt").write_text("a photo")
    [sample] = read_dataset(tmp_path, 512)
    assert (sample.height, sample.width) == (768, 384)  # shown 20 wide, 40 high: 1:2; as stored it is 2:1
    with Image.open(path) as stored:
        pixels = np.asarray(stored.convert("RGB"))
    assert pixels.shape == (20, 40, 3)
    turned = Image.fromarray(np.ascontiguousarray(np.rot90(pixels, k=-1)))  # clockwise, and no EXIF left
    expected = preprocess.normalize(preprocess.resize_and_crop(preprocess.to_tensor(turned), 768, 384))
    assert torch.equal(load_pixels(sample), expected)


def test_load_pixels_is_the_pipelines_preprocessing(tmp_path):
    path = pair(tmp_path, "x.png", "x", width=30, height=20)
    [sample] = read_dataset(tmp_path, 64)  # 3:2 at 64: 64·√1.5 = 78.4 -> 64 (2.45·32); 64/√1.5 = 52.3 -> 64
    assert (sample.height, sample.width) == (64, 64)
    with Image.open(path) as opened:
        x = torch.from_numpy(np.asarray(opened.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    scaled = torch.nn.functional.interpolate(x[None], size=(64, 96), mode="bilinear", antialias=True)[0]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD))
    expected = (scaled[:, :, 16:80].clamp(0, 1) - mean) / std  # covers 64x64 at 64x96, the center cut out
    got = load_pixels(sample)
    assert got.dtype == torch.float32 and got.shape == (3, 64, 64)
    assert torch.allclose(got, expected, atol=1e-6)
    with Image.open(path) as opened:
        pixels = preprocess.to_tensor(opened)
    assert torch.equal(got, preprocess.normalize(preprocess.resize_and_crop(pixels, 64, 64)))


# ---------------------------------------------------------------------------------------------------------
# Problems: one line each, naming the file


def test_missing_and_wrong_folders(tmp_path):
    assert problems(tmp_path / "nowhere") == [f"dataset folder {tmp_path / 'nowhere'} does not exist"]
    (tmp_path / "file").write_text("")
    assert problems(tmp_path / "file") == [f"dataset folder {tmp_path / 'file'} is not a folder"]
    (tmp_path / "empty").mkdir()
    assert problems(tmp_path / "empty") == [
        f"dataset folder {tmp_path / 'empty'} holds no images (.png, .jpg, .jpeg, .webp, .bmp)"]
    (tmp_path / "empty" / "metadata.jsonl").write_text("\n")
    assert problems(tmp_path / "empty") == [f"{tmp_path / 'empty' / 'metadata.jsonl'} lists no images"]


def test_truncated_image(tmp_path):
    path = pair(tmp_path, "cut.png", "cut", width=64, height=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    [line] = problems(tmp_path)
    assert line.startswith(f"image {path} cannot be read (")


def test_not_an_image(tmp_path):
    path = pair(tmp_path, "fake.png", "fake")
    path.write_bytes(b"these bytes are no PNG" * 10)
    assert problems(tmp_path) == [f"image {path} is not an image Pillow can read"]


def test_image_without_caption(tmp_path):
    path = image(tmp_path / "sub" / "lonely.png", 8, 8)
    assert problems(tmp_path) == [f"image {path} has no caption: expected {tmp_path / 'sub' / 'lonely.txt'} beside it"]


@pytest.mark.parametrize("kind, reason", [
    ("latin-1", "not UTF-8 text: byte 0xff at offset 0"),
    ("huge", "larger than 1 MiB"),
    ("pipe", "not a regular file (a named pipe)"),
    ("zero", "not a regular file (a character device)"),
    ("folder", "is a directory"),
])
def test_unreadable_captions(tmp_path, kind, reason):
    pair(tmp_path, "x.png", b"\xff\xfe\xfa" if kind == "latin-1" else b"a" * ((1 << 20) + 1))
    caption = tmp_path / "x.txt"
    if kind in ("pipe", "zero"):
        not_a_regular_file(caption, kind)
    elif kind == "folder":
        caption.unlink()
        caption.mkdir()
    assert problems(tmp_path) == [f"caption {caption} cannot be read ({reason})"]


def test_bad_metadata_lines_each_get_their_line(tmp_path):
    root = tmp_path / "data"
    image(root / "ok.png", 8, 8)
    image(tmp_path / "outside.png", 8, 8)
    meta = root / "metadata.jsonl"
    lines = ['{"file_name": "ok.png", "text": "fine"}', "{not json", "[1, 2]", '{"text": "no name"}',
             '{"file_name": "ok.png", "text": 7}', '{"file_name": "../outside.png", "text": "escapes"}',
             json.dumps({"file_name": str(root / "ok.png"), "text": "absolute"}),
             '{"file_name": "gone.png", "text": "missing"}']
    meta.write_text("\n".join(lines))
    found = problems(root)
    assert found[0].startswith(f"{meta}:2: not valid JSON (")
    assert found[1:] == [f"{meta}:3: not a JSON object",
                         f"{meta}:4: file_name is missing",
                         f"{meta}:5: text is not a string",
                         f"{meta}:6: file_name '../outside.png' points outside {root}",
                         f"{meta}:7: file_name '{root / 'ok.png'}' points outside {root}",
                         f"{meta}:8: file_name 'gone.png': {root / 'gone.png'} does not exist"]


def test_unreadable_metadata(tmp_path):
    image(tmp_path / "ok.png", 8, 8)
    meta = tmp_path / "metadata.jsonl"
    meta.write_bytes(b'{"file_name": "ok.png", "text": "fine"}\n{"file_name": "ok.png", "text": "caf\xe9"}\n')
    assert problems(tmp_path) == [f"{meta}:2: not UTF-8 text: byte 0xe9 at offset 36"]  # line 1 is read
    meta.unlink()
    not_a_regular_file(meta, "pipe")
    assert problems(tmp_path) == [f"{meta} cannot be read (not a regular file (a named pipe))"]


def test_every_problem_is_reported_at_once(tmp_path):
    pair(tmp_path, "a_good.png", "good")
    cut = pair(tmp_path, "b_cut.png", "cut", width=64, height=64)
    cut.write_bytes(cut.read_bytes()[:100])
    lonely = image(tmp_path / "c_lonely.png", 8, 8)
    pair(tmp_path, "d_latin.png", "caf\xe9".encode("latin-1"))
    both = image(tmp_path / "e_both.png", 8, 8)  # no caption, and no image either: two lines
    both.write_bytes(b"junk")
    found = problems(tmp_path)
    assert len(found) == 5
    assert found[0].startswith(f"image {cut} cannot be read (")
    assert found[1:] == [f"image {lonely} has no caption: expected {tmp_path / 'c_lonely.txt'} beside it",
                         f"caption {tmp_path / 'd_latin.txt'} cannot be read (not UTF-8 text: byte 0xe9 at offset 3)",
                         f"image {both} has no caption: expected {tmp_path / 'e_both.txt'} beside it",
                         f"image {both} is not an image Pillow can read"]


# ---------------------------------------------------------------------------------------------------------
# Fingerprint


def test_fingerprint_follows_content_not_paths(tmp_path):
    root = tmp_path / "data"
    cat = pair(root, "cat.png", "a cat")
    pair(root, "dog.png", "a dog", width=32, height=16)
    before = dataset_fingerprint(read_dataset(root, 512))
    identities = [[file_sha256(cat), "a cat", 512, 512], [file_sha256(root / "dog.png"), "a dog", 384, 768]]
    assert before == hashlib.sha256(b"".join(json.dumps(x).encode() + b"\n" for x in identities)).hexdigest()
    shutil.copytree(root, tmp_path / "moved")
    assert dataset_fingerprint(read_dataset(tmp_path / "moved", 512)) == before
    assert dataset_fingerprint(read_dataset(root, 256)) != before  # other buckets
    (root / "cat.txt").write_text("a black cat")
    assert dataset_fingerprint(read_dataset(root, 512)) != before
    (root / "cat.txt").write_text("a cat")
    image(cat, 16, 16, seed=1)
    assert dataset_fingerprint(read_dataset(root, 512)) != before
    image(cat, 16, 16)
    assert dataset_fingerprint(read_dataset(root, 512)) == before
