"""wurst/weights/converted.py: wurst.json has one writer and one reader, which checks its format version. A folder
from a newer wurst is refused in one line that says to upgrade, by the repository reader and by the image
encoder's; the current version reads. Folders are replaced whole or not at all."""

import json
import shutil

import pytest
import torch

from tests.support.image_fixtures import tiny_encoder
from wurst import ConfigError
from wurst.weights import image_encoder
from wurst.weights.convert import convert
from wurst.weights.converted import CONVERTED_INDEX, FORMAT_VERSION, read_index, replace_folder, write_index
from wurst.weights.repository import read_repository


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_prior_repo, tiny_decoder_repo, encoder_folder):
    out = tmp_path_factory.mktemp("converted")
    convert(out, prior=str(tiny_prior_repo), decoder=str(tiny_decoder_repo), image_encoder=str(encoder_folder))
    return out


def with_version(folder, tmp_path, version):
    """A copy of `folder` whose wurst.json has `version` (None: no version field)."""
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    index = json.loads((copy / CONVERTED_INDEX).read_text())
    index.pop("version") if version is None else index.update(version=version)
    (copy / CONVERTED_INDEX).write_text(json.dumps(index))
    return copy


def test_the_index_carries_the_format_version(converted, encoder_folder):
    for folder, kind in [(converted / "prior", "prior"), (converted / "decoder", "decoder"),
                         (encoder_folder, "image_encoder")]:
        index = json.loads((folder / CONVERTED_INDEX).read_text())
        assert (index["format"], index["version"], index["kind"]) == ("wurst", FORMAT_VERSION, kind)
        assert read_index(folder) == index
    assert set(read_index(converted / "prior")["models"]) == {"stage_c", "text_encoder", "stage_c_encoder"}


def test_the_current_version_is_read(converted, encoder_folder):
    assert read_repository(converted / "prior", "prior").converted
    assert read_repository(converted / "decoder", "decoder").converted
    for folder in (converted / "prior", encoder_folder):
        assert image_encoder.has_converted(folder)
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        assert torch.equal(image_encoder.load_image_encoder(folder)(x), image_encoder.load_converted(encoder_folder)(x))


def refusal(call) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("reader", ["repository", "image encoder"])
def test_a_newer_version_is_refused_saying_to_upgrade(reader, converted, encoder_folder, tmp_path):
    if reader == "repository":
        folder = with_version(converted / "decoder", tmp_path, FORMAT_VERSION + 1)
        calls = [lambda: read_repository(folder, "decoder")]
    else:
        folder = with_version(encoder_folder, tmp_path, FORMAT_VERSION + 1)
        calls = [lambda: image_encoder.has_converted(folder), lambda: image_encoder.load_converted(folder),
                 lambda: image_encoder.load_image_encoder(folder)]
    for call in calls:
        message = refusal(call)
        assert str(folder / CONVERTED_INDEX) in message
        assert f"version {FORMAT_VERSION + 1} of wurst's converted format" in message
        assert f"reads version {FORMAT_VERSION} at most: upgrade wurst" in message


@pytest.mark.parametrize("version", [None, 0, "1", 1.0, True])
def test_a_missing_or_invalid_version_is_refused(version, converted, encoder_folder, tmp_path):
    prior = with_version(converted / "prior", tmp_path, version)
    encoder = with_version(encoder_folder, tmp_path, version)
    for call, folder in [(lambda: read_repository(prior, "prior"), prior),
                         (lambda: image_encoder.load_converted(encoder), encoder),
                         (lambda: image_encoder.load_image_encoder(encoder), encoder)]:
        message = refusal(call)
        assert f"{folder / CONVERTED_INDEX} has no valid format version (its field 'version' is {version!r}" in message


def test_a_foreign_index_is_refused(tmp_path):
    (tmp_path / CONVERTED_INDEX).write_text(json.dumps({"format": "other", "version": 1, "models": {}}))
    assert "is not a wurst index" in refusal(lambda: image_encoder.has_converted(tmp_path))


def test_the_encoder_is_not_added_to_a_folder_of_a_newer_version(tmp_path):
    write_index(tmp_path, kind="prior", models={"stage_c": {}})
    index = {**json.loads((tmp_path / CONVERTED_INDEX).read_text()), "version": FORMAT_VERSION + 1}
    (tmp_path / CONVERTED_INDEX).write_text(json.dumps(index))
    assert "upgrade wurst" in refusal(lambda: image_encoder.save_converted(tiny_encoder(), tmp_path))
    assert json.loads((tmp_path / CONVERTED_INDEX).read_text()) == index
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONVERTED_INDEX]


def test_a_failed_replacement_leaves_the_old_folder(tmp_path):
    target = tmp_path / "prior"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError), replace_folder(target) as partial:
        (partial / "new").write_text("new")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["old", "prior"]
    with replace_folder(target) as partial:
        (partial / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new", "prior"]
