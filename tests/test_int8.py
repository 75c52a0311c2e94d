"""int8 (issue 18): latency tables of statically quantized ops, their refusal where fp32 is expected, and exports
of a detector checked against torch and scored through each runtime. OpenVINO runs only in child processes (in the
suite's own process its native runtime crashed a later test: tests/test_runtimes.py)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nas.detect.digits import generate_digits
from nas.latency.protocol import Protocol
from nas.latency.table import LatencyTable, LatencyTableError

ROOT = Path(__file__).resolve().parent.parent
ARCH = "zoo:mobilenet_v3_small_100"
FAST = ["--repeats", "3", "--min-time", "0", "--warmup", "1", "--warmup-time", "0", "--calibrate", "0", "--quiet"]


def nas(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("digits")
    return str(generate_digits(root, 32, 16, imgsz=64, min_size=12, max_size=32, progress=False, workers=0))


def test_ort_int8_table_header_and_refusal_as_fp32(digits, tmp_path):
    out = tmp_path / "int8.csv"
    r = nas("lut", "build", "--out", str(out), "--arch", ARCH, "--resolution", "32", "--backend", "onnxruntime-cpu",
            "--dtype", "int8", "--data", digits, "--no-reference", *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    table = LatencyTable.load(out)
    assert table.protocol.dtype == "int8" and "#   dtype: int8" in out.read_text()
    assert Path(table.protocol.calibration) == Path(digits).parent / "images" / "train"
    assert len(table.entries) >= 10 and all(0 < e.p10_us < 1e6 for e in table.entries.values())

    with pytest.raises(LatencyTableError) as err:  # a caller expecting fp32 (validate, a search's check)
        table.check_compatible(Protocol(backend="onnxruntime-cpu"))
    assert "dtype: table 'int8', requested 'fp32'" in str(err.value) and "\n" not in str(err.value)

    r = nas("lut", "adapt", str(out), "--space", "search_spaces/uib_yolo.yaml", "--dtype", "fp32", "--out",
            str(tmp_path / "fp32.csv"), "--quiet")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("nas: error:")]
    assert r.returncode == 2 and len(errors) == 1 and r.stderr.strip().endswith(errors[0]), r.stderr
    assert "header.protocol.dtype" in errors[0] and "'int8'" in errors[0] and "'fp32'" in errors[0]
    assert not (tmp_path / "fp32.csv").exists()  # refused before anything was measured


def test_openvino_int8_table_and_export_match_torch(digits, tmp_path):
    pytest.importorskip("nncf", reason="pip install 'hwnas-yolo[openvino-int8]'")
    out = tmp_path / "ov-int8.csv"
    r = nas("lut", "build", "--out", str(out), "--arch", ARCH, "--resolution", "32", "--backend", "openvino-cpu",
            "--dtype", "int8", "--data", digits, *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    header = LatencyTable.load(out).header
    assert header["protocol"]["dtype"] == "int8" and header["device"]["nncf"]

    # the whole detector as OpenVINO IR, raw head outputs against torch on 8 val images (fp32), and int8 written
    script = textwrap.dedent(f"""
        import json, torch
        from nas.arch.detector import Detector
        from nas.arch.headconfig import HeadConfig
        from nas.arch.zoo import get_arch
        from nas.report.deploy import deploy
        torch.manual_seed(0)
        model = Detector(get_arch("mobilenet_v3_small_100").with_resolution(64), HeadConfig())
        out = deploy(model, 64, {str(tmp_path / "export")!r}, ["openvino"], data={digits!r}, int8=True,
                     evaluate=False, calibration_images=8)
        print(json.dumps([d.to_dict() for d in out]))
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    fp32, int8 = json.loads(r.stdout.strip().splitlines()[-1])
    assert fp32["dtype"] == "fp32" and Path(fp32["path"]).suffix == ".xml" and fp32["max_diff"] <= 1e-3
    assert int8["dtype"] == "int8" and Path(int8["path"]).is_file() and Path(int8["path"]).with_suffix(".bin").is_file()


def test_int8_export_of_a_trained_detector_reports_the_drop(digits, tmp_path):
    pytest.importorskip("nncf", reason="pip install 'hwnas-yolo[openvino-int8]'")
    r = nas("train", ARCH, "--data", digits, "--epochs", "1", "--imgsz", "64", "--batch", "8", "--workers", "0",
            "--project", str(tmp_path), "--name", "tiny", "--no-onnx", "--export", "onnx,openvino", "--int8",
            "--json", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    exports = {(d["format"], d["dtype"]): d for d in json.loads(r.stdout)["exports"]}
    assert set(exports) == {(f, d) for f in ("onnx", "openvino") for d in ("fp32", "int8")}
    for fmt in ("onnx", "openvino"):
        fp32, int8 = exports[fmt, "fp32"], exports[fmt, "int8"]
        assert fp32["max_diff"] <= 1e-3 and math.isfinite(fp32["map50_95"])
        assert math.isfinite(int8["map50_95"]) and int8["map50_95_drop"] == pytest.approx(
            fp32["map50_95"] - int8["map50_95"])
        assert Path(int8["path"]).is_file()

    r = nas("train", ARCH, "--data", digits, "--int8")
    assert r.returncode == 2 and "--int8" in r.stderr and "--export" in r.stderr
