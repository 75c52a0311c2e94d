"""Latency lookup tables: real measurements on a tiny space, exact file round trip, precise refusals."""
import math
from dataclasses import replace
from pathlib import Path

import pytest

from nas.arch.spec import BlockSpec
from nas.errors import ConfigError
from nas.latency.profile import Protocol
from nas.latency.table import LatencyTable, LatencyTableError, arch_ops, import_csv, op_key
from nas.latency.validate import validate, write_report
from nas.space import space_from_dict

from conftest import FAST, TINY


@pytest.fixture(scope="module")
def space(tiny_space):
    return tiny_space


@pytest.fixture(scope="module")
def table(tiny_space, tiny_table):
    assert len(tiny_table.entries) == len({op_key(b, s) for b, s in tiny_space.ops()})
    return tiny_table


def test_space_ops_cover_every_sampled_arch(space):
    keys = {op_key(b, s) for b, s in space.ops()}
    for seed in range(30):
        for _, b, s in arch_ops(space.random(seed)):
            assert op_key(b, s) in keys


def test_predict_is_the_sum_of_entries(space, table):
    arch = space.random(3)
    pred = table.predict(arch)
    assert [b for b, _, _ in pred.blocks] == [n for n, _, _ in arch_ops(arch)]
    assert math.isclose(pred.total_us, sum(table.entries[op_key(b, s)].median_us for _, b, s in arch_ops(arch)))
    assert pred.total_us > 0


def test_file_round_trip_is_exact(table, tmp_path):
    p = table.save(tmp_path / "t.csv")
    text = p.read_text()
    again = LatencyTable.load(p)
    assert again.entries == table.entries and again.header == table.header
    assert again.dumps() == text
    assert text.startswith("# format: nas/lut@1")
    assert "cpu:" in text and "torch:" in text and "threads: 1" in text and "date:" in text


def test_extend_measures_only_missing(space, table, tmp_path):
    t = LatencyTable.load(table.save(tmp_path / "t.csv"))
    before = dict(t.entries)
    assert t.extend(space.ops(), progress=False) == 0
    wider = space_from_dict({**TINY, "stem": {"out": [8, 16], "act": ["relu"]}}, "wider")
    added = t.extend(wider.ops(), progress=False)
    assert added > 0 and len(t.entries) == len(before) + added
    assert all(t.entries[k] == v for k, v in before.items())  # nothing re-measured


def test_missing_op_is_a_clear_error(space, table):
    arch = space.random(0)
    big = replace(arch, stem=replace(arch.stem, out=40))
    with pytest.raises(LatencyTableError) as e:
        table.predict(big)
    msg = str(e.value)
    assert "stem: conv kernel=3 out=40" in msg and "nas lut extend" in msg


def test_other_protocol_is_refused(table):
    table.check_compatible(replace(FAST, repeats=99))  # repeat counts don't change the numbers' meaning
    for change in (dict(threads=2), dict(batch=4), dict(backend="onnxruntime-cpu")):
        with pytest.raises(LatencyTableError, match="different setting"):
            table.check_compatible(replace(FAST, **change))


@pytest.mark.parametrize("edit,field,words", [
    (lambda t: t.replace(",5\n", ",0\n", 1), ".n", "at least 1"),
    (lambda t: _set_first_median(t, "-3.0"), ".median_us", "positive"),
    (lambda t: _set_first_median(t, ""), ".median_us", "not a number"),
    (lambda t: _set_first_median(t, "nan"), ".median_us", "positive finite"),
    (lambda t: t.replace("op,median_us,p10_us,p90_us,n", "op,median,p10,p90,n"), "columns", "expected the column"),
    (lambda t: t.replace("# format: nas/lut@1", "# format: nas/lut@9"), "header.format", "nas/lut@1"),
    (lambda t: t.replace("#   threads: 1", "#   thread: 1"), "header.protocol.thread", "unknown field"),
    (lambda t: t + t.splitlines()[-1] + "\n", "line", "duplicate op"),
])
def test_hand_edited_tables_are_rejected(table, tmp_path, edit, field, words):
    p = tmp_path / "bad.csv"
    p.write_text(edit(table.dumps()))
    with pytest.raises(ConfigError) as e:
        LatencyTable.load(p)
    assert field in (e.value.field or "") and words in str(e.value) and str(p) in str(e.value)


def _set_first_median(text: str, value: str) -> str:
    lines = text.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("op,")) + 1
    cells = lines[i].split(",")
    cells[1] = value
    lines[i] = ",".join(cells)
    return "\n".join(lines) + "\n"


def test_csv_import(space, tmp_path):
    keys = sorted({op_key(b, s) for b, s in space.ops()})
    csv_path = tmp_path / "phone.csv"
    csv_path.write_text("op,median_us\n" + "".join(f"{k},{100 + i}\n" for i, k in enumerate(keys)))
    header = {"name": "phone", "device": {"cpu": "Snapdragon"}, "protocol": {"backend": "torch-cpu", "threads": 4}}
    t = import_csv(csv_path, header)
    assert len(t.entries) == len(keys) and t.entries[keys[0]].median_us == 100
    again = LatencyTable.loads(t.dumps())
    assert again.entries == t.entries and again.protocol.threads == 4
    assert again.predict(space.random(0)).total_us > 0
    csv_path.write_text("op,median_us\n" + keys[0] + ",fast\n")
    with pytest.raises(ConfigError, match="line 2.median_us: not a number"):
        import_csv(csv_path, header)


def test_validate_against_real_measurement(space, table, tmp_path):
    archs = [space.random(i, name=f"a{i}") for i in range(8)]
    report = validate(table, archs, progress=False)
    assert report.n == 8
    for r in report.rows:
        assert r["measured_us"] > 0 and r["predicted_us"] > 0
    # the table is a real predictor: within a factor of 2 of end-to-end measurement on every architecture
    assert all(0.5 < r["predicted_us"] / r["measured_us"] < 2 for r in report.rows)
    assert report.calibrated is not None and report.calibration.fitted_on == 4
    paths = write_report(report, tmp_path / "val")
    assert paths["png"].stat().st_size > 1000 and paths["csv"].read_text().count("\n") == 9
    assert any(paths["tensorboard"].iterdir())


def test_op_key_is_stable():
    b = BlockSpec("extra_dw", out=48, stride=2, kernels=(3, 5), expand=4.0, se=0.25, act="relu")
    assert op_key(b, (32, 40, 40)) == "extra_dw kernels=3/5 expand=4.0 out=48 stride=2 se=0.25 act=relu in=32x40x40"


def test_lut_command_line(tmp_path):
    import json
    import subprocess
    import sys

    import yaml

    sp = tmp_path / "tiny.yaml"
    sp.write_text(yaml.safe_dump(TINY))
    lut = tmp_path / "t.csv"

    def nas(*args):
        return subprocess.run([sys.executable, "-m", "nas", *map(str, args)], capture_output=True, text=True)

    r = nas("lut", "build", "--space", sp, "--out", lut, "--repeats", 3, "--min-time", 0, "--warmup", 1, "--quiet")
    assert r.returncode == 0, r.stderr
    r = nas("lut", "build", "--space", sp, "--out", lut)
    assert r.returncode == 2 and "exists" in r.stderr
    arch = tmp_path / "a.yaml"
    from nas.arch.spec import save_arch

    save_arch(space_from_dict(TINY, "tiny").random(5), arch)
    r = nas("lut", "show", lut, "--arch", arch, "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["predicted_ms"] > 0 and shown["blocks"][0]["block"] == "stem"
    r = nas("lut", "show", lut, "--arch", "zoo:mobilenet_v2_100")
    assert r.returncode == 2 and "nas lut extend" in r.stderr and "Traceback" not in r.stderr
    tpl = tmp_path / "ops.csv"
    assert nas("lut", "template", "--space", sp, "--out", tpl).returncode == 0
    rows = tpl.read_text().splitlines()
    filled = tmp_path / "filled.csv"
    filled.write_text("\n".join([rows[0]] + [f"{r}{i + 10}" for i, r in enumerate(rows[1:])]) + "\n")
    hdr = tmp_path / "hdr.yaml"
    hdr.write_text("name: jetson\ndevice: {cpu: Jetson Orin}\nprotocol: {backend: torch-cuda, threads: 1}\n")
    r = nas("lut", "import", filled, "--header", hdr, "--out", tmp_path / "jetson.csv")
    assert r.returncode == 0, r.stderr
    assert LatencyTable.load(tmp_path / "jetson.csv").predict(space_from_dict(TINY, "tiny").random(5)).total_us > 0
