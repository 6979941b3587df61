"""The training checkpoint and the metrics journal in the output folder.

- `checkpoint.pt`: everything a resumed run needs to continue as if it had never stopped: the step, the trainable
  weights, the optimizer's and learning-rate schedule's state, the EMA weights and the RNG state. (The data order and
  each sample's noise derive from the seed and the step: the step is the whole data position.) Written atomically,
  so the file on disk is always a complete checkpoint, the last one written.
- `metrics.jsonl`: one record per step. A record is appended after its step; a resumed run first drops the records
  of steps after its checkpoint (they will be redone), so each step is recorded exactly once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from wurst.errors import CheckpointError
from wurst.files import atomic_file, open_regular, write_file_atomically

CHECKPOINT, METRICS = "checkpoint.pt", "metrics.jsonl"


def save_checkpoint(out: Path, state: dict) -> None:
    with atomic_file(out / CHECKPOINT) as f:
        torch.save(state, f)


def load_checkpoint(out: Path) -> dict | None:
    """The folder's checkpoint, or None where it has none yet. Read with weights_only=True: it cannot run code."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        with open_regular(path) as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is a damaged file
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}): remove it to start the job over") from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path} is not a wurst.train checkpoint: remove it to start the job over")
    return state


class Metrics:
    """metrics.jsonl, append-only on rank 0."""

    def __init__(self, out: Path, *, after_step: int):
        """Keep the records of steps 1..after_step (the checkpoint's) and drop the rest, including a line that a kill
        cut short."""
        self.path = out / METRICS
        if self.path.exists():
            with open_regular(self.path) as f:
                lines = f.read().decode("utf-8", errors="replace").split("\n")
            kept = []
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= after_step:
                    kept.append(line + "\n")
            write_file_atomically(self.path, "".join(kept).encode())
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def append(self, record: dict) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)
