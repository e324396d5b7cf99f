"""Metrics: counting on the hot path, the Prometheus rendering, the server, the daemon.

Prometheus text format: https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from virtiofsd_py.app.metrics import BUCKETS, MIN_BIT, Gauge, Metrics, OpStats
from virtiofsd_py.app.metrics_server import (
    AddressError,
    MetricsAddress,
    MetricsServer,
    parse_address,
)
from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess, is_own_daemon
from virtiofsd_py.testing.frontend.fuse_client import FuseClient, FuseError
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend

LINE = re.compile(r'^([a-z_]+)(?:\{((?:[a-z_]+="[^"]*",?)*)\})? (\S+)$')


def request(opcode: int, unique: int = 2) -> list[memoryview]:
    return [memoryview(abi.IN_HEADER.pack(40, opcode, unique, 1, 0, 0, 1, 0, 0))]


def fake_handler(err: int = 0, *, sleep_ns: int = 0) -> object:
    def handle(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        if sleep_ns:
            deadline = time.perf_counter_ns() + sleep_ns
            while time.perf_counter_ns() < deadline:
                pass
        unique = struct.unpack_from("<Q", readable[0], 8)[0]
        abi.OUT_HEADER.pack_into(writable[0], 0, 16, -err, unique)
        return 16

    return handle


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a Prometheus text page; every line must be a comment or a sample."""
    out = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ .+$", line), line
            continue
        m = LINE.match(line)
        assert m, f"not a sample line: {line!r}"
        labels = frozenset(re.findall(r'([a-z_]+)="([^"]*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **lb: str
) -> float:
    return samples[(f"virtiofsd_py_{name}", frozenset(lb.items()))]


# -- counting --------------------------------------------------------------------
def test_counts_requests_errors_and_latency_by_opcode() -> None:
    m = Metrics()
    ok = m.instrument(fake_handler())  # type: ignore[arg-type]
    enoent = m.instrument(fake_handler(errno.ENOENT))  # type: ignore[arg-type]
    out = [memoryview(bytearray(64))]
    for _ in range(3):
        assert ok(request(abi.FUSE_GETATTR), out) == 16
    assert enoent(request(abi.FUSE_LOOKUP), out) == 16
    assert ok(request(abi.FUSE_LOOKUP), out) == 16
    stats = {s.opcode: s for s in m.op_stats()}
    assert set(stats) == {abi.FUSE_GETATTR, abi.FUSE_LOOKUP}
    assert (stats[abi.FUSE_GETATTR].requests, stats[abi.FUSE_GETATTR].errors) == (3, 0)
    assert (stats[abi.FUSE_LOOKUP].requests, stats[abi.FUSE_LOOKUP].errors) == (2, 1)
    assert sum(stats[abi.FUSE_GETATTR].buckets) == 3
    assert stats[abi.FUSE_GETATTR].sum_ns > 0
    assert m.errnos() == {errno.ENOENT: 1}


def test_no_reply_and_odd_requests_are_counted_without_errors() -> None:
    m = Metrics()
    h = m.instrument(lambda r, w: 0)
    h(request(abi.FUSE_FORGET), [])
    h([memoryview(b"\x01")], [])  # too short to have an opcode
    h(request(abi.CUSE_INIT), [])  # beyond the table: the OTHER slot
    stats = {s.opcode: s for s in m.op_stats()}
    assert stats[abi.FUSE_FORGET].requests == 1
    assert stats[0].requests == 2
    assert all(s.errors == 0 for s in stats.values())
    assert 'opcode="OTHER"' in m.prometheus()


def test_latency_lands_in_the_right_bucket() -> None:
    m = Metrics()
    slow = m.instrument(fake_handler(sleep_ns=3 << 20))  # type: ignore[arg-type]
    slow(request(abi.FUSE_READ), [memoryview(bytearray(16))])
    (s,) = m.op_stats()
    (i,) = [i for i, n in enumerate(s.buckets) if n]
    # 3 Mi ns has bit_length 22: bucket 22 - MIN_BIT (a preempted run may land higher).
    assert i >= (3 << 20).bit_length() - MIN_BIT
    assert s.quantile_ns(0.5) == 1 << (MIN_BIT + i)
    assert s.sum_ns >= 3 << 20


def test_quantiles() -> None:
    buckets = [0] * BUCKETS
    buckets[0], buckets[5] = 90, 10
    s = OpStats(abi.FUSE_READ, 100, 0, 0, tuple(buckets))
    assert s.quantile_ns(0.5) == 1 << MIN_BIT
    assert s.quantile_ns(0.99) == 1 << (MIN_BIT + 5)
    assert OpStats(1, 0, 0, 0, tuple([0] * BUCKETS)).quantile_ns(0.5) == 0


def test_no_increment_is_lost_across_threads() -> None:
    m = Metrics()
    h = m.instrument(fake_handler())  # type: ignore[arg-type]
    per_thread = 5000

    def work() -> None:
        out = [memoryview(bytearray(16))]
        req = request(abi.FUSE_GETATTR)
        for _ in range(per_thread):
            h(req, out)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (s,) = m.op_stats()
    assert s.requests == 4 * per_thread
    assert sum(s.buckets) == 4 * per_thread


def test_prometheus_page_is_well_formed_and_consistent() -> None:
    m = Metrics()
    m.add_gauges(lambda: [Gauge("queue_pending", "x", 3, (("queue", "1"),))])
    ok = m.instrument(fake_handler())  # type: ignore[arg-type]
    bad = m.instrument(fake_handler(errno.EACCES))  # type: ignore[arg-type]
    out = [memoryview(bytearray(16))]
    ok(request(abi.FUSE_OPEN), out)
    bad(request(abi.FUSE_OPEN), out)
    samples = parse(m.prometheus())
    assert sample(samples, "fuse_requests_total", opcode="OPEN") == 2
    assert sample(samples, "fuse_errors_total", opcode="OPEN") == 1
    assert sample(samples, "fuse_errno_total", errno="EACCES") == 1
    assert sample(samples, "fuse_request_duration_seconds_count", opcode="OPEN") == 2
    assert sample(samples, "fuse_request_duration_seconds_bucket", opcode="OPEN", le="+Inf") == 2
    buckets = sorted(
        (float(dict(k[1])["le"]), v)
        for k, v in samples.items()
        if k[0].endswith("_bucket") and dict(k[1])["le"] != "+Inf"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert sample(samples, "queue_pending", queue="1") == 3
    assert sample(samples, "open_fds") > 0
    lines = m.summary_lines()
    assert any(line.startswith("metrics: OPEN requests=2 errors=1 ") for line in lines)
    assert any("EACCES=1" in line for line in lines)


def test_fast_operation_counts_join_the_counters_untimed() -> None:
    m = Metrics()
    ok = m.instrument(fake_handler())  # type: ignore[arg-type]
    ok(request(abi.FUSE_GETATTR), [memoryview(bytearray(16))])
    m.add_fast_counts(lambda: {(abi.FUSE_GETATTR, 0): 5, (abi.FUSE_GETATTR, errno.ENOENT): 2})
    (s,) = m.op_stats()
    assert (s.requests, s.errors, s.fast, s.timed_requests) == (8, 2, 7, 1)
    assert m.errnos() == {errno.ENOENT: 2}
    samples = parse(m.prometheus())
    assert sample(samples, "fuse_requests_total", opcode="GETATTR") == 8
    assert sample(samples, "fuse_request_duration_seconds_count", opcode="GETATTR") == 1
    assert any("GETATTR requests=8 errors=2 fast=7 " in line for line in m.summary_lines())


# -- addresses and the server ------------------------------------------------------
@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("/run/m.sock", MetricsAddress(path="/run/m.sock")),
        ("unix:rel.sock", MetricsAddress(path="rel.sock")),
        ("9100", MetricsAddress(host="127.0.0.1", port=9100)),
        ("127.0.0.1:9100", MetricsAddress(host="127.0.0.1", port=9100)),
        ("127.1.2.3:9100", MetricsAddress(host="127.1.2.3", port=9100)),
        ("localhost:9100", MetricsAddress(host="127.0.0.1", port=9100)),
        ("[::1]:9100", MetricsAddress(host="::1", port=9100)),
    ],
)
def test_accepted_addresses(addr: str, expected: MetricsAddress) -> None:
    assert parse_address(addr) == expected


@pytest.mark.parametrize(
    "addr", ["0.0.0.0:9100", "10.0.0.1:9100", "[::]:9100", "example.com:80", "70000", "unix:", "x"]
)
def test_refused_addresses(addr: str) -> None:
    with pytest.raises(AddressError):
        parse_address(addr)


async def http_get(connect: object, path: str = "/metrics") -> tuple[str, str]:
    reader, writer = await connect()  # type: ignore[operator]
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return head, body


async def test_server_on_a_unix_socket(tmp_path: Path) -> None:
    m = Metrics()
    m.instrument(fake_handler())(request(abi.FUSE_STATFS), [memoryview(bytearray(16))])  # type: ignore[arg-type]
    path = str(tmp_path / "metrics.sock")
    server = MetricsServer(m, parse_address(path))
    await server.start()
    try:
        assert os.stat(path).st_mode & 0o077 == 0
        head, body = await http_get(lambda: asyncio.open_unix_connection(path))
        assert head.startswith("HTTP/1.0 200 ")
        assert "text/plain; version=0.0.4" in head
        assert sample(parse(body), "fuse_requests_total", opcode="STATFS") == 1
        head, _ = await http_get(lambda: asyncio.open_unix_connection(path), "/other")
        assert head.startswith("HTTP/1.0 404 ")
    finally:
        await server.close()
    assert not os.path.exists(path)


async def test_server_on_loopback_tcp() -> None:
    server = MetricsServer(Metrics(), MetricsAddress(host="127.0.0.1", port=0))
    await server.start()
    try:
        port = int(server.bound().rsplit(":", 1)[1])
        head, body = await http_get(lambda: asyncio.open_connection("127.0.0.1", port))
        assert head.startswith("HTTP/1.0 200 ")
        assert "virtiofsd_py_uptime_seconds" in body
    finally:
        await server.close()


async def test_server_answers_garbage_with_400(tmp_path: Path) -> None:
    path = str(tmp_path / "m.sock")
    server = MetricsServer(Metrics(), MetricsAddress(path=path))
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"hello\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert data.startswith(b"HTTP/1.0 400 ")
    finally:
        await server.close()


# -- the daemon ------------------------------------------------------------------
own = pytest.mark.skipif(not is_own_daemon(), reason="tests virtiofsd-py's own options")


def wait_for(cond: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def scrape(path: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200 "), head
    return parse(body)


@own
@pytest.mark.parametrize(
    "sandbox",
    [
        "none",
        # Past pivot_root nothing can be imported: what renders the page must
        # have been imported before (confine/sandbox.py preload).
        pytest.param(
            "namespace",
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="the namespace sandbox needs root"),
        ),
    ],
)
def test_daemon_serves_metrics_and_dumps_them_on_sigusr1(tmp_path: Path, sandbox: str) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"x")
    mpath = str(tmp_path / "metrics.sock")
    extra = ["--metrics", f"unix:{mpath}", "--sandbox", sandbox]
    d = DaemonProcess(share, tmp_path / "run", extra_args=extra).start()
    fe = VhostUserFrontend.connect(d.socket_path)
    try:
        wait_for(lambda: os.path.exists(mpath), "the metrics socket")
        fe.connect_and_start(queues=2, queue_size=128)
        fuse = FuseClient(fe)
        fuse.init()
        fuse.lookup(abi.FUSE_ROOT_ID, "f")
        with pytest.raises(FuseError):
            fuse.lookup(abi.FUSE_ROOT_ID, "missing")
        s = scrape(mpath)
        assert sample(s, "fuse_requests_total", opcode="INIT") == 1
        assert sample(s, "fuse_requests_total", opcode="LOOKUP") == 2
        assert sample(s, "fuse_errors_total", opcode="LOOKUP") == 1
        assert sample(s, "fuse_errno_total", errno="ENOENT") == 1
        assert sample(s, "open_inodes") >= 2  # the root and "f"
        assert sample(s, "queue_pending", queue="1") == 0
        assert sample(s, "queue_inflight", queue="1") == 0
        assert sample(s, "open_fds") > 0
        os.kill(d.pid, signal.SIGUSR1)
        wait_for(lambda: "metrics: LOOKUP requests=2 errors=1" in d.log(), "the SIGUSR1 dump")
        # The dump is several log lines, written one by one.
        wait_for(lambda: "errors by errno ENOENT=1" in d.log(), "the errno line of the dump")
        # Debug level traces every request by name.
        assert re.search(r"FUSE LOOKUP unique=\d+ nodeid=1 ", d.log())
    finally:
        fe.close()
        assert d.stop(10) == 0, d.log()
    assert not os.path.exists(mpath)


@own
def test_daemon_refuses_a_public_metrics_address(tmp_path: Path) -> None:
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "virtiofsd_py", "--shared-dir", str(tmp_path),
         "--socket-path", str(tmp_path / "s"), "--metrics", "0.0.0.0:9100"],
        capture_output=True, text=True, timeout=20,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert res.returncode == 2
    assert "non-loopback" in res.stderr
    assert not (tmp_path / "s").exists()


def test_untimed_counts_without_latency() -> None:
    m = Metrics()
    h = m.instrument(fake_handler(errno.EIO), timed=False)  # type: ignore[arg-type]
    h(request(abi.FUSE_FSYNC), [memoryview(bytearray(16))])
    (s,) = m.op_stats()
    assert (s.requests, s.errors, s.sum_ns, sum(s.buckets)) == (1, 1, 0, 0)
    page = m.prometheus()
    assert "duration_seconds_bucket" not in page
    assert sample(parse(page), "fuse_errors_total", opcode="FSYNC") == 1
    assert m.summary_lines()[0] == "metrics: FSYNC requests=1 errors=1"


# -- request tracing ---------------------------------------------------------------
@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO])
def test_requests_are_traced_by_name_only_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, level: int
) -> None:
    from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
    from virtiofsd_py.fuse.dispatcher import OUR_MAX_MINOR, Dispatcher

    caplog.set_level(level, logger="virtiofsd_py.fuse.dispatcher")
    fs = PassthroughFS(PassthroughConfig(shared_dir=tmp_path))
    try:
        d = Dispatcher(fs)  # decides whether to trace, once
        out = [memoryview(bytearray(16)), memoryview(bytearray(4096))]
        init = abi.INIT_IN.pack(7, OUR_MAX_MINOR, 65536, 0, 0, *([0] * 11))
        hdr = abi.IN_HEADER.pack(40 + len(init), abi.FUSE_INIT, 2, 0, 0, 0, 1, 0, 0)
        d.handle([memoryview(hdr + init)], out)
        name = b"missing\0"
        hdr = abi.IN_HEADER.pack(40 + len(name), abi.FUSE_LOOKUP, 4, 1, 0, 0, 7, 0, 0)
        d.handle([memoryview(hdr + name)], out)
    finally:
        fs.close()
    traced = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    if level == logging.DEBUG:
        assert "FUSE LOOKUP unique=4 nodeid=1 uid=0 gid=0 pid=7 len=48" in traced
        # The error names the request too.
        assert any(m.startswith("FUSE LOOKUP unique=4 nodeid=1: ") for m in traced)
    else:
        assert traced == []
