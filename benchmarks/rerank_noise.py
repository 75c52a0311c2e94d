"""How much of the rerank's order is noise: every rerank candidate of a finished headline run short-trained again
with other training seeds (nas.rerank's schedule otherwise unchanged), then per candidate the seed-to-seed spread
and Kendall τ between the seeds' orders, per budget.

    .venv/bin/python benchmarks/rerank_noise.py runs/headline/results.json --seeds 1 2 --out runs/rerank_noise

Trainings run one per usable core (one thread each) and are reused by a rerun (nas.rerank's markers).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def one(task: tuple[str, str, int, str, str]) -> tuple[str, int, float]:
    import torch

    from nas.arch.spec import loads_arch
    from nas.detect.short import ShortSchedule, short_train

    label, arch, seed, data, out = task
    torch.set_num_threads(1)
    r = short_train(loads_arch(arch, label), ShortSchedule(), data, Path(out) / f"{label}_s{seed}", seed)
    print(f"{label} seed {seed}: mAP50-95 {r['map50_95']:.4f} ({r['train_s']:.0f} s)", flush=True)
    return label, seed, r["map50_95"]


def main(argv: list[str] | None = None) -> None:
    from scipy.stats import kendalltau

    from nas.detect.short import ShortSchedule

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="a headline run's results.json (its rerank gives the first seeds)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="further training seeds (default: 1 2)")
    ap.add_argument("--out", type=Path, default=Path("runs/rerank_noise"))
    args = ap.parse_args(argv)
    res = json.loads(args.results.read_text())
    if ShortSchedule().neck != res["settings"]["neck"]:
        sys.exit(f"{args.results}: neck {res['settings']['neck']!r}, the short schedule's is {ShortSchedule().neck!r}")
    budgets = {b["tag"]: b["search"].get("candidates_ranked") or [] for b in res["budgets"]}
    if not any(budgets.values()):
        sys.exit(f"{args.results}: no rerank in this run (made with --rerank 0?)")
    run_seeds = res["settings"].get("rerank_seeds", [0])  # a run before the 3-seed rerank had seed 0 only
    new = [s for s in args.seeds if s not in run_seeds]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    data = ShortSchedule().dataset(args.out)
    tasks = [(f"{tag}-{c['label']}", c["arch"], s, data, str(args.out)) for tag, cs in budgets.items() for c in cs
             for s in new]
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        got = {(label, seed): m for label, seed, m in pool.map(one, tasks)}
    full = {m["model"]: m["map50_95"]["median"] for m in res["models"].values()}
    seeds = [*run_seeds, *new]
    lines = [f"Short-training mAP50-95 (nas.rerank schedule) of {args.results}'s rerank candidates, seeds "
             f"{', '.join(map(str, run_seeds))} from the run, {', '.join(map(str, new)) or 'none'} here; full = the "
             f"run's 8-epoch median.", ""]
    for tag, cs in budgets.items():
        table = {c["label"]: [*c.get("per_seed", [c["map50_95"]]), *(got[(f"{tag}-{c['label']}", s)] for s in new)]
                 for c in cs}
        lines += [f"## {tag}", "", "| candidate | " + " | ".join(f"seed {s}" for s in seeds)
                  + " | mean | range | full |", "|---|" + "---:|" * (len(seeds) + 3)]
        for label, v in sorted(table.items(), key=lambda kv: -statistics.mean(kv[1])):
            f = full.get(f"{tag}-{label}")
            lines.append(f"| {label} | " + " | ".join(f"{x:.4f}" for x in v) + f" | {statistics.mean(v):.4f} | "
                         f"{max(v) - min(v):.4f} | {'-' if f is None else f'{f:.4f}'} |")
        taus = [kendalltau([v[i] for v in table.values()], [v[j] for v in table.values()]).statistic
                for i in range(len(seeds)) for j in range(i + 1, len(seeds))]
        spreads = [max(v) - min(v) for v in table.values()]
        means = [statistics.mean(v) for v in table.values()]
        lines += ["", f"Kendall τ between the seeds' orders: {', '.join(f'{t:+.2f}' for t in taus)}; median range "
                      f"over seeds {statistics.median(spreads):.4f}; spread of the candidates' means "
                      f"{max(means) - min(means):.4f}.", ""]
    text = "\n".join(lines)
    (args.out / "rerank_noise.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
