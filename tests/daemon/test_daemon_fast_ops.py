"""The daemon answers READs of a handle on its fast operations while the same
handle is released and its fd number reused by other OPENs, in a thread
pool: every READ gets the released file's bytes or EBADF, never another
file's (the fast operations' tables, virtiofsd_py/fastops).  Run in both
cores by the test script.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_support import finish_daemon

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess
from virtiofsd_py.testing.frontend.fuse_client import FuseClient, Pending
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend

SECONDS = 3.0
SIZE = 16384


@pytest.fixture
def client(tmp_path: Path) -> Iterator[FuseClient]:
    share = tmp_path / "share"
    share.mkdir()
    (share / "x").write_bytes(b"X" * SIZE)
    (share / "y").write_bytes(b"Y" * SIZE)
    d = DaemonProcess(share, tmp_path / "run", extra_args=["--thread-pool-size", "4"])
    d.start()
    fe = VhostUserFrontend.connect(d.socket_path)
    try:
        fe.connect_and_start(queues=2, queue_size=256)
        c = FuseClient(fe, timeout=30)
        c.init()
        yield c
    finally:
        fe.close()
        finish_daemon(d)


def test_reads_racing_release_never_see_another_file(client: FuseClient) -> None:
    c = client
    x = c.lookup(abi.FUSE_ROOT_ID, "x").nodeid
    y = c.lookup(abi.FUSE_ROOT_ID, "y").nodeid
    fh = c.open(x, os.O_RDONLY).fh
    spare: list[int] = []
    reads = bad = ebadf = 0
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        batch: list[Pending] = [
            c.submit(abi.FUSE_READ, x, abi.READ_IN.pack(fh, 0, SIZE, 0, 0, 0, 0), SIZE)
            for _ in range(12)
        ]
        release = c.submit(abi.FUSE_RELEASE, x, abi.RELEASE_IN.pack(fh, 0, 0, 0))
        # New opens right behind the release: the freed fd number goes to one.
        opens_y = [c.submit(abi.FUSE_OPEN, y, abi.OPEN_IN.pack(os.O_RDONLY, 0), 16) for _ in "ab"]
        open_x = c.submit(abi.FUSE_OPEN, x, abi.OPEN_IN.pack(os.O_RDONLY, 0), 16)
        for old in spare:
            batch.append(c.submit(abi.FUSE_RELEASE, y, abi.RELEASE_IN.pack(old, 0, 0, 0)))
        c.wait([*batch, release, *opens_y, open_x])
        for p in batch[:12]:
            r = c.reply(p)
            reads += 1
            if r.error == -errno.EBADF:
                ebadf += 1
            elif r.error != 0 or r.payload != b"X" * SIZE:
                bad += 1
        for p in batch[12:]:
            assert c.reply(p).error == 0
        assert c.reply(release).error == 0
        spare = [abi.OPEN_OUT.unpack_from(c.reply(p).payload)[0] for p in opens_y]
        fh = abi.OPEN_OUT.unpack_from(c.reply(open_x).payload)[0]
    assert bad == 0, f"{bad} of {reads} reads got another file's bytes or an error"
    assert reads > ebadf  # most reads were answered with the file's bytes
