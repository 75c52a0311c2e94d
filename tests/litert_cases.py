"""The litert-cpu profiling backend and the LiteRT export (nas.latency.litert, nas.report.deploy), run by
tests/test_runtimes.py in a process of its own: a measured op in a table whose header names the runtime, the timed
graph delegated to XNNPACK, and a converted detector computing what torch computes on real images."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DET, hide_package

from nas.arch.blocks import build_block
from nas.arch.detector import Detector
from nas.arch.headconfig import HeadConfig
from nas.arch.spec import BlockSpec
from nas.errors import NasError
from nas.latency.protocol import Protocol
from nas.latency.table import LatencyTable

pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install 'hwnas-yolo[litert]')")
pytest.importorskip("litert_torch", reason="litert-torch is not installed (pip install 'hwnas-yolo[litert]')")

FAST_LITERT = Protocol(backend="litert-cpu", warmup_runs=2, warmup_s=0.0, repeats=10, min_time_s=0.0, reference=False)
# A UIB ExtraDW block with SE and hswish and a residual: every kind of layer a searched block has.
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


def test_measured_op_lands_in_a_table_whose_header_names_litert(tmp_path) -> None:
    import ai_edge_litert

    small = (UIB, (24, 16, 16))
    big = (BlockSpec(op="ib", kernel=3, expand=6.0, out=64, stride=1, se=0.0, act="relu"), (64, 32, 32))
    table = LatencyTable.new(FAST_LITERT, "litert-test")
    assert table.extend([small, big], path=tmp_path / "litert.csv", progress=False) == 2
    loaded = LatencyTable.load(tmp_path / "litert.csv")
    assert loaded.protocol.backend == "litert-cpu"
    assert loaded.header["device"]["ai_edge_litert"] == ai_edge_litert.__version__
    assert loaded.header["device"]["litert_torch"]
    e_small, e_big = (loaded.entries[k] for k in sorted(loaded.entries, key=lambda k: "in=64" in k))
    assert all(math.isfinite(e.p10_us) and e.p10_us > 0 and e.n >= 10 for e in (e_small, e_big))
    assert e_big.p10_us > 3 * e_small.p10_us  # ~30x the MACs: a table of constant overheads would fail this


def test_timed_model_runs_under_xnnpack_and_computes_what_torch_computes(tmp_path) -> None:
    from nas.latency.litert import convert_tflite, interpreter, litert_runner, tflite_function

    block = _trained_like(build_block(UIB, 24))
    x = torch.randn(1, 24, 20, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = block(x).numpy()
    path = convert_tflite(block, x, tmp_path / "uib.tflite")
    ops = [o["op_name"] for o in interpreter(path)._get_ops_details()]
    assert "DELEGATE" in ops and "TRANSPOSE" not in ops  # XNNPACK took the graph; NHWC ends, no layout shuffles
    np.testing.assert_allclose(tflite_function(path)(x.numpy())[0], ref, atol=1e-4, rtol=0)
    litert_runner(path, [x.numpy()], FAST_LITERT)()
    with pytest.raises(NasError, match="input 0 has shape"):
        litert_runner(path, [np.zeros((1, 24, 10, 10), np.float32)], FAST_LITERT)


def test_converted_tiny_detector_matches_torch_on_real_images(tmp_path) -> None:
    """What `nas export --format litert` checks: the raw head outputs (DFL logits and class logits of every level)
    of the converted detector against torch on DigitsDet images, within 1e-3."""
    from nas.detect.data import YoloDataset
    from nas.detect.digits import ensure_digits
    from nas.report.deploy import check_raw, deploy
    from nas.space import space_from_dict

    data = ensure_digits(tmp_path / "digits", n_train=2, n_val=3, imgsz=64, progress=False, workers=0)
    arch = space_from_dict(DET).random(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _trained_like(Detector(arch, HeadConfig(neck="dw", num_classes=10)))
    images = [YoloDataset(str(data), "val", 64, augment=False)[i][0].numpy()[None] for i in range(3)]
    assert len(images) == 3 and images[0].shape == (1, 3, 64, 64) and images[0].std() > 0.05  # real pictures
    diff = check_raw(model, "litert", images, tmp_path)
    assert 0 < diff <= 1e-3  # 0 would mean nothing was compared
    assert (tmp_path / "raw.tflite").stat().st_size > 10_000
    with pytest.raises(NasError, match="int8 LiteRT"):
        deploy(model, 64, tmp_path / "out8", ["litert"], data=str(data), int8=True, evaluate=False)


def test_missing_runtime_says_how_to_install(monkeypatch) -> None:
    from nas.latency.litert import INSTALL_HINT, import_interpreter
    from nas.latency.profile import measure

    hide_package(monkeypatch, "ai_edge_litert")
    with pytest.raises(NasError) as info:
        import_interpreter()
    assert str(info.value) == INSTALL_HINT and "hwnas-yolo[litert]" in INSTALL_HINT
    with pytest.raises(NasError, match="litert"):
        measure(torch.nn.ReLU(), (4, 8, 8), FAST_LITERT)
