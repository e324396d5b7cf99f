"""Request counters, error counts, latency histograms and gauges, for operators.

``Metrics.instrument`` wraps the queue runner's request handler (the FUSE
dispatcher's ``handle``): per request it peeks the opcode in the request
header, times the call with ``time.perf_counter_ns`` and reads the error
field of the reply header, then bumps plain lists indexed by opcode.  The
counters live in one shard per thread (worker threads included), so no
increment is ever lost and none takes a lock; readers sum the shards.

Gauges (queue depths, open inodes, handles, fds) are not counted on the hot
path: sources registered with ``add_gauges`` are asked when someone reads.

Two renderings: ``prometheus()`` (text exposition format 0.0.4, served by
``metrics_server``; ``prometheus_client`` writes it from the families that
``PrometheusCollector`` makes of a snapshot) and ``summary_lines()`` (what
SIGUSR1 writes to the log).
"""

from __future__ import annotations

import errno as errno_mod
import itertools
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from virtiofsd_py.fuse.abi import opcode_name
from virtiofsd_py.virtio.runner import ChainHandler

#: Counter slots: every FUSE opcode the kernel sends is below 64; the rest
#: (CUSE_INIT, garbage) share slot 0, which no real request uses.
SLOTS = 64
#: (opcode, errno) -> requests answered by compiled fast operations (errno 0: success).
FastCounts = Callable[[], dict[tuple[int, int], int]]
#: Latency buckets are powers of two in ns: bucket i holds requests with
#: 2**(MIN_BIT+i-1) <= ns < 2**(MIN_BIT+i); the first also holds faster ones,
#: the last slower ones (2**10 ns ~ 1 us ... 2**30 ns ~ 1.07 s, then +Inf).
MIN_BIT = 10
MAX_BIT = 30
BUCKETS = MAX_BIT - MIN_BIT + 2
PREFIX = "virtiofsd_py"

_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")


class _Shard:
    """One thread's counters; only that thread writes them."""

    __slots__ = ("errnos", "errors", "hist", "requests", "sum_ns")

    def __init__(self) -> None:
        self.requests = [0] * SLOTS
        self.errors = [0] * SLOTS
        self.sum_ns = [0] * SLOTS
        #: Latency buckets of opcode ``op`` are ``hist[op * BUCKETS : (op + 1) * BUCKETS]``.
        self.hist = [0] * (SLOTS * BUCKETS)
        self.errnos: dict[int, int] = {}

    def count_error(self, op: int, err: int) -> None:
        self.errors[op] += 1
        self.errnos[err] = self.errnos.get(err, 0) + 1


@dataclass(frozen=True, slots=True)
class OpStats:
    """Totals for one opcode at one moment."""

    opcode: int
    requests: int
    errors: int
    sum_ns: int
    #: Per-bucket (not cumulative) counts, see ``bucket_bounds_ns``.
    buckets: tuple[int, ...]
    #: Of ``requests``, those answered by compiled fast operations (not timed).
    fast: int = 0

    @property
    def timed_requests(self) -> int:
        """Requests the histogram holds (``buckets`` and ``sum_ns``)."""
        return self.requests - self.fast

    def quantile_ns(self, q: float) -> int:
        """Upper bound of the bucket holding the ``q`` quantile (0 if no requests)."""
        if not self.timed_requests:
            return 0
        want = q * self.timed_requests
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= want:
                return 1 << (MIN_BIT + i) if i < BUCKETS - 1 else 1 << (MAX_BIT + 1)
        return 1 << (MAX_BIT + 1)


@dataclass(frozen=True, slots=True)
class Gauge:
    """One gauge sample: ``name`` without the prefix, labels, value."""

    name: str
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


GaugeSource = Callable[[], Iterable[Gauge]]


def bucket_bounds_ns() -> list[int]:
    """Upper bounds (exclusive) of the finite buckets, in nanoseconds."""
    return [1 << b for b in range(MIN_BIT, MAX_BIT + 1)]


class Metrics:
    """Per-opcode request, error and latency statistics plus gauge sources."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._shards: list[_Shard] = []
        self._shards_lock = threading.Lock()
        self._gauges: list[GaugeSource] = []
        self._fast: list[FastCounts] = []
        self.started = time.time()
        #: This process's fd directory as it can name it (relative under --sandbox chroot).
        self.fd_dir = "/proc/self/fd"
        #: Whether latencies are measured (``instrument(timed=...)``).
        self.timed = True

    # -- hot path -------------------------------------------------------------
    def _shard(self) -> _Shard:
        shard = _Shard()
        with self._shards_lock:
            self._shards.append(shard)
        self._local.shard = shard
        return shard

    def instrument(self, handler: ChainHandler, *, timed: bool = True) -> ChainHandler:
        """``handler`` counted (and timed if ``timed``); same signature and result.

        Written for speed (measured by bench/metrics_overhead.py): byte peeks
        instead of struct unpacking (real opcodes fit in the low byte; a
        negative error has its top byte set), one flat histogram list.  The
        two clock reads are most of the cost, hence ``timed``.
        """
        local = self._local
        new_shard = self._shard
        clock = time.perf_counter_ns
        last = BUCKETS - 1
        self.timed = timed

        def opcode(readable: Sequence[memoryview]) -> int:
            first = readable[0] if readable else b""
            if len(first) < 8 or first[5] or first[6] or first[7] or first[4] >= SLOTS:
                return 0
            return first[4]

        def counted(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
            try:
                shard: _Shard = local.shard
            except AttributeError:
                shard = new_shard()
            try:
                op = _U32.unpack_from(readable[0], 4)[0]  # opcode: one call, not four peeks
            except (IndexError, struct.error):
                op = 0
            if op >= SLOTS:
                op = 0
            n = handler(readable, writable)
            shard.requests[op] += 1
            if n >= 16:
                out = writable[0]
                if len(out) >= 8 and out[7]:
                    shard.count_error(op, -_I32.unpack_from(out, 4)[0])
            return n

        def counted_timed(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
            try:
                shard: _Shard = local.shard
            except AttributeError:
                shard = new_shard()
            op = opcode(readable)
            t0 = clock()
            n = handler(readable, writable)
            dt = clock() - t0
            shard.requests[op] += 1
            shard.sum_ns[op] += dt
            b = dt.bit_length() - MIN_BIT
            shard.hist[op * BUCKETS + (0 if b < 0 else last if b > last else b)] += 1
            if n >= 16:
                out = writable[0]
                if len(out) >= 8 and out[7]:
                    shard.count_error(op, -_I32.unpack_from(out, 4)[0])
            return n

        return counted_timed if timed else counted

    # -- reading -------------------------------------------------------------
    def add_gauges(self, source: GaugeSource) -> None:
        """Register a callable asked for its gauges at every read."""
        self._gauges.append(source)

    def add_fast_counts(self, source: FastCounts) -> None:
        """Register the counts of requests the compiled fast operations answered
        (``QueueRunner.fast_counts``): counted as requests and errors, not timed.
        Asked only when someone reads, so the fast path stays free of Python."""
        self._fast.append(source)

    def _fast_counts(self) -> dict[tuple[int, int], int]:
        total: dict[tuple[int, int], int] = {}
        for source in self._fast:
            for k, n in source().items():
                total[k] = total.get(k, 0) + n
        return total

    def op_stats(self) -> list[OpStats]:
        """Totals per opcode seen so far, by opcode number."""
        with self._shards_lock:
            shards = list(self._shards)
        fast_requests = [0] * SLOTS
        fast_errors = [0] * SLOTS
        for (op, err), n in self._fast_counts().items():
            fast_requests[op] += n
            if err:
                fast_errors[op] += n
        out = []
        for op in range(SLOTS):
            requests = sum(s.requests[op] for s in shards) + fast_requests[op]
            if not requests:
                continue
            base = op * BUCKETS
            buckets = tuple(sum(s.hist[base + i] for s in shards) for i in range(BUCKETS))
            out.append(
                OpStats(
                    op,
                    requests,
                    sum(s.errors[op] for s in shards) + fast_errors[op],
                    sum(s.sum_ns[op] for s in shards),
                    buckets,
                    fast_requests[op],
                )
            )
        return out

    def errnos(self) -> dict[int, int]:
        """Error replies by errno."""
        with self._shards_lock:
            shards = list(self._shards)
        total: dict[int, int] = {}
        for s in shards:
            for e, n in list(s.errnos.items()):
                total[e] = total.get(e, 0) + n
        for (_, e), n in self._fast_counts().items():
            if e:
                total[e] = total.get(e, 0) + n
        return total

    def uptime(self) -> float:
        return time.time() - self.started

    def gauges(self) -> list[Gauge]:
        out = [
            Gauge("open_fds", "File descriptors the daemon has open.", _count_fds(self.fd_dir)),
            Gauge("uptime_seconds", "Seconds since the daemon started.", self.uptime()),
        ]
        for source in self._gauges:
            out.extend(source())
        return out

    # -- renderings ------------------------------------------------------------
    def prometheus(self) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        return generate_latest(PrometheusCollector(self)).decode()

    def summary_lines(self) -> list[str]:
        """Human-readable one-line records (for the log on SIGUSR1)."""
        out = []
        for s in self.op_stats():
            line = f"metrics: {_op(s)} requests={s.requests} errors={s.errors}"
            if s.fast:
                line += f" fast={s.fast}"
            if self.timed and s.timed_requests:
                line += (
                    f" mean={s.sum_ns / s.timed_requests / 1000:.1f}us"
                    f" p50<{s.quantile_ns(0.5) / 1000:.0f}us p99<{s.quantile_ns(0.99) / 1000:.0f}us"
                )
            out.append(line)
        errs = self.errnos()
        if errs:
            out.append(
                "metrics: errors by errno "
                + " ".join(f"{_errno_name(e)}={n}" for e, n in sorted(errs.items()))
            )
        gauges = " ".join(f"{g.name}{_label_suffix(g.labels)}={g.value:.6g}" for g in self.gauges())
        out.append(f"metrics: {gauges}")
        return out


class PrometheusCollector(Collector):
    """The metric families of one snapshot of ``metrics``, for ``prometheus_client``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        stats = m.op_stats()
        requests = _counter("fuse_requests", "FUSE requests handled, by opcode.", "opcode")
        errors = _counter("fuse_errors", "FUSE error replies, by opcode.", "opcode")
        for s in stats:
            requests.add_metric([_op(s)], s.requests)
            errors.add_metric([_op(s)], s.errors)
        errnos = _counter("fuse_errno", "FUSE error replies, by errno.", "errno")
        for e, n in sorted(m.errnos().items()):
            errnos.add_metric([_errno_name(e)], n)
        duration = HistogramMetricFamily(
            f"{PREFIX}_fuse_request_duration_seconds",
            "Time to execute a FUSE request and write its reply, by opcode.",
            labels=["opcode"],
        )
        bounds = [f"{bound / 1e9:.9g}" for bound in bucket_bounds_ns()]
        for s in stats if m.timed else ():
            if not s.timed_requests:
                continue
            finite = zip(bounds, itertools.accumulate(s.buckets), strict=False)
            buckets = [*finite, ("+Inf", s.timed_requests)]
            duration.add_metric([_op(s)], buckets, s.sum_ns / 1e9)
        yield from (requests, errors, errnos, duration)
        gauges: dict[str, GaugeMetricFamily] = {}
        for g in m.gauges():
            family = gauges.get(g.name)
            if family is None:
                labels = [k for k, _ in g.labels]
                family = GaugeMetricFamily(f"{PREFIX}_{g.name}", g.help, labels=labels)
                gauges[g.name] = family
            family.add_metric([v for _, v in g.labels], g.value)
        yield from gauges.values()


def _counter(name: str, help_text: str, label: str) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", help_text, labels=[label])


def _op(s: OpStats) -> str:
    return opcode_name(s.opcode) if s.opcode else "OTHER"


def _errno_name(e: int) -> str:
    return errno_mod.errorcode.get(e, str(e))


def _label_suffix(labels: tuple[tuple[str, str], ...]) -> str:
    return "".join(f"[{v}]" for _, v in labels)


def _count_fds(fd_dir: str) -> int:
    try:
        return len(os.listdir(fd_dir))
    except OSError:
        return -1


def ring_gauges(rings: Callable[[], Sequence[Any]]) -> GaugeSource:
    """Gauges for the virtqueues ``rings()`` returns (``Vring`` objects).

    ``pending``: chains the driver made available that the daemon has not
    popped yet (avail idx - last avail idx, mod 2^16: virtio 1.x 2.7.6);
    ``inflight``: popped, running in a worker thread, not yet on the used ring.
    """

    def read() -> Iterator[Gauge]:
        for ring in rings():
            q = ring.queue
            if q is None:
                continue
            labels = (("queue", str(ring.index)),)
            worker = ring.served_by
            last = worker.last_avail_idx if worker is not None else q.last_avail_idx
            try:
                pending = (q.avail_idx() - last) & 0xFFFF
            except (OSError, ValueError):
                pending = 0  # memory unmapped under us: the ring is going away
            yield Gauge("queue_pending", "Available chains not yet taken.", pending, labels)
            yield Gauge("queue_inflight", "Taken, reply not yet used.", ring.inflight, labels)

    return read


def table_gauges(inodes: Callable[[], int], handles: Callable[[], int]) -> GaugeSource:
    """Gauges for the filesystem's inode and handle tables."""

    def read() -> Iterator[Gauge]:
        yield Gauge("open_inodes", "Inodes the guest holds references to.", inodes())
        yield Gauge("open_handles", "Open file and directory handles.", handles())

    return read
