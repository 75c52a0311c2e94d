"""Latency lookup tables (MnasNet/NetAdapt style): every op a space can produce, measured once on one device and
backend; a network's latency is predicted as the sum over its ops, in microseconds, without running it. A whole
detector adds one op: its neck + head (+ box decoding) behind the backbone's three feature maps (`NeckHeadOp`).

File format (`nas/lut@1`, see docs/LATENCY.md): a commented YAML header (device, versions, protocol, date) and a
CSV body sorted by op key, so tables are readable and diff cleanly. An entry's latency is the protocol's statistic
(p10 or median column). A table may carry a `calibration` (see `LatencyTable.calibrate`): one scale, fitted on
sampled networks measured end to end, that `predict` applies to the sum and reports beside it.
"""
from __future__ import annotations

import csv
import functools
import io
import logging
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

from nas.arch.blocks import build_block
from nas.arch.headconfig import HeadConfig
from nas.arch.spec import ArchSpec
from nas.config import MAX_FILE_BYTES, check_keys, parse_yaml, read, require_mapping
from nas.errors import ConfigError, NasError
from nas.latency.coverage import NeckHeadOp, TableOp, arch_ops, extend_command, key_of, neckhead_op, op_key
from nas.latency.environment import cpu_id
from nas.latency.header import check_header_records
from nas.latency.measurer import LOCAL, Measurer, measure_all, reference_speed
from nas.latency.protocol import Protocol
from nas.system import exclusive_lock, write_atomically

FORMAT = "nas/lut@1"
COLUMNS = ("op", "median_us", "p10_us", "p90_us", "n")
# Protocol fields that change the numbers themselves: a table is refused for a protocol that differs in these.
BINDING = ("backend", "threads", "batch", "dtype")
Shape = tuple[int, int, int]
TABLE_STATISTICS = {"p10": "p10_us", "median": "median_us"}  # protocol statistic -> the column a table predicts with
log = logging.getLogger(__name__)


class LatencyTableError(NasError):
    """A table cannot answer: missing ops, or measured under another backend/threads/batch/dtype."""


@dataclass(frozen=True)
class Entry:
    median_us: float
    p10_us: float
    p90_us: float
    n: int


@dataclass(frozen=True)
class Prediction:
    total_us: float                              # backbone entries x the table's calibration scale, + neck+head
    blocks: tuple[tuple[str, str, float], ...]   # (block name, op key, µs): the table's entries, uncalibrated
    sum_us: float = 0.0                          # the plain sum of the entries

    @property
    def total_ms(self) -> float:
        return self.total_us / 1e3


@dataclass
class LatencyTable:
    header: dict[str, Any]
    entries: dict[str, Entry] = field(default_factory=dict)
    path: Path | None = None

    # ------------------------------------------------------------ identity and compatibility
    @property
    def protocol(self) -> Protocol:
        return Protocol.from_dict(self.header["protocol"])

    @property
    def reference_us(self) -> float | None:
        """The reference workload's time this table's entries are normalised to (None: raw numbers)."""
        v = self.header.get("reference_us")
        return float(v) if v else None

    @property
    def scale(self) -> float:
        """The calibration scale `predict` applies (1.0 for an uncalibrated table)."""
        c = self.header.get("calibration")
        return float(c["scale"]) if c else 1.0

    @property
    def column(self) -> str:
        """Entry field holding the protocol's statistic."""
        return TABLE_STATISTICS[self.protocol.statistic]

    @property
    def name(self) -> str:
        return str(self.header.get("name") or (self.path.stem if self.path else "table"))

    def measured_elsewhere(self) -> str | None:
        """The CPU this table was measured on when it is not this machine's (None: this CPU, or either unknown)."""
        theirs, mine = self.header.get("device", {}).get("cpu_id"), cpu_id()
        return theirs if theirs and mine and theirs != mine else None

    def check_compatible(self, protocol: Protocol, cpu: bool = True, measurer: Measurer = LOCAL) -> None:
        """Refuse a protocol whose backend/threads/batch/dtype differ; warn when software versions (and with `cpu`,
        the CPU) of the measuring device differ."""
        mine = self.header["protocol"]
        diffs = [f"{k}: table {mine.get(k)!r}, requested {getattr(protocol, k)!r}" for k in BINDING
                 if mine.get(k) != getattr(protocol, k)]
        if diffs:
            raise LatencyTableError(
                f"{self.path or self.name}: measured under a different setting ({'; '.join(diffs)}); latency does not "
                f"carry over between backends, thread counts, batch sizes or dtypes: build a table for this setting "
                f"with `nas lut build`")
        here = measurer.environment(protocol)
        for k in ("torch", "onnxruntime", "openvino", "ai_edge_litert") + (("cpu", "cpu_id") if cpu else ()):
            if k in self.header.get("device", {}) and k in here and self.header["device"][k] != here[k]:
                log.warning("%s: measured with %s %r, running %r; predictions may be off (validate with "
                            "`nas lut validate`)", self.path or self.name, k, self.header["device"][k], here[k])

    # ------------------------------------------------------------ lookups
    def missing(self, ops: Iterable[TableOp]) -> list[TableOp]:
        return [op for op in ops if key_of(op) not in self.entries]

    def predict(self, arch: ArchSpec, head: HeadConfig | None = None) -> Prediction:
        """Sum of the table's entries over the backbone's ops, plus with `head` the detector's neck+head op (a
        budget on the whole detector); every missing op is listed in the error, with the command that adds it."""
        ops = [(name, op_key(block, shape)) for name, block, shape in arch_ops(arch)]
        if head is not None:
            ops.append(("neck+head", neckhead_op(arch, head).key))
        rows, missing = [], []
        column = self.column
        for name, key in ops:
            e = self.entries.get(key)
            if e is None:
                missing.append(f"{name}: {key}")
                continue
            rows.append((name, key, getattr(e, column)))
        if missing:
            table = self.path or "TABLE"
            shown = "; ".join(missing[:3]) + (f"; ... ({len(missing)} in all)" if len(missing) > 3 else "")
            fixes = []
            if any(not m.startswith("neck+head:") for m in missing):
                fixes.append(f"`nas lut extend {table} --arch ARCH.yaml` (or --space SPACE.yaml)")
            if head is not None and missing[-1].startswith("neck+head:"):
                fixes.append(f"`{extend_command(str(table), head)}` (or --arch ARCH.yaml)")
            raise LatencyTableError(
                f"latency table {self.path or self.name} has no entry for {len(missing)} op(s) of {arch.name!r}: "
                f"{shown}. Add them with {' and '.join(fixes)}")
        total = sum(r[2] for r in rows)
        # The calibration is fitted on backbones, whose blocks are timed one by one; the neck+head entry is already
        # one whole module timed end to end, so it is added unscaled (scaling it made detectors lean high).
        neckhead = sum(r[2] for r in rows if r[0] == "neck+head")
        return Prediction((total - neckhead) * self.scale + neckhead, tuple(rows), total)

    # ------------------------------------------------------------ measuring
    @classmethod
    def new(cls, protocol: Protocol, name: str, space: str | None = None, notes: str | None = None,
            measurer: Measurer = LOCAL) -> LatencyTable:
        """An empty table whose header describes `measurer`'s device (this machine by default)."""
        if protocol.statistic not in TABLE_STATISTICS:
            raise ConfigError("latency protocol", "statistic", f"a table stores {' or '.join(TABLE_STATISTICS)} "
                                                               f"latencies, not {protocol.statistic!r}")
        header = {"format": FORMAT, "name": name, "unit": "microseconds",
                  "device": {k: _plain(v) for k, v in measurer.environment(protocol).items() if k != "protocol"},
                  "protocol": protocol.to_dict(), "space": space}
        ref = reference_speed(protocol, measurer)
        if ref is not None:
            header["reference_us"] = round(ref, 2)
        if notes:
            header["notes"] = notes
        return cls(header=header)

    def extend(self, ops: Iterable[TableOp], *, progress: bool = True, save_every: int = 200,
               path: str | Path | None = None, measurer: Measurer = LOCAL) -> int:
        """Measure every op not yet in the table on `measurer`'s device; saves every `save_every` ops so a killed
        build loses little. Backbone blocks and neck+head ops go through the same measurement and normalisation."""
        protocol = self.protocol
        todo, seen = [], set()
        for op in ops:
            k = key_of(op)
            if k not in self.entries and k not in seen:
                seen.add(k)
                todo.append((k, op))
        if not todo:
            return 0
        path = Path(path) if path else self.path
        bar = _progress(len(todo), progress, "measuring ops")
        try:
            jobs = (functools.partial(_job, op) for _, op in todo)
            for i, ((k, _), raw) in enumerate(zip(todo, measure_all(measurer, jobs, protocol))):
                m = raw.normalised(self.reference_us)
                self.entries[k] = Entry(round(m.median_us, 2), round(m.p10_us, 2), round(m.p90_us, 2), m.n)
                bar.update(1)
                if path and (i + 1) % save_every == 0:
                    self.save(path)
        finally:
            bar.close()
            if path:
                self.save(path)
        self.header["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if path:
            self.save(path)
        return len(todo)

    # ------------------------------------------------------------ file format
    def dumps(self) -> str:
        head = yaml.safe_dump(self.header, sort_keys=False, default_flow_style=False, width=120)
        out = io.StringIO()
        out.write("".join(f"# {line}\n" for line in head.splitlines()))
        w = csv.writer(out, lineterminator="\n")
        w.writerow(COLUMNS)
        for k in sorted(self.entries):
            e = self.entries[k]
            w.writerow([k, f"{e.median_us:.2f}", f"{e.p10_us:.2f}", f"{e.p90_us:.2f}", e.n])
        return out.getvalue()

    def save(self, path: str | Path) -> Path:
        # temp file + rename: a crash or a full disk mid-write never leaves half a table, the previous one stays whole
        p = write_atomically(path, self.dumps(), f"saving the latency table ({len(self.entries)} ops)",
                             "free space and run the same command again: it measures only the ops still missing")
        self.path = p
        return p

    @classmethod
    def loads(cls, text: str, source: str = "<table>") -> "LatencyTable":
        lines = text.splitlines()
        head = [ln[2:] if ln.startswith("# ") else ln[1:] for ln in lines if ln.startswith("#")]
        body = [(n, ln) for n, ln in enumerate(lines, 1) if not ln.startswith("#") and ln.strip()]
        if not head:
            raise ConfigError(source, "header", "no '# ' header lines; a table starts with '# format: nas/lut@1'")
        header = require_mapping(parse_yaml("\n".join(head), source), source, "header")
        if header.get("format") != FORMAT:
            raise ConfigError(source, "header.format", f"expected {FORMAT!r}, got {header.get('format')!r}")
        check_keys(header, ("format", "name", "unit", "device", "protocol", "space", "notes", "updated", "imported_from",
                            "reference_us", "calibration", "adapted_from", "adaptation"), source, "header")
        proto = require_mapping(read(header, "protocol", dict, source, "header"), source, "header.protocol")
        check_keys(proto, [f.name for f in fields(Protocol)], source, "header.protocol")  # suggests the nearest key
        try:
            Protocol.from_dict(proto)
        except ConfigError as e:
            raise ConfigError(source, f"header.protocol.{e.field}", e.message) from None
        except TypeError as e:
            raise ConfigError(source, "header.protocol", str(e)) from None
        if proto.get("statistic", "p10") not in TABLE_STATISTICS:
            raise ConfigError(source, "header.protocol.statistic", f"a table holds {' or '.join(TABLE_STATISTICS)} "
                                                                   f"latencies, got {proto.get('statistic')!r}")
        check_header_records(header, source)
        if not body or tuple(c.strip() for c in body[0][1].split(",")) != COLUMNS:
            raise ConfigError(source, "columns", f"expected the column line {','.join(COLUMNS)}")
        entries = {}
        for lineno, row in _csv_rows(body[1:], source):
            entries_key, entry = _parse_row(row, source, lineno)
            if entries_key in entries:
                raise ConfigError(source, f"line {lineno}", f"duplicate op {entries_key!r}")
            entries[entries_key] = entry
        return cls(header=dict(header), entries=entries)

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(str(p), None, "latency table not found" if not p.exists() else "not a regular file")
        if p.stat().st_size > 8 * MAX_FILE_BYTES:
            raise ConfigError(str(p), None, "file too large for a latency table")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(str(p), None, f"not UTF-8 text (byte {e.start})") from None
        table = cls.loads(text, str(p))
        table.path = p
        return table


def _job(op: TableOp) -> tuple[Any, Any]:
    """The module an op key stands for and its input shape(s)."""
    if isinstance(op, NeckHeadOp):
        return op.build(), op.shapes
    b, shape = op
    return build_block(b, shape[0]), shape


def _plain(v: Any) -> Any:
    """Plain YAML scalars only (torch.__version__ is a str subclass the safe dumper refuses)."""
    if v is None or type(v) in (bool, int, float, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return str(v)


def _csv_rows(lines: Iterable[tuple[int, str]], source: str) -> Iterable[tuple[int, list[str]]]:
    """CSV rows with their real line numbers (blank and comment lines skipped); one line is one row."""
    for lineno, line in lines:
        try:
            row = next(csv.reader([line]), [])
        except csv.Error as e:  # e.g. a field over csv's 128 KiB limit
            raise ConfigError(source, f"line {lineno}", f"unreadable CSV ({e})") from None
        yield lineno, row


def _parse_row(row: list[str], source: str, lineno: int) -> tuple[str, Entry]:
    where = f"line {lineno}"
    if len(row) != len(COLUMNS):
        raise ConfigError(source, where, f"expected {len(COLUMNS)} columns ({','.join(COLUMNS)}), got {len(row)}")
    key = row[0].strip()
    if not key:
        raise ConfigError(source, f"{where}.op", "empty op key")
    if key.startswith("#"):  # it would be written as a header comment line and read back as YAML
        raise ConfigError(source, f"{where}.op", f"op keys cannot start with '#', got {key[:60]!r}")
    vals = []
    for col, text in zip(COLUMNS[1:4], row[1:4]):
        try:
            v = float(text)
        except ValueError:
            raise ConfigError(source, f"{where}.{col}", f"not a number: {text!r}") from None
        if not math.isfinite(v) or v <= 0:
            raise ConfigError(source, f"{where}.{col}", f"latency must be a positive finite number, got {text!r}")
        vals.append(v)
    try:
        n = int(row[4])
    except ValueError:
        raise ConfigError(source, f"{where}.n", f"not an integer: {row[4]!r}") from None
    if n < 1:
        raise ConfigError(source, f"{where}.n", f"must be at least 1, got {n}")
    if not vals[1] <= vals[0] <= vals[2]:
        raise ConfigError(source, where, f"expected p10 <= median <= p90, got {vals[1]}, {vals[0]}, {vals[2]}")
    return key, Entry(vals[0], vals[1], vals[2], n)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="op", dynamic_ncols=True)


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Hold TABLE.lock while this process reads, measures into and saves TABLE: a second `nas lut build/extend` of
    the same file waits (one line says so) and then reads what the first saved, so no entry is lost; measuring one
    after the other also keeps each from skewing the other's timings. The OS drops the lock with a dead process."""
    p = Path(path)
    lock = p.with_name(p.name + ".lock")
    with ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(lock, wait=False))
        except BlockingIOError:
            log.warning("waiting for another process writing %s (it holds %s)", p, lock)
            held.enter_context(exclusive_lock(lock))
        yield


def import_csv(csv_path: str | Path, header: Mapping[str, Any], *, source_name: str | None = None) -> LatencyTable:
    """A table from a CSV measured elsewhere (phone, Jetson): columns op,median_us[,p10_us,p90_us,n].

    `op` keys come from `nas lut template`; missing p10/p90 default to the median, n to 1.
    """
    p = Path(csv_path)
    if not p.is_file():
        raise ConfigError(str(p), None, "CSV file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), None, f"not UTF-8 text (byte {e.start})") from None
    rows = list(_csv_rows(((n, ln) for n, ln in enumerate(text.splitlines(), 1)
                           if ln.strip() and not ln.startswith("#")), str(p)))
    if not rows:
        raise ConfigError(str(p), None, "empty CSV")
    cols = [c.strip() for c in rows[0][1]]
    if cols[:2] != ["op", "median_us"] or any(c not in COLUMNS for c in cols) or len(set(cols)) != len(cols):
        raise ConfigError(str(p), "columns", f"expected columns op,median_us[,p10_us,p90_us,n], got "
                                             f"{','.join(cols)[:120]}")
    if len(rows) == 1:  # an importable table with no ops would only fail later, at the first prediction
        raise ConfigError(str(p), None, "no op rows after the column line; fill in the ops of `nas lut template`")
    table = LatencyTable(header=dict(header))
    for lineno, row in rows[1:]:
        d = dict(zip(cols, row))
        if len(row) != len(cols):
            raise ConfigError(str(p), f"line {lineno}", f"expected {len(cols)} columns, got {len(row)}")
        full = [d["op"], d["median_us"], d.get("p10_us") or d["median_us"], d.get("p90_us") or d["median_us"],
                d.get("n") or "1"]
        k, e = _parse_row(full, str(p), lineno)
        if k in table.entries:  # two measurements of one op: which one is right is the user's call, not ours
            raise ConfigError(str(p), f"line {lineno}", f"duplicate op {k!r}")
        table.entries[k] = e
    table.header.setdefault("format", FORMAT)
    table.header["imported_from"] = source_name or p.name
    return table
