"""The device agent (`nas device serve`): an HTTP server on the target device that times ONNX models sent by
`nas lut ... --device` and answers with the measurements, the device's cpu_id and runtime versions. No torch here:
the device needs numpy, onnx and the runtimes only (the `agent` extra).

Security: every request but GET /health carries the token (compared in constant time); bodies are size-limited and
must arrive within the read timeout; models are ONNX only, checked before any runtime sees them; one measurement
runs at a time in a separate process (`agentworker.py`) that is killed when the request overruns its time limit;
waiting requests queue for a bounded time. The token is never logged."""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from nas.errors import NasError
from nas.latency.agentworker import MAX_FRAME, first_line
from nas.latency.environment import host_environment
from nas.latency.protocol import Protocol
from nas.latency.wire import REPLY, Request, WireError, decode_request, error_reply

log = logging.getLogger("nas.latency.agent")
DRAIN_BYTES = 1 << 20  # a refused request's body up to this size is read and dropped, so the reply reaches the client


@dataclass(frozen=True)
class Limits:
    max_body: int = 256 << 20      # bytes of one request
    time_limit_s: float = 300.0    # one request's measurement, from its turn to its reply
    read_timeout_s: float = 30.0   # the whole body must arrive within this
    queue_wait_s: float = 600.0    # how long a request waits for the measurement before a 503
    max_waiting: int = 8           # requests waiting at once; more get a 503 at once
    max_connections: int = 32      # open connections; more are closed unanswered


class Worker:
    """The measuring process: started with the agent, killed and started afresh when a request overruns or it dies."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.flush: bool | None = None
        self.buffer = b""

    def start(self, flush: bool = True) -> None:
        """Start the process ahead of the first request (flush: the protocol default)."""
        if self.proc is None:
            self._start(flush)

    def _start(self, flush: bool) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # where `nas` is imported from, installed or not
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "nas.latency.agentworker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, close_fds=True)
        self.flush, self.buffer = flush, b""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                with contextlib.suppress(OSError):
                    pipe.close()
            self.proc = None

    def _read(self, n: int, deadline: float) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while len(self.buffer) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _frame(self, deadline: float) -> dict[str, Any]:
        (n,) = struct.unpack(">I", self._read(4, deadline))
        if n > MAX_FRAME:
            raise EOFError
        return json.loads(self._read(n, deadline))

    def run(self, message: dict[str, Any], flush: bool, deadline: float) -> Iterator[dict[str, Any]]:
        """The worker's frames for `message` until it is done; TimeoutError at the deadline (the worker is killed),
        EOFError if it died."""
        if self.proc is None or self.proc.poll() is not None or self.flush != flush:
            # one flush-to-zero setting per process: ONNX Runtime applies the first session's for good
            self.stop()
            self._start(flush)
        assert self.proc is not None and self.proc.stdin is not None
        data = json.dumps(message).encode()
        try:
            self.proc.stdin.write(struct.pack(">I", len(data)) + data)
            self.proc.stdin.flush()
            while not (frame := self._frame(deadline)).get("done"):
                yield frame
        except (TimeoutError, EOFError, BrokenPipeError):
            self.stop()
            self._start(flush)  # it imports its runtimes while the reply goes out: the next request finds it ready
            raise


class AgentServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], token: str, limits: Limits = Limits()):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)
        self.token, self.limits, self.worker = token.encode(), limits, Worker()
        self.measuring, self.queue_lock, self.waiting = threading.Lock(), threading.Lock(), 0
        self.connections = threading.BoundedSemaphore(limits.max_connections)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.acquire(blocking=False):
            log.warning("%d connections open: closing one from %s", self.limits.max_connections, client_address[0])
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line instead of socketserver's traceback (a client that left before its reply, mostly)."""
        log.warning("connection from %s failed: %s", client_address[0], first_line(sys.exc_info()[1]))

    def server_close(self) -> None:
        super().server_close()
        self.worker.stop()

    @contextlib.contextmanager
    def turn(self) -> Iterator[float]:
        """Wait for the measurement (one at a time), at most limits.queue_wait_s; yields the seconds waited."""
        with self.queue_lock:
            if self.waiting >= self.limits.max_waiting:
                raise WireError(f"busy: {self.waiting} requests are already waiting; retry later", 503)
            self.waiting += 1
        start = time.monotonic()
        try:
            got = self.measuring.acquire(timeout=self.limits.queue_wait_s)
        finally:
            with self.queue_lock:
                self.waiting -= 1
        if not got:
            raise WireError(f"busy: another measurement ran for the whole {self.limits.queue_wait_s:g} s this request "
                            f"may wait (the agent's --queue-wait); retry later", 503)
        try:
            yield time.monotonic() - start
        finally:
            self.measuring.release()

    def device(self, protocol: Protocol) -> dict[str, Any]:
        """This device as a table header records it, with the protocol's runtime version."""
        try:
            env = host_environment(protocol)
        except NasError as e:
            raise WireError(f"backend {protocol.backend} is not available on this device: {e}", 501) from None
        env.pop("protocol", None)
        return env

    def measure(self, request: Request) -> tuple[int, dict[str, Any]]:
        """Run `request` in the worker within the time limit: (HTTP status, reply)."""
        p = request.protocol
        if p.threads > (os.cpu_count() or 1):
            raise WireError(f"protocol.threads: {p.threads} threads asked, this device has {os.cpu_count()} cores")
        device = self.device(p)
        started, deadline = time.time(), time.monotonic() + self.limits.time_limit_s
        results: list[dict[str, Any]] = []
        status, extra = 200, {}
        with tempfile.TemporaryDirectory(prefix="nas-agent-") as tmp:
            def place(job: Any, name: str) -> dict[str, Any]:
                path = Path(tmp) / name
                path.write_bytes(job.model)
                return {"id": job.id, "path": str(path), "inputs": [list(s) for s in job.inputs]}

            message = {"protocol": p.to_dict(), "jobs": [place(j, f"{i}.onnx") for i, j in enumerate(request.jobs)],
                       "reference": place(request.reference, "reference.onnx") if request.reference else None}
            pending = [j.id for j in request.jobs]
            try:
                for frame in self.worker.run(message, p.flush_denormal, deadline):
                    pending.remove(frame["id"])
                    if "error" in frame:  # the worker's last frame before "done": read on, the pipe stays in step
                        status, extra = 422, {"error": f"{frame['id']}: {frame['error']}", "job": frame["id"]}
                    else:
                        results.append(frame)
            except TimeoutError:
                status, extra = 504, {"job": pending[0], "error": (
                    f"time limit of {self.limits.time_limit_s:g} s (the agent's --time-limit) reached while measuring "
                    f"{pending[0]} ({len(results)} of {len(request.jobs)} done); the measuring process was stopped")}
            except EOFError:
                status, extra = 500, {"job": pending[0], "error": (
                    f"the measuring process died while measuring {pending[0]} ({len(results)} of {len(request.jobs)} "
                    f"done); the agent starts a new one for the next request")}
        reply = {"format": REPLY, "device": device, "results": results, "started": started, "finished": time.time(),
                 **extra}
        return status, reply


class Handler(BaseHTTPRequestHandler):
    server: AgentServer
    server_version = "nas-agent/1"

    def setup(self) -> None:
        self.timeout = self.server.limits.read_timeout_s  # also bounds the wait for the request line and headers
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True
        level = logging.INFO if status < 400 else logging.WARNING
        log.log(level, "%s %s -> %d%s", self.client_address[0], self.path[:80], status,
                f" ({body['error'][:200]})" if "error" in body else "")

    def _refuse(self, status: int, message: str) -> None:
        """Reply with an error; a small unread body is drained first so the client sees the reply, not a reset."""
        n = self.headers.get("Content-Length", "")
        if n.isdigit() and int(n) <= DRAIN_BYTES:
            with contextlib.suppress(OSError, TimeoutError):
                self._body(int(n))
        self._reply(status, error_reply(message))

    def _authorised(self) -> bool:
        given = self.headers.get("Authorization", "")
        if not given.startswith("Bearer "):
            self._refuse(401, "no token: send the header 'Authorization: Bearer TOKEN' with the token of the agent's "
                              "--token-file")
            return False
        if not hmac.compare_digest(given[len("Bearer "):].strip().encode(), self.server.token):
            self._refuse(401, "wrong token: use the token in the agent's --token-file")
            return False
        return True

    def _body(self, n: int) -> bytes:
        """Exactly n bytes, all within the read timeout (a client trickling bytes cannot hold the thread longer)."""
        deadline, parts, left = time.monotonic() + self.server.limits.read_timeout_s, [], n
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.connection.settimeout(remaining)
            chunk = self.rfile.read1(min(left, 1 << 20))
            if not chunk:
                raise ConnectionError("closed before the end of the body")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("", "/health"):
            self._reply(200, {"format": REPLY, "agent": "nas device agent"})
        else:
            self._refuse(404, f"no such path {self.path[:80]!r}; POST /measure or /environment")

    def do_POST(self) -> None:
        route = {"/measure": self._measure, "/environment": self._environment}.get(self.path)
        if route is None:
            return self._refuse(404, f"no such path {self.path[:80]!r}; POST /measure or /environment")
        if not self._authorised():
            return None
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            return self._refuse(411, "send the body with a Content-Length")
        if int(length) > self.server.limits.max_body:
            return self._reply(413, error_reply(f"body of {int(length)} bytes exceeds the agent's limit of "
                                                f"{self.server.limits.max_body} bytes (--max-body-mb); send fewer "
                                                f"models per request"))
        try:
            body = self._body(int(length))
        except (TimeoutError, OSError):
            return self._reply(408, error_reply(f"the body did not arrive within "
                                                f"{self.server.limits.read_timeout_s:g} s (the agent's read timeout)"))
        try:
            route(body)
        except WireError as e:
            self._reply(e.status, error_reply(str(e)))
        except OSError as e:  # e.g. no space for the models' temporary files: an answer, not a dropped connection
            self._reply(500, error_reply(f"the agent could not run the request: {first_line(e)}"))
        return None

    def _environment(self, body: bytes) -> None:
        try:
            data = json.loads(body)
            protocol = Protocol.from_dict(data["protocol"])
        except (ValueError, KeyError, TypeError, NasError) as e:
            raise WireError(f"expected {{\"protocol\": {{...}}}} with a valid latency protocol ({str(e)[:120]})"
                            ) from None
        limits = {"max_body": self.server.limits.max_body, "time_limit_s": self.server.limits.time_limit_s,
                  "queue_wait_s": self.server.limits.queue_wait_s}
        self._reply(200, {"format": REPLY, "device": self.server.device(protocol), "limits": limits})

    def _measure(self, body: bytes) -> None:
        request = decode_request(body)
        with self.server.turn() as waited:
            status, reply = self.server.measure(request)
        reply["waited_s"] = round(waited, 3)
        self._reply(status, reply)


def serve(host: str, port: int, token: str, limits: Limits = Limits(), ready: Any = None) -> None:
    """Serve until interrupted; `ready(server)` is called once listening (the command prints the address)."""
    with AgentServer((host, port), token, limits) as server:
        log.info("device agent on %s (limits: %s)", server.url, asdict(limits))
        server.worker.start()
        if ready is not None:
            ready(server)
        try:
            server.serve_forever()
        finally:
            server.worker.stop()
