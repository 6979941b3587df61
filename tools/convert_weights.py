"""Convert Würstchen checkpoints into wurst's own compact layout: one folder per repository, holding wurst.json
(every config), one safetensors file per model under wurst's module names, and the tokenizer files.

    python tools/convert_weights.py --out converted       # from warp-ai/wuerstchen-prior and warp-ai/wuerstchen
    python tools/convert_weights.py --prior DIR --decoder DIR --out converted --dtype bfloat16
    python tools/convert_weights.py --out converted --stage-c model_v2_stage_c.pt --stage-b model_v2_stage_b.pt \\
        --stage-a vqgan_f4_v1_500k.pt                                      # the original dome272 release files
    python tools/convert_weights.py --out blend --interpolate base.pt aesthetic.pt --alpha 0.5
    python tools/convert_weights.py --out converted --image-encoder model_v2_stage_b.pt   # for image to image

The text encoders and tokenizers always come from --prior and --decoder (hub ids or directories in hub or wurst
layout). --stage-c/-b/-a replace a stage's weights with those of an original-format .pt file or a hub component
folder (prior/, decoder/, vqgan/). --interpolate A B --alpha W makes Stage C (1 - W)·A + W·B (the published
prior is the 50% blend of v2-base and v2-aesthetic). The output loads with wurst.load_pipeline(
prior="OUT/prior", decoder="OUT/decoder"); the converter reloads it and checks every tensor before it finishes.

Stage C's image encoder (image to image) is written into OUT/prior as stage_c_encoder.safetensors: from
--image-encoder (an original .pt holding effnet_state_dict, or a converted folder), else from a --stage-b release
file that holds one, else carried over from a converted --prior that has one.

This script is the command line of wurst.weights.convert, which does the work.
"""

from __future__ import annotations

import argparse
import sys

from wurst.errors import WurstError
from wurst.weights.convert import DTYPES, convert
from wurst.weights.repository import KINDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", default=KINDS["prior"].default, help="prior repository (hub id or directory)")
    parser.add_argument("--decoder", default=KINDS["decoder"].default, help="decoder repository (hub id or directory)")
    parser.add_argument("--out", required=True, help="output folder; gets prior/ and decoder/")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep)")
    parser.add_argument("--stage-c", help="Stage C weights: original .pt file or hub prior/ folder")
    parser.add_argument("--stage-b", help="Stage B weights: original .pt file or hub decoder/ folder")
    parser.add_argument("--stage-a", help="Stage A weights: original .pt file or hub vqgan/ folder")
    parser.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="Stage C = (1 - alpha) A + alpha B")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of B in --interpolate (default 0.5)")
    parser.add_argument("--image-encoder", help="Stage C's image encoder for image to image: an original .pt "
                        "holding effnet_state_dict (model_v2_stage_b.pt) or a converted folder (default: from "
                        "--stage-b or a converted --prior, when they hold one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        convert(args.out, prior=args.prior, decoder=args.decoder, dtype=DTYPES[args.dtype] if args.dtype else None,
                stage_c=args.stage_c, stage_b=args.stage_b, stage_a=args.stage_a, interpolate=args.interpolate,
                alpha=args.alpha, image_encoder=args.image_encoder, overwrite=args.overwrite, on_written=print)
    except (WurstError, ValueError, OSError) as e:
        print(f"convert_weights: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
