"""A non-editable install: the wheel built from a clean copy of the checkout holds the shipped experiments, search
spaces and latency tables as real files, and an installed copy finds them through the package, from any folder.
(The whole `pip install .` + `nas quickstart` in a fresh venv takes minutes: README, by hand.)"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"experiments": ("quickstart.yaml", "uib_pareto.yaml", "uib_constraint.yaml"),
           "search_spaces": ("uib_yolo.yaml",),
           "latency_tables": ("cpu_torch-cpu_fp32_t1.csv", "cpu_onnxruntime-cpu_fp32_t1.csv")}


def _clean_copy(dst: Path) -> Path:
    """What a fresh clone of this working tree holds (tracked and not-ignored files; symlinks stay links)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src, out = ROOT / rel, dst / rel
        if not (src.exists() or src.is_symlink()):
            continue  # deleted in the working tree
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), out)
        elif src.is_file():
            shutil.copy2(src, out)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _clean_copy(tmp_path_factory.mktemp("clone"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "--wheel-dir",
                    str(out), str(src)], check=True, capture_output=True)
    (path,) = out.glob("*.whl")
    return path


def test_the_checkout_links_to_the_packaged_data():
    for folder, names in SHIPPED.items():
        for name in names:
            assert (ROOT / folder / name).resolve() == (ROOT / "nas" / "data" / folder / name).resolve()
            assert not (ROOT / "nas" / "data" / folder / name).is_symlink()


def test_wheel_holds_the_shipped_data_as_real_files(wheel):
    assert wheel.name.startswith("hwnas_yolo-")
    with zipfile.ZipFile(wheel) as z:
        infos = {i.filename: i for i in z.infolist()}
        for folder, names in SHIPPED.items():
            for name in names:
                info = infos[f"nas/data/{folder}/{name}"]
                assert (info.external_attr >> 16) & 0o170000 != 0o120000, f"{info.filename} is a symlink"
                assert z.read(info) == (ROOT / "nas" / "data" / folder / name).read_bytes()
        entry_points = next(n for n in infos if n.endswith(".dist-info/entry_points.txt"))
        assert "nas = nas.commands.main:main" in z.read(entry_points).decode()
        assert not any(n.startswith(("experiments/", "search_spaces/", "latency_tables/", "tests/")) for n in infos)


def test_an_installed_copy_finds_its_data_from_an_empty_folder(wheel, tmp_path):
    site, empty = tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    with zipfile.ZipFile(wheel) as z:  # a pure wheel installs by unpacking
        z.extractall(site)
    code = (
        "import sys\n"
        "from importlib.resources import files\n"
        "from pathlib import Path\n"
        "import nas\n"
        "from nas.commands.quickstart import EXPERIMENT\n"
        "from nas.search.experiment import load_experiment\n"
        "site = Path(sys.argv[1]).resolve()\n"
        "assert Path(nas.__file__).resolve().is_relative_to(site), nas.__file__\n"
        "assert EXPERIMENT == Path(str(files('nas') / 'data' / 'experiments' / 'quickstart.yaml'))\n"
        "exp = load_experiment(EXPERIMENT)\n"  # loads its space and table: relative paths resolve in the package
        "for p in (EXPERIMENT, exp.space, exp.table):\n"
        "    assert Path(p).resolve().is_relative_to(site / 'nas' / 'data'), p\n"
        "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", code, str(site)], check=False, cwd=empty, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
