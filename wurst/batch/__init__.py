"""`python -m wurst.batch PROMPTS --out DIR [options]`: many prompts, in one process or under torchrun.

    python -m wurst.batch prompts.txt --out images/
    torchrun --nproc-per-node 4 -m wurst.batch prompts.jsonl --out images/ --batch-size 4

PROMPTS is a text file (one prompt per line; blank lines are skipped) or, when it ends in .jsonl, JSON Lines with
`prompt` and optional `negative_prompt`, `seed`, `height`, `width`, `num_images`. The options are the CLI's; they
are the defaults of lines that do not set their own.

What an image is depends on the job alone, never on the number of processes, the order of work or restarts:
- Images are numbered k = 0, 1, ... in file order; image k is DIR/k.png (zero-padded) with the CLI's metadata.
- A line without a seed: image k is what `python -m wurst PROMPT --seed BASE+k` draws (BASE is --seed, 0 by
  default). A line with its own seed is what `python -m wurst PROMPT --seed SEED --num-images N` draws.
- --batch-size B runs up to B images of one size through each forward pass, with one generator per image, so an
  image equals its batch-size-1 result up to float rounding. Groups are fixed by the job (same-size images in
  index order, B at a time; a seeded line of N images is one group), so a rerun recomputes exactly those groups.

Files appear whole or not at all (see files.atomic_file). Each process appends a record to its own journal
(DIR/.journal/rank-R.jsonl) only after the image is in place; when every image is done, rank 0 writes
DIR/manifest.jsonl, sorted by index, and removes the journals. Rerunning the same command skips every image whose
file and record are complete, so after a kill and a rerun DIR holds exactly what an uninterrupted run writes.
DIR/job.json holds the job's settings; a different job into the same DIR is refused.
"""

from wurst.batch.app import main

__all__ = ["main"]
