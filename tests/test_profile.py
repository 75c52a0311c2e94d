"""Tests for nas.latency.profile: protocol validation, the timing statistics, restored global state, backends."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch
from torch import nn

from nas.errors import ConfigError, NasError
from nas.latency.environment import environment
from nas.latency.onnx import export_onnx, ort_session
from nas.latency.profile import measure, measure_interleaved
from nas.latency.protocol import BACKENDS, Measurement, Protocol

FAST = Protocol(warmup_runs=3, warmup_s=0.0, repeats=20, min_time_s=0.0)
FAST_ORT = Protocol(backend="onnxruntime-cpu", warmup_runs=3, warmup_s=0.0, repeats=20, min_time_s=0.0)


class TinyAttention(nn.Module):
    """Single-head self-attention over the H*W tokens: the matmul + softmax pattern of Mobile MQA."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.qkv = nn.Linear(channels, 3 * channels)
        self.scale = channels**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x.flatten(2).transpose(1, 2)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) * self.scale, dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b, c, h, w)


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def _conv(channels: int, kernel: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, channels, kernel, padding=kernel // 2), nn.BatchNorm2d(channels), nn.ReLU())


@pytest.mark.parametrize("backend", ["torch-cpu", "onnxruntime-cpu"])
def test_small_conv_statistics_are_ordered(backend: str) -> None:
    m = measure(_conv(8), (8, 16, 16), Protocol(backend=backend, warmup_s=0.0, repeats=30, min_time_s=0.0))
    assert m.median_us > 0
    assert m.min_us <= m.p10_us <= m.median_us <= m.p90_us
    assert m.n >= 30
    assert Measurement.from_dict(m.to_dict()) == m


def test_min_time_keeps_measuring_past_repeats() -> None:
    m = measure(nn.Identity(), (4, 4, 4), Protocol(warmup_s=0.0, repeats=5, min_time_s=0.05))
    assert m.n > 5


@pytest.mark.parametrize("backend", ["torch-cpu", "onnxruntime-cpu"])
def test_bigger_conv_is_slower_side_by_side(backend: str) -> None:
    protocol = Protocol(backend=backend, warmup_runs=3, warmup_s=0.0, repeats=30, min_time_s=0.0)
    # 8x the channels: 64x the MACs, so the order must hold whatever the machine's drift.
    result = measure_interleaved(
        {"small": _conv(8), "big": _conv(64)}, {"small": (8, 16, 16), "big": (64, 16, 16)}, protocol, runs_per_round=3
    )
    assert set(result) == {"small", "big"}
    assert result["small"].n == result["big"].n >= 30
    assert result["big"].median_us > 2 * result["small"].median_us


def test_interleaved_rejects_missing_shape() -> None:
    with pytest.raises(ConfigError, match="b"):
        measure_interleaved({"a": nn.Identity(), "b": nn.Identity()}, {"a": (1, 2, 2)}, FAST)


def test_threads_and_training_flags_are_restored() -> None:
    before = torch.get_num_threads()
    target = 2 if before != 2 else 3
    torch.set_num_threads(target)
    try:
        module = _conv(4).train()
        measure(module, (4, 8, 8), FAST)
        assert torch.get_num_threads() == target
        assert all(m.training for m in module.modules())
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU pinning needs os.sched_setaffinity (Linux)")
def test_pinning_is_restored_and_checked() -> None:
    before = os.sched_getaffinity(0)
    core = min(before)
    measure(nn.Identity(), (4, 4, 4), Protocol(warmup_s=0.0, repeats=5, min_time_s=0.0, pin_cpu=core))
    assert os.sched_getaffinity(0) == before
    with pytest.raises(ConfigError, match="pin_cpu"):
        measure(nn.Identity(), (4, 4, 4), Protocol(pin_cpu=max(before) + 1000))


def test_gc_is_reenabled_when_the_module_raises() -> None:
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="boom"):
        measure(Boom(), (4, 4, 4), FAST)
    assert gc.isenabled()


def test_onnxruntime_output_matches_torch(tmp_path) -> None:
    module = _conv(8).eval()
    with torch.no_grad():  # non-trivial BN statistics, so the fold into the conv is actually checked
        module[1].running_mean.uniform_(-1, 1)
        module[1].running_var.uniform_(0.5, 2)
    x = torch.randn(1, 8, 16, 16)
    session = ort_session(export_onnx(module, x, tmp_path / "conv.onnx", opset=FAST_ORT.onnx_opset, exporter=FAST_ORT.onnx_exporter), FAST_ORT)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out, module(x).detach().numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_attention_exports_and_runs_under_onnxruntime(tmp_path, exporter: str) -> None:
    protocol = Protocol(backend="onnxruntime-cpu", onnx_exporter=exporter, warmup_s=0.0, repeats=10, min_time_s=0.0)
    module = TinyAttention(16).eval()
    x = torch.randn(1, 16, 8, 8)
    session = ort_session(export_onnx(module, x, tmp_path / "attn.onnx", opset=protocol.onnx_opset,
                                      exporter=exporter), protocol)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out, module(x).detach().numpy(), atol=1e-4, rtol=0)
    if exporter == "torchscript":  # the default; a second dynamo export would cost seconds for nothing new
        assert measure(module, (16, 8, 8), protocol).median_us > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine (torch CPU build)")
def test_cuda_measures_and_leaves_the_module_on_cpu() -> None:
    module = _conv(8)
    m = measure(module, (8, 16, 16), Protocol(backend="torch-cuda", warmup_s=0.0, repeats=10, min_time_s=0.0))
    assert m.median_us > 0 and m.n >= 10
    assert next(module.parameters()).device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_requested_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(NasError, match="CUDA is not available"):
        measure(nn.Identity(), (4, 4, 4), Protocol(backend="torch-cuda"))


def test_unknown_backend_lists_the_valid_ones() -> None:
    with pytest.raises(NasError) as info:
        Protocol(backend="tflite")
    assert all(name in str(info.value) for name in BACKENDS)


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"threads": 0}, "threads"),
        ({"batch": 0}, "batch"),
        ({"repeats": 0}, "repeats"),
        ({"min_time_s": -1}, "min_time_s"),
        ({"statistic": "p99"}, "statistic"),
        ({"dtype": "fp16"}, "dtype"),
        ({"onnx_exporter": "dynamo", "onnx_opset": 17}, "onnx_opset"),
        ({"threads": True}, "threads"),
        ({"retain_heap": "yes"}, "retain_heap"),
    ],
)
def test_invalid_protocol_fields(fields: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Protocol(**fields)
    assert info.value.field == field


def test_bad_input_shape() -> None:
    with pytest.raises(ConfigError, match="input_shape"):
        measure(nn.Identity(), (3, 0, 4), FAST)


def test_protocol_round_trip_and_description() -> None:
    protocol = Protocol(backend="onnxruntime-cpu", threads=2, repeats=100, pin_cpu=0)
    assert Protocol.from_dict(protocol.to_dict()) == protocol
    assert Protocol.from_dict({"warmup_s": 1}).warmup_s == 1.0
    text = protocol.describe()
    assert "onnxruntime-cpu" in text and "2 threads" in text and "opset" in text
    with pytest.raises(ConfigError, match="known fields"):
        Protocol.from_dict({"backend": "torch-cpu", "repeat": 5})


def test_environment_records_what_a_table_header_needs() -> None:
    env = environment(FAST_ORT)
    for key in ("cpu", "cores", "torch", "onnxruntime", "python", "libc", "date"):
        assert env[key], key
    assert Protocol.from_dict(env["protocol"]) == FAST_ORT
    assert "onnxruntime" not in environment(FAST)
