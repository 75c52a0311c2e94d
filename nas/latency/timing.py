"""The timing loop, without torch: warm-up and individually timed calls of a runner (a callable doing one
inference), the process state they run in (pinning, heap, garbage collector), and their `Measurement`. Local
profiling (`profile.py`) and the device agent (`agent.py`) time through these same functions."""
from __future__ import annotations

import contextlib
import gc
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from nas.errors import ConfigError
from nas.latency.protocol import PROTOCOL_SOURCE, Measurement, Protocol
from nas.system import retain_heap

Runner = Callable[[], Any]


def pin_cores(protocol: Protocol) -> set[int]:
    """The cores pin_cpu .. pin_cpu + threads - 1, checked against what this process may use."""
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError(PROTOCOL_SOURCE, "pin_cpu",
                          "CPU pinning needs Linux (os.sched_setaffinity); use pin_cpu: null")
    assert protocol.pin_cpu is not None
    wanted = set(range(protocol.pin_cpu, protocol.pin_cpu + protocol.threads))
    available = os.sched_getaffinity(0)
    if not wanted <= available:
        raise ConfigError(
            PROTOCOL_SOURCE, "pin_cpu",
            f"cores {sorted(wanted)} are not all available to this process (available: {sorted(available)})",
        )
    return wanted


@contextlib.contextmanager
def process_env(protocol: Protocol) -> Iterator[None]:
    """Heap retention, CPU pinning and the garbage collector off for the duration; pinning and gc restored after.
    The runtime's own settings (thread count, denormals) are the caller's."""
    cores = pin_cores(protocol) if protocol.pin_cpu is not None else None
    affinity_before = os.sched_getaffinity(0) if cores is not None else None
    gc_was_enabled = gc.isenabled()
    try:
        if protocol.retain_heap:
            retain_heap()
        if cores is not None:
            # Affects this thread and threads created later; pools a runtime already started keep their mask.
            os.sched_setaffinity(0, cores)
        # Young generations only: a full collection costs ~80 ms in a process holding torch, optuna and a few
        # thousand built modules, which dominated table builds; gc is off while timing anyway.
        gc.collect(1)
        gc.disable()  # a collection inside a timed call would be charged to whichever op it hit
        yield
    finally:
        if gc_was_enabled:
            gc.enable()
        if affinity_before is not None:
            os.sched_setaffinity(0, affinity_before)


def warm_up(run: Runner, protocol: Protocol) -> None:
    clock = time.perf_counter_ns
    deadline = clock() + int(protocol.warmup_s * 1e9)
    done = 0
    while done < protocol.warmup_runs or clock() < deadline:
        run()
        done += 1


def time_calls(run: Runner, protocol: Protocol, reference: Runner | None = None) -> Measurement:
    """Warm-up, then timed calls until both protocol.repeats calls and protocol.min_time_s seconds are done (at
    most max_repeats); with `reference`, the reference workload is timed before every call (after an untimed call
    of it). Call inside the timing environment."""
    warm_up(run, protocol)
    samples: list[int] = []
    ref_samples: list[int] = []
    clock = time.perf_counter_ns
    deadline = clock() + int(protocol.min_time_s * 1e9)
    while len(samples) < protocol.repeats or (clock() < deadline and len(samples) < protocol.max_repeats):
        if reference is not None:
            reference()  # untimed: whatever ran before leaves the timed reference below unaffected
            start = clock()
            reference()
            ref_samples.append(clock() - start)
        start = clock()
        run()
        samples.append(clock() - start)
    return Measurement.from_samples(samples, ref_samples, protocol.statistic)


def time_interleaved(runners: Mapping[str, Runner], protocol: Protocol, min_rounds: int, max_rounds: int,
                     runs_per_round: int, on_round: Callable[[], Any] | None = None) -> dict[str, Measurement]:
    """Round-robin over `runners` in a seeded shuffle each round: one untimed call, then `runs_per_round` timed
    ones; rounds go on until `min_rounds` are done and the total time reaches protocol.min_time_s per runner
    (at most `max_rounds`). Call inside the timing environment."""
    names = list(runners)
    rng = random.Random(protocol.seed)
    samples: dict[str, list[int]] = {name: [] for name in names}
    for name in names:
        warm_up(runners[name], protocol)
    clock = time.perf_counter_ns
    deadline = clock() + int(protocol.min_time_s * len(names) * 1e9)
    done = 0
    while done < min_rounds or (clock() < deadline and done < max_rounds):
        rng.shuffle(names)
        for name in names:
            run, out = runners[name], samples[name]
            run()
            for _ in range(runs_per_round):
                start = clock()
                run()
                out.append(clock() - start)
        done += 1
        if on_round is not None:
            on_round()
    return {name: Measurement.from_samples(samples[name]) for name in runners}
