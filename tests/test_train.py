"""Training loop: a tiny DigitsDet run, exact resume, safe checkpoints, divergence, torchrun (gloo), commands."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nas.detect.train as train_mod
from nas.arch.headconfig import HeadConfig
from nas.arch.zoo import get_arch
from nas.commands.main import build_parser
from nas.detect.checkpoint import FORMAT, load_checkpoint, load_detector
from nas.detect.device import resolve_channels_last
from nas.detect.digits import generate_digits
from nas.detect.optim import planned_epochs
from nas.detect.train import TrainConfig, TrainingDiverged, train
from nas.errors import ConfigError, NasError

ROOT = Path(__file__).resolve().parents[1]
ARCH = "mobilenet_v3_small_100"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("digits")
    return str(generate_digits(root, 32, 16, imgsz=96, min_size=12, max_size=40, progress=False, workers=0))


def tiny(data: str, project: Path, **kw) -> TrainConfig:
    base = dict(arch=get_arch(ARCH), data=data, epochs=2, imgsz=96, batch=8, workers=0, head=HeadConfig(neck="dw"),
                project=str(project), progress=False, warmup_epochs=0.5, close_mosaic=1, seed=3)
    return TrainConfig(**{**base, **kw})


def test_tiny_training_learns_and_writes_run_folder(digits, tmp_path):
    seen = []
    # no mosaic: the loss of mosaic and single-image epochs are not comparable
    r = train(tiny(digits, tmp_path, epochs=3, name="run", close_mosaic=3, lr0=0.05), on_epoch=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [1, 2, 3] and r.epochs == 3
    losses = [sum(h[f"train/{n}"] for n in ("box_loss", "cls_loss", "dfl_loss")) for h in r.history]
    assert losses[-1] < losses[0]
    run = tmp_path / "run"
    assert r.run_dir == run and (run / "weights" / "last.pt").is_file() and (run / "weights" / "best.pt").is_file()
    assert (run / "args.yaml").is_file() and (run / "arch.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(run.glob("events.out.tfevents.*"))))
    events.Reload()
    assert {"train/box_loss", "lr/pg0", "metrics/mAP50", "metrics/mAP50-95"} <= set(events.Tags()["scalars"])
    rows = (run / "results.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("epoch,train/box_loss") and "map50_95" in rows[0]
    assert 0 <= r.map50_95 <= r.map50 <= 1 and 1 <= r.best_epoch <= 3
    # checkpoints are plain data: they load with weights_only=True
    ckpt = torch.load(run / "weights" / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["format"] == FORMAT and ckpt["epoch"] == r.best_epoch and "arch_yaml" in ckpt["meta"]
    model = load_detector(run / "weights" / "best.pt")
    assert not model.training and model(torch.rand(1, 3, 96, 96)).shape == (1, 189, 14)
    # a second run with the same name gets a new folder
    assert train(tiny(digits, tmp_path, epochs=1, name="run", tensorboard=False)).run_dir == tmp_path / "run2"


class Stop(Exception):
    pass


def test_resume_repeats_an_uninterrupted_run(digits, tmp_path):
    full = train(tiny(digits, tmp_path, name="full", tensorboard=False))

    def stop_after_first(epoch, metrics):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):  # the callback's exception propagates after last.pt is written
        train(tiny(digits, tmp_path, name="part", tensorboard=False), on_epoch=stop_after_first)
    assert load_checkpoint(tmp_path / "part" / "weights" / "last.pt")["epoch"] == 1
    resumed = train(TrainConfig(project=str(tmp_path), name="part", resume=True, workers=0, progress=False,
                                tensorboard=False))
    assert resumed.epochs == 2
    a, b = load_checkpoint(full.last), load_checkpoint(resumed.last)
    for key in ("model", "ema"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    for ha, hb in zip(full.history, resumed.history):
        assert {k: v for k, v in ha.items() if "time" not in k} == {k: v for k, v in hb.items() if "time" not in k}
    with pytest.raises(NasError, match="already finished"):
        train(TrainConfig(project=str(tmp_path), name="part", resume=True, progress=False))


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": FORMAT, "model": torch.nn.Linear(2, 2)}, path)  # a whole module: pickled classes
    with pytest.raises(NasError, match="pickled Python objects"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(NasError, match="not a nas checkpoint"):
        load_checkpoint(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(NasError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_nan_loss_raises_training_diverged(digits, tmp_path, monkeypatch):
    class NanLoss(train_mod.DetectionLoss):
        def __call__(self, preds, targets, imgsz):
            loss, parts = super().__call__(preds, targets, imgsz)
            return loss * float("nan"), parts

    monkeypatch.setattr(train_mod, "DetectionLoss", NanLoss)
    with pytest.raises(TrainingDiverged, match="epoch 1, step 1/4"):
        train(tiny(digits, tmp_path, epochs=1, name="nan", tensorboard=False))


def test_bad_config_is_a_config_error(digits, tmp_path):
    with pytest.raises(ConfigError, match="multiple of 32"):
        train(tiny(digits, tmp_path, imgsz=100))
    with pytest.raises(ConfigError, match="sgd or adamw"):
        train(tiny(digits, tmp_path, optimizer="adam"))
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(TrainConfig(project=str(tmp_path), name="missing", resume=True))


def test_torchrun_two_processes_gloo(digits, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import json, os
        from nas.arch.detector import HeadConfig
        from nas.arch.zoo import get_arch
        from nas.detect.train import TrainConfig, train
        r = train(TrainConfig(get_arch({ARCH!r}), data={digits!r}, epochs=1, imgsz=64, batch=8, workers=0,
                              head=HeadConfig(neck="dw"), project={str(tmp_path)!r}, name="ddp", exist_ok=True,
                              progress=False, tensorboard=False))
        with open(f"result_{{os.environ['RANK']}}.json", "w") as f:  # not stdout: the ranks' lines interleave
            json.dump({{"epochs": r.epochs, "dir": str(r.run_dir)}}, f)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # --standalone: a local rendezvous on a free port (a fixed port could clash with a parallel run)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"result_{rank}.json").read_text()) == {"epochs": 1, "dir": str(tmp_path / "ddp")}
    assert len((tmp_path / "ddp" / "results.csv").read_text().splitlines()) == 2
    assert load_checkpoint(tmp_path / "ddp" / "weights" / "last.pt")["epoch"] == 1


def _parser() -> argparse.ArgumentParser:
    return build_parser()


def test_train_command_json_and_onnx(digits, tmp_path, capsys):
    args = _parser().parse_args(["train", f"zoo:{ARCH}", "--data", digits, "--epochs", "1", "--imgsz", "64",
                                 "--batch", "8", "--workers", "0", "--neck", "dw", "--project", str(tmp_path),
                                 "--name", "cli", "--quiet", "--json"])
    args.func(args)
    out = json.loads(capsys.readouterr().out)
    assert {"map50", "map50_95", "epochs", "weights", "onnx", "onnx_max_diff"} <= set(out)
    assert out["epochs"] == 1 and Path(out["weights"]).is_file() and out["onnx_max_diff"] <= 1e-4
    assert (tmp_path / "cli" / "model.onnx").is_file()


def test_train_help_states_the_real_defaults():
    import re

    train_parser = _parser()._subparsers._group_actions[0].choices["train"]
    checked = 0
    for action in train_parser._actions:
        m = re.search(r"\(default (\S+)\)", action.help or "")
        if m and action.dest in TrainConfig.__dataclass_fields__:
            assert str(TrainConfig.__dataclass_fields__[action.dest].default) == m.group(1), action.dest
            checked += 1
    assert checked >= 10


def test_data_digits_command(tmp_path, capsys):
    args = _parser().parse_args(["data", "digits", "--out", str(tmp_path / "d"), "--train", "3", "--val", "2",
                                 "--imgsz", "192", "--workers", "0", "--quiet"])
    args.func(args)
    assert capsys.readouterr().out.strip() == str(tmp_path / "d" / "data.yaml")
    assert len(list((tmp_path / "d" / "images" / "train").glob("*.png"))) == 3
    with pytest.raises(NasError):
        args = _parser().parse_args(["data", "digits", "--out", str(tmp_path / "e"), "--imgsz", "16", "--quiet"])
        args.func(args)


def test_nas_command_line_trains_and_generates_digits(digits, tmp_path, capsys):
    from nas.commands.main import build_parser, main

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"train", "data"} <= set(commands)
    assert main(["train", "zoo:mobilenet_v4_conv_small", "--data", digits, "--epochs", "1", "--imgsz", "64",
                 "--batch", "8", "--workers", "0", "--neck", "dw", "--project", str(tmp_path), "--name", "cli",
                 "--threads", "1", "--no-onnx", "--quiet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"map50", "map50_95", "epochs", "weights"} <= set(out) and "onnx" not in out
    assert out["epochs"] == 1 and Path(out["weights"]).is_file() and 0 <= out["map50_95"] <= out["map50"] <= 1
    # user errors: one line on stderr, exit code 2
    assert main(["train", "--project", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("nas: error: nas train: ARCH: give an arch YAML")
    # small images get digit sizes that fit (the 16-96 px default needs 192 px images)
    assert main(["data", "digits", "--out", str(tmp_path / "d"), "--train", "2", "--val", "1", "--imgsz", "128",
                 "--workers", "0", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "d" / "data.yaml")
    heights = [float(line.split()[4]) for f in (tmp_path / "d" / "labels").rglob("*.txt")
               for line in f.read_text().splitlines()]
    assert heights and max(heights) <= 0.5


def test_channels_last_trains_the_same_and_saves_standard_checkpoints(digits, tmp_path):
    runs = {cl: train(tiny(digits, tmp_path, epochs=1, name=f"cl{cl}", channels_last=cl, tensorboard=False))
            for cl in (True, False)}
    loss = {cl: [r.history[0][f"train/{n}"] for n in ("box_loss", "cls_loss", "dfl_loss")] for cl, r in runs.items()}
    assert loss[True] == pytest.approx(loss[False], rel=1e-3)  # a layout change, not a different computation
    ckpt = load_checkpoint(runs[True].last)
    for key in ("model", "ema"):
        assert all(v.is_contiguous() for v in ckpt[key].values()), key
    model = load_detector(runs[True].last)
    assert all(p.is_contiguous() for p in model.parameters())
    assert model(torch.rand(1, 3, 96, 96)).is_contiguous()
    assert resolve_channels_last(None, torch.device("cpu"))
    assert not resolve_channels_last(None, torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="channels_last"):
        train(tiny(digits, tmp_path, channels_last="yes"))


def test_time_limit_replans_epochs_and_ends_after_the_budget(digits, tmp_path):
    cfg = TrainConfig(epochs=50, time_limit_s=100.0)
    assert planned_epochs(cfg, []) == 50  # nothing measured yet: the cap
    assert planned_epochs(cfg, [10.0, 30.0]) == 5  # mean 20 s: 5 epochs fit
    assert planned_epochs(cfg, [60.0, 70.0]) == 2  # over budget: what is done
    assert planned_epochs(cfg, [0.5]) == 50
    assert planned_epochs(TrainConfig(epochs=7), [1e3]) == 7  # no limit
    # a budget smaller than one epoch: one epoch, evaluated although val_interval would skip it
    r = train(tiny(digits, tmp_path, epochs=5, name="budget", time_limit_s=1e-3, val_interval=3, tensorboard=False))
    assert r.epochs == 1 and len(r.history) == 1 and 0 <= r.map50_95 <= r.map50 <= 1
    with pytest.raises(NasError, match="already finished"):
        train(TrainConfig(project=str(tmp_path), name="budget", resume=True, workers=0, progress=False))
    with pytest.raises(ConfigError, match="time_limit_s"):
        train(tiny(digits, tmp_path, time_limit_s=0))


def _bad_label_set(root: Path) -> tuple[str, Path]:
    from PIL import Image

    for split, names in (("train", ("a", "b")), ("val", ("c",))):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for n in names:
            Image.new("RGB", (64, 64), (90, 90, 90)).save(root / "images" / split / f"{n}.png")
            (root / "labels" / split / f"{n}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    bad = root / "labels" / "train" / "b.txt"
    bad.write_text("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n")  # line 2: four values
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [x, y]\n")
    return str(root / "data.yaml"), bad


def test_strict_stops_at_the_first_bad_label_line(tmp_path, capsys, caplog):
    import logging

    from nas.commands.main import main

    data, bad = _bad_label_set(tmp_path / "bad")
    with pytest.raises(ConfigError, match=f"{bad}:2: expected 5 values"):
        train(tiny(data, tmp_path, epochs=1, imgsz=64, strict=True))
    assert main(["train", f"zoo:{ARCH}", "--data", data, "--strict", "--project", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nas: error: {bad}:2: expected 5 values") and err.count("\n") == 1
    # without strict: skipped with one warning, training runs
    with caplog.at_level(logging.WARNING, logger="nas"):
        assert train(tiny(data, tmp_path, epochs=1, imgsz=64, batch=2, name="lenient", tensorboard=False)).epochs == 1
    assert any(r.levelno == logging.WARNING and "skipped 1 bad label line" in r.getMessage() for r in caplog.records)


def test_train_command_passes_fast_path_strict_and_time_limit(monkeypatch):
    seen = []

    def fake_train(cfg, on_epoch=None):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(train_mod, "train", fake_train)
    for extra, want in (([], (None, False, None)), (["--no-channels-last", "--strict", "--time-limit", "90"],
                                                     (False, True, 90.0)), (["--channels-last"], (True, False, None))):
        args = _parser().parse_args(["train", f"zoo:{ARCH}", "--quiet", *extra])
        with pytest.raises(Stop):
            args.func(args)
        assert (seen[-1].channels_last, seen[-1].strict, seen[-1].time_limit_s) == want


def test_augmentation_settings_reach_the_training_and_are_checked(tmp_path, monkeypatch):
    seen = []

    def fake_train(cfg, on_epoch=None):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(train_mod, "train", fake_train)
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text("fliplr: 0.0\nmosaic: 0.5\nhsv_v: 0.2\n")
    args = _parser().parse_args(["train", f"zoo:{ARCH}", "--quiet", "--hyp", str(hyp), "--hsv-v", "0.1"])
    with pytest.raises(Stop):
        args.func(args)
    cfg = seen[-1]
    assert (cfg.hyp.fliplr, cfg.hyp.hsv_v, cfg.mosaic, cfg.hyp.hsv_s) == (0.0, 0.1, 0.5, 0.7)  # file, flag, default
    # recorded flat in args.yaml and checkpoints (ultralytics' names), and read back
    d = cfg.to_dict()
    assert d["fliplr"] == 0.0 and d["hsv_v"] == 0.1 and TrainConfig.from_dict(d).hyp == cfg.hyp
    assert TrainConfig.from_dict({k: v for k, v in d.items() if k != "fliplr"}).hyp.fliplr == 0.5  # older runs
    for argv, words in ((["--fliplr", "2"], "fliplr: must be in [0, 1.0]"),
                        (["--hyp", str(tmp_path / "typo.yaml")], "flipLR")):
        (tmp_path / "typo.yaml").write_text("flipLR: 0.0\n")
        args = _parser().parse_args(["train", f"zoo:{ARCH}", "--quiet", *argv])
        with pytest.raises(ConfigError, match=re.escape(words)):
            args.func(args)
    with pytest.raises(ConfigError, match="mosaic"):
        train(TrainConfig(arch=get_arch(ARCH), mosaic=1.5))
