"""Does a table measured through the device agent match one measured locally? (issue 18, docs/BENCHMARKS.md
"Device agent (issue 18)")

Starts `nas device serve` on 127.0.0.1, then runs the same `nas lut build` and `nas lut validate --extend` twice,
locally and with `--device`, everything pinned to one core, and compares the two tables op by op (ratio agent/local)
and network by network (end-to-end times measured by each validation), beside a second local run (the machine's
noise), and their validations (share of networks within ±10%). Prints the command lines, wall times and a JSON summary:

    .venv/bin/python benchmarks/agent_vs_local.py --cpu 1 --out runs/agent-vs-local
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nas.latency.environment import cpu_id
from nas.latency.table import LatencyTable


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd), flush=True)
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    return round(time.monotonic() - start, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", default="1", help="core to pin the agent, its worker and the clients to")
    ap.add_argument("--arch", default="zoo:mobilenet_v3_small_100", help="arch whose ops the table is built from")
    ap.add_argument("--resolution", default="256")
    ap.add_argument("--space", default="search_spaces/uib_yolo.yaml", help="space the validation samples from")
    ap.add_argument("-n", "--num", default="20", help="networks to validate on")
    ap.add_argument("--out", type=Path, default=Path("runs/agent-vs-local"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    nas, pin = [sys.executable, "-m", "nas.commands.main"], ["taskset", "-c", args.cpu]
    token = args.out / "token"
    agent = subprocess.Popen([*pin, *nas, "device", "serve", "--port", "0", "--token-file", str(token)],
                             stdout=subprocess.PIPE, text=True)
    try:
        line = agent.stdout.readline()
        url = line.split(" on ")[1].split()[0]
        device = ["--device", url, "--token-file", str(token)]
        build = ["lut", "build", "--arch", args.arch, "--resolution", args.resolution, "--backend", "onnxruntime-cpu",
                 "--no-reference", "--calibrate", "0", "--quiet", "--force"]
        validate = ["lut", "validate", "--space", args.space, "-n", args.num, "--seed", "0", "--extend", "--quiet",
                    "--json"]
        times = {}
        for where, extra in (("local", []), ("agent", device), ("local2", [])):  # a second local run: the noise floor
            table = str(args.out / f"{where}.csv")
            times[f"build_{where}_s"] = run([*pin, *nas, *build, "--out", table, *extra])
            times[f"validate_{where}_s"] = run([*pin, *nas, validate[0], validate[1], table, *validate[2:],
                                                "--out", str(args.out / f"validate-{where}"), *extra])
    finally:
        agent.terminate()
        agent.wait(30)
    agent_cpu = LatencyTable.load(args.out / "agent.csv").header["device"].get("cpu_id")
    summary = {"cpu_id": cpu_id(), "agent_cpu_id": agent_cpu,
               "agent_vs_local": compare(args.out, "agent", "local"),
               "local2_vs_local": compare(args.out, "local2", "local"),
               "validate": {w: validation(args.out, w) for w in ("local", "agent", "local2")}, **times}
    print(json.dumps(summary, indent=2))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))


def _ratios(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    r = [a[k] / b[k] for k in b if k in a]
    q = statistics.quantiles(r, n=10)
    return {"n": len(r), "median_ratio": round(statistics.median(r), 4), "p10_ratio": round(q[0], 3),
            "p90_ratio": round(q[8], 3), "within_10pct": round(sum(abs(x - 1) <= 0.10 for x in r) / len(r), 3)}


def compare(out: Path, a: str, b: str) -> dict[str, dict[str, float]]:
    """Table entries (p10) and end-to-end network times of run `a` over run `b`."""
    ta, tb = (LatencyTable.load(out / f"{w}.csv") for w in (a, b))
    nets = {w: {r["arch"]: float(r["measured_us"]) for r in csv.DictReader((out / f"validate-{w}" /
                                                                           "validation.csv").open())} for w in (a, b)}
    return {"ops": _ratios({k: e.p10_us for k, e in ta.entries.items()}, {k: e.p10_us for k, e in tb.entries.items()}),
            "networks": _ratios(nets[a], nets[b])}


def validation(out: Path, where: str) -> dict[str, float]:
    v = json.loads((out / f"validate-{where}" / "validation.json").read_text())
    return {k: round(v[k], 3) for k in ("within_10pct", "kendall_tau", "mape", "bias_pct")}

if __name__ == "__main__":
    main()
