"""Where weights come from when they are not a local folder: the Hugging Face hub, through its local cache (offline
too), and wurst's own cache of what it derives from them. The hub's errors are translated here, once, into a
one-line ModelNotFoundError."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from wurst.errors import ModelNotFoundError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
T = TypeVar("T")


def cache_root() -> Path:
    """wurst's own cache: cast copies, the extracted image encoder. $WURST_CACHE, by default ~/.cache/wurst."""
    return Path(os.environ.get("WURST_CACHE", Path.home() / ".cache" / "wurst"))


def inside_repository(path: Path, folder: Path) -> bool:
    """Whether `path` lies inside the repository folder `folder` once symlinks are resolved, as every file a
    repository names must: inside `folder` itself or, where `folder` is in a snapshot of the Hugging Face cache
    (models--ORG--NAME/snapshots/REVISION/...), inside that repository's blobs/, which the snapshot's files link
    to."""
    target, folder = Path(path).resolve(), Path(folder).absolute()
    roots = [folder.resolve()]
    snapshot = next((p for p in (folder, *folder.parents) if p.parent.name == "snapshots"), None)
    if snapshot is not None and (snapshot.parent.parent / "blobs").is_dir():
        roots.append((snapshot.parent.parent / "blobs").resolve())
    return any(target.is_relative_to(root) for root in roots)


def _from_hub(fetch: Callable[[], T], *, offline: str, failed: str) -> T:
    """fetch(), its hub errors as one line: `offline` when the file is not cached and the hub cannot be reached,
    `failed: <the hub's first line>` when the hub answers with an error or refuses the name (`a--b/c`)."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return fetch()
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise ModelNotFoundError(offline) from e
    except (HfHubHTTPError, HFValidationError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelNotFoundError(f"{failed}: {first_line}") from e


def resolve(ref: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """The local directory of a model: `ref` itself if it is a directory, else a hub id fetched through the
    Hugging Face cache (only the files matching `allow_patterns`)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    text = str(ref)
    if not HUB_ID.match(text):
        raise ModelNotFoundError(f"model directory not found: {text}")
    from huggingface_hub import snapshot_download

    return Path(_from_hub(
        lambda: snapshot_download(text, allow_patterns=allow_patterns),
        offline=f"{text} is neither a local directory nor in the Hugging Face cache, and the hub cannot be reached "
                f"(offline): download it on a connected machine with `hf download {text}`, or pass a local directory",
        failed=f"cannot fetch {text} from the hub",
    ))


def hub_file(repo_id: str, filename: str, *, offline: str) -> Path:
    """One file of a hub repository, through the Hugging Face cache; `offline` is the message when it is not
    cached and the hub cannot be reached."""
    from huggingface_hub import hf_hub_download

    return Path(_from_hub(lambda: hf_hub_download(repo_id, filename), offline=offline,
                          failed=f"cannot fetch {filename} from {repo_id}"))
