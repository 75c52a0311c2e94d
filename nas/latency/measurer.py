"""Where a table's numbers come from: a `Measurer` times modules and describes the device that timed them. Tables,
validation and adaptation take one; `LOCAL` (the default) measures on this machine with `profile.measure`, a
`remote.RemoteMeasurer` on another device through its agent (`nas device serve`)."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from typing import Protocol as Interface

from torch import nn

from nas.arch.headconfig import HeadConfig
from nas.arch.spec import ArchSpec
from nas.latency.environment import environment
from nas.latency.profile import measure, network, typical_block
from nas.latency.protocol import Measurement, Protocol, Shape

Job = tuple[nn.Module, "Shape | Sequence[Shape]"]  # a module and its input shape(s) without the batch


class Measurer(Interface):
    """`batch`: modules one call measures at best (a remote device answers many per request)."""

    batch: int

    def measure_many(self, jobs: Sequence[Job], protocol: Protocol) -> list[Measurement]:
        """One measurement per job, in order, each as `profile.measure` takes it."""
        ...

    def environment(self, protocol: Protocol) -> dict[str, Any]:
        """The measuring device as a table header records it (`environment.environment`)."""
        ...


class LocalMeasurer:
    """This machine, one module at a time: exactly `profile.measure` and `environment.environment`."""

    batch = 1

    def measure_many(self, jobs: Sequence[Job], protocol: Protocol) -> list[Measurement]:
        return [measure(module, shape, protocol) for module, shape in jobs]

    def environment(self, protocol: Protocol) -> dict[str, Any]:
        return environment(protocol)


LOCAL = LocalMeasurer()


def measure_all(measurer: Measurer, jobs: Iterable[Callable[[], Job]], protocol: Protocol) -> Iterator[Measurement]:
    """Measurements of the jobs in order, `measurer.batch` per call; each job is built only when its turn comes
    (a module built long before its measurement would hold memory for nothing)."""
    todo = iter(jobs)
    while chunk := [make() for make in itertools.islice(todo, measurer.batch)]:
        yield from measurer.measure_many(chunk, protocol)


def network_job(arch: ArchSpec, head: HeadConfig | None = None) -> Callable[[], Job]:
    """What `profile.measure_network` measures, built when a measurer asks for it: (module, input shape)."""
    return lambda: (network(arch, head), (arch.channels, arch.resolution, arch.resolution))


def reference_speed(protocol: Protocol, measurer: Measurer = LOCAL, repeats: int = 300) -> float | None:
    """`profile.reference_speed` on `measurer`'s device: the reference workload's time next to a typical block."""
    if not protocol.reference or protocol.backend == "torch-cuda":
        return None
    p = dataclasses.replace(protocol, repeats=repeats, min_time_s=0.0)
    return measurer.measure_many([(typical_block(), (64, 40, 40))], p)[0].reference_us

