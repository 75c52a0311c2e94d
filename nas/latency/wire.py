"""The device agent's wire format, read and written by both ends: a measurement request (protocol, models, input
shapes) and its reply (measurements, the device), as JSON with the models base64-encoded. No pickles, no code:
a model is an ONNX file, checked here by its first bytes and by the agent's worker by parsing it."""
from __future__ import annotations

import base64
import binascii
import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas.errors import ConfigError, NasError
from nas.latency.protocol import ONNX_BACKENDS, Protocol

REQUEST = "nas/agent-request@1"
REPLY = "nas/agent-reply@1"
MODEL_FORMATS = ("onnx",)
AGENT_BACKENDS = ONNX_BACKENDS      # runtimes of an ONNX model; the agent has no torch
MAX_JOBS = 256                      # models per request
MAX_INPUTS = 16                     # inputs per model
MAX_INPUT_ELEMENTS = 1 << 26        # per input: 256 MB of float32, generated on the device
SOURCE = "agent request"

Shapes = tuple[tuple[int, ...], ...]


class WireError(NasError):
    """A request or reply that does not follow the wire format; `status` is the HTTP status the agent answers."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Job:
    """One model to time: its ONNX bytes and the full shape of each input (batch first)."""

    id: str
    model: bytes
    inputs: Shapes


@dataclass(frozen=True)
class Request:
    protocol: Protocol
    jobs: tuple[Job, ...]
    reference: Job | None           # the reference workload, timed before every call (Protocol.reference)


def read_token(path: str | Path) -> str:
    """The shared secret in `path` (whitespace stripped); ConfigError naming the file when it is unusable."""
    p = Path(path)
    try:
        token = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(p), None, f"cannot read the agent token ({type(e).__name__}); give the file the agent "
                                        f"was started with (--token-file)") from None
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(str(p), None, "an agent token is one word of at least 16 printable characters")
    return token


def new_token(path: str | Path) -> str:
    """A fresh random token written to `path` (readable by its owner only); FileExistsError if it exists."""
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token


def check_model_bytes(data: bytes, what: str) -> None:
    """WireError (415) unless `data` starts like a serialised ONNX ModelProto: its first field, ir_version (field 1,
    a varint), gives the first byte 0x08. Pickles, zip archives (torch.save) and text are named as such."""
    if not data:
        raise WireError(f"{what}: empty model", 415)
    if data[:1] == b"\x08":
        return
    kind = ("a Python pickle" if data[:1] == b"\x80" else "a zip archive (torch.save?)" if data[:2] == b"PK"
            else "text" if data[:1].isascii() and data[:1].isalnum() else f"bytes starting {data[:4].hex()}")
    raise WireError(f"{what}: not an ONNX model ({kind}); the agent runs ONNX models only ({', '.join(MODEL_FORMATS)})",
                    415)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if (not isinstance(value, list) or not 1 <= len(value) <= 8
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in value)):
        raise WireError(f"{where}: a shape is a list of 1 to 8 positive integers, got {str(value)[:80]}")
    if math.prod(value) > MAX_INPUT_ELEMENTS:
        raise WireError(f"{where}: {math.prod(value)} elements, more than the agent's {MAX_INPUT_ELEMENTS} per input")
    return tuple(value)


def _job(value: Any, where: str) -> Job:
    if not isinstance(value, dict) or set(value) - {"id", "format", "model", "inputs"}:
        raise WireError(f"{where}: expected an object with id, format, model (base64) and inputs")
    if value.get("format", "onnx") not in MODEL_FORMATS:
        raise WireError(f"{where}.format: {str(value.get('format'))[:40]!r} is not allowed; allowed: "
                        f"{', '.join(MODEL_FORMATS)}", 415)
    job_id = value.get("id", "")
    if not isinstance(job_id, str) or not 1 <= len(job_id) <= 200:
        raise WireError(f"{where}.id: a string of 1 to 200 characters")
    model = value.get("model")
    try:
        data = base64.b64decode(model if isinstance(model, str) else "", validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"{where}.model: not base64") from None
    check_model_bytes(data, f"{where} ({job_id})")
    inputs = value.get("inputs")
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= MAX_INPUTS:
        raise WireError(f"{where}.inputs: a list of 1 to {MAX_INPUTS} shapes")
    return Job(job_id, data, tuple(_shape(s, f"{where}.inputs[{i}]") for i, s in enumerate(inputs)))


def _protocol(value: Any) -> Protocol:
    if not isinstance(value, dict):
        raise WireError("protocol: expected an object with the fields of a latency protocol")
    try:
        protocol = Protocol.from_dict(value)
    except ConfigError as e:
        raise WireError(f"protocol.{e.field}: {e.message}") from None
    except TypeError as e:
        raise WireError(f"protocol: {e}") from None
    if protocol.backend not in AGENT_BACKENDS:
        raise WireError(f"protocol.backend: the agent runs ONNX models on {', '.join(AGENT_BACKENDS)}, not "
                        f"{protocol.backend}")
    return protocol


def encode_request(protocol: Protocol, jobs: list[Job], reference: Job | None = None) -> bytes:
    def job(j: Job) -> dict[str, Any]:
        return {"id": j.id, "format": "onnx", "model": base64.b64encode(j.model).decode("ascii"),
                "inputs": [list(s) for s in j.inputs]}

    return json.dumps({"format": REQUEST, "protocol": protocol.to_dict(), "jobs": [job(j) for j in jobs],
                       "reference": job(reference) if reference else None}).encode()


def decode_request(body: bytes) -> Request:
    """The request in `body`, every field checked; WireError (with the HTTP status to answer) otherwise."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError(f"body is not JSON ({str(e)[:80]})") from None
    if not isinstance(data, dict) or data.get("format") != REQUEST:
        raise WireError(f"body: expected a JSON object with format {REQUEST!r}")
    unknown = sorted(set(data) - {"format", "protocol", "jobs", "reference"})
    if unknown:
        raise WireError(f"{unknown[0][:40]}: unknown field; known: format, protocol, jobs, reference")
    protocol = _protocol(data.get("protocol"))
    jobs = data.get("jobs")
    if not isinstance(jobs, list) or not 1 <= len(jobs) <= MAX_JOBS:
        raise WireError(f"jobs: a list of 1 to {MAX_JOBS} models")
    parsed = tuple(_job(j, f"jobs[{i}]") for i, j in enumerate(jobs))
    if len({j.id for j in parsed}) != len(parsed):
        raise WireError("jobs: ids must be distinct")
    reference = None
    if protocol.reference:
        if data.get("reference") is None:
            raise WireError("reference: the protocol times the reference workload; send its model")
        reference = _job(data["reference"], "reference")
    return Request(protocol, parsed, reference)


def error_reply(message: str, **extra: Any) -> dict[str, Any]:
    return {"format": REPLY, "error": message, **extra}


def decode_reply(body: bytes, url: str) -> dict[str, Any]:
    """A reply as a dict with its format checked; NasError naming the agent otherwise."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("format") != REPLY:
        raise NasError(f"{url}: the reply is not a nas device agent's (is `nas device serve` listening there?)")
    return data
