"""Device state transfer between two daemon processes, as two QEMUs drive it.

The source daemon serves a FUSE session (lookups, open files), is stopped
and saves its state through a pipe; a second daemon process on the same
directory loads it, and the same node ids and file handles work there
without a new FUSE_INIT.  Also: what a destination does with broken states,
and the dirty log of a running daemon.
"""

from __future__ import annotations

import mmap
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess
from virtiofsd_py.testing.frontend.fuse_client import FuseClient, FuseError
from virtiofsd_py.testing.frontend.vhost_user import Nack, VhostUserFrontend
from virtiofsd_py.vhost.protocol import (
    LOG_DESC,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    MessageType,
    ProtocolFeature,
    bit,
)

pytestmark = pytest.mark.ours_only


class Side:
    def __init__(self, share: Path, run: Path, *extra: str) -> None:
        self.daemon = DaemonProcess(share, run, extra_args=list(extra)).start()
        self.fe = VhostUserFrontend.connect(self.daemon.socket_path)

    def close(self) -> int | None:
        self.fe.close()
        status = self.daemon.wait(10)
        if status is None:
            self.daemon.kill()
        return status


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    (d / "dir").mkdir(parents=True)
    (d / "dir" / "data").write_bytes(bytes(range(256)) * 64)
    (d / "notes").write_bytes(b"line 1\n")
    return d


@pytest.fixture
def sides(share: Path, tmp_path: Path) -> Iterator[tuple[Side, Side]]:
    a = Side(share, tmp_path / "a")
    b = Side(share, tmp_path / "b")
    yield a, b
    assert a.close() == 0, a.daemon.log()
    assert b.close() == 0, b.daemon.log()


def test_state_moves_to_a_second_daemon(sides: tuple[Side, Side], share: Path) -> None:
    a, b = sides
    a.fe.connect_and_start(queues=2, queue_size=256)
    src = FuseClient(a.fe)
    src.init()
    d = src.lookup(abi.FUSE_ROOT_ID, "dir")
    f = src.lookup(d.nodeid, "data")
    fh = src.open(f.nodeid).fh
    n = src.lookup(abi.FUSE_ROOT_ID, "notes")
    wfh = src.open(n.nodeid, os.O_RDWR).fh
    bases = a.fe.stop()
    state = a.fe.save_state()
    doc = msgpack.unpackb(state)
    assert doc["format"] == "virtiofsd-py/device-state"
    assert {i["id"] for i in doc["fs"]["inodes"]} == {d.nodeid, f.nodeid, n.nodeid}

    # The destination: a normal start with the source's ring bases, the state
    # loaded before the rings run (QEMU's order), then the same ids work.
    b.fe.connect_and_start(queues=2, queue_size=256, start_rings=False)
    assert b.fe.load_state(state) == 0
    for q, base in zip(b.fe.queues, bases, strict=True):
        # The guest's rings as migrated memory would hold them: both at the base.
        q.avail_idx = q.kicked_idx = q.last_used = base
        q._set_u16(q.avail_gpa + 2, base)
        q._set_u16(q.used_gpa + 2, base)
        b.fe.start_queue(q, base=base)
        b.fe.set_vring_enable(q.index, True)
    dst = FuseClient(b.fe)
    dst._unique = src._unique
    assert dst.read(f.nodeid, fh, 0, 512) == (share / "dir" / "data").read_bytes()[:512]
    assert dst.getattr(d.nodeid).ino == (share / "dir").stat().st_ino
    assert dst.write(n.nodeid, wfh, 7, b"line 2\n") == 7
    assert (share / "notes").read_bytes() == b"line 1\nline 2\n"
    # New lookups get new ids, never one of the migrated ones.
    fresh = dst.lookup(abi.FUSE_ROOT_ID, "dir")
    assert fresh.nodeid == d.nodeid  # the same inode keeps its node
    with pytest.raises(FuseError):
        dst.read(f.nodeid, fh + 100, 0, 10)


def test_broken_state_fails_the_check_and_the_daemon_lives_on(
    sides: tuple[Side, Side],
) -> None:
    _, b = sides
    b.fe.connect_and_start(queues=2, queue_size=256, start_rings=False)
    assert b.fe.load_state(b"\x81\xa6format\xa3bad") != 0
    assert b.fe.load_state(b"") != 0
    # The device still starts and serves a new session after the failures.
    for q in b.fe.queues:
        b.fe.start_queue(q)
        b.fe.set_vring_enable(q.index, True)
    client = FuseClient(b.fe)
    client.init()
    assert client.lookup(abi.FUSE_ROOT_ID, "notes").nodeid > 1
    assert "cannot load the device state" in b.daemon.log()


def test_rejected_state_is_kept_beside_the_socket_even_in_the_sandbox(
    share: Path, tmp_path: Path
) -> None:
    side = Side(share, tmp_path / "sb", "--sandbox", "namespace")
    try:
        side.fe.connect_and_start(queues=2, queue_size=256, start_rings=False)
        assert side.fe.load_state(b"\x81\xa6format\xa3bad") != 0
        kept = list((tmp_path / "sb").glob("virtiofsd-py-rejected-state-*"))
        assert len(kept) == 1 and kept[0].read_bytes() == b"\x81\xa6format\xa3bad"
        assert "inspect-state" in side.daemon.log()
    finally:
        assert side.close() == 0, side.daemon.log()


def test_transfer_refused_while_running(sides: tuple[Side, Side]) -> None:
    a, _ = sides
    a.fe.connect_and_start(queues=2, queue_size=256)
    with pytest.raises(Nack):
        a.fe.save_state()
    a.fe.stop()
    assert a.fe.save_state()  # once suspended it works


def test_dirty_log_of_a_running_daemon(sides: tuple[Side, Side], share: Path) -> None:
    a, _ = sides
    a.fe.connect_and_start(queues=2, queue_size=256)
    assert a.fe.device_features & bit(VHOST_F_LOG_ALL)
    assert a.fe.has_protocol_feature(ProtocolFeature.LOG_SHMFD)
    client = FuseClient(a.fe)
    client.init()
    mem = a.fe.mem
    assert mem is not None
    size = (mem.gpa_end >> 12) // 8 + 1
    log_fd = os.memfd_create("dirty-log")
    os.ftruncate(log_fd, size)
    try:
        a.fe.send(MessageType.SET_LOG_BASE, LOG_DESC.pack(size, 0), fds=[log_fd])
        assert a.fe.recv_reply(MessageType.SET_LOG_BASE).u64() == 0
        features = (
            bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VHOST_USER_F_PROTOCOL_FEATURES)
        )
        a.fe.set_features(features | bit(VHOST_F_LOG_ALL))
        f = client.lookup(abi.FUSE_ROOT_ID, "notes")
        fh = client.open(f.nodeid).fh
        os.pwrite(log_fd, bytes(size), 0)  # as QEMU after it synced the log
        assert client.read(f.nodeid, fh, 0, 7) == b"line 1\n"
        assert _dirty(log_fd, size)  # the reply's pages were logged while LOG_ALL is on
        a.fe.set_features(features)  # LOG_ALL off: the device keeps working
        assert client.read(f.nodeid, fh, 0, 4) == b"line"
    finally:
        os.close(log_fd)


def _dirty(fd: int, size: int) -> set[int]:
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        return {i * 8 + b for i, byte in enumerate(m[:size]) for b in range(8) if byte >> b & 1}


def test_memory_backend_offers_no_migration(tmp_path: Path) -> None:
    """Its tables cannot move: QEMU is told up front (no LOG_ALL, no DEVICE_STATE),
    and so refuses to migrate, instead of the save failing at the switch-over."""
    command = f"{shlex.quote(sys.executable)} -m virtiofsd_py --socket-path {{socket}}"
    args = ["--backend", "memory", "--sandbox", "none", "--log-level", "debug"]
    daemon = DaemonProcess(tmp_path / "unused", tmp_path / "run", template=command, extra_args=args)
    daemon.start()
    fe = VhostUserFrontend.connect(daemon.socket_path)
    try:
        fe.connect_and_start(queues=2, queue_size=256)
        assert not fe.device_features & bit(VHOST_F_LOG_ALL)
        assert not fe.has_protocol_feature(ProtocolFeature.DEVICE_STATE)
        assert not fe.has_protocol_feature(ProtocolFeature.LOG_SHMFD)
        FuseClient(fe).init()  # and it serves as before
    finally:
        fe.close()
        status = daemon.wait(10)
        if status is None:
            daemon.kill()
    assert status == 0, daemon.log()
    assert "cannot migrate" in daemon.log()
