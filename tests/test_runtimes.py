"""The optional runtimes' tests (tests/openvino_cases.py, tests/litert_cases.py), each in a pytest process of its own.
OpenVINO's native runtime loaded into the long suite's process (torch, ONNX Runtime and everything before it)
crashed it with a segmentation fault in a later test, while the same cases pass on their own; litert-torch imports
JAX, whose threads make every later os.fork() of the suite (the search workers) liable to deadlock."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

CASES = {"openvino": ("openvino_cases.py", ["openvino"], 5),
         "litert": ("litert_cases.py", ["ai_edge_litert", "litert_torch"], 4)}


@pytest.mark.parametrize("extra", list(CASES))
def test_runtime_cases_pass_in_their_own_process(extra):
    cases, modules, n = CASES[extra]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install 'hwnas-yolo[{extra}]')")
    tests = Path(__file__).resolve().parent
    r = subprocess.run([sys.executable, "-m", "pytest", str(tests / cases), "-o", "addopts=", "-q", "-p",
                        "no:cacheprovider", "-p", "no:anyio"], cwd=tests.parent, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert f"{n} passed" in r.stdout, r.stdout[-2000:]
