"""Files that appear whole or not at all, and the PNGs wurst writes (their settings in text chunks)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shlex
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no locks, and no stale partial files are removed
    pass


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
    elsewhere, and to replace an existing file, it is named `.NAME.partial` beside `path` and renamed into place.
    That file is locked while it is written: one a killed process left is unlocked, and the next write of `path`
    removes it. An OSError names `path`."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        remove_stale(partial)
        try:
            fd, temporary = os.open(path.parent, os.O_TMPFILE | os.O_WRONLY, 0o666), None
        except (AttributeError, OSError):  # not Linux, or a file system without O_TMPFILE
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY  # its mode 0o666 less the umask, as a plain open gives
            fd, temporary = claim(partial, lambda: os.open(partial, flags, 0o666)), partial
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            lock(fd)
            yield f
            f.flush()
            os.fsync(f.fileno())
            if temporary is None:
                try:
                    link_unnamed(fd, path)  # appears complete, under its name, in one step
                    return
                except FileExistsError:  # replacing a file: link under the partial name, then rename over it
                    claim(partial, lambda: link_unnamed(fd, partial))
                    temporary = partial
            os.replace(temporary, path)  # while the file is open and locked
    except OSError as e:
        if temporary:
            temporary.unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        if temporary:
            temporary.unlink(missing_ok=True)
        raise


def claim(partial: Path, make):
    """make(), which creates `partial`; a `partial` that exists now is another process's, writing the same file."""
    try:
        return make()
    except FileExistsError as e:
        raise OSError(errno.EBUSY, "another process is writing it") from e


def lock(fd: int) -> None:
    """Hold an exclusive lock on the file open as `fd` while this process lives (where locks are supported)."""
    with contextlib.suppress(OSError, NameError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale(partial: Path) -> None:
    """Remove `partial` if no live process holds its lock: a process killed while writing it left it."""
    try:
        fd = os.open(partial, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return  # none (or none of ours)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(partial).st_ino == os.fstat(fd).st_ino:  # still the file that was locked
            partial.unlink()
    except (OSError, NameError):  # held by a live writer, gone meanwhile, or no locks here: leave it
        pass
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes) -> None:
    """`path` holds either its old content or all of `data` (see atomic_file)."""
    with atomic_file(path) as f:
        f.write(data)


class NotRegularFileError(OSError):
    """A path that is not a regular file (after symlinks): a named pipe, a device, a socket."""


FILE_KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
              stat.S_IFSOCK: "a socket"}


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` open for reading, if it is a regular file (symlinks followed). Anything else is refused before a byte
    is read: a folder (IsADirectoryError), or a named pipe, which would block, or a device such as /dev/zero, which
    never ends (NotRegularFileError). Opening does not wait for a pipe's writer (O_NONBLOCK)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(mode):
            kind = FILE_KINDS.get(stat.S_IFMT(mode), "a special file")
            raise NotRegularFileError(errno.EINVAL, f"not a regular file ({kind})", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | os.PathLike, limit: int) -> bytes:
    """All of the regular file `path` (see open_regular), refused with an OSError (EFBIG) before it is read when
    it holds more than `limit` bytes."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        data = b"" if size > limit else f.read(limit + 1)  # read past the limit: a file may grow while it is read
        if size > limit or len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {size_text(limit)}", str(path))
        return data


def size_text(size: int) -> str:
    """A byte count for messages: 16 MiB, 256 KiB, 100 bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


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
    """The sha256 of a regular file (open_regular), read in 1 MiB chunks (a LoRA or a prompts file may be large)."""
    digest = hashlib.sha256()
    with open_regular(path) as f:
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
