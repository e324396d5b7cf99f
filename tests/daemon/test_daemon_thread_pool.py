"""``--thread-pool-size``: many requests in flight, completed out of order.

The front-end keeps up to ~40 requests outstanding on a small ring (so the
indices wrap many times), mixing cheap ones (GETATTR, LOOKUP hit and miss)
with reads of up to 128 KiB, and FORGETs on the hiprio queue; every used
element, reply header and byte read is checked by the test driver and here.
This is the guest-free form of the soak test (tests/guest/test_soak.py):
it found the torn ring-index stores (see ``virtqueue.index_view``) in about
one run in three.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_support import HostTree, finish_daemon

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess
from virtiofsd_py.testing.frontend.fuse_client import FuseClient, Pending
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend

SECONDS = 4.0
RING = 128


@pytest.fixture
def pooled(host_tree: HostTree, tmp_path: Path) -> Iterator[FuseClient]:
    d = DaemonProcess(host_tree.root, tmp_path / "run", extra_args=["--thread-pool-size", "4"])
    d.start()
    fe = VhostUserFrontend.connect(d.socket_path)
    try:
        fe.connect_and_start(queues=2, queue_size=RING)
        client = FuseClient(fe, timeout=30)
        client.init()
        yield client
    finally:
        fe.close()
        finish_daemon(d)


def test_many_requests_in_flight_complete_once_and_intact(
    pooled: FuseClient, host_tree: HostTree
) -> None:
    c = pooled
    rnd = random.Random(7)
    big = c.lookup(abi.FUSE_ROOT_ID, "big.bin")
    fh = c.open(big.nodeid).fh
    q = c.fe.queues[1]
    outstanding: list[Pending] = []
    expect: dict[int, bytes] = {}
    hits = completed = submitted = 0
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline or outstanding:
        room = q.num_free // 40 if time.monotonic() < deadline else 0
        for _ in range(min(rnd.randrange(1, 40), room)):
            op = rnd.randrange(4)
            if op == 0:
                p = c.submit(abi.FUSE_GETATTR, 1, abi.GETATTR_IN.pack(0, 0, 0), abi.ATTR_OUT.size)
            elif op == 1:
                p = c.submit(abi.FUSE_LOOKUP, 1, b"small.txt\0", abi.ENTRY_OUT.size)
                hits += 1
            elif op == 2:
                size = rnd.choice((4096, 65536, 131072))
                off = rnd.randrange(len(host_tree.big) - size)
                args = abi.READ_IN.pack(fh, off, size, 0, 0, 0, 0)
                p = c.submit(abi.FUSE_READ, big.nodeid, args, size)
                expect[p.unique] = host_tree.big[off : off + size]
            else:
                p = c.submit(abi.FUSE_LOOKUP, 1, b"no-such-file\0", abi.ENTRY_OUT.size)
            outstanding.append(p)
            submitted += 1
        for used in q.wait_used(30):
            assert isinstance(used.chain.token, Pending)
            used.chain.token.used = used
        still = []
        for p in outstanding:
            if not p.done:
                still.append(p)
                continue
            reply = c.reply(p)
            completed += 1
            if p.unique in expect:
                assert reply.error == 0 and reply.payload == expect.pop(p.unique)
            elif p.opcode == abi.FUSE_LOOKUP:
                assert reply.error in (0, -2)
        outstanding = still
        if hits >= 100:
            small = c.lookup(abi.FUSE_ROOT_ID, "small.txt").nodeid
            c.forget(small, hits + 1)
            hits = 0
    assert completed == submitted > 1000
    assert not expect
    c.release(big.nodeid, fh)
    assert c.getattr(abi.FUSE_ROOT_ID).ino == host_tree.root.stat().st_ino
