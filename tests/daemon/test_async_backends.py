"""Async back-ends through the daemon: many requests in flight, misbehaviour.

The back-end (tests/support/async_backends.py, served with ``--backend
FILE:FACTORY``) sleeps in GETATTR and READ for a time that depends on the
file, so requests submitted together complete out of order; the checks
are that every reply lands on its own request, that GET_VRING_BASE waits
for all of them (vhost-user.rst), and that a backend which raises, returns
the wrong type or never returns (until FUSE_INTERRUPT) gets error replies
and log lines, with the daemon serving on and holding no more fds or
memory after 10,000 such requests than after the first few.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from async_backends import FIRST_FILE, SPECIAL, content
from daemon_support import finish_daemon, session

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess
from virtiofsd_py.testing.frontend.fuse_client import FuseClient, Pending
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend

BACKEND = Path(__file__).resolve().parents[1] / "support" / "async_backends.py"
IN_FLIGHT = 100


def template(*extra: str) -> str:
    return (
        f"{sys.executable} -m virtiofsd_py --socket-path {{socket}} --log-level info"
        f" --backend {BACKEND}:SleepyFS --backend-option files=200 " + " ".join(extra)
    )


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path, tmp_path, template=template())
    d.start()
    yield d


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[tuple[VhostUserFrontend, FuseClient]]:
    fe, c = session(daemon)
    c.timeout = 30
    try:
        yield fe, c
    finally:
        fe.close()


def getattr_args() -> bytes:
    return abi.GETATTR_IN.pack(0, 0, 0)


def submit_getattrs(c: FuseClient, nodeids: list[int]) -> list[Pending]:
    pend = [
        c.submit(abi.FUSE_GETATTR, n, getattr_args(), abi.ATTR_OUT.size, kick=False)
        for n in nodeids
    ]
    c.fe.queues[1].kick()
    return pend


def collect(c: FuseClient, count: int) -> list[Pending]:
    """The next ``count`` completions of queue 1, in the order the device used them."""
    order: list[Pending] = []
    q = c.fe.queues[1]
    while len(order) < count:
        for used in q.wait_used(30, min_count=1):
            token = used.chain.token
            assert isinstance(token, Pending)
            token.used = used
            order.append(token)
    return order


def test_hundred_in_flight_complete_out_of_order_each_on_its_request(
    daemon: DaemonProcess, client: tuple[VhostUserFrontend, FuseClient]
) -> None:
    _, c = client
    nodeids = [FIRST_FILE + i for i in range(IN_FLIGHT)]
    pend = submit_getattrs(c, nodeids)
    order = collect(c, IN_FLIGHT)
    assert [p.unique for p in order] != [p.unique for p in pend], "expected reordering"
    for p, nodeid in zip(pend, nodeids, strict=True):
        r = c.reply(p)
        assert r.error == 0
        attr = abi.ATTR_OUT.unpack_from(r.payload)
        assert attr[3] == nodeid  # fuse_attr.ino: the file this request asked about
    # READs in flight too: each reply holds its own file's bytes.
    reads = []
    for i in range(IN_FLIGHT):
        nodeid = FIRST_FILE + i
        args = abi.READ_IN.pack(nodeid, 4096 * (i % 16), 4096, 0, 0, 0, 0)
        reads.append((nodeid, i, c.submit(abi.FUSE_READ, nodeid, args, 4096, kick=False)))
    c.fe.queues[1].kick()
    collect(c, IN_FLIGHT)
    for nodeid, i, p in reads:
        r = c.reply(p)
        assert r.error == 0 and r.payload == content(nodeid, 4096 * (i % 16), 4096)
    finish_daemon(daemon)


def test_get_vring_base_waits_for_every_request_in_flight(
    daemon: DaemonProcess, client: tuple[VhostUserFrontend, FuseClient]
) -> None:
    fe, c = client
    submit_getattrs(c, [FIRST_FILE + i for i in range(IN_FLIGHT)])
    q = fe.queues[1]
    base = fe.get_vring_base(1)
    # GET_VRING_BASE answered: every request is on the used ring already.
    assert base == q.avail_idx
    assert q.used_idx == q.avail_idx
    assert len(q.poll_used()) == IN_FLIGHT
    finish_daemon(daemon)


def interrupt(c: FuseClient, target: int) -> None:
    c.call(abi.FUSE_INTERRUPT, 0, abi.INTERRUPT_IN.pack(target), None, queue=0)


def test_misbehaving_backend_error_replies_daemon_serves_on(
    daemon: DaemonProcess, client: tuple[VhostUserFrontend, FuseClient]
) -> None:
    _, c = client
    for name in (b"raises", b"wrongtype"):
        r = c.request(abi.FUSE_GETATTR, SPECIAL[name], getattr_args(), abi.ATTR_OUT.size)
        assert -r.error == errno.EIO, name
    hung = c.submit(abi.FUSE_GETATTR, SPECIAL[b"hangs"], getattr_args(), abi.ATTR_OUT.size)
    # Others are served while it waits.
    assert c.getattr(FIRST_FILE).ino == FIRST_FILE
    assert not hung.done
    interrupt(c, hung.unique)
    c.wait([hung])
    assert -c.reply(hung).error == errno.EINTR
    assert c.getattr(FIRST_FILE + 1).ino == FIRST_FILE + 1
    log = daemon.log()
    assert "a bug in the backend" in log
    assert "internal error" in log
    finish_daemon(daemon, expect_clean=False)  # the tracebacks logged are the point


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_ten_thousand_bad_requests_no_fd_or_memory_growth(
    daemon: DaemonProcess, client: tuple[VhostUserFrontend, FuseClient]
) -> None:
    _, c = client
    kinds = (b"raises", b"wrongtype", b"hangs")

    def round_of(n: int) -> None:
        done = 0
        while done < n:
            batch = []
            for i in range(min(60, n - done)):
                batch.append(
                    c.submit(
                        abi.FUSE_GETATTR, SPECIAL[kinds[(done + i) % 3]], getattr_args(),
                        abi.ATTR_OUT.size, kick=False,
                    )
                )  # fmt: skip
            c.fe.queues[1].kick()
            hangs = [p for i, p in enumerate(batch) if (done + i) % 3 == 2]
            for p in hangs:
                interrupt(c, p.unique)
            c.wait(batch, timeout=30)
            for i, p in enumerate(batch):
                want = errno.EINTR if (done + i) % 3 == 2 else errno.EIO
                assert -c.reply(p).error == want
            done += len(batch)

    round_of(600)  # warm up: caches, allocator arenas, log buffers
    fds, rss = daemon.fd_count(), vm_rss_kib(daemon.pid)
    round_of(10_000)
    assert daemon.fd_count() <= fds
    grown = vm_rss_kib(daemon.pid) - rss
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB over 10,000 bad requests"
    assert c.getattr(FIRST_FILE).ino == FIRST_FILE
    finish_daemon(daemon, expect_clean=False)


def test_served_confined_when_asked(tmp_path: Path) -> None:
    """--sandbox namespace --seccomp kill given: the factory ran before confinement,
    and the bridge needs no call outside the allow-list."""
    d = DaemonProcess(
        tmp_path, tmp_path, template=template("--sandbox", "namespace", "--seccomp", "kill")
    )
    d.start()
    fe, c = session(d)
    try:
        pend = submit_getattrs(c, [FIRST_FILE + i for i in range(IN_FLIGHT)])
        c.wait(pend, timeout=30)
        for p, i in zip(pend, range(IN_FLIGHT), strict=True):
            assert abi.ATTR_OUT.unpack_from(c.reply(p).payload)[3] == FIRST_FILE + i
    finally:
        fe.close()
    assert "sandbox namespace" in d.log()
    finish_daemon(d)
