"""Hostile inputs (issue 8, items 5 and 6): every malformed file of tests/hostile/ is refused with one line that names
the file and the field, exit code 2 and no traceback; hypothesis fuzzing finds no other exception in any loader;
YAML is only read by the safe loader and checkpoints only with torch.load(weights_only=True).

Most cases run `nas.cli.main` in-process (importing torch per subprocess would cost ~1.5 s each); one per format
goes through a real `python -m nas` subprocess.
"""
from __future__ import annotations

import argparse
import ast
import copy
import logging
import os
import pickle
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import nas.config
from nas.arch.spec import loads_arch
from nas.commands.lut import cmd_import
from nas.commands.main import main
from nas.config import load_yaml, parse_yaml
from nas.detect.checkpoint import FORMAT as CKPT_FORMAT
from nas.detect.checkpoint import load_checkpoint
from nas.detect.data import YoloDataset, load_data_config, parse_label_file
from nas.errors import ConfigError, NasError
from nas.latency.table import LatencyTable, import_csv
from nas.search.experiment import experiment_from_dict, load_experiment
from nas.space import space_from_dict

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ROOT / "tests" / "hostile"
VALID = HOSTILE / "valid"
MANIFEST: dict[str, dict[str, Any]] = yaml.safe_load((HOSTILE / "manifest.yaml").read_text())
CLI_CASES = sorted(k for k in MANIFEST if not k.startswith("labels/"))
LABEL_CASES = sorted(k for k in MANIFEST if k.startswith("labels/"))
NOT_ERRORS = {"data/download_script.yaml"}  # well-formed on purpose: see test_data_download_is_never_run
PWNED = "hostile-pwned"  # what the python-tag cases would create in the working folder if they ever ran


def command(case: str, path: Path, tmp: Path) -> list[str]:
    """The `nas` arguments that read a file of this corpus folder."""
    fmt = case.split("/")[0]
    if fmt == "space":
        return ["space", "info", str(path)]
    if fmt == "arch":
        return ["arch", "info", str(path)]
    if fmt == "experiment":
        return ["search", str(path), "--trials", "1", "--output", str(tmp / "runs"), "--quiet"]
    if fmt == "lut":
        return ["lut", "show", str(path)]
    if fmt == "lut_import":
        csv, header = (VALID / "import.csv", path) if path.suffix == ".yaml" else (path, VALID / "import_header.yaml")
        return ["lut", "import", str(csv), "--header", str(header), "--out", str(tmp / "imported.csv")]
    if fmt == "data":
        return ["train", "zoo:mobilenet_v3_small_100", "--data", str(path), "--project", str(tmp / "train"),
                "--epochs", "1", "--no-onnx", "--quiet"]
    raise AssertionError(f"no command for {case}")


def check_error(stderr: str, reported: Path, field: str | None, words: list[str]) -> None:
    """One line `nas: error: FILE: FIELD: message` naming this file and field, with these words."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("nas: error: "), stderr
    where, _, message = lines[0].removeprefix("nas: error: ").partition(": ")
    assert Path(where).resolve() == reported.resolve(), stderr
    if field is not None:
        assert message.startswith(f"{field}: "), f"expected field {field!r}: {stderr}"
    for w in words:
        assert w in message, f"{w!r} not in: {stderr}"


def run_in_process(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a table measured with another torch: warned, not an error
        code = main(argv)
    return code, capsys.readouterr().err


# ---------------------------------------------------------------- the corpus

def test_corpus_is_complete():
    """Every file is listed with its expected error (and every entry exists): a case can't silently drop out."""
    on_disk = {str(p.relative_to(HOSTILE)) for p in HOSTILE.rglob("*") if p.is_file()
               and p.parent != HOSTILE and p.parent.name != "valid"}
    assert on_disk == set(MANIFEST) | NOT_ERRORS
    per_format: dict[str, int] = {}
    for k in MANIFEST:
        per_format[k.split("/")[0]] = per_format.get(k.split("/")[0], 0) + 1
    assert set(per_format) == {"space", "arch", "experiment", "lut", "lut_import", "data", "labels"}
    assert sum(per_format.values()) >= 40 and min(per_format.values()) >= 5, per_format


def test_valid_bases_load():
    """The well-formed files the cases were made from load: each case is bad for its own reason only."""
    assert load_experiment(VALID / "experiment.yaml").name == "tiny"
    assert space_from_dict(load_yaml(VALID / "space.yaml")).name == "tiny"
    assert loads_arch((VALID / "arch.yaml").read_text()).name == "tiny"
    assert len(LatencyTable.load(VALID / "table.csv").entries) == 2
    assert len(import_csv(VALID / "import.csv", load_yaml(VALID / "import_header.yaml")).entries) == 2
    assert load_data_config(VALID / "data.yaml").names == ("zero", "one", "two")


@pytest.mark.parametrize("case", CLI_CASES)
def test_malformed_file_gives_one_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = MANIFEST[case]
    code, err = run_in_process(command(case, HOSTILE / case, tmp_path), capsys)
    assert code == 2, err
    check_error(err, HOSTILE / spec.get("reported", case), spec["field"], spec["words"])
    assert not (tmp_path / PWNED).exists()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "imported.csv").exists()


VALID_TABLE = (VALID / "table.csv").read_bytes()
# Byte-level cases, written by the test: (corpus-like path, bytes, field, words)
GENERATED: list[tuple[str, bytes, str | None, list[str]]] = [
    ("space/latin1.yaml", b"format: nas/space@1\nname: caf\xe9\n", None, ["not UTF-8 text (byte 29)"]),
    ("arch/nul_byte.yaml", b"format: nas/arch@1\nname: a\x00b\n", None, ["unacceptable character #x0000"]),
    ("arch/utf16.yaml", "format: nas/arch@1\n".encode("utf-16"), None, ["not UTF-8 text (byte 0)"]),
    ("experiment/latin1.yaml", b"format: nas/experiment@1\nname: \xe9t\xe9\n", None, ["not UTF-8 text"]),
    ("lut/latin1.csv", VALID_TABLE + b"conv kernel=3 out=8 stride=2 act=relu in=3x\xd764x64,1.0,1.0,1.0,1\n", None,
     ["not UTF-8 text"]),
    ("lut/huge_field.csv", VALID_TABLE + b"x" * 200_000 + b",1.0,1.0,1.0,1\n", "line 12",
     ["unreadable CSV", "field limit"]),
    ("lut_import/latin1.csv", b"op,median_us\nconv \xb5s,1.0\n", None, ["not UTF-8 text (byte 18)"]),
    ("lut_import/header_latin1.yaml", b"name: \xe9\nprotocol: {}\n", None, ["not UTF-8 text"]),
    ("data/latin1.yaml", b"path: .\nnames: [z\xe9ro]\n", None, ["not UTF-8 text"]),
    ("data/huge.yaml", b"# padding\n" * (17 * 2**20 // 10), None, ["larger than 16 MiB"]),
]


@pytest.mark.parametrize("case,content,field,words", GENERATED, ids=[g[0] for g in GENERATED])
def test_malformed_bytes_give_one_line(case, content, field, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / case
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    code, err = run_in_process(command(case, path, tmp_path), capsys)
    assert code == 2, err
    check_error(err, path, field, words)


def test_image_list_not_utf8(tmp_path, capsys):
    """A train split given as a .txt list that is not text: the list file is named, not the data YAML."""
    (tmp_path / "train.txt").write_bytes(b"images/\xff.png\n")
    (tmp_path / "val.txt").write_text("images/0.png\n")
    data = tmp_path / "data.yaml"
    data.write_text("path: .\ntrain: train.txt\nval: val.txt\nnames: [a]\n")
    code, err = run_in_process(command("data/x", data, tmp_path), capsys)
    assert code == 2
    check_error(err, tmp_path / "train.txt", None, ["not UTF-8 text (byte 7)", "one path per line"])


def test_data_download_is_never_run(tmp_path, monkeypatch):
    """ultralytics data YAMLs may carry a `download:` script; it is accepted, ignored and never executed."""
    monkeypatch.chdir(tmp_path)
    data = load_data_config(HOSTILE / "data" / "download_script.yaml")
    assert data.names == ("zero", "one", "two") and not (tmp_path / PWNED).exists()


# ---------------------------------------------------------------- label files (YoloDataset: skipped or, strict, refused)

def _dataset(root: Path, label: bytes) -> tuple[Path, Path]:
    """One 16x16 image per split, the train image labelled with `label`; returns (data YAML, label file)."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(root / "images" / split / "im.png")
    lp = root / "labels" / "train" / "im.txt"
    lp.parent.mkdir(parents=True)
    lp.write_bytes(label)
    data = root / "data.yaml"
    data.write_text("path: .\ntrain: images/train\nval: images/val\nnames: [zero, one, two]\n")
    return data, lp


LABELS = [(c, (HOSTILE / c).read_bytes(), MANIFEST[c]["line"], MANIFEST[c]["words"]) for c in LABEL_CASES] + [
    ("labels/latin1.txt (generated)", b"0 0.5 0.5 0.2 0.2 \xb1\n", None, ["not UTF-8 text"]),
]


def train_strict(data: Path, tmp: Path) -> list[str]:
    """`nas train --strict`: the first bad label line stops it (without --strict bad lines are skipped, with a warning)."""
    return ["train", "zoo:mobilenet_v3_small_100", "--data", str(data), "--strict", "--project", str(tmp / "train"),
            "--epochs", "1", "--imgsz", "32", "--no-onnx", "--quiet"]


def check_label_error(stderr: str, label: Path, line: int | None, words: list[str]) -> None:
    """Label problems name FILE:LINE (grep style) instead of a field."""
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(f"nas: error: {label}:{line}: " if line else f"nas: error: {label}: "), stderr
    assert all(w in stderr for w in words), stderr


@pytest.mark.parametrize("case,content,line,words", LABELS, ids=[lab[0] for lab in LABELS])
def test_bad_label_lines(case, content, line, words, tmp_path, capsys, caplog):
    data, lp = _dataset(tmp_path, content)
    code, err = run_in_process(train_strict(data, tmp_path), capsys)
    assert code == 2
    check_label_error(err, lp, line, words)
    # strict: the first bad line stops loading, named as FILE:LINE
    with pytest.raises(ConfigError) as e:
        YoloDataset(data, "train", imgsz=32, strict=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{lp}:{line}: " if line else f"{lp}: "), msg
    assert all(w in msg for w in words), msg
    # default (what `nas train` does): bad lines are skipped with one warning naming file and line; good lines stay
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nas"):
        ds = YoloDataset(data, "train", imgsz=32)
    assert any(r.levelno == logging.WARNING and re.search(re.escape(f"{lp}:{line}" if line else str(lp)),
                                                          r.getMessage()) for r in caplog.records), caplog.text
    good = sum(1 for t in content.decode("utf-8", "replace").splitlines() if t.strip()) - 1 if line else 0
    assert len(ds.labels[0]) == good


# ---------------------------------------------------------------- real processes, one per format

SUBPROCESS = ["space/bomb.yaml", "arch/python_tag.yaml", "experiment/huge_seed.yaml", "lut/unknown_protocol_key.csv",
              "lut_import/header_unknown_protocol_key.yaml", "data/nc_mismatch.yaml"]


def nas_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nas", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("case", SUBPROCESS)
def test_cli_process(case, tmp_path):
    spec = MANIFEST[case]
    r = nas_process(command(case, HOSTILE / case, tmp_path), tmp_path)
    assert r.returncode == 2, r.stderr
    check_error(r.stderr, HOSTILE / case, spec["field"], spec["words"])
    assert r.stdout == "" and not (tmp_path / PWNED).exists()


def test_cli_process_labels(tmp_path):
    case = "labels/class_out_of_range.txt"
    data, lp = _dataset(tmp_path, (HOSTILE / case).read_bytes())
    r = nas_process(train_strict(data, tmp_path), tmp_path)
    assert r.returncode == 2, r.stderr
    check_label_error(r.stderr, lp, MANIFEST[case]["line"], MANIFEST[case]["words"])


# ---------------------------------------------------------------- YAML safety

def test_yaml_bomb_is_refused_quickly():
    text = (HOSTILE / "space" / "bomb.yaml").read_text()
    start = time.process_time()
    with pytest.raises(ConfigError, match="expands to more than"):
        parse_yaml(text, "bomb.yaml")
    assert time.process_time() - start < 1.0


@pytest.mark.parametrize("text", [
    "!!python/object/apply:os.system ['touch hostile-pwned']",
    "a: !!python/object/new:os.system ['touch hostile-pwned']",
    "a: !!python/name:os.system",
    "a: !!python/module:os",
    "a: !!python/object:argparse.Namespace {x: 1}",
    "a: !!python/tuple [1, 2]",
    "a: !custom {x: 1}",
])
def test_yaml_tags_never_construct_objects(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="YAML tag not allowed"):
        parse_yaml(text, "tag.yaml")
    assert not (tmp_path / PWNED).exists()


@pytest.mark.parametrize("text,words", [
    ("a: 2001-13-45", "month must be in 1..12"),
    ("a: !!int twelve", "invalid int value 'twelve'"),
    ("a: !!int ''", "invalid int value ''"),
    ("a: !!float fast", "invalid float value 'fast'"),
    ("a: !!bool maybe", "invalid bool value 'maybe'"),
    ("!!timestamp a: 1", "invalid timestamp value 'a'"),
    ("a: 0x" + "f" * 5000, "integer too large"),
    ("a: " + "9" * 5000, "invalid int value"),
    ("a: &x [*x]", "recursive YAML alias"),
    ("? [a, b]\n: 1", "unhashable key"),
    ("[" * 1000, "nested too deeply"),
    ("a: 1\n---\nb: 2", "expected a single document"),
])
def test_yaml_values_python_would_choke_on(text, words):
    with pytest.raises(ConfigError) as e:
        parse_yaml(text, "f.yaml")
    assert words in str(e.value) and "\n" not in str(e.value)


def _package_sources() -> dict[Path, str]:
    return {p: p.read_text() for p in sorted((ROOT / "nas").rglob("*.py"))}


def test_yaml_only_through_the_safe_loader():
    """No yaml.load / unsafe_load / full_load or unsafe Loader anywhere in the package; the one loader class is
    SafeLoader plus checks, and it knows no python/* tag."""
    bad = re.compile(r"yaml\.(load|load_all|unsafe_load|unsafe_load_all|full_load|full_load_all)\s*\(|"
                     r"\b(FullLoader|UnsafeLoader|FullConstructor|UnsafeConstructor)\b|yaml\.Loader\b|Loader\s*=")
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p, text in _package_sources().items()
            for n, line in enumerate(text.splitlines(), 1) if bad.search(line)]
    assert not hits, hits
    loader = nas.config._SafeLoader
    assert issubclass(loader, yaml.SafeLoader)
    tags = list(loader.yaml_constructors) + list(loader.yaml_multi_constructors)
    assert not [t for t in tags if t and "python" in t], tags


def test_torch_load_only_with_weights_only():
    """Every torch.load call passes weights_only=True (literally); no pickle.load(s), no np.load(allow_pickle=True)."""
    calls, problems = 0, []
    for p, text in _package_sources().items():
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{p.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load":
                calls += 1
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "pickle" and node.func.attr in ("load", "loads", "Unpickler"):
                problems.append(f"{where}: pickle.{node.func.attr}")
            if owner in ("np", "numpy") and node.func.attr == "load" and isinstance(kw.get("allow_pickle"), ast.Constant) \
                    and kw["allow_pickle"].value:
                problems.append(f"{where}: np.load(allow_pickle=True)")
    assert calls >= 1 and not problems, problems


# ---------------------------------------------------------------- checkpoints

class _RunsShell:
    """Unpickling this runs a shell command: what an untrusted old-style checkpoint can do with torch.load(...)."""

    def __reduce__(self):
        return os.system, (f"touch {PWNED}",)


def _unsafe_checkpoints(d: Path) -> dict[str, Path]:
    files = {name: d / f"{name}.pt" for name in ("module", "legacy", "shell")}
    torch.save({"format": CKPT_FORMAT, "model": torch.nn.Linear(2, 2)}, files["module"])
    torch.save({"format": CKPT_FORMAT, "args": argparse.Namespace(lr=0.01)}, files["legacy"],
               _use_new_zipfile_serialization=False)  # the pre-1.6 format many old checkpoints are in
    files["shell"].write_bytes(pickle.dumps({"format": CKPT_FORMAT, "model": _RunsShell()}))
    return files


def test_unsafe_checkpoints_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, path in _unsafe_checkpoints(tmp_path).items():
        with pytest.raises(NasError) as e:
            load_checkpoint(path)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{path}: ") and "pickled Python objects" in msg, (name, msg)
    assert not (tmp_path / PWNED).exists()
    damaged = tmp_path / "damaged.pt"
    torch.save({"format": CKPT_FORMAT, "model": {}, "meta": {"arch_yaml": "x"}}, damaged)
    with pytest.raises(NasError, match=r"damaged nas checkpoint: missing or not a mapping: meta.num_classes"):
        load_checkpoint(damaged)


def test_resume_from_unsafe_checkpoint_process(tmp_path):
    """`nas train --resume` on a last.pt that would run a shell command: one line, exit 2, nothing run."""
    weights = tmp_path / "runs" / "old" / "weights"
    weights.mkdir(parents=True)
    _unsafe_checkpoints(tmp_path)["shell"].rename(weights / "last.pt")
    r = nas_process(["train", "--resume", "--name", "old", "--project", str(tmp_path / "runs"), "--no-onnx", "--quiet"],
                    tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{weights / 'last.pt'}: refused to load" in r.stderr and "pickled Python objects" in r.stderr
    assert not (tmp_path / PWNED).exists()


# ---------------------------------------------------------------- fuzzing: only NasError may escape a loader

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TOKENS = ["\n", " ", "  ", "- ", ": ", ", ", "{", "}", "[", "]", "&a ", "*a", "<<: *a", "? ", "|\n", "'", '"', "#",
          "---\n", "...\n", "%YAML 1.1\n", "!!python/object/apply:os.system ['x'] ", "!!int ", "!!float ",
          "!!binary ", "!!set ", "!!timestamp ", "!!str ", "!x ", "0x", "0o7", "1e999", ".inf", ".nan", "-1", "0",
          "99999999999999999999", "2001-13-45", "1:2:3", "~", "null", "true", "\t", "\x00", "\ufeff", "\r", "\u2028",
          "é", "format", "nas/arch@1", "op: ib", "stride: 2", "x" * 40]
TOKEN = st.sampled_from(TOKENS) | st.text(max_size=4)
YAMLISH = st.lists(TOKEN, max_size=40).map("".join)


def text_mutations(valid: str) -> st.SearchStrategy[str]:
    """A valid file with 1-4 random insertions, deletions or truncations."""
    @st.composite
    def mutated(draw: st.DrawFn) -> str:
        text = valid
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(text)))
            op = draw(st.sampled_from(["insert", "insert", "delete", "truncate"]))
            if op == "insert":
                text = text[:i] + draw(TOKEN) + text[i:]
            elif op == "delete":
                text = text[:i] + text[draw(st.integers(i, min(len(text), i + 40))):]
            else:
                text = text[:i]
        return text
    return mutated()


SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, -1, 1, 2, 3, 8, 64, 2**31])
           | st.floats() | st.text(max_size=8) | st.sampled_from(["ib", "relu", "s1", "conv", "fp32", "torch-cpu", ""]))
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3)
                      | st.dictionaries(st.text(max_size=6) | st.integers(-3, 3), c, max_size=3), max_leaves=6)


def structure_mutations(valid: Any) -> st.SearchStrategy[str]:
    """A valid document with 1-3 values replaced, deleted or added at random depths, dumped back to YAML."""
    @st.composite
    def mutated(draw: st.DrawFn) -> str:
        doc = copy.deepcopy(valid)
        for _ in range(draw(st.integers(1, 3))):
            node = doc
            while True:
                keys = list(node) if isinstance(node, dict) else list(range(len(node)))
                if not keys:
                    break
                k = draw(st.sampled_from(keys))
                if isinstance(node[k], (dict, list)) and node[k] and draw(st.booleans()):
                    node = node[k]
                    continue
                op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
                if op == "replace":
                    node[k] = draw(VALUES)
                elif op == "delete":
                    del node[k]
                elif isinstance(node, dict):
                    node[draw(st.text(max_size=8) | st.sampled_from(["kernal", "op", "nmae", "evaluator"]))] = draw(VALUES)
                else:
                    node.append(draw(VALUES))
                break
        return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    return mutated()


def only_nas_errors(fn: Callable[[], Any]) -> None:
    """Run a loader: success or a one-line NasError are fine, anything else fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except NasError as e:
        assert "\n" not in str(e) and "\r" not in str(e), repr(str(e))


def _table_loads(text: str) -> None:
    LatencyTable.loads(text, "fuzz.csv")


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    for name in ("train.txt", "val.txt"):
        (d / name).write_text("images/0.png\n")
    return d


VALID_TEXT = {name: (VALID / name).read_text() for name in
              ("arch.yaml", "space.yaml", "experiment.yaml", "table.csv", "import.csv", "data.yaml")}
VALID_DOC = {name: yaml.safe_load(text) for name, text in VALID_TEXT.items() if name.endswith(".yaml")}
VALID_DOC["import_header.yaml"] = load_yaml(VALID / "import_header.yaml")


@settings(FUZZ, max_examples=400)
@given(text=YAMLISH)
def test_fuzz_parse_yaml_text(text):
    only_nas_errors(lambda: parse_yaml(text, "fuzz.yaml"))


@settings(FUZZ, max_examples=200)
@given(data=st.binary(max_size=300))
def test_fuzz_parse_yaml_bytes(data):
    only_nas_errors(lambda: parse_yaml(data, "fuzz.yaml"))


@settings(FUZZ, max_examples=300)
@given(text=structure_mutations(VALID_DOC["arch.yaml"]) | text_mutations(VALID_TEXT["arch.yaml"]))
def test_fuzz_arch(text):
    only_nas_errors(lambda: loads_arch(text, "fuzz.yaml"))


@settings(FUZZ, max_examples=300)
@given(text=structure_mutations(VALID_DOC["space.yaml"]) | text_mutations(VALID_TEXT["space.yaml"]))
def test_fuzz_space(text):
    only_nas_errors(lambda: space_from_dict(parse_yaml(text, "fuzz.yaml"), "fuzz.yaml").describe())


@settings(FUZZ, max_examples=300)
@given(text=structure_mutations(VALID_DOC["experiment.yaml"]) | text_mutations(VALID_TEXT["experiment.yaml"]))
def test_fuzz_experiment(text):
    only_nas_errors(lambda: experiment_from_dict(parse_yaml(text, "fuzz.yaml"), "fuzz.yaml", VALID))


@settings(FUZZ, max_examples=400)
@given(text=text_mutations(VALID_TEXT["table.csv"]) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_fuzz_table(text):
    only_nas_errors(lambda: _table_loads(text))


@settings(FUZZ, max_examples=300)
@given(csv=text_mutations(VALID_TEXT["import.csv"]), header=structure_mutations(VALID_DOC["import_header.yaml"]))
def test_fuzz_lut_import(csv, header, fuzz_dir):
    (fuzz_dir / "in.csv").write_text(csv)
    (fuzz_dir / "header.yaml").write_text(header)
    args = argparse.Namespace(csv=fuzz_dir / "in.csv", header=fuzz_dir / "header.yaml", out=str(fuzz_dir / "out.csv"))
    only_nas_errors(lambda: cmd_import(args))


@settings(FUZZ, max_examples=300)
@given(text=structure_mutations(VALID_DOC["data.yaml"]) | text_mutations(VALID_TEXT["data.yaml"]))
def test_fuzz_data_yaml(text, fuzz_dir):
    path = fuzz_dir / "data.yaml"
    path.write_text(text)
    only_nas_errors(lambda: load_data_config(path))


LABEL_TOKENS = st.sampled_from(["0", "1", "2", "7", "-1", "0.5", "1.5", "1e999", "nan", "-inf", "1e-400", "0x10", "١",
                                "1_0", "x", ""])
LABEL_TEXT = st.lists(st.lists(LABEL_TOKENS, max_size=7).map(" ".join), max_size=5).map("\n".join)


@settings(FUZZ, max_examples=300)
@given(content=LABEL_TEXT.map(str.encode) | st.binary(max_size=100))
def test_fuzz_label_file(content, fuzz_dir):
    """A label file never raises: each bad line becomes a LabelProblem (one line of text), the rest are boxes."""
    path = fuzz_dir / "im.txt"
    path.write_bytes(content)
    labels, problems = parse_label_file(path, 3)
    assert labels.shape[1] == 5 and np.isfinite(labels).all()
    assert ((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1)).all() and (labels[:, 3:] > 0).all()
    assert all("\n" not in str(p) for p in problems)
