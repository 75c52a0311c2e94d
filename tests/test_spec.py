"""Arch YAML: exact round trip (property-tested over the search space) and precise one-line errors."""
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nas.arch.spec import BlockSpec, dumps_arch, load_arch, loads_arch, make_divisible
from nas.arch.zoo import get_arch
from nas.errors import ConfigError
from nas.space import load_space

ROOT = Path(__file__).resolve().parents[1]
SPACE = load_space(ROOT / "search_spaces" / "uib_yolo.yaml")


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_round_trip_over_space_samples(seed):
    arch = SPACE.random(seed, name=f"trial-{seed}")
    text = dumps_arch(arch)
    again = loads_arch(text)
    assert again == arch
    assert dumps_arch(again) == text
    # one line per block
    n_blocks = sum(len(s.blocks) for s in arch.stages)
    assert sum(1 for line in text.splitlines() if line.lstrip().startswith("- {op:")) == n_blocks


@settings(max_examples=100, deadline=None)
@given(name=st.text(min_size=1, max_size=20).filter(lambda s: "\n" not in s and "\r" not in s and s.strip()),
       ls=st.one_of(st.none(), st.floats(1e-9, 1.0)),
       info=st.dictionaries(st.text(st.characters(categories=["L"]), min_size=1, max_size=8),
                            st.one_of(st.integers(-10**6, 10**6), st.floats(-1e6, 1e6), st.text(max_size=10)), max_size=3))
def test_round_trip_names_floats_and_info(name, ls, info):
    base = get_arch("mobilenet_v4_conv_small")
    import dataclasses
    st0 = base.stages[2]
    b = dataclasses.replace(st0.blocks[1], layer_scale=ls)
    arch = dataclasses.replace(base, name=name, info=info,
                               stages=base.stages[:2] + (dataclasses.replace(st0, blocks=(st0.blocks[0], b) + st0.blocks[2:]),) + base.stages[3:])
    text = dumps_arch(arch)
    again = loads_arch(text)
    assert again == arch and dict(again.info) == info
    assert dumps_arch(again) == text


@pytest.mark.parametrize("text", ["a,b", "x]", "{y}", "k: v", "#c", "- z", "yes", "1.5", "ü"])
def test_flow_style_strings_are_quoted(text):
    """Stage names (listed in `features: [...]`) and info values are written in flow style, where a bare "," or
    "]" would split or end the list: found with a stage named "a,b", which came back as "a"."""
    import dataclasses

    base = get_arch("mobilenet_v3_small_100")
    renamed = {base.features[0]: text}
    arch = dataclasses.replace(
        base, stages=tuple(dataclasses.replace(st0, name=renamed.get(st0.name, st0.name)) for st0 in base.stages),
        features=tuple(renamed.get(f, f) for f in base.features), info={"note": text})
    again = loads_arch(dumps_arch(arch))
    assert again == arch and again.features[0] == text and again.info["note"] == text


def test_make_divisible_rules():
    assert [make_divisible(v) for v in (18, 30, 11.2, 5.6, 60, 4, 88.08)] == [24, 32, 16, 8, 64, 8, 88]


GOOD = dumps_arch(get_arch("mobilenet_v3_small_100"))

# (description, text transform, field the error must name, words the message must contain)
MALFORMED = [
    ("unknown op", lambda t: t.replace("{op: ib, kernel: 3, expand: 4.5", "{op: ibb, kernel: 3, expand: 4.5"),
     "stages.s2.blocks[0].op", 'did you mean "ib"'),
    ("unknown activation", lambda t: t.replace("act: hswish}", "act: hswsh}", 1), "act", "unknown activation"),
    ("even kernel", lambda t: t.replace("{op: ib, kernel: 3, expand: 4.5", "{op: ib, kernel: 4, expand: 4.5"),
     "stages.s2.blocks[0].kernel", "odd"),
    ("zero kernel", lambda t: t.replace("{op: ib, kernel: 3, expand: 4.5", "{op: ib, kernel: 0, expand: 4.5"),
     "stages.s2.blocks[0].kernel", "odd and positive"),
    ("stride 3", lambda t: t.replace("out: 24, stride: 2", "out: 24, stride: 3"), "stages.s2.blocks[0].stride", "1 or 2"),
    ("negative channels", lambda t: t.replace("out: 24, stride: 2", "out: -24, stride: 2"), "stages.s2.blocks[0].out", "positive"),
    ("zero channels", lambda t: t.replace("out: 24, stride: 2", "out: 0, stride: 2"), "stages.s2.blocks[0].out", "positive"),
    ("huge channels", lambda t: t.replace("out: 24, stride: 2", "out: 99999999999, stride: 2"), "stages.s2.blocks[0].out", "at most"),
    ("expansion below 1", lambda t: t.replace("expand: 4.5", "expand: 0.5"), "stages.s2.blocks[0].expand", "between 1"),
    ("feature names a missing stage", lambda t: t.replace("features: [s2, s3, s4]", "features: [s2, s3, s9]"),
     "features[2]", "no stage named 's9'"),
    ("wrong format tag", lambda t: t.replace("format: nas/arch@1", "format: nas/arch@2"), "format", "nas/arch@1"),
    ("missing format tag", lambda t: t.replace("format: nas/arch@1\n", ""), "format", "missing format"),
    ("unknown key in a block", lambda t: t.replace("{op: ib, kernel: 3, expand: 4.5", "{op: ib, kernal: 3, expand: 4.5"),
     "stages.s2.blocks[0].kernal", 'did you mean "kernel"'),
    ("wrong type", lambda t: t.replace("out: 24, stride: 2", "out: twenty, stride: 2"), "stages.s2.blocks[0].out", "expected an integer"),
    ("boolean as int", lambda t: t.replace("out: 24, stride: 2", "out: true, stride: 2"), "stages.s2.blocks[0].out", "expected an integer"),
    ("missing field", lambda t: t.replace("expand: 4.5, ", ""), "stages.s2.blocks[0].expand", "required"),
    ("ffn with stride 2", lambda t: t.replace("{op: ib, kernel: 3, expand: 4.5", "{op: ffn, expand: 4.5"),
     "stages.s2.blocks[0].stride", "ffn"),
    ("python object tag", lambda t: "!!python/object/apply:os.system ['echo hi']\n", None, "tag not allowed"),
    ("empty file", lambda t: "", None, "empty"),
    ("not a mapping", lambda t: "- just\n- a list\n", None, "expected a mapping"),
    ("truncated", lambda t: t[: len(t) // 2].rsplit("{", 1)[0] + "{op: ib, kern", None, "invalid YAML"),
    ("resolution below total stride", lambda t: t.replace("resolution: 224", "resolution: 16"), "input.resolution", "total stride"),
    ("duplicate stage", lambda t: t.replace("name: s3", "name: s2"), "stages[2].name", "duplicate"),
    ("kernels not a pair", lambda t: dumps_arch(get_arch("mobilenet_v4_conv_small")).replace("kernels: [5, 5]", "kernels: [5]", 1),
     "kernels", "[start, middle]"),
]


@pytest.mark.parametrize("desc,transform,field,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_specs_give_precise_errors(tmp_path, desc, transform, field, words):
    path = tmp_path / "bad.yaml"
    path.write_text(transform(GOOD))
    assert path.read_text() != GOOD
    with pytest.raises(ConfigError) as e:
        load_arch(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))
    if field:
        assert e.value.field is not None and field in e.value.field, msg
    assert words in msg, msg


def test_non_utf8_file(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"format: nas/arch@1\nname: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_arch(p)


def test_cli_exits_2_with_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(GOOD.replace("{op: ib, kernel: 3, expand: 4.5", "{op: ib, kernel: 4, expand: 4.5"))
    r = subprocess.run([sys.executable, "-m", "nas", "arch", "info", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"{p}: stages.s2.blocks[0].kernel: kernel must be odd" in r.stderr


def test_blockspec_derived_widths():
    b = BlockSpec("ib", out=24, stride=2, kernel=3, expand=3.67, se=0.25, act="relu")
    assert b.mid(24) == 88 and b.se_width(24) == 24
