"""The command line: zoo and space commands, JSON output, exit codes."""
import json
import subprocess
import sys
from pathlib import Path

from nas.arch.spec import loads_arch
from nas.arch.zoo import ZOO

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", "nas", *args], capture_output=True, text=True, cwd=ROOT)


def test_zoo_list_json():
    r = run("zoo", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["name"] for x in rows] == list(ZOO)
    for x in rows:
        assert {"name", "params", "macs"} <= set(x)
        if x["ref_params"] is None:
            assert x["name"] == "yolov8n_csp"
            continue
        assert abs(x["params_diff_pct"]) < 0.5 and abs(x["macs_diff_pct"]) < 5


def test_zoo_show_prints_loadable_yaml():
    r = run("zoo", "show", "mobilenet_v4_conv_small")
    assert r.returncode == 0
    assert loads_arch(r.stdout).name == "mobilenet_v4_conv_small"
    r = run("zoo", "show", "mobilenet_v4_conv_smal")
    assert r.returncode == 2 and 'did you mean "mobilenet_v4_conv_small"' in r.stderr and "Traceback" not in r.stderr


def test_space_info_json():
    r = run("space", "info", "search_spaces/uib_yolo.yaml", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["log10_size"] >= 15 and info["num_ops"] > 100


def test_missing_file_is_one_line():
    r = run("space", "info", "nope.yaml")
    assert r.returncode == 2 and r.stderr.strip() == "nas: error: nope.yaml: file not found"


def test_help_does_not_import_torch():
    """`nas --help` and the parser stay fast: torch is imported by the commands that use it, not by the parser."""
    code = "import sys; from nas.commands.main import build_parser; build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
