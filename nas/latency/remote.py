"""Measuring on another device through its agent (`nas device serve`): `RemoteMeasurer` exports each module to
ONNX here, exactly as local profiling does, sends many per request and reads back the agent's measurements and
its device (cpu_id, runtime versions) for the table header."""
from __future__ import annotations

import http.client
import json
import logging
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nas.errors import ConfigError, NasError
from nas.latency.measurer import Job
from nas.latency.onnx import eval_mode, export_onnx
from nas.latency.profile import REFERENCE_SHAPE, reference_module
from nas.latency.protocol import Measurement, Protocol, Shapes
from nas.latency.wire import AGENT_BACKENDS, MAX_JOBS, decode_reply, encode_request
from nas.latency.wire import Job as WireJob

log = logging.getLogger(__name__)
BUSY_WAIT_S = 1800.0  # how long a client keeps retrying an agent busy with another client's measurements


def _shapes(shape: Any) -> Shapes:
    if shape and all(isinstance(s, (tuple, list)) for s in shape):
        return tuple(tuple(s) for s in shape)
    return (tuple(shape),)


class RemoteMeasurer:
    """The device behind the agent at `url` ("http://HOST:PORT"). `batch`: models per request at most (fewer when
    the agent's body limit asks); a request that overruns the agent's time limit keeps what was measured and
    the rest is sent again, the model that was running on its own first."""

    def __init__(self, url: str, token: str, batch: int = 32, timeout_s: float | None = None) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or not u.hostname or u.path not in ("", "/"):
            raise ConfigError("command line", "--device", f"expected http://HOST:PORT, got {url!r}")
        self.url, self.host, self.port = f"http://{u.netloc}", u.hostname, u.port or 80
        self.batch, self.timeout_s = max(1, min(batch, MAX_JOBS)), timeout_s
        self._token, self._limits, self._cpu_id, self._alone = token, None, None, False
        self._reference: dict[tuple, bytes] = {}

    def __repr__(self) -> str:  # never the token
        return f"RemoteMeasurer({self.url!r})"

    # ---------------------------------------------------------------- HTTP
    def _post(self, path: str, body: bytes, timeout: float) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("POST", path, body, {"Authorization": f"Bearer {self._token}",
                                              "Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, decode_reply(resp.read(), self.url)
        except (OSError, http.client.HTTPException) as e:
            raise NasError(f"cannot reach the device agent at {self.url} ({type(e).__name__}: {e}); is `nas device "
                           f"serve` running there, and the port reachable (an SSH tunnel, or --allow-remote)?"
                           ) from None
        finally:
            conn.close()

    def _checked(self, status: int, reply: dict[str, Any]) -> dict[str, Any]:
        if status == 401:
            raise NasError(f"the device agent at {self.url} refused the token: {reply.get('error')}")
        if status != 200:
            raise NasError(f"the device agent at {self.url} answered {status}: {reply.get('error')}")
        cid = reply.get("device", {}).get("cpu_id")
        if self._cpu_id and cid and cid != self._cpu_id:  # another machine answers at that address now
            raise NasError(f"the device agent at {self.url} reports cpu {cid!r}, earlier {self._cpu_id!r}; one "
                           f"table must not mix devices")
        self._cpu_id = self._cpu_id or cid
        return reply

    def _environment_reply(self, protocol: Protocol) -> dict[str, Any]:
        body = json.dumps({"protocol": protocol.to_dict()}).encode()
        reply = self._checked(*self._post("/environment", body, self.timeout_s or 60.0))
        self._limits = reply.get("limits") or {}
        return reply

    def environment(self, protocol: Protocol) -> dict[str, Any]:
        """The agent's device, plus the exporter's versions from here (the ONNX graphs are made here)."""
        self._supports(protocol)
        device = dict(self._environment_reply(protocol)["device"])
        device["torch"] = torch.__version__  # the exporter's; the runtimes are the device's (no openvino needed here)
        if protocol.onnx_exporter == "dynamo":
            import onnxscript

            device["onnxscript"] = onnxscript.__version__
        device["agent"] = self.url
        return {**device, "protocol": protocol.to_dict()}

    # ---------------------------------------------------------------- measuring
    def _supports(self, protocol: Protocol) -> None:
        if protocol.backend not in AGENT_BACKENDS:
            raise ConfigError("command line", "--backend", f"the device agent runs ONNX models: use --backend "
                                                           f"{' or '.join(AGENT_BACKENDS)} with --device")
        if protocol.dtype != "fp32":
            raise ConfigError("command line", "--dtype", f"the device agent measures fp32 models, not {protocol.dtype}")

    def _export(self, module: torch.nn.Module, shapes: Shapes, batch: int, protocol: Protocol, tmp: Path) -> bytes:
        """The ONNX bytes of `module`, exported as `profile.measure` exports it (same seeded example inputs)."""
        gen = torch.Generator().manual_seed(protocol.seed)
        xs = tuple(torch.randn((batch, *s), generator=gen) for s in shapes)
        with eval_mode(module):
            path = export_onnx(module, xs, tmp / "model.onnx", opset=protocol.onnx_opset,
                               exporter=protocol.onnx_exporter)
        return path.read_bytes()

    def _reference_job(self, protocol: Protocol, tmp: Path) -> WireJob | None:
        if not protocol.reference:
            return None
        key = (protocol.onnx_opset, protocol.onnx_exporter, protocol.seed)
        if key not in self._reference:
            self._reference[key] = self._export(reference_module(), (REFERENCE_SHAPE,), 1, protocol, tmp)
        return WireJob("reference", self._reference[key], ((1, *REFERENCE_SHAPE),))

    def measure_many(self, jobs: Sequence[Job], protocol: Protocol) -> list[Measurement]:
        self._supports(protocol)
        if self._limits is None:
            self._environment_reply(protocol)
        with tempfile.TemporaryDirectory(prefix="nas-remote-") as d:
            tmp = Path(d)
            reference = self._reference_job(protocol, tmp)
            wire = []
            for i, (module, shape) in enumerate(jobs):
                shapes = _shapes(shape)
                wire.append(WireJob(f"job-{i}", self._export(module, shapes, protocol.batch, protocol, tmp),
                                    tuple((protocol.batch, *s) for s in shapes)))
        names = {w.id: f"{type(m).__name__} at {shape}" for w, (m, shape) in zip(wire, jobs)}
        done: dict[str, Measurement] = {}
        todo = list(wire)
        while todo:
            part = self._fit(todo)
            status, reply = self._send(protocol, part, reference)
            for r in reply.get("results", []):
                done[r["id"]] = Measurement.from_dict(r["measurement"])
            todo = [w for w in todo if w.id not in done]
            if status == 504 and len(part) > 1:  # the batch overran: the model that was running goes alone next
                log.warning("%s: a request of %d models overran the agent's time limit after %d; sending the rest "
                            "again, %s on its own first", self.url, len(part), len(reply.get("results", [])),
                            names.get(reply.get("job", ""), "the model it was measuring"))
                todo.sort(key=lambda w: w.id != reply.get("job"))
                self._alone = True
                continue
            what = names.get(reply.get("job", ""), "a model")
            self._checked(status, {**reply, "error": f"{what}: {reply.get('error')}"})
        return [done[w.id] for w in wire]

    def _fit(self, todo: list[WireJob]) -> list[WireJob]:
        """As many of `todo` as the agent's body limit takes (base64 adds a third), one after an overrun."""
        if self._alone:
            self._alone = False
            return todo[:1]
        room, part = 0.7 * float((self._limits or {}).get("max_body", 64 << 20)), []
        for w in todo[:self.batch]:
            room -= len(w.model) * 4 / 3 + 200
            if part and room < 0:
                break
            part.append(w)
        return part

    def _send(self, protocol: Protocol, part: list[WireJob], reference: WireJob | None) -> tuple[int, dict]:
        """Post one request; an agent busy with another client is retried for up to BUSY_WAIT_S."""
        body = encode_request(protocol, part, reference)
        limits = self._limits or {}
        limit = float(limits.get("time_limit_s", 300)) + float(limits.get("queue_wait_s", 0))
        give_up = time.monotonic() + BUSY_WAIT_S
        while True:
            status, reply = self._post("/measure", body, self.timeout_s or limit + 60)
            if status != 503 or time.monotonic() > give_up:
                return status, reply
            log.warning("%s: %s; retrying in 10 s", self.url, reply.get("error"))
            time.sleep(10)

