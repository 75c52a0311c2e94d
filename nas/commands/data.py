"""`nas data digits`: generate DigitsDet, the embedded default dataset, in the ultralytics layout."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_data_digits(args: argparse.Namespace) -> Path:
    from nas.detect.digits import generate_digits

    path = generate_digits(args.out, args.train, args.val, args.imgsz, args.seed, min_size=args.min_size,
                           max_size=args.max_size, progress=not args.quiet, workers=args.workers)
    print(path)
    return path


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="datasets").add_subparsers(dest="data_command", metavar="ACTION",
                                                                        required=True)
    d = data.add_parser("digits", help="generate DigitsDet, a small detection dataset of handwritten digits",
                        description="Paste scikit-learn's bundled handwritten digits onto textured canvases; writes "
                                    "images/, labels/ and data.yaml (ultralytics layout). Deterministic by seed.")
    d.add_argument("--out", required=True, type=Path, help="output folder")
    d.add_argument("--train", type=int, default=1000, help="training images (default 1000)")
    d.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    d.add_argument("--imgsz", type=int, default=320, help="image side in pixels (default 320)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--min-size", type=int, dest="min_size",
                   help="smallest digit height in pixels (default 16, or --max-size if smaller)")
    d.add_argument("--max-size", type=int, dest="max_size",
                   help="largest digit height in pixels, at most imgsz/2 (default 96, or imgsz/2 if smaller)")
    d.add_argument("--workers", type=int, default=None, help="processes (default: usable CPUs, at most 8)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_data_digits)
