"""The int8 flags the `nas lut` actions share (--dtype, --data) and where int8 calibration images come from."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any


def calibration_images(data: str | None) -> str:
    """The folder whose images calibrate int8 image inputs: --data's training images, else a small DigitsDet
    generated once into the user cache (32 images, a few seconds)."""
    if data:
        from nas.detect.data import load_data_config

        return str(load_data_config(data).split("train")[0])
    from nas.detect.digits import ensure_digits
    from nas.system import cache_dir

    return str(ensure_digits(cache_dir() / "digitsdet_calibration", 32, 0, progress=False).parent)


def local_calibration(protocol: Any) -> Any:
    """`protocol` with this machine's calibration images when the table's folder is not here (a copied table)."""
    if protocol.dtype != "int8" or (protocol.calibration and Path(protocol.calibration).is_dir()):
        return protocol
    return dataclasses.replace(protocol, calibration=calibration_images(None))


def int8_flags(g: Any, default: str | None) -> None:
    """--dtype and --data on a parser or argument group; `default` None: the source table's dtype (adapt)."""
    g.add_argument("--dtype", choices=("fp32", "int8"), default=default,
                   help="fp32, or int8: each op's ONNX export statically quantized for the backend (onnxruntime-cpu: "
                        "QDQ; openvino-cpu: NNCF, pip install 'hwnas-yolo[openvino-int8]')"
                        + (f" (default {default})" if default else " (default: the source table's)"))
    g.add_argument("--data", help="int8: data YAML whose training images calibrate image inputs (default: a small "
                                  "DigitsDet in the user cache)")


def with_dtype(protocol: Any, args: argparse.Namespace) -> Any:
    """`nas lut adapt`: the target protocol with --dtype (a dtype the source lacks is refused by adapt: latency does
    not transfer across dtypes) and, for int8, this machine's calibration images."""
    if args.dtype:
        protocol = dataclasses.replace(protocol, dtype=args.dtype, calibration=None)
    if protocol.dtype == "int8":
        protocol = dataclasses.replace(protocol, calibration=calibration_images(args.data))
    return protocol
