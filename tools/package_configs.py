"""Write wurst/weights/published_configs.json, the published configs an installed wurst needs (wurst.weights.original
reads the three stages' from it to convert original-format files), from configs/warp-ai, which stays their one
source. Run it after changing those configs; tests/weights/test_original_format.py fails while the two disagree.

    python tools/package_configs.py           # write the packaged copy
    python tools/package_configs.py --check   # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "warp-ai"
PACKAGED = ROOT / "wurst" / "weights" / "published_configs.json"
SOURCES = {
    "prior": CONFIGS / "wuerstchen-prior" / "prior" / "config.json",
    "decoder": CONFIGS / "wuerstchen" / "decoder" / "config.json",
    "vqgan": CONFIGS / "wuerstchen" / "vqgan" / "config.json",
}


def packaged_text() -> str:
    """The packaged file as it should be: {kind: config} in SOURCES' order, with a note of where it comes from."""
    sources = {kind: str(path.relative_to(ROOT)) for kind, path in SOURCES.items()}
    document = {"_generated": {"by": "tools/package_configs.py", "from": sources},
                **{kind: json.loads(path.read_text(encoding="utf-8")) for kind, path in SOURCES.items()}}
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the packaged copy is current")
    args = parser.parse_args(argv)
    text = packaged_text()
    current = PACKAGED.read_text(encoding="utf-8") if PACKAGED.is_file() else None
    if args.check:
        if current != text:
            print(f"{PACKAGED.relative_to(ROOT)} is stale: run python tools/package_configs.py", file=sys.stderr)
            return 1
        return 0
    if current != text:
        PACKAGED.write_text(text, encoding="utf-8")
        print(PACKAGED.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
