"""`nas device serve`: the measurement agent, run on the device a latency table is for (no torch needed there)."""
from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import sys
from pathlib import Path

from nas.errors import ConfigError


def _loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except (OSError, ValueError):
        return False


def _token(path: Path) -> str:
    from nas.latency.wire import new_token, read_token

    if path.exists():
        if path.stat().st_mode & 0o077:
            print(f"nas: warning: {path} is readable by other users; chmod 600 {path}", file=sys.stderr)
        return read_token(path)
    try:
        token = new_token(path)
    except OSError as e:
        raise ConfigError(str(path), None, f"cannot write a new token ({e.strerror})") from None
    print(f"wrote a new token to {path} (owner-only); copy this file to the machine that runs `nas lut ... --device`",
          file=sys.stderr)
    return token


def cmd_serve(args: argparse.Namespace) -> None:
    from nas.latency.agent import Limits, serve

    if not args.allow_remote and not _loopback(args.host):
        raise ConfigError("command line", "--host", f"{args.host} is reachable from other machines; the agent runs "
                                                    f"what it is sent: pass --allow-remote on a trusted network only "
                                                    f"(or keep 127.0.0.1 and use an SSH tunnel)")
    for flag, value in (("--max-body-mb", args.max_body_mb), ("--time-limit", args.time_limit),
                        ("--read-timeout", args.read_timeout), ("--queue-wait", args.queue_wait)):
        if not value > 0:
            raise ConfigError("command line", flag, f"must be positive, got {value}")
    token = _token(args.token_file)
    limits = Limits(max_body=int(args.max_body_mb * (1 << 20)), time_limit_s=args.time_limit,
                    read_timeout_s=args.read_timeout, queue_wait_s=args.queue_wait)

    def ready(server) -> None:
        print(f"nas device agent on {server.url} (token in {args.token_file}); on the search machine: nas lut build "
              f"... --backend onnxruntime-cpu --device {server.url} --token-file FILE", flush=True)

    def stop(signum, frame) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)  # the measuring process is stopped with the agent
    try:
        serve(args.host, args.port, token, limits, ready)
    except OSError as e:
        raise ConfigError("command line", "--port", f"cannot listen on {args.host}:{args.port} ({e.strerror})"
                          ) from None


def device_flags(p: argparse.ArgumentParser) -> None:
    """--device and --token-file, for the `nas lut` actions that measure."""
    g = p.add_argument_group("measuring on another device (its agent: `nas device serve`)")
    g.add_argument("--device", metavar="URL", help="measure on the device whose agent listens at http://HOST:PORT "
                                                   "(ONNX backends; the table header records that device)")
    g.add_argument("--token-file", type=Path, help="file holding the agent's token (copied from the device)")


def measurer_from(args: argparse.Namespace):
    """This machine, or with --device the device behind that agent."""
    from nas.latency.measurer import LOCAL

    if not getattr(args, "device", None):
        return LOCAL
    if not args.token_file:
        raise ConfigError("command line", "--token-file", "--device needs the agent's token file")
    from nas.latency.remote import RemoteMeasurer
    from nas.latency.wire import read_token

    return RemoteMeasurer(args.device, read_token(args.token_file))


def register(sub: argparse._SubParsersAction) -> None:
    device = sub.add_parser("device", help="measure latency tables on another device: its agent").add_subparsers(
        dest="device_command", metavar="ACTION", required=True)
    p = device.add_parser("serve", help="serve latency measurements of ONNX models on this device (needs numpy, onnx "
                                        "and the runtimes: pip install 'hwnas-yolo[agent]')")
    p.add_argument("--port", type=int, default=8710, help="TCP port (default 8710; 0: any free port)")
    p.add_argument("--token-file", type=Path, required=True,
                   help="file holding the shared secret clients must send; created with a random token if missing")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--allow-remote", action="store_true", help="allow an address other machines can reach")
    p.add_argument("--max-body-mb", type=float, default=256, help="largest request in MB (default 256)")
    p.add_argument("--time-limit", type=float, default=300,
                   help="seconds one request may measure before its measuring process is stopped (default 300)")
    p.add_argument("--read-timeout", type=float, default=30, help="seconds a request body may take to arrive "
                                                                  "(default 30)")
    p.add_argument("--queue-wait", type=float, default=600, help="seconds a request waits for the measurement "
                                                                 "running before it is answered busy (default 600)")
    p.set_defaults(func=cmd_serve)
