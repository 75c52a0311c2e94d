"""`nas train ARCH.yaml|zoo:NAME`: train a detector on a backbone, export and check its ONNX, print the metrics; and
`nas train --from RUN`: train a search's best front members beside zoo baselines and compare them."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nas.commands.common import arch_ref, json_clean, set_quiet
from nas.errors import ConfigError, NasError


def cmd_train(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train, export the best weights to model.onnx (checked against PyTorch), print the metrics.

    Returns the summary dict on rank 0 (None on other torchrun ranks).
    """
    from nas.arch.headconfig import NECKS, HeadConfig
    from nas.detect.checkpoint import load_detector
    from nas.detect.train import TrainConfig, train
    from nas.latency.onnx import check_onnx, export_onnx

    given = {k: getattr(args, k) for k in ("data", "epochs", "imgsz", "batch", "device", "workers", "neck", "name",
                                           "project", "optimizer", "lr0", "seed", "schedule", "close_mosaic",
                                           "val_interval", "exist_ok", "threads", "strict", "channels_last",
                                           "time_limit_s")}
    kwargs = {k: v for k, v in given.items() if v is not None}
    kwargs.update(_augmentation(args))
    if getattr(args, "from_run", None) is not None:
        cmd_compare(args, kwargs)
        return None
    if args.arch is None and not args.resume:
        raise ConfigError("nas train", "ARCH", "give an arch YAML or zoo:NAME (or --resume --name NAME, or --from RUN)")
    if args.int8 and not args.export:
        raise ConfigError("command line", "--int8", "goes with --export FORMATS (e.g. --export onnx,openvino --int8)")
    if args.export:
        from nas.report.deploy import parse_formats

        parse_formats(args.export)  # a typo fails now, not after the training
    arch = arch_ref(args.arch) if args.arch is not None else None
    neck = kwargs.pop("neck", None)
    if neck is None and arch is not None and arch.info.get("neck") in NECKS:
        neck = arch.info["neck"]  # an export of a detector-scope search: the neck its latency includes
    if neck is not None:
        kwargs["head"] = HeadConfig(neck=neck)
    # a command owns its process: keeping freed memory saves page faults in every training step
    cfg = TrainConfig(arch=arch, resume=args.resume, progress=not args.quiet, retain_heap=True, **kwargs)
    result = train(cfg)
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    weights = result.best if result.best.is_file() else result.last
    summary: dict[str, Any] = {
        "map50": result.map50, "map50_95": result.map50_95, "fitness": result.fitness, "epochs": result.epochs,
        "best_epoch": result.best_epoch, "weights": str(weights), "last": str(result.last),
        "run_dir": str(result.run_dir), "seconds": round(result.seconds, 1), "final": result.final,
        "speed_ms": result.speed,  # PyTorch eval on the val set, per image: preprocess, inference, nms
    }
    onnx_error = None
    if not args.no_onnx:
        model = load_detector(weights)
        imgsz = _run_imgsz(result.run_dir)  # on --resume the run's own size
        summary["params"] = sum(p.numel() for p in model.parameters())
        try:
            onnx_path = export_onnx(model, imgsz, result.run_dir / "model.onnx")
            summary["onnx"] = str(onnx_path)
            summary["onnx_max_diff"] = check_onnx(model, onnx_path, imgsz)
        except NasError as e:  # report the training first: its weights are saved and valid
            onnx_error = e
            summary["onnx_error"] = str(e)
    if args.export:
        summary["exports"] = _export(args, weights, result.run_dir)
    if args.json:
        print(json.dumps(json_clean(summary), indent=2))
    else:
        from nas.report.deploy import summary_lines

        epochs = f"{result.epochs} epoch{'s' if result.epochs != 1 else ''}"
        print(f"{result.run_dir}: {epochs} in {result.seconds / 60:.1f} min; best epoch {result.best_epoch}: "
              f"mAP50 {result.map50:.4f}, mAP50-95 {result.map50_95:.4f}")
        print(f"weights: {weights}")
        if "onnx_max_diff" in summary:
            print(f"onnx:    {summary['onnx']} (max diff vs PyTorch {summary['onnx_max_diff']:.2e})")
        for line in summary_lines(summary.get("exports", [])):
            print(line)
    if onnx_error is not None:
        raise onnx_error
    return summary


def _export(args: argparse.Namespace, weights: Path, run_dir: Path) -> list[dict[str, Any]]:
    """--export FORMATS [--int8]: the trained detector in each format under RUN/export, checked and scored on the
    run's own data (`nas.report.deploy`)."""
    import yaml

    from nas.detect.checkpoint import load_detector
    from nas.detect.train import default_data
    from nas.detect.trainconfig import TrainConfig
    from nas.report.deploy import deploy, parse_formats

    saved = yaml.safe_load((run_dir / "args.yaml").read_text())
    data = saved.get("data") or str(default_data(TrainConfig(digits_train=saved.get("digits_train", 1000),
                                                             digits_val=saved.get("digits_val", 200)), False))
    out = deploy(load_detector(weights), int(saved["imgsz"]), run_dir / "export", parse_formats(args.export),
                 data=data, int8=args.int8)
    return [d.to_dict() for d in out]


def _run_imgsz(run_dir: Path) -> int:
    import yaml

    return int(yaml.safe_load((run_dir / "args.yaml").read_text())["imgsz"])


def _augmentation(args: argparse.Namespace) -> dict[str, Any]:
    """`hyp` and `mosaic` from --hyp FILE (a YAML mapping of ultralytics' names) and the per-field flags on top;
    nothing when neither is given (a resume keeps the run's own)."""
    from nas.config import load_yaml, require_mapping
    from nas.detect.augment import AugmentConfig
    from nas.detect.trainconfig import HYP_KEYS

    values: dict[str, Any] = {}
    if args.hyp:
        values = dict(require_mapping(load_yaml(args.hyp), str(args.hyp), None))
    values.update({k: getattr(args, k) for k in (*HYP_KEYS, "mosaic") if getattr(args, k) is not None})
    if not values:
        return {}
    out: dict[str, Any] = {}
    if "mosaic" in values:
        out["mosaic"] = values.pop("mosaic")
    if values:
        out["hyp"] = AugmentConfig.from_mapping(values, str(args.hyp or "command line"))
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser(
        "train", help="train a YOLO detector on a backbone and report COCO mAP",
        description="Train backbone + neck + YOLOv8 head on a YOLO-format dataset (DigitsDet when --data is not "
                    "given). Writes PROJECT/NAME/: args.yaml, arch.yaml, weights/last.pt and best.pt, results.csv, "
                    "TensorBoard events and model.onnx. Multi-GPU/CPU: torchrun --nproc_per_node N -m nas train ...")
    t.add_argument("arch", nargs="?", metavar="ARCH", help="arch YAML path or zoo:NAME (e.g. zoo:mobilenet_v3_small_100)")
    t.add_argument("--data", help="data YAML in the ultralytics layout (default: DigitsDet, generated once into "
                                  "~/.cache/nas or $NAS_CACHE)")
    t.add_argument("--epochs", type=int, help="training epochs (default 10)")
    t.add_argument("--imgsz", type=int, help="square input size, a multiple of 32 (default 320)")
    t.add_argument("--batch", type=int, help="total batch size over all processes (default 16)")
    t.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    t.add_argument("--workers", type=int, help="data loader processes (default 2)")
    t.add_argument("--threads", type=int, help="torch threads per process (default: torch's; 1 is often fastest "
                                               "on a busy small CPU)")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, dest="channels_last",
                   help="channels-last memory format for the model and batches (default: on for CPU, where it "
                        "saves 15-25%% of a training step, off for CUDA)")
    t.add_argument("--time-limit", type=float, dest="time_limit_s", metavar="SECONDS",
                   help="wall-clock budget: the epochs (then at most --epochs) are re-planned after each epoch from "
                        "the mean epoch time, the LR schedule and close-mosaic follow; ends after the epoch that "
                        "uses the budget up")
    t.add_argument("--strict", action="store_true", default=None,
                   help="stop at the first bad label line (file:line) instead of skipping bad lines with one warning")
    t.add_argument("--neck", choices=("yolov8", "dw"), help="yolov8: C2f PAN; dw: light depthwise PAN (default dw)")
    t.add_argument("--optimizer", choices=("sgd", "adamw"), help="default sgd (momentum 0.937, nesterov)")
    t.add_argument("--lr0", type=float, help="initial learning rate (default 0.01 for SGD, 0.001 for AdamW)")
    t.add_argument("--schedule", choices=("linear", "cosine"), help="LR decay to lr0*0.01 (default linear)")
    t.add_argument("--close-mosaic", type=int, dest="close_mosaic", help="last N epochs without mosaic (default 10)")
    _augmentation_flags(t)
    t.add_argument("--val-interval", type=int, dest="val_interval", help="evaluate every N epochs (default 1)")
    t.add_argument("--seed", type=int, help="random seed (default 0)")
    t.add_argument("--project", help="parent folder of runs (default runs/train)")
    t.add_argument("--name", help="run folder name (default: the arch name, made unique with 2, 3, ...)")
    t.add_argument("--exist-ok", action="store_true", default=None, dest="exist_ok",
                   help="reuse PROJECT/NAME instead of making a new folder")
    t.add_argument("--resume", action="store_true", help="continue PROJECT/NAME/weights/last.pt (same settings)")
    t.add_argument("--no-onnx", action="store_true", dest="no_onnx", help="skip the model.onnx export and check")
    t.add_argument("--export", metavar="FORMATS",
                   help="then write the best weights as onnx and/or openvino (comma-separated) into RUN/export, raw "
                        "head outputs checked against torch on val images (atol 1e-3) and val mAP through each runtime")
    t.add_argument("--int8", action="store_true",
                   help="with --export: also int8 files (calibrated on training images) and their mAP drop against fp32")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--json", action="store_true",
                   help="print a JSON object (map50, map50_95, epochs, weights, onnx, ...) instead of text")
    c = t.add_argument_group("comparing a search's winners with zoo baselines (--from)")
    c.add_argument("--from", dest="from_run", metavar="RUN",
                   help="train the search's top-K front members and the zoo baselines with the same data and "
                        "schedule (into RUN/compare/), measure all of them side by side with the latency table's "
                        "protocol, and write compare.md, compare.csv, map_vs_latency.png and a TensorBoard image "
                        "(RUN/tb). --imgsz defaults to the members' largest search resolution, --neck to the run's")
    c.add_argument("--top-k", type=int, default=3, metavar="K", help="front members to train, best score first "
                                                                     "(default 3)")
    c.add_argument("--rerank", type=int, default=0, metavar="N",
                   help="short-train the N best front members first (4 epochs at 128 px on a small DigitsDet, 3 "
                        "seeds, 1-3 CPU minutes each) and train the K best of them by the mean mAP: the search's "
                        "proxy rarely orders the top few well (docs/BENCHMARKS.md, Headline). Default 0: train "
                        "the top K by the search's score")
    c.add_argument("--baselines", metavar="LIST",
                   help="comma-separated zoo models, e.g. zoo:mobilenet_v3_small_100,zoo:mobilenet_v4_conv_small "
                        "(the default), or none")
    c.add_argument("--no-measure", action="store_true", help="skip the latency measurement")
    t.set_defaults(func=cmd_train)


def cmd_compare(args: argparse.Namespace, train_kwargs: dict[str, Any]) -> list:
    """The `nas train --from RUN` handler; `train_kwargs` are the TrainConfig fields given on the command line."""
    from nas.arch.headconfig import HeadConfig
    from nas.detect.train import TrainConfig
    from nas.report.compare import compare, markdown, parse_baselines, top_members, write_outputs, zoo_entrants
    from nas.report.runs import open_run

    if args.arch is not None or args.resume:
        raise ConfigError("command line", "--from", "trains the run's front members: give no ARCH and no --resume")
    if args.top_k < 0:
        raise ConfigError("command line", "--top-k", f"must be >= 0, got {args.top_k}")
    if args.rerank and args.rerank <= args.top_k:
        raise ConfigError("command line", "--rerank", f"must be more than --top-k ({args.top_k}) to choose among "
                                                      f"them, got {args.rerank} (0: no reranking)")
    r = open_run(args.from_run)
    set_quiet(args.quiet)  # the library's progress lines go to stderr (stdout: the table or JSON)
    entrants = top_members(r.study, max(args.top_k, args.rerank)) if args.top_k else []
    ranked = []
    if args.rerank and entrants:
        from nas.detect.short import ShortSchedule
        from nas.report.rerank import rerank

        schedule = ShortSchedule(neck=train_kwargs.get("neck") or r.exp.evaluator.neck, data=train_kwargs.get("data"))
        ranked = rerank(entrants, schedule, r.run_dir / "compare" / "rerank", retain_heap=True,
                        **{k: train_kwargs[k] for k in ("device", "threads", "workers") if k in train_kwargs})
        entrants = [x.entrant for x in ranked[:args.top_k]]
    entrants += zoo_entrants(parse_baselines(args.baselines))
    if not entrants:
        raise ConfigError("command line", "--top-k/--baselines", "nothing to train: ask for front members or baselines")
    exp = r.exp
    data = train_kwargs.get("data")
    if data is not None:
        from nas.detect.data import load_data_config

        nc = load_data_config(data).nc
    else:
        nc = 10  # DigitsDet
    head = HeadConfig(neck=train_kwargs.get("neck") or exp.evaluator.neck, num_classes=nc)
    # one image size for all (the same schedule): by default the largest resolution of the searched members, so
    # none is trained below the resolution it was searched at
    searched = [e.arch.resolution for e in entrants if e.source == "search"]
    kw = {"imgsz": max(searched) if searched else TrainConfig.imgsz, **train_kwargs, "head": head}
    for k in ("name", "project", "neck"):  # compare names the folders; the neck is in `head`
        kw.pop(k, None)
    # a command owns its process: keeping freed memory saves page faults in every training step
    base = TrainConfig(arch=entrants[0].arch, progress=not args.quiet, retain_heap=True, **kw)
    out = r.run_dir / "compare"
    table = None if args.no_measure else r.table(None, "measuring the detectors")
    rows = compare(entrants, base, out, head, table.protocol if table else None, table)
    budget = exp.budget_ms if exp.scope == "detector" else None  # a backbone budget is not on this axis
    epochs = f"{base.epochs} epoch{'s' * (base.epochs != 1)}"
    title = (f"{r.study.study_name}: {epochs} at {base.imgsz} px, {head.neck} neck, "
             f"{'measured ' + table.protocol.backend if table else 'not measured'}")
    paths = write_outputs(rows, out, title, budget, r.run_dir / "tb" if exp.tensorboard_every else None)
    if args.json:
        print(json.dumps({"rows": [asdict(x) for x in rows],
                          "rerank": [{"model": x.entrant.label, "score": x.entrant.score, "map50_95": x.map50_95,
                                      "map50": x.map50, "train_s": x.train_s, "per_seed": list(x.per_seed)}
                                     for x in ranked],
                          **{k: str(v) for k, v in paths.items()}}, indent=2))
    else:
        print(markdown(rows, title))
        print("wrote " + ", ".join(str(v) for k, v in paths.items() if k != "tensorboard"))
        if "tensorboard" in paths:
            print(f"TensorBoard: tensorboard --logdir {paths['tensorboard']} (images: compare/map_vs_latency)")
    return rows


def _augmentation_flags(t: argparse.ArgumentParser) -> None:
    from nas.detect.augment import AugmentConfig

    d = AugmentConfig()
    g = t.add_argument_group("augmentation (ultralytics' names and defaults)")
    g.add_argument("--hyp", type=Path, metavar="FILE",
                   help="YAML mapping of the fields below (e.g. {fliplr: 0.0, mosaic: 0.5}); flags override it")
    g.add_argument("--mosaic", type=float, help="probability of a 4-image mosaic (default 1.0)")
    g.add_argument("--fliplr", type=float, help=f"probability of a horizontal flip (default {d.fliplr}); 0 for "
                                                "text, digits and other handed objects")
    for name, what in (("hsv_h", "hue shift, fraction of the colour circle"), ("hsv_s", "saturation gain range"),
                       ("hsv_v", "value gain range"), ("degrees", "rotation range, degrees"),
                       ("translate", "shift range, fraction of the size"), ("scale", "zoom range (1 ± scale)"),
                       ("shear", "shear range, degrees")):
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float,
                       help=f"{what} (default {getattr(d, name)})")
