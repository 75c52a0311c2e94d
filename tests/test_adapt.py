"""Adapting a table to this machine: a known per-op-kind transfer recovered from real measurements, the header's
adaptation record (round trip, refusals of hand edits), untransferable protocols refused, the command line."""
import copy
import json
from dataclasses import replace

import pytest
import yaml
from conftest import DET, FAST, TINY

from nas.arch.headconfig import HeadConfig
from nas.errors import ConfigError
from nas.latency.adapt import adapt, check_transferable, target_protocol
from nas.latency.coverage import space_neckhead_ops
from nas.latency.table import Entry, LatencyTable
from nas.space import space_from_dict

# A "table from another machine": this machine's entries with ib ops 2x slower and extra_dw ops 2x faster there.
FOREIGN = {"ib": 2.0, "extra_dw": 0.5}
# More ops per kind than TINY, so that a sample of them leaves most entries to the fitted transfer.
WIDE = {**TINY, "resolution": [64, 96],
        "stages": [{**TINY["stages"][0], "ops": ["ib", "fused_ib", "extra_dw"], "kernels": [3, 5]},
                   {**TINY["stages"][1], "kernels": [3, 5], "expand": [2.0, 4.0]}, TINY["stages"][2]]}


def _foreign(table: LatencyTable) -> LatencyTable:
    t = copy.deepcopy(table)
    t.header["device"]["cpu_id"] = "GenuineIntel family 6 model 999"
    for k, e in t.entries.items():
        f = FOREIGN.get(k.split()[0], 1.0)
        t.entries[k] = Entry(e.median_us * f, e.p10_us * f, e.p90_us * f, e.n)
    return t


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(space, this machine's table, the foreign table, its adaptation back to this machine)."""
    d = tmp_path_factory.mktemp("wide")
    (d / "space.yaml").write_text(yaml.safe_dump(WIDE))
    space = space_from_dict(WIDE, str(d / "space.yaml"))
    here = LatencyTable.new(FAST, "wide-here")
    here.extend(space.ops(), progress=False)
    foreign = _foreign(here)
    foreign.path = d / "foreign.csv"
    foreign.save(foreign.path)
    adapted = adapt(foreign, space, FAST, 4, n_ops=len(here.entries) // 2, seed=3, network_protocol=FAST,
                    progress=False)
    return space, here, foreign, adapted


def test_a_known_per_kind_transfer_is_recovered(wide):
    space, here, foreign, adapted = wide
    a = adapted.header["adaptation"]
    assert a["ops"] == len(here.entries) // 2 and a["networks"] == 4 and a["seed"] == 3
    assert set(adapted.entries) == set(foreign.entries)
    # the machine is the same, so target / source = 1 / FOREIGN up to one common factor (the reference speed now)
    f = a["factors"]
    common = sorted(f[k] * FOREIGN.get(k, 1.0) for k in f if k != "all")[len(f) // 2 - 1]
    for kind in ("ib", "extra_dw", "convnext", "ffn"):
        assert 0.8 < f[kind] * FOREIGN.get(kind, 1.0) / common < 1.25, (kind, f)
    assert f["extra_dw"] / f["ib"] > 3  # 4 in truth: far from 1, where a global scale would leave it
    # entries not measured here come back to this machine's own, not the foreign ones
    measured = {k for k in adapted.entries if k in here.entries and adapted.entries[k] != foreign.entries[k]}
    back = [adapted.entries[k].p10_us / here.entries[k].p10_us / common for k in measured
            if k.split()[0] in FOREIGN]
    assert back and sorted(back)[len(back) // 2] == pytest.approx(1.0, abs=0.25)
    for arch in (space.random(i) for i in range(5)):
        ratio = adapted.predict(arch).sum_us / here.predict(arch).sum_us / common
        assert 0.7 < ratio < 1.4


def test_header_records_the_adaptation_and_round_trips(wide, tmp_path):
    _, _, foreign, adapted = wide
    h = adapted.header
    assert h["adapted_from"] == {"table": str(foreign.path), "cpu_id": "GenuineIntel family 6 model 999",
                                 "backend": "torch-cpu", "threads": 1}
    assert h["device"]["cpu_id"] != "GenuineIntel family 6 model 999" and h["protocol"] == FAST.to_dict()
    assert h["reference_us"] > 0 and 0.5 <= h["calibration"]["scale"] <= 2 and h["calibration"]["archs"] == 4
    a = h["adaptation"]
    assert a["minutes"] >= 0 and a["method"].startswith("ridge") and {"ops_cv_mape", "networks_within_10pct"} <= set(
        a["residuals"])
    p = adapted.save(tmp_path / "adapted.csv")
    again = LatencyTable.load(p)
    assert again.header == h and again.entries == adapted.entries and again.dumps() == adapted.dumps()


@pytest.mark.parametrize("edit,field,words", [
    (lambda h: h["adaptation"].update(ops="many"), "header.adaptation.ops", "expected an integer"),
    (lambda h: h["adaptation"].update(minutes=-1.0), "header.adaptation.minutes", ">= 0"),
    (lambda h: h["adaptation"]["residuals"].update(networks_mape="low"), "header.adaptation.residuals.networks_mape", "number"),
    (lambda h: h["adaptation"].update(netwroks=3), "header.adaptation.netwroks", "unknown key"),
    (lambda h: h["adapted_from"].update(threads=0), "header.adapted_from.threads", ">= 1"),
    (lambda h: h["adapted_from"].update(backend="tflite"), "header.adapted_from.backend", "unknown backend"),
    (lambda h: h.pop("adapted_from"), "header.adapted_from", "required"),
    (lambda h: h.update(adaptation=[1, 2]), "header.adaptation", "mapping"),
])
def test_hand_edited_adapted_tables_are_rejected(wide, tmp_path, edit, field, words):
    t = copy.deepcopy(wide[3])
    edit(t.header)
    p = tmp_path / "bad.csv"
    p.write_text(t.dumps())
    with pytest.raises(ConfigError) as e:
        LatencyTable.load(p)
    assert e.value.field == field and words in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change,field", [({"batch": 2}, "batch"), ({"statistic": "median"}, "statistic"),
                                          ({"backend": "torch-cuda", "dtype": "fp16"}, "dtype")])
def test_untransferable_protocols_are_refused(tiny_table, change, field):
    with pytest.raises(ConfigError) as e:
        check_transferable(tiny_table, replace(FAST, **change))
    assert e.value.field == f"header.protocol.{field}" and "\n" not in str(e.value) and "nas lut build" in str(e.value)
    check_transferable(tiny_table, replace(FAST, backend="onnxruntime-cpu", threads=2))  # these transfer


def test_target_protocol():
    assert target_protocol(FAST, threads=2) == replace(FAST, threads=2)
    assert target_protocol(FAST, "onnxruntime-cpu").reference is False  # as the shipped ORT tables
    assert target_protocol(FAST, "openvino-cpu").reference is False
    assert target_protocol(replace(FAST, backend="onnxruntime-cpu", reference=False), "torch-cpu").reference is True
    assert target_protocol(FAST, "onnxruntime-cpu", reference=True).reference is True


def test_detector_ops_are_measured_with_a_head(tmp_path):
    head = HeadConfig(num_classes=3)
    space = space_from_dict(DET, "det")
    source = LatencyTable.new(FAST, "det-source")
    source.extend([*space.ops(), *space_neckhead_ops(space, head)], progress=False)
    adapted = adapt(_foreign(source), space, FAST, 2, head, n_ops=8, network_protocol=FAST, progress=False)
    measured = [k for k in adapted.entries if k.startswith("neckhead")]
    assert measured and "neckhead" in adapted.header["adaptation"]["factors"]
    assert adapted.predict(space.random(0), head).total_us > 0


def test_an_adapted_table_takes_real_measurements(wide):
    """`nas lut extend` on an adapted table: real ops measured under its (this machine's) protocol."""
    t = copy.deepcopy(wide[3])
    wider = space_from_dict({**WIDE, "stem": {"out": [8, 16], "act": ["relu"]}}, "wider")
    t.check_compatible(t.protocol)
    assert t.extend(wider.ops(), progress=False) > 0 and not t.missing(wider.ops())


def test_lut_adapt_command_line(tiny_dir, tiny_table, tmp_path, capsys):
    from nas.commands.main import main

    def nas(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    space = tiny_dir / "space.yaml"
    _foreign(tiny_table).save(tmp_path / "foreign.csv")
    out = tmp_path / "adapted.csv"
    code, stdout, err = nas("lut", "adapt", tmp_path / "foreign.csv", "--space", space, "-n", 3, "--ops", 12, "--out",
                            out, "--quiet")
    assert code == 0, err
    assert f"{out}: {len(tiny_table.entries)} ops adapted" in stdout and "12 ops and 3 networks measured" in stdout
    assert "Traceback" not in err and "UserWarning" not in err
    code, _, err = nas("lut", "adapt", tmp_path / "foreign.csv", "--space", space, "--out", out)
    assert code == 2 and "exists" in err
    code, stdout, _ = nas("lut", "show", out)
    assert code == 0 and "adapted from" in stdout and "adaptation:" in stdout
    flags = ("--space", space, "-n", 4, "--repeats", 3, "--min-time", 0, "--quiet", "--json")
    code, stdout, err = nas("lut", "validate", out, *flags, "--out", tmp_path / "val")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["adapted_from"]["table"] == str(tmp_path / "foreign.csv") and s["n_adapt"] == 3
    tiny_table.save(tmp_path / "plain.csv")
    s = json.loads(nas("lut", "validate", tmp_path / "plain.csv", *flags, "--out", tmp_path / "val2")[1])
    assert s["adapted_from"] is None and s["n_adapt"] is None
