"""Rank 0's progress line."""

from __future__ import annotations

import threading
from pathlib import Path

from wurst.batch.folder import read_records
from wurst.batch.plan import PlannedImage


class Progress:
    """Rank 0's one line for the whole job: images done of the total (all processes), images per minute, ETA.
    With several processes, a thread counts the journals' records every few seconds."""

    def __init__(self, out: Path, images: list[PlannedImage], done: int, poll: bool):
        from tqdm.auto import tqdm

        self.out, self.images, self.start = out, images, done
        self.bar = tqdm(total=len(images), initial=done, unit="image", dynamic_ncols=True,
                        bar_format="{n}/{total} images [{elapsed}<{remaining}{postfix}]")
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.watch, daemon=True) if poll else None
        if self.thread:
            self.thread.start()

    def set(self, done: int) -> None:
        with self.lock:
            elapsed = self.bar.format_dict["elapsed"]
            if elapsed > 0 and done > self.start:
                self.bar.set_postfix_str(f"{(done - self.start) / elapsed * 60:.1f} images/min", refresh=False)
            self.bar.update(done - self.bar.n)

    def watch(self) -> None:
        while not self.stop.wait(3.0):
            self.set(len(set(read_records(self.out)) & set(range(len(self.images)))))

    def close(self, done: int) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join()
        self.set(done)
        self.bar.close()
