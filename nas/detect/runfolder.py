"""A training run's folder: results.csv, and what a resume reads back (last.pt, args.yaml, results.csv), each
refused with one line naming the file and the fix when it is damaged or edited."""
from __future__ import annotations

import csv
import io
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from nas.arch.spec import dumps_arch, loads_arch
from nas.detect.checkpoint import load_checkpoint
from nas.detect.optim import planned_epochs
from nas.detect.trainconfig import RUNTIME_FIELDS, TrainConfig
from nas.errors import ConfigError, NasError, NoSpaceError
from nas.system import exclusive_lock, no_space, write_atomically

LOSS_NAMES = ("box_loss", "cls_loss", "dfl_loss")
CSV_FIELDS = ("epoch", *(f"train/{n}" for n in LOSS_NAMES), "lr/pg0", "lr/pg1", "lr/pg2", "map50", "map50_95",
              "fitness", "time", "val_time")
# what a resume reads from last.pt beyond load_checkpoint's own checks, with the types it needs
RESUME_KEYS = {"epoch": int, "best_fitness": (int, float), "best_epoch": int, "ema": dict, "ema_updates": int,
               "optimizer": dict, "scheduler": dict, "rng": dict, "config": dict}
# args.yaml fields a resume may differ in: runtime settings, and where the run lives
ARGS_FREE = (*RUNTIME_FIELDS, "resume", "project", "name", "exist_ok")
LOCK_NAME = "train.lock"  # held (an OS lock: gone with its process) by the training writing the folder
TB_TAGS = {"map50": "metrics/mAP50", "map50_95": "metrics/mAP50-95", "fitness": "metrics/fitness",
           "time": "time/epoch", "val_time": "time/val"}


def hold_run_dir(run_dir: Path, held: ExitStack) -> None:
    """Lock `run_dir` for this training's life (until `held` closes), or refuse at once when another training
    writes it: two trainings would interleave their epochs in one last.pt and results.csv."""
    lock = run_dir / LOCK_NAME
    try:
        held.enter_context(exclusive_lock(lock, wait=False))
    except BlockingIOError:
        raise NasError(f"{run_dir}: another training is writing this run folder (it holds {lock}); wait for it to "
                       "finish (then --resume continues after its last epoch), or train under another --name") from None


def unique_dir(project: Path, name: str) -> Path:
    """project/name, or project/name2, name3, ... when it exists."""
    d, i = project / name, 2
    while d.exists():
        d, i = project / f"{name}{i}", i + 1
    return d


def full_disk_fix(run_dir: Path) -> str:
    """What to run after a write in `run_dir` was refused for want of space: the resume, which continues after the
    last checkpoint whole on disk (results.csv rows past it are dropped and trained again)."""
    if not (run_dir / "weights" / "last.pt").is_file():
        return f"free space and start the training again (no epoch of {run_dir} was saved)"
    return (f"free space, then `nas train --resume --project {run_dir.parent} --name {run_dir.name}` continues "
            "after the last saved epoch")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    out = io.StringIO(newline="")
    w = csv.DictWriter(out, CSV_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    # temp file + rename: a kill or a full disk mid-write must not truncate the history
    write_atomically(path, out.getvalue(), "writing the training history", full_disk_fix(path.parent))


def open_run_folder(run_dir: Path, cfg: TrainConfig) -> Any:
    """Write args.yaml (what a resume checks) and arch.yaml, each replaced whole or not at all; returns the
    TensorBoard writer of the run (None without cfg.tensorboard)."""
    fix = full_disk_fix(run_dir)
    write_atomically(run_dir / "args.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False), "writing args.yaml", fix)
    write_atomically(run_dir / "arch.yaml", dumps_arch(cfg.arch), "writing arch.yaml", fix)
    if not cfg.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

    return SummaryWriter(str(run_dir))


def log_epoch(writer: Any, row: dict[str, Any], run_dir: Path) -> None:
    """An epoch's results.csv row as TensorBoard scalars (none without a writer), flushed. A full disk is a NasError
    naming the events file (TensorBoard's writer thread meets it first and dies; its flush raises the error here)."""
    if writer is None:
        return
    try:
        for k, v in row.items():
            if k != "epoch" and math.isfinite(v):
                writer.add_scalar(TB_TAGS.get(k, k), v, row["epoch"])
        writer.flush()
    except Exception as e:
        reason = no_space(e)
        if reason is None:
            raise
        events = getattr(getattr(writer.file_writer, "event_writer", None), "_file_name", None) or run_dir
        raise NoSpaceError(f"{events}: {reason} while writing TensorBoard events; {full_disk_fix(run_dir)}") from e


def close_writer(writer: Any) -> None:
    """Close the TensorBoard writer (if any). After a full disk its thread is dead and close raises that error once
    more: it was reported already (log_epoch), and must not hide the error the training stops with."""
    if writer is None:
        return
    try:
        writer.close()
    except Exception as e:
        if no_space(e) is None:
            raise


def read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for n, r in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
            try:  # hand-edited or damaged: the history a resume extends, so say where
                missing = [c for c in ("epoch", "time") if r.get(c) is None]  # the columns a resume reads
                if missing:
                    raise ValueError(f"no {' or '.join(missing)} value")
                rows.append({k: (int(v) if k == "epoch" else float(v) if v != "" else float("nan"))
                             for k, v in r.items()})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{path}:{n}", None, f"unreadable row ({e}); restore the file, or delete it to "
                                                       "resume without the earlier epochs' rows") from None
    return rows


def _resume_ready(path: Path) -> dict[str, Any]:
    """A checkpoint that has everything a resume needs, or a NasError naming the file."""
    ckpt = load_checkpoint(path)
    bad = [k for k, t in RESUME_KEYS.items() if not isinstance(ckpt.get(k), t) or isinstance(ckpt.get(k), bool)]
    if bad:
        raise NasError(f"{path}: damaged nas checkpoint: missing or of the wrong type: {', '.join(bad)}")
    return ckpt


def resume_fix(run_dir: Path) -> str:
    """How to get going again when last.pt is unusable: best.pt is a full checkpoint too, if it is intact."""
    best = run_dir / "weights" / "best.pt"
    try:
        epoch = _resume_ready(best)["epoch"]
    except NasError:
        return "start a new run without --resume (this run has no usable checkpoint to continue)"
    return (f"to continue after epoch {epoch} instead, copy {best} over it and resume again; or start a new run "
            "without --resume")


def _resume_checkpoint(run_dir: Path) -> dict[str, Any]:
    try:
        return _resume_ready(run_dir / "weights" / "last.pt")
    except NasError as e:  # load_checkpoint's reason, plus what to do about it in a resume
        raise NasError(f"{e}; {resume_fix(run_dir)}") from None


def _check_args_yaml(run_dir: Path, saved: dict[str, Any]) -> None:
    """A resume continues with the checkpoint's settings and rewrites args.yaml from them; an args.yaml that no
    longer says the same (hand-edited to change the run, or damaged) would be silently overridden, so refuse it."""
    path = run_dir / "args.yaml"
    if not path.exists():  # only a record: rewritten below
        return
    fix = ("a resume keeps the settings it was started with (weights/last.pt); restore the file or delete it "
           "(it is rewritten from the checkpoint), or start a new run without --resume to change settings")
    try:
        args = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(str(path), None, f"unreadable ({type(e).__name__}{where}); {fix}") from None
    if not isinstance(args, dict):
        raise ConfigError(str(path), None, f"expected a mapping of settings, got {type(args).__name__}; {fix}")
    for k, v in saved.items():
        if k in ARGS_FREE or k == "arch":
            continue
        if k not in args:
            raise ConfigError(str(path), k, f"missing, the checkpoint has {v!r}; {fix}")
        if args[k] != v:
            raise ConfigError(str(path), k, f"{args[k]!r} differs from the checkpoint's {v!r}; {fix}")


def resume_dir(cfg: TrainConfig) -> Path:
    """The run folder `cfg.resume` continues: PROJECT/NAME."""
    name = cfg.name or (cfg.arch.name if cfg.arch is not None else None)
    if not name:
        raise ConfigError("train config", "name", "resume needs the run's name (runs/train/NAME)")
    return Path(cfg.project) / name


def open_resume(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any], list[dict[str, Any]], Path]:
    """For `cfg.resume`: the run's own config (cfg's runtime fields kept), its last.pt, the results.csv rows up to
    it and the run folder; refused when the run is missing, damaged, edited or already finished."""
    run_dir = resume_dir(cfg)
    if not (run_dir / "weights" / "last.pt").is_file():
        raise ConfigError(str(run_dir), None, "nothing to resume: weights/last.pt not found (check --project "
                                              "and --name, or start without --resume)")
    ckpt = _resume_checkpoint(run_dir)
    known = TrainConfig().to_dict()  # the flat keys a checkpoint's config holds
    saved = {k: v for k, v in ckpt["config"].items() if k in known}
    _check_args_yaml(run_dir, saved)
    cfg = TrainConfig.from_dict(saved, **{k: getattr(cfg, k) for k in RUNTIME_FIELDS},
                                arch=loads_arch(ckpt["meta"]["arch_yaml"], str(run_dir)), resume=True,
                                project=cfg.project, name=run_dir.name)
    history = [r for r in read_csv(run_dir / "results.csv") if r["epoch"] <= ckpt["epoch"]]
    if ckpt["epoch"] >= planned_epochs(cfg, [r["time"] for r in history]):
        budget = f" (time limit {cfg.time_limit_s:g} s)" if cfg.time_limit_s is not None else ""
        raise NasError(f"{run_dir}: already finished ({ckpt['epoch']} of at most {cfg.epochs} epochs{budget}); "
                       "nothing to resume")
    return cfg, ckpt, history, run_dir
