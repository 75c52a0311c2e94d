"""Latency lookup tables: real measurements on a tiny space, exact file round trip, precise refusals."""
import math
from dataclasses import replace

import pytest
from conftest import FAST, TINY

from nas.arch.spec import BlockSpec
from nas.errors import ConfigError
from nas.latency.coverage import arch_ops, op_key
from nas.latency.protocol import Measurement
from nas.latency.table import LatencyTable, LatencyTableError, import_csv
from nas.latency.validate import calibrate, validate, write_report
from nas.space import space_from_dict


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
    assert table.column == "p10_us" and "calibration" not in table.header  # the default statistic, uncalibrated
    assert math.isclose(pred.total_us, sum(table.entries[op_key(b, s)].p10_us for _, b, s in arch_ops(arch)))
    assert pred.total_us == pred.sum_us > 0


def test_calibration_scales_predictions_and_is_checked_on_load(space, table, tmp_path):
    t = LatencyTable.load(table.save(tmp_path / "t.csv"))
    archs = [space.random(100 + i, name=f"c{i}") for i in range(5)]
    scale = calibrate(t, archs, replace(t.protocol, repeats=10), progress=False)
    assert 0.5 <= scale <= 2 and t.header["calibration"]["archs"] == 5
    arch = space.random(3)
    pred = t.predict(arch)
    assert pred.sum_us == pytest.approx(table.predict(arch).total_us)
    assert pred.total_us == pytest.approx(t.header["calibration"]["scale"] * pred.sum_us)
    again = LatencyTable.load(t.save(tmp_path / "t.csv"))
    assert again.predict(arch) == pred
    report = validate(again, [space.random(i, name=f"a{i}") for i in range(4)], progress=False)
    assert report.plain_sum is not None and report.summary()["calibration"]["scale"] == t.header["calibration"]["scale"]
    text = (tmp_path / "t.csv").read_text()
    bad = text.replace(f"scale: {t.header['calibration']['scale']}", "scale: 7.5")
    with pytest.raises(ConfigError, match=r"header.calibration.scale: must be a number in \[0.5, 2.0\]"):
        LatencyTable.loads(bad, "t.csv")
    with pytest.raises(ConfigError, match="header.calibration.scael"):
        LatencyTable.loads(text.replace("  scale:", "  scael:"), "t.csv")


def test_reference_is_summarised_with_the_protocol_statistic():
    samples, refs = [1000] * 10, [100_000 + 10_000 * i for i in range(10)]
    assert Measurement.from_samples(samples, refs, "p10").reference_us == pytest.approx(109.0)
    assert Measurement.from_samples(samples, refs, "median").reference_us == pytest.approx(145.0)


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


def test_table_from_another_cpu_generation_is_warned(table, caplog):
    """Cloud guests name every EPYC "AMD EPYC": the family/model id is what tells a Zen 4 table on a Zen 5 host."""
    import copy
    import logging
    import re

    from nas.latency.environment import cpu_id

    if cpu_id() is None:
        pytest.skip("no CPU family/model in /proc/cpuinfo on this platform")
    assert table.header["device"]["cpu_id"] == cpu_id()  # recorded at build time
    with caplog.at_level(logging.WARNING, logger="nas"):
        table.check_compatible(FAST)  # measured on this machine: silent
    assert not caplog.records
    other = copy.deepcopy(table)
    other.header["device"]["cpu_id"] = "GenuineIntel family 6 model 999"
    with caplog.at_level(logging.WARNING, logger="nas"):
        other.check_compatible(FAST)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert re.search("cpu_id 'GenuineIntel family 6 model 999'.*nas lut validate", caplog.records[0].getMessage())


@pytest.mark.parametrize("edit,field,words", [
    (lambda t: t.replace(",5\n", ",0\n", 1), ".n", "at least 1"),
    (lambda t: _set_first_median(t, "-3.0"), ".median_us", "positive"),
    (lambda t: _set_first_median(t, ""), ".median_us", "not a number"),
    (lambda t: _set_first_median(t, "nan"), ".median_us", "positive finite"),
    (lambda t: t.replace("op,median_us,p10_us,p90_us,n", "op,median,p10,p90,n"), "columns", "expected the column"),
    (lambda t: t.replace("# format: nas/lut@1", "# format: nas/lut@9"), "header.format", "nas/lut@1"),
    (lambda t: t.replace("#   threads: 1", "#   thread: 1"), "header.protocol.thread", "unknown"),
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
    # 15 runs per arch: the median survives a few calls preempted by another process on a busy machine
    report = validate(table, archs, replace(table.protocol, repeats=15), progress=False)
    assert report.n == 8
    for r in report.rows:
        assert r["measured_us"] > 0 and r["predicted_us"] > 0
    # the table is a real predictor: within a factor of 2 of end-to-end measurement. Not on every architecture:
    # these ~1 ms networks, measured while another process shares the core, can lose most runs to time-slicing
    # (seen: 2 of 8 measured at 10x), which no reference workload corrects.
    ratios = sorted(r["predicted_us"] / r["measured_us"] for r in report.rows)
    assert sum(0.5 < x < 2 for x in ratios) >= 6 and 0.67 < ratios[len(ratios) // 2] < 1.5
    assert report.plain_sum is None and report.summary()["calibration"] is None  # the tiny table is uncalibrated
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
    r = nas("lut", "validate", lut, "--space", sp, "-n", 6, "--repeats", 3, "--min-time", 0, "--quiet", "--json",
            "--out", tmp_path / "val")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    keys = {"within_10pct", "within_5pct", "mape", "kendall_tau", "spearman"}
    assert summary["n"] == 6 and keys <= set(summary) and keys <= set(summary["baseline"])
    assert 0 <= summary["within_10pct"] <= 1 and summary["mape"] >= 0
    r = nas("lut", "calibrate", lut, "--space", sp, "-n", 3, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "calibration scale" in r.stdout and LatencyTable.load(lut).header["calibration"]["archs"] == 3
    r = nas("lut", "validate", lut, "--space", sp, "-n", 4, "--repeats", 3, "--min-time", 0, "--quiet",
            "--out", tmp_path / "val2")
    assert r.returncode == 0 and "plain sum" in r.stdout and "the table's calibration" in r.stdout, r.stdout + r.stderr
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


def test_entries_are_normalised_to_the_reference_speed(space, table):
    """A table built with the reference workload stores nominal-speed numbers: an entry measured while the
    reference ran 2x slower than nominal is halved, and the raw numbers survive in validation rows."""
    assert table.reference_us and table.reference_us > 0
    m = Measurement(median_us=200.0, p10_us=180.0, p90_us=260.0, mean_us=210.0, min_us=170.0, n=5, reference_us=100.0)
    n = m.normalised(50.0)
    assert (n.median_us, n.p10_us, n.p90_us, n.reference_us) == (100.0, 90.0, 130.0, 50.0)
    assert Measurement(1.0, 1.0, 1.0, 1.0, 1.0, 1).normalised(50.0).median_us == 1.0  # no reference: unchanged
    report = validate(table, [space.random(i, name=f"a{i}") for i in (3, 4)], progress=False)
    row = report.rows[0]
    assert row["reference_us"] > 0 and report.raw is not None
    assert row["measured_us"] == pytest.approx(row["raw_measured_us"] * table.reference_us / row["reference_us"], rel=1e-2)


def test_predict_takes_under_a_millisecond(space, table):
    import time

    archs = [space.random(i) for i in range(50)]
    t0 = time.perf_counter()
    for a in archs:
        table.predict(a)
    assert (time.perf_counter() - t0) / len(archs) < 1e-3
