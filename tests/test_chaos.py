"""The chaos soak's short form (benchmarks/chaos_soak.py, issue 20): four `nas search` workers on one study while a
random one is SIGKILLed every few seconds and started again, and, on PostgreSQL (a server of its own), the database
is stopped once mid-run and started again. Afterwards exactly `trials` complete, numbers unique without gaps, none
RUNNING or WAITING, every trial seen COMPLETE during the run unchanged, no worker traceback or failed exit."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import servers

from nas.search.storage import make_storage

ROOT = Path(__file__).resolve().parents[1]
# forked workers (milliseconds to start) so that kills every 2-3 s still leave them time for trials on one core
RUNS = {"postgresql": ["--trials", "50", "--kill-every", "2.5", "--outage-s", "4"],
        "journal": ["--trials", "60", "--kill-every", "1.5"]}


@pytest.mark.parametrize("storage", list(RUNS))
def test_chaos_soak_short(storage, tmp_path):
    if storage == "postgresql" and servers.pg_missing():
        pytest.skip(servers.pg_missing())
    trials = int(RUNS[storage][1])
    cmd = [sys.executable, str(ROOT / "benchmarks" / "chaos_soak.py"), "--launcher", "fork", "--workers", "4",
           "--storages", storage, "--no-clean", "--wait-s", "150", "--out", str(tmp_path), *RUNS[storage]]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    run = json.loads(r.stdout)[storage]["faults"]
    context = json.dumps(run)
    assert run["complete"] == trials and run["duplicates"] == 0 and run["gaps"] == 0, context
    assert run["stuck"] == 0 and run["lost"] == 0 and not run["timed_out"], context
    assert not run["bad_exits"] and run["tracebacks"] == 0, context
    assert run["kills"] >= 3 and run["retries"] >= 1, context  # the chaos happened, and hit running trials
    if storage == "postgresql":
        assert run["db_restarts"] == 1 and run["complete_before_outage"] > 0, context
        assert run["changed_since_outage"] == 0 and run["outage_lines"] >= 1, context
    else:  # the journal read back here, independently of the benchmark's own check
        from optuna.trial import TrialState

        reader = make_storage(f"journal:///{tmp_path / 'journal' / 'journal-faults.journal'}")
        stored = reader.get_all_trials(reader.get_study_id_from_name("journal-faults"))
        assert sorted(t.number for t in stored) == list(range(len(stored)))
        assert sum(t.state == TrialState.COMPLETE for t in stored) == trials
        assert not [t for t in stored if t.state in (TrialState.RUNNING, TrialState.WAITING)]
