"""The openvino-cpu profiling backend (nas.latency.openvino), run by tests/test_runtimes.py in a process of its own:
timings, the header's version, the measured model computing what torch computes, and a table built through the
command line."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, hide_package

from nas.arch.blocks import build_block
from nas.arch.spec import BlockSpec
from nas.commands.main import main
from nas.errors import NasError
from nas.latency.environment import environment
from nas.latency.onnx import export_onnx
from nas.latency.openvino import INSTALL_HINT, import_openvino, openvino_runner
from nas.latency.profile import measure
from nas.latency.protocol import Protocol
from nas.latency.table import LatencyTable

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'hwnas-yolo[openvino]')")

FAST_OV = Protocol(backend="openvino-cpu", warmup_runs=2, warmup_s=0.0, repeats=10, min_time_s=0.0)
# A UIB ExtraDW block with SE and hswish: every kind of layer a searched block has.
UIB = BlockSpec(op="extra_dw", kernels=(3, 5), expand=4.0, out=24, stride=1, se=0.25, act="hswish")


def _trained_like(module: torch.nn.Module) -> torch.nn.Module:
    """Random batch-norm statistics, as after training: fresh ones (mean 0, var 1) would hide a folding error."""
    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return module.eval()


def test_measured_op_is_positive_and_finite_and_header_records_openvino() -> None:
    m = measure(build_block(UIB, 24), (24, 20, 20), FAST_OV)
    values = (m.min_us, m.p10_us, m.median_us, m.p90_us, m.mean_us)
    assert all(math.isfinite(v) and v > 0 for v in values) and m.n >= 10
    assert m.min_us <= m.p10_us <= m.median_us <= m.p90_us
    assert m.reference_us is not None and m.reference_us > 0  # the reference ran in OpenVINO too
    env = environment(FAST_OV)
    assert env["openvino"] == ov.__version__.split("-")[0] and env["protocol"]["backend"] == "openvino-cpu"
    assert "OpenVINO CPU" in FAST_OV.describe()


def test_measured_model_computes_what_torch_computes(tmp_path) -> None:
    """The compiled model the backend times (f32 precision forced, NHWC at its ends) equals torch on a UIB block."""
    block = _trained_like(build_block(UIB, 24))
    x = torch.randn(1, 24, 20, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = block(x).numpy()
    path = export_onnx(block, x, tmp_path / "uib.onnx")
    out = openvino_runner(path, [x.numpy()], FAST_OV)()[0]
    assert out.shape == (1, 20, 20, 24)  # NHWC, as bound
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=0)


def test_missing_package_says_how_to_install(monkeypatch) -> None:
    hide_package(monkeypatch, "openvino")
    with pytest.raises(NasError) as info:
        import_openvino()
    assert str(info.value) == INSTALL_HINT
    with pytest.raises(NasError, match="pip install 'hwnas-yolo\\[openvino\\]'"):
        measure(torch.nn.ReLU(), (4, 8, 8), FAST_OV)


def test_measuring_writes_nothing_into_home(tmp_path) -> None:
    """openvino's converter telemetry would write ~/intel on import; nas skips the converter (import_openvino)."""
    import os
    import subprocess
    import sys

    code = ("from torch import nn; from nas.latency.profile import measure; from nas.latency.protocol import Protocol;"
            "measure(nn.ReLU(), (4, 8, 8), Protocol(backend='openvino-cpu', repeats=3, min_time_s=0.0, warmup_s=0.0))")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HOME": str(tmp_path)}, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_builds_a_loadable_openvino_table(tmp_path, capsys) -> None:
    # at 64 px OpenVINO's per-call overhead dominates every op: the tiny networks ran 0.59-0.61x the sum of their ops
    # on a quiet Zen 4, 0.47x once under load, past the calibration's sanity range (0.5-2); 0.78x at 160 px
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**TINY, "resolution": [160]}))
    out = tmp_path / "ov.csv"
    code = main(["lut", "build", "--space", str(space), "--backend", "openvino-cpu", "--out",
                 str(out), "--repeats", "3", "--min-time", "0", "--warmup", "1", "--warmup-time", "0",
                 "--calibrate", "3", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    table = LatencyTable.load(out)
    assert table.protocol.backend == "openvino-cpu" and table.header["device"]["openvino"]
    assert table.entries and all(e.p10_us > 0 for e in table.entries.values())
    assert table.header["calibration"]["archs"] == 3
