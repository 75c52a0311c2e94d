"""Reliability (issue 8, items 3 and 4): a SIGKILLed `nas train` resumes to the very run it would have been; failing
candidates (exceptions, out of memory, NaN/inf proxies or losses) are FAILED trials with their reason while the study
goes on; damaged data YAMLs, checkpoints, args.yaml and results.csv give one line naming the file and the fix.

Most error cases call `nas.cli.main` in-process (a subprocess costs ~2 s of torch import); the kill needs real ones.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from optuna.trial import TrialState

import nas.detect.train as train_mod
from nas.arch.headconfig import HeadConfig
from nas.arch.zoo import get_arch
from nas.commands.main import main
from nas.detect.checkpoint import load_checkpoint
from nas.detect.digits import generate_digits
from nas.detect.train import TrainConfig, train
from nas.search import proxies
from nas.search.experiment import experiment_from_dict
from nas.search.study import run

ROOT = Path(__file__).resolve().parents[1]
ARCH = "mobilenet_v3_small_100"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    # 96 training images = 12 steps of 8: an epoch long enough (~1 s) to be killed in the middle of
    root = tmp_path_factory.mktemp("digits")
    return str(generate_digits(root, 96, 16, imgsz=96, min_size=12, max_size=40, progress=False, workers=0))


# ---------------------------------------------------------------- 1. SIGKILL mid-epoch, then --resume

def _nas(*args: str) -> list[str]:
    return [sys.executable, "-m", "nas", *args]


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:  # times differ between runs; everything else must not
        return [{k: v for k, v in r.items() if "time" not in k} for r in csv.DictReader(f)]


def test_sigkilled_training_resumes_to_the_uninterrupted_run(digits, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # 3 epochs, all inside the default 3-epoch warmup (the LR depends on the global step, so on the restored epoch
    # counter) and the last without mosaic; workers 0: no loader processes orphaned by the kill
    common = ["--workers", "0", "--threads", "1", "--no-onnx", "--quiet", "--json", "--project", str(tmp_path)]
    start = ["train", f"zoo:{ARCH}", "--data", digits, "--epochs", "3", "--imgsz", "96", "--batch", "8", "--neck",
             "dw", "--close-mosaic", "1", "--seed", "3", *common]
    last = tmp_path / "killed" / "weights" / "last.pt"
    proc = subprocess.Popen(_nas(*start, "--name", "killed"), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # epoch 2 trains for ~1 s after epoch 1's checkpoint: land in its middle
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    # killed during epoch 2: its checkpoint and results row were never written
    assert load_checkpoint(last)["epoch"] == 1, "epoch 2 ended before the kill: make the epoch longer"
    assert len(_csv(tmp_path / "killed" / "results.csv")) == 1

    resumed, full = (subprocess.run(_nas(*argv), check=False, env=env, cwd=tmp_path, capture_output=True, text=True,
                                    timeout=180) for argv in (["train", "--resume", "--name", "killed", *common],
                                                              [*start, "--name", "full"]))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert full.returncode == 0, full.stderr[-2000:]
    out_r, out_f = yaml.safe_load(resumed.stdout), yaml.safe_load(full.stdout)  # JSON is YAML
    assert out_r["epochs"] == out_f["epochs"] == 3

    # CPU training with one thread is bit-reproducible across processes, so the tightest honest bound is equality:
    # every epoch's losses, LRs (pg0-2: warmup and schedule) and mAP, and the final state.
    rows_r, rows_f = _csv(tmp_path / "killed" / "results.csv"), _csv(tmp_path / "full" / "results.csv")
    assert [r["epoch"] for r in rows_r] == ["1", "2", "3"]  # the epoch counter continued, no epoch repeated
    assert rows_r == rows_f
    assert (out_r["map50"], out_r["map50_95"], out_r["best_epoch"]) == (out_f["map50"], out_f["map50_95"],
                                                                        out_f["best_epoch"])
    a, b = load_checkpoint(tmp_path / "killed" / "weights" / "last.pt"), load_checkpoint(tmp_path / "full" / "weights"
                                                                                         / "last.pt")
    assert (a["epoch"], a["ema_updates"], a["best_epoch"], a["best_fitness"]) == \
        (b["epoch"], b["ema_updates"], b["best_epoch"], b["best_fitness"]) and a["ema_updates"] == 36
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key
    # optimizer: momentum buffers and per-group LR/momentum; scheduler: its epoch and base LRs
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    assert [{k: v for k, v in g.items() if k != "params"} for g in a["optimizer"]["param_groups"]] == \
        [{k: v for k, v in g.items() if k != "params"} for g in b["optimizer"]["param_groups"]]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 3
    assert a["scheduler"]["_last_lr"] == b["scheduler"]["_last_lr"]


# ---------------------------------------------------------------- 2. failing candidates in a search

def _proxy_exp(tiny_dir, tiny_table, tmp_path, **kw):
    d = {"format": "nas/experiment@1", "name": "rel", "space": str(tiny_dir / "space.yaml"),
         "table": str(tiny_table.path), "budget_ms": 1000.0, "mode": "mnas", "scope": "backbone",
         "sampler": "random", "trials": 4, "evaluator": {"kind": "proxy", "proxy": "params", "resolution": 64},
         "output": str(tmp_path / "runs")}
    return experiment_from_dict({**d, **kw}, "exp.yaml")


def test_failing_proxies_are_failed_trials_and_the_study_completes(tiny_dir, tiny_table, tmp_path, monkeypatch):
    real = proxies.PROXIES["params"]

    def oom(*a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    def memory(*a):
        raise MemoryError("simulated")

    def bug(*a):
        raise ZeroDivisionError("simulated bug in a proxy")

    # one outcome per call, in trial order (one worker); good ones in between so no failure streak stops the run
    plan = [real, lambda *a: math.nan, lambda *a: math.inf, real, oom, memory, lambda *a: -math.inf, bug, real, real]
    calls = iter(plan)
    monkeypatch.setitem(proxies.PROXIES, "params", lambda *a: next(calls)(*a))
    study = run(_proxy_exp(tiny_dir, tiny_table, tmp_path), progress=False)

    by_number = {t.number: t for t in study.trials}
    assert len(by_number) == len(plan)  # the study went on to its 4 complete trials
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert [t.number for t in done] == [0, 3, 8, 9]
    assert all(math.isfinite(t.value) and t.user_attrs["evaluated"] is True for t in done)
    expected = {1: "ProxyError: proxy 'params' failed on arch 'rel-trial-1': score is nan",
                2: "ProxyError: proxy 'params' failed on arch 'rel-trial-2': score is inf",
                4: "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (simulated)",
                5: "MemoryError: simulated",
                6: "ProxyError: proxy 'params' failed on arch 'rel-trial-6': score is -inf",
                7: "ZeroDivisionError: simulated bug in a proxy"}
    for n, reason in expected.items():
        t = by_number[n]
        assert t.state == TrialState.FAIL and t.value is None, n
        assert t.user_attrs["fail_reason"] == reason and t.user_attrs["evaluated"] is False
        assert "arch" in t.user_attrs  # the candidate itself is kept, to look at or retry
        # expected failure kinds need no traceback; an unexpected exception keeps one for the bug report
        assert ("fail_traceback" in t.user_attrs) == (n == 7), n
    assert "ZeroDivisionError" in by_number[7].user_attrs["fail_traceback"]


def test_a_real_nan_inside_a_proxy_is_a_proxy_error(tiny_space, monkeypatch):
    """NaN from the computation itself (not only a NaN result): a NaN weight poisons the feature maps."""
    arch = tiny_space.random(0)
    real_network = proxies._network

    def poisoned(*a, **kw):
        net = real_network(*a, **kw)
        with torch.no_grad():
            next(p for p in net.parameters() if p.ndim == 4).view(-1)[0] = math.nan
        return net

    monkeypatch.setattr(proxies, "_network", poisoned)
    for name in ("grad_norm", "naswot", "zen", "synflow", "snip", "entropy"):
        with pytest.raises(proxies.ProxyError, match="NaN"):
            proxies.score(arch, name, resolution=64, batch=4)


def test_failing_short_trainings_are_failed_trials_and_the_study_completes(det_space, tmp_path, monkeypatch):
    # per training (= trial): which loss call (0-based; 2 steps per epoch) goes wrong and how
    plan = {0: (2, "nan"), 1: (0, "inf"), 2: (1, "oom"), 3: (3, "nan_grad")}
    state = {"train": -1, "step": 0}

    class Faulty(train_mod.DetectionLoss):
        def __call__(self, preds, targets, imgsz):
            loss, parts = super().__call__(preds, targets, imgsz)
            at, kind = plan.get(state["train"], (None, None))
            state["step"] += 1
            if state["step"] - 1 != at:
                return loss, parts
            if kind == "oom":
                raise torch.OutOfMemoryError("CPU out of memory (simulated)")
            if kind == "nan_grad":  # finite loss, NaN gradients: d/dx sqrt(x) at 0 is inf, times 0
                return loss + torch.sqrt(loss * 0) * 0, parts
            return loss * float(kind), parts

    real_train = train_mod.train

    def counting_train(cfg, on_epoch=None):
        state["train"], state["step"] = state["train"] + 1, 0
        return real_train(cfg, on_epoch)

    monkeypatch.setattr(train_mod, "DetectionLoss", Faulty)
    monkeypatch.setattr(train_mod, "train", counting_train)
    space, table = det_space
    exp = experiment_from_dict({
        "format": "nas/experiment@1", "name": "st", "space": str(space), "table": str(table), "budget_ms": 1000.0,
        "scope": "backbone", "mode": "constraint", "sampler": "random", "trials": 2, "output": str(tmp_path / "runs"),
        "evaluator": {"kind": "train", "epochs": 2, "imgsz": 64, "train_batch": 8, "train_images": 16,
                      "val_images": 8, "pruner": "none"}}, "exp.yaml")
    study = run(exp, progress=False)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.FAIL] * 4 + [TrialState.COMPLETE] * 2
    reasons = [t.user_attrs["fail_reason"] for t in trials[:4]]
    assert reasons[0].startswith("TrainingDiverged: training diverged: the loss became nan at epoch 2, step 1/2")
    assert reasons[1].startswith("TrainingDiverged: training diverged: the loss became inf at epoch 1, step 1/2")
    assert reasons[2] == "OutOfMemoryError: CPU out of memory (simulated)"
    # NaN gradients at the very last step: no later loss shows them, so without the gradient check this trial
    # "finished" with NaN weights and was recorded COMPLETE with mAP 0
    assert reasons[3].startswith("TrainingDiverged: training diverged: the gradient norm became nan at epoch 2, "
                                 "step 2/2")
    assert trials[0].intermediate_values == {1: trials[0].intermediate_values[1]}  # epoch 1 was reported, then failed
    for t in trials[:4]:
        assert t.user_attrs["evaluated"] is False and "fail_traceback" not in t.user_attrs and t.value is None
    for t in trials[4:]:
        assert math.isfinite(t.value) and t.value == t.user_attrs["map50_95"]


# ---------------------------------------------------------------- 3. damaged inputs: one line, exit 2

def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("nas: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.removeprefix("nas: error: ").strip()


@pytest.mark.parametrize("text,field", [
    ("path: .\ntrain: images/train\nnames: [a]\n", "val"),                      # a required split missing
    ("path: nowhere\ntrain: images/train\nval: images/val\nnames: [a]\n", "path"),
    ("path: .\ntrain: images/train\nval: images/val\nnames: [a]\nnc: 3\n", "nc"),
    ("path: .\ntrain: images/train\nval: images/val\nnames: [a]\nvall: x\n", "vall"),  # a typo
])
def test_bad_data_yaml_fails_before_the_run_folder_exists(digits, tmp_path, capsys, text, field):
    bad = Path(digits).parent / f"bad_{field}.yaml"  # next to the real images, so only the named field is wrong
    bad.write_text(text)
    project = tmp_path / "runs"
    assert main(["train", f"zoo:{ARCH}", "--data", str(bad), "--project", str(project), "--name", "x", "--quiet"]) == 2
    assert _one_line_error(capsys).startswith(f"{bad}: {field}")
    assert not (project / "x").exists()


def test_bad_labels_with_strict_leave_no_run_folder(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        Image.new("RGB", (64, 64)).save(tmp_path / "images" / split / "a.png")
        (tmp_path / "labels" / split / "a.txt").write_text("0 0.5 0.5 0.2\n")  # four values
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a]\n")
    argv = ["train", f"zoo:{ARCH}", "--data", str(tmp_path / "data.yaml"), "--strict", "--project",
            str(tmp_path / "runs"), "--name", "x", "--quiet"]
    assert main(argv) == 2
    assert _one_line_error(capsys).startswith(f"{tmp_path / 'labels' / 'train' / 'a.txt'}:1: expected 5 values")
    assert not (tmp_path / "runs").exists()


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def stopped_run(digits, tmp_path_factory) -> Path:
    """A 2-epoch run stopped after epoch 1 (last.pt and best.pt at epoch 1): the thing a resume continues."""
    project = tmp_path_factory.mktemp("stopped")

    def stop(epoch, metrics):
        raise Stop

    with pytest.raises(Stop):
        train(TrainConfig(arch=get_arch(ARCH), data=digits, epochs=2, imgsz=64, batch=32, workers=0,
                          head=HeadConfig(neck="dw"),
                          project=str(project), name="run", progress=False, tensorboard=False), on_epoch=stop)
    return project / "run"


def _resume(run_dir: Path) -> list[str]:
    return ["train", "--resume", "--project", str(run_dir.parent), "--name", run_dir.name, "--workers", "0",
            "--no-onnx", "--quiet", "--json"]


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _random_bytes(p: Path) -> None:
    p.write_bytes(random.Random(0).randbytes(p.stat().st_size))


def _drop_optimizer(p: Path) -> None:  # loadable, but not resumable
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, p)


def _wrong_shape(p: Path) -> None:  # a tensor edited to another shape: load_state_dict refuses it
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    k = next(k for k, v in ckpt["model"].items() if v.ndim == 4)
    ckpt["model"][k] = torch.zeros(1)
    torch.save(ckpt, p)


@pytest.mark.parametrize("damage,words", [
    (_truncate, "not a readable checkpoint"),
    (_random_bytes, "not a readable checkpoint"),
    (_drop_optimizer, "damaged nas checkpoint: missing or of the wrong type: optimizer"),
    (_wrong_shape, "damaged nas checkpoint: cannot restore the training state (RuntimeError"),
])
def test_damaged_last_pt_on_resume_names_the_file_and_the_fix(stopped_run, tmp_path, capsys, damage, words):
    run_dir = _copy(stopped_run, tmp_path)
    last, best = run_dir / "weights" / "last.pt", run_dir / "weights" / "best.pt"
    damage(last)
    assert main(_resume(run_dir)) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"{last}: ") and words in err, err
    assert err.endswith(f"to continue after epoch 1 instead, copy {best} over it and resume again; or start a new "
                        "run without --resume")
    if damage is _truncate:  # the fix works: best.pt is a full checkpoint
        shutil.copy(best, last)
        assert main(_resume(run_dir)) == 0
        assert load_checkpoint(last)["epoch"] == 2
    if damage is _random_bytes:  # no intact best.pt either: the only way out is a new run
        _truncate(best)
        assert main(_resume(run_dir)) == 2
        assert _one_line_error(capsys).endswith("start a new run without --resume (this run has no usable checkpoint "
                                                "to continue)")


@pytest.mark.parametrize("edit,words", [
    (lambda t: "epochs: [1,\n" + t, "args.yaml: unreadable (ParserError at line"),      # damaged
    (lambda t: "- just\n- a list\n", "args.yaml: expected a mapping of settings, got list"),
    (lambda t: t.replace("epochs: 2", "epochs: 5"), "args.yaml: epochs: 5 differs from the checkpoint's 2"),  # edited
    (lambda t: t.replace("imgsz: 64\n", ""), "args.yaml: imgsz: missing, the checkpoint has 64"),
])
def test_damaged_or_edited_args_yaml_on_resume_is_refused(stopped_run, tmp_path, capsys, edit, words):
    run_dir = _copy(stopped_run, tmp_path)
    args = run_dir / "args.yaml"
    text = args.read_text()
    args.write_text(edit(text))
    assert main(_resume(run_dir)) == 2
    err = _one_line_error(capsys)
    assert err.startswith(str(run_dir)) and words in err, err
    assert err.endswith("restore the file or delete it (it is rewritten from the checkpoint), or start a new run "
                        "without --resume to change settings")
    if "differs" in words:  # the fix works: without args.yaml the resume runs and writes it again
        args.unlink()
        assert main(_resume(run_dir)) == 0
        assert yaml.safe_load(args.read_text())["epochs"] == 2


def test_damaged_results_csv_on_resume_names_the_row(stopped_run, tmp_path, capsys):
    run_dir = _copy(stopped_run, tmp_path)
    csv_path = run_dir / "results.csv"
    header, row = csv_path.read_text().splitlines()
    csv_path.write_text(f"{header}\n{row.replace(',', ',x', 1)}\n")  # a letter in the first loss
    assert main(_resume(run_dir)) == 2
    assert _one_line_error(capsys).startswith(f"{csv_path}:2: unreadable row (could not convert string to float")
    csv_path.unlink()  # the fix works: the resume goes on, with the resumed epoch's row only
    assert main(_resume(run_dir)) == 0
    assert [r["epoch"] for r in _csv(csv_path)] == ["2"]


def test_training_writes_only_into_its_run_folder(digits, tmp_path):
    """`nas train` with ONNX export and TensorBoard: new files only under PROJECT/NAME (and matplotlib's font
    cache, the documented exception), none in the working directory, HOME or the temp dir."""
    work, home, tmp = tmp_path / "work", tmp_path / "home", tmp_path / "tmp"
    for d in (work, home, tmp):
        d.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HOME": str(home), "TMPDIR": str(tmp),
           "XDG_CACHE_HOME": str(home / ".cache"), "MPLCONFIGDIR": str(home / ".mpl")}
    r = subprocess.run(_nas("train", f"zoo:{ARCH}", "--data", digits, "--epochs", "1", "--imgsz", "64", "--batch", "8",
                            "--workers", "0", "--project", str(tmp_path / "proj"), "--name", "run", "--quiet"),
                       env=env, cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = tmp_path / "proj" / "run"
    new = [p for p in tmp_path.rglob("*") if p.is_file()]
    outside = sorted(str(p.relative_to(tmp_path)) for p in new
                     if run_dir not in p.parents and home / ".mpl" not in p.parents)
    assert not outside, outside
    assert (run_dir / "weights" / "last.pt").is_file()


# ---------------------------------------------------------------- issue 20: two trainings on one run folder

def test_a_second_training_on_a_held_run_folder_is_refused(digits, tmp_path, capsys):
    """A `nas train --resume` subprocess holds its run folder for its whole life: another --resume of the same run
    and a fresh `--name X --exist-ok` into it are refused at once with one line naming the folder; the holder ends
    as if alone (every epoch's row once, last.pt at the last epoch)."""
    epochs = 6  # ~1 s each here: the holder runs for seconds after it took the folder

    def stop(epoch, metrics):
        raise Stop

    with pytest.raises(Stop):  # a run stopped after epoch 1: what the resumes below continue
        train(TrainConfig(arch=get_arch(ARCH), data=digits, epochs=epochs, imgsz=96, batch=8, workers=0,
                          head=HeadConfig(neck="dw"), project=str(tmp_path), name="run", progress=False,
                          tensorboard=False, threads=1), on_epoch=stop)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(_nas(*_resume(run_dir), "--threads", "1"), env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120  # its first resumed epoch written: it holds the folder
        while len(_csv(run_dir / "results.csv")) < 2 and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder.poll() is None, "the holder ended before the others tried: make its epochs longer"
        capsys.readouterr()
        assert main(_resume(run_dir)) == 2
        err = _one_line_error(capsys)
        assert err.startswith(f"{run_dir}: another training is writing this run folder"), err
        assert err.endswith("or train under another --name"), err
        assert main(["train", f"zoo:{ARCH}", "--data", digits, "--epochs", "1", "--imgsz", "96", "--batch", "8",
                     "--neck", "dw", "--workers", "0", "--no-onnx", "--quiet", "--project", str(tmp_path),
                     "--name", "run", "--exist-ok"]) == 2
        assert _one_line_error(capsys).startswith(f"{run_dir}: another training is writing this run folder")
        assert holder.poll() is None, "the holder ended while the others tried: make its epochs longer"
    finally:
        _, err = holder.communicate(timeout=120)
    assert holder.returncode == 0, err.decode()[-2000:]
    assert [r["epoch"] for r in _csv(run_dir / "results.csv")] == [str(e) for e in range(1, epochs + 1)]
    assert load_checkpoint(run_dir / "weights" / "last.pt")["epoch"] == epochs
    assert main(_resume(run_dir)) == 2  # the lock went with its holder: refused only because the run is done
    assert "already finished" in _one_line_error(capsys)
