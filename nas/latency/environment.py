"""What makes a latency number reproducible: CPU model and generation, software versions, date, protocol."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any

from nas.latency.openvino import openvino_version
from nas.latency.protocol import Protocol
from nas.latency.quantize import quantizer_versions
from nas.latency.runtime import import_ort


def _cpuinfo() -> dict[str, str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = [line.split(":", 1) for line in f if ":" in line]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, value in reversed(info)}  # the first core's value wins


def _cpu_model() -> str:
    fields = _cpuinfo()
    for key in ("model name", "Hardware", "Model", "Processor", "cpu model"):
        if fields.get(key):
            return fields[key]
    return platform.processor() or platform.machine() or "unknown"


def cpu_id() -> str | None:
    """The CPU generation, where the model name does not tell it: a cloud guest's "AMD EPYC" was a Zen 4 (family
    25) on one host and a Zen 5 (family 26), 1.6-1.9x faster on these detectors, on the next."""
    f = _cpuinfo()
    if f.get("vendor_id") and f.get("cpu family"):
        return f"{f['vendor_id']} family {f['cpu family']} model {f.get('model', '?')}"
    if f.get("CPU implementer"):  # Arm
        return f"arm implementer {f['CPU implementer']} part {f.get('CPU part', '?')}"
    return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def environment(protocol: Protocol) -> dict[str, Any]:
    """What makes a latency number reproducible: hardware, software versions, date, and the protocol itself."""
    import torch

    return host_environment(protocol, torch)


def host_environment(protocol: Protocol, torch: Any = None) -> dict[str, Any]:
    """`environment` of a process that may have no torch (the device agent): with `torch` (the module) its version,
    the ISA it dispatches to and CUDA's details are recorded too."""
    env: dict[str, Any] = {
        "cpu": _cpu_model(),
        **({"cpu_id": cid} if (cid := cpu_id()) else {}),
        **({"cpu_capability": torch.backends.cpu.get_cpu_capability()} if torch else {}),  # torch's kernel ISA
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "libc": " ".join(platform.libc_ver()).strip() or "unknown",
        **({"torch": torch.__version__} if torch else {}),
    }
    governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if governor:
        env["cpu_governor"] = governor
    if protocol.backend == "onnxruntime-cpu":
        import onnx

        env["onnxruntime"] = import_ort().__version__
        env["onnx"] = onnx.__version__
        if protocol.onnx_exporter == "dynamo" and torch:  # the exporter's: where torch is, not on a device agent
            import onnxscript

            env["onnxscript"] = onnxscript.__version__
    if protocol.backend == "openvino-cpu":
        import onnx

        env["openvino"] = openvino_version()
        env["onnx"] = onnx.__version__
    if protocol.backend == "litert-cpu":
        from nas.latency.litert import litert_versions

        env.update(litert_versions())
    if protocol.dtype == "int8":
        env.update(quantizer_versions(protocol.backend))
    if protocol.backend == "torch-cuda" and torch:
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
            env["cudnn"] = torch.backends.cudnn.version()
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["protocol"] = protocol.to_dict()
    return env
