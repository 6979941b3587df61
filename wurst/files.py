"""Files that appear whole or not at all, and the PNGs wurst writes (their settings in text chunks)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def png_bytes(image, metadata: dict[str, str]) -> bytes:
    """The image as PNG, its metadata in iTXt chunks (UTF-8, so any prompt survives)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: `path` holds either its old content or all that was written in the
    block, whenever the process dies. Where the file system allows (Linux O_TMPFILE), the data goes to an unnamed
    file that is linked in only when complete, so that not even a SIGKILL leaves a temporary file behind;
    elsewhere a named temporary file is renamed into place. An OSError names `path`."""
    path = Path(path)
    try:
        fd, temporary = os.open(path.parent, os.O_TMPFILE | os.O_WRONLY, 0o666), None
    except (AttributeError, OSError):  # not Linux, or a file system without O_TMPFILE
        try:
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        except OSError as e:
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        os.fchmod(fd, 0o666 & ~current_umask())
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            if temporary is None:
                try:
                    link_unnamed(fd, path)  # appears complete, under its name, in one step
                    return
                except FileExistsError:  # replacing a file: link under a temporary name, then rename over it
                    temporary = str(path.with_name(f".{path.name}.{os.getpid()}.partial"))
                    link_unnamed(fd, Path(temporary))
        os.replace(temporary, path)
    except OSError as e:
        if temporary:
            Path(temporary).unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        if temporary:
            Path(temporary).unlink(missing_ok=True)
        raise


def write_file_atomically(path: Path, data: bytes) -> None:
    """`path` holds either its old content or all of `data` (see atomic_file)."""
    with atomic_file(path) as f:
        f.write(data)


def link_unnamed(fd: int, path: Path) -> None:
    """Give the O_TMPFILE file open as `fd` the name `path`. Plain link() would link /proc's symlink itself;
    passing a directory descriptor makes os.link call linkat(..., AT_SYMLINK_FOLLOW), which links the file."""
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.link(f"/proc/self/fd/{fd}", path.name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=True)
    finally:
        os.close(folder)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_png_atomically(image, path: Path, metadata: dict[str, str]) -> None:
    write_file_atomically(path, png_bytes(image, metadata))


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (a LoRA or a prompts file may be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def png_metadata(settings: dict, *, image_index: int, command: list[str]) -> dict[str, str]:
    """PNG text chunks: each setting (a list or dict as JSON), the image's place in its seed's batch, all of it as
    JSON, and the command."""
    metadata = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in settings.items()}
    metadata["image_index"] = str(image_index)  # this image's place in a --num-images batch from that seed
    metadata["wurst"] = json.dumps({**settings, "image_index": image_index})
    metadata["command"] = shlex.join(command)
    return metadata
