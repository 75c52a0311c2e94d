"""The openvino-cpu backend's tests (tests/openvino_cases.py) in a pytest process of their own: OpenVINO's native
runtime loaded into the long suite's process (torch, ONNX Runtime and everything before it) crashed it with a
segmentation fault in a later test, while the same cases pass on their own."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'hwnas-yolo[openvino]')")


def test_openvino_backend_cases_pass_in_their_own_process():
    tests = Path(__file__).resolve().parent
    r = subprocess.run([sys.executable, "-m", "pytest", str(tests / "openvino_cases.py"), "-o", "addopts=",
                        "-q", "-p", "no:cacheprovider"], cwd=tests.parent, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "5 passed" in r.stdout, r.stdout[-2000:]
