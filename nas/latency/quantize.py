"""int8 post-training static quantization of an exported ONNX model, one place for both runtimes: ONNX Runtime
(QDQ, per-channel int8 weights, uint8 activations, MinMax ranges) and OpenVINO (NNCF). Latency tables (`--dtype
int8`), their end-to-end checks and the exports of trained detectors all quantize through `quantize_model`.

Calibration data (`calibration_inputs`): an input shaped like an image (3 channels) is calibrated on real images
(`Protocol.calibration`: a folder, DigitsDet's by default) when given; any other input, that is every op behind the
stem, on seeded standard-normal tensors. Why not the real activations at that point: an op entry belongs to every
architecture that contains it, each with another prefix, so "the activation at that point" is not one tensor; running
a prefix per op would cost a network's forward per entry for numbers the timing does not depend on. The int8
kernels' speed does not depend on the scales: one ib block (48 ch, 40x40, k5, SE) quantized from normal, 100x normal,
uniform [0, 1] and rectified inputs ran within 2% of each other on both runtimes (docs/LATENCY.md). Accuracy does
depend on them, so exports of trained detectors calibrate the whole network on training images.
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nas.errors import ConfigError, NasError
from nas.system import import_without

log = logging.getLogger(__name__)

CALIBRATION_SAMPLES = 8        # per latency-table op or network: enough for MinMax ranges; speed ignores them
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FILL = 114 / 255               # the letterbox grey of the detection pipeline
INT8_BACKENDS = ("onnxruntime-cpu", "openvino-cpu")
NNCF_HINT = "int8 on openvino-cpu needs NNCF: pip install 'hwnas-yolo[openvino-int8]'"

Sample = tuple[np.ndarray, ...]  # one array per model input


# --- calibration data -------------------------------------------------------------------------------------------


def image_files(folder: str | Path) -> list[Path]:
    """The images directly in `folder` (or in its images/train, images/val subfolders: a DigitsDet root), sorted."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(str(root), None, "calibration image folder not found; pass --data DATA.yaml or leave it "
                                           "out for DigitsDet")
    for where in (root, root / "images" / "train", root / "images" / "val"):
        files = sorted(p for p in where.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if where.is_dir() else []
        if files:
            return files
    raise ConfigError(str(root), None, f"no images ({', '.join(IMAGE_SUFFIXES)}) to calibrate int8 ranges on")


def letterboxed(path: Path, height: int, width: int) -> np.ndarray:
    """One image as a (3, height, width) float32 array in [0, 1]: resized to fit, centred on grey (as detection
    validation feeds it)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        s = min(height / im.height, width / im.width)
        w, h = max(1, round(im.width * s)), max(1, round(im.height * s))
        im = im.resize((w, h), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255
    out = np.full((3, height, width), FILL, dtype=np.float32)
    top, left = (height - h) // 2, (width - w) // 2
    out[:, top:top + h, left:left + w] = a
    return out


def image_batches(files: Sequence[Path], height: int, width: int, batch: int = 1) -> list[np.ndarray]:
    """`files` letterboxed to height x width in batches of `batch` (N, 3, H, W); a short last batch is dropped."""
    arrays = [letterboxed(f, height, width) for f in files]
    return [np.stack(arrays[i:i + batch]) for i in range(0, len(arrays) - batch + 1, batch)]


def calibration_inputs(shapes: Sequence[Sequence[int]], batch: int = 1, seed: int = 0,
                       images: str | Path | None = None, n: int = CALIBRATION_SAMPLES) -> list[Sample]:
    """`n` calibration samples for a model with one input per shape (C, H, W): real images for a single 3-channel
    input when `images` names a folder, else seeded standard-normal tensors (see the module's docstring)."""
    if images is not None and len(shapes) == 1 and shapes[0][0] == 3:
        _, h, w = shapes[0]
        files = image_files(images)[:n * batch]
        return [(b,) for b in image_batches(files, h, w, batch)]
    rng = np.random.default_rng(seed)
    return [tuple(rng.standard_normal((batch, *s), dtype=np.float32) for s in shapes) for _ in range(n)]


# --- the quantizers ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ORT's quantization tools warn through the root logger on every call ("consider pre-processing", even after
    it); a table build quantizes hundreds of ops, so below ERROR they are dropped for the duration. A module-level
    `logging.warning` also installs a root handler when there is none (`basicConfig`), after which every record of
    the process printed twice; a handler added meanwhile is removed."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)


def float_tail(graph: Any) -> list[str]:
    """Names of the ONNX graph's nodes from which no Conv is reachable: a detector's box decoding (DFL softmax and
    expectation, anchors, the concatenation of pixel boxes with class probabilities). ONNX Runtime's QDQ quantizer
    would give that concatenation one uint8 scale for boxes up to the image size and probabilities below 1, which
    rounds every probability to 0 or 1 (mAP50-95 0.227 -> 0.0 on a trained DigitsDet detector); deployments keep
    the decoding in float, and so do the tables' neck+head entries."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    reaches: dict[int, bool] = {}
    for node in reversed(graph.node):  # ONNX nodes are topologically sorted: consumers come later
        reaches[id(node)] = node.op_type == "Conv" or any(reaches.get(id(c), False) for out in node.output
                                                           for c in consumers.get(out, ()))
    return [node.name for node in graph.node if not reaches[id(node)]]


def quantize_ort(onnx_path: str | Path, out_path: str | Path, samples: Sequence[Sample],
                 keep_float_tail: bool = False) -> Path:
    """Static QDQ int8 for ONNX Runtime: per-channel int8 weights, uint8 activations (MLAS's fast U8S8 path on x86:
    with int8 activations the first conv of an ib block stayed unfused and the block ran 2x slower), MinMax ranges.
    The model is pre-processed first (shape inference, ORT's basic fusions): without it a bias behind an Identity
    stayed float and its conv was left out of the QLinearConv fusion."""
    import onnx

    from nas.latency.runtime import import_ort

    import_ort()  # telemetry off before onnxruntime first initialises
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out_path)
    pre = out.with_name(out.stem + ".pre.onnx")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initialisers = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initialisers]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([dict(zip(names, s)) for s in samples])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    try:
        with _quiet_root_logger():
            quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
            tail = float_tail(onnx.load(str(pre)).graph) if keep_float_tail else []
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=tail)
    except Exception as err:  # the quantizer raises many types
        raise NasError(f"ONNX Runtime int8 quantization of {onnx_path} failed ({type(err).__name__}: "
                       f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from err
    finally:
        pre.unlink(missing_ok=True)
    return out


def import_nncf() -> Any:
    """nncf, quiet, without its telemetry. Importing nncf (3.4) builds an openvino_telemetry client that counts the
    absence of a consent file as consent and writes a client id into ~/intel; nas writes only into its run folder
    and sends nothing, so the first import runs with openvino_telemetry unimportable (nncf then uses a stub)."""
    from nas.latency.openvino import import_openvino

    import_openvino()  # its own import guard first
    try:
        nncf = import_without("nncf", "openvino_telemetry")
    except ImportError as err:
        raise NasError(NNCF_HINT) from err
    nncf.set_log_level(logging.ERROR)  # its INFO lines, once per quantized op
    return nncf


def openvino_float_tail(model: Any) -> list[str]:
    """`float_tail` on an OpenVINO model: the names of the ops from which no (group) convolution is reachable."""
    convs = {"Convolution", "GroupConvolution"}
    reaches: dict[str, bool] = {}
    ops = model.get_ordered_ops()
    for op in reversed(ops):
        after = (t.get_node() for out in op.outputs() for t in out.get_target_inputs())
        reaches[op.get_friendly_name()] = op.get_type_name() in convs or any(
            reaches.get(n.get_friendly_name(), False) for n in after)
    return [op.get_friendly_name() for op in ops if not reaches[op.get_friendly_name()]
            and op.get_type_name() not in ("Parameter", "Result", "Constant")]


def quantize_openvino(onnx_path: str | Path, out_path: str | Path, samples: Sequence[Sample],
                      keep_float_tail: bool = False) -> Path:
    """NNCF post-training quantization for the OpenVINO CPU plugin (its defaults: symmetric int8 activations,
    per-channel int8 weights, fast bias correction), written as OpenVINO IR (`out_path` .xml + .bin, full-precision
    float parts: `compress_to_fp16` would halve them)."""
    from nas.latency.openvino import import_openvino

    ov = import_openvino()
    nncf = import_nncf()
    out = Path(out_path).with_suffix(".xml")
    try:
        model = ov.Core().read_model(str(onnx_path))
        ignored = nncf.IgnoredScope(names=openvino_float_tail(model), validate=False) if keep_float_tail else None
        # its progress bars (rich) write to stdout, where `--json` output goes: captured and dropped
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quantized = nncf.quantize(model, nncf.Dataset([list(s) for s in samples]), subset_size=len(samples),
                                      target_device=nncf.TargetDevice.CPU, ignored_scope=ignored)
        ov.save_model(quantized, str(out), compress_to_fp16=False)
    except Exception as err:  # OpenVINO and NNCF raise many types
        raise NasError(f"NNCF int8 quantization of {onnx_path} failed ({type(err).__name__}: "
                       f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''})") from err
    return out


def quantize_model(backend: str, onnx_path: str | Path, samples: Sequence[Sample],
                   out_path: str | Path | None = None, *, decodes: bool = False) -> Path:
    """`onnx_path` quantized to int8 for `backend` (onnxruntime-cpu: a QDQ .onnx; openvino-cpu: an IR .xml),
    calibrated on `samples`; written beside the input unless `out_path` says where. `decodes`: the model ends in a
    detector's box decoding, kept in float (`float_tail`; NNCF alone quantized the DFL expectation's MatMul, which
    cost 0.014 mAP50-95 on a trained DigitsDet detector at 256 px, mostly at high IoU thresholds)."""
    if backend not in INT8_BACKENDS:
        raise ConfigError("latency protocol", "dtype", f"int8 is measured on {' or '.join(INT8_BACKENDS)}, not "
                                                       f"{backend}")
    if not samples:
        raise NasError(f"no calibration samples to quantize {onnx_path}")
    src = Path(onnx_path)
    if backend == "onnxruntime-cpu":
        return quantize_ort(src, out_path or src.with_name(src.stem + ".int8.onnx"), samples, decodes)
    return quantize_openvino(src, out_path or src.with_name(src.stem + ".int8.xml"), samples, decodes)


def quantizer_versions(backend: str) -> dict[str, str]:
    """The quantizer's package version for a table header (ORT's own is recorded already)."""
    if backend != "openvino-cpu":
        return {}
    return {"nncf": import_nncf().__version__}
