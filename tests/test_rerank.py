"""nas.report.rerank: candidates short-trained alike, ordered by their mAP, finished trainings reused."""
import json
import logging
import math
import pickle
from dataclasses import replace

import pytest
from conftest import DET

from nas.detect.short import ShortSchedule
from nas.report.compare import Entrant
from nas.report.rerank import Ranked, order, rerank
from nas.space import space_from_dict

TINY = ShortSchedule(epochs=1, imgsz=64, batch=8, train_images=16, val_images=8, seeds=(0, 1))


def test_order_best_map_first_then_score_nan_last():
    def r(label, m, score):
        return Ranked(Entrant(label, "search", None, score), m, m, 1.0)

    got = order([r("a", 0.2, 1.0), r("b", math.nan, 9.0), r("c", 0.3, 0.5), r("d", 0.2, 2.0)])
    assert [x.entrant.label for x in got] == ["c", "d", "a", "b"]


@pytest.fixture(scope="module")
def candidates():
    space = space_from_dict(DET, "det.yaml")
    return [Entrant(f"trial-{s}", "search", space.random(s, name=f"c{s}"), float(s)) for s in range(3)]


def pickling_map(fn, items):
    """The builtin map, after the round trip a process pool puts the function and every task through."""
    return map(pickle.loads(pickle.dumps(fn)), [pickle.loads(pickle.dumps(x)) for x in items])


def test_rerank_trains_each_candidate_once_per_seed_and_orders_by_mean_short_map(candidates, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="nas.report.rerank"):
        ranked = rerank(candidates, TINY, tmp_path)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rerank [")]
    assert sorted(x.entrant.label for x in ranked) == ["trial-0", "trial-1", "trial-2"]
    maps = [x.map50_95 for x in ranked]
    assert maps == sorted(maps, reverse=True) and all(0 <= m <= 1 for m in maps)
    weights = [tmp_path / e.label / f"seed{s}" / "weights" / "last.pt" for e in candidates for s in (0, 1)]
    assert all(w.is_file() for w in weights)
    for x in ranked:  # the score is the mean over the seeds' runs
        per_seed = [json.loads((tmp_path / x.entrant.label / f"seed{s}" / "short.json").read_text())["result"]
                    ["map50_95"] for s in (0, 1)]
        assert x.map50_95 == pytest.approx(sum(per_seed) / 2)
    assert len(logged) == 3 and all("(mean of 2 seeds) after 1 epochs at 64 px" in s for s in logged)

    # a rerun reuses every finished training (their weights are not rewritten) and gives the same order
    stamps = [w.stat().st_mtime_ns for w in weights]
    again = rerank(candidates, TINY, tmp_path, pickling_map)  # one picklable task per candidate
    assert [(x.entrant.label, x.map50_95) for x in again] == [(x.entrant.label, x.map50_95) for x in ranked]
    assert stamps == [w.stat().st_mtime_ns for w in weights]

    # another seed list reuses the seeds already trained and trains only the new one
    rerank(candidates[:1], replace(TINY, seeds=(1, 2)), tmp_path)
    assert (tmp_path / "trial-0" / "seed1" / "weights" / "last.pt").stat().st_mtime_ns == stamps[1]
    assert (tmp_path / "trial-0" / "seed2" / "short.json").is_file()

    # another schedule is another result: the marker does not hide it
    rerank(candidates[:1], replace(TINY, lr0=0.002), tmp_path)
    assert (tmp_path / "trial-0" / "seed0" / "weights" / "last.pt").stat().st_mtime_ns != stamps[0]
