"""A misbehaving front-end: the daemon logs, cleans up and carries on or exits.

vhost-user.rst gives the front-end no way to resynchronise a broken stream,
so a disconnect ends the daemon (status 0, no traceback); everything else
must leave it serving with no fd or memory growth.  Leaks are counted over
many iterations of the same fault: ``/proc/PID/fd``, the daemon's mappings
of guest memory (``/proc/PID/maps``) and its RSS.

What one bad message does is in test_daemon_badinput.py; here it is the
repetition and the faults that span several messages.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest
from daemon_support import TRACEBACK, HostTree

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess
from virtiofsd_py.testing.frontend.driver import GuestMemory
from virtiofsd_py.testing.frontend.fuse_client import FuseClient
from virtiofsd_py.testing.frontend.vhost_user import Nack, VhostUserFrontend
from virtiofsd_py.vhost.protocol import (
    DEVICE_STATE_LOAD,
    DEVICE_STATE_SAVE,
    FLAG_NEED_REPLY,
    HEADER,
    MEM_REGION,
    MEM_TABLE_HEAD,
    VERSION,
    MessageType,
)
from virtiofsd_py.virtio.types import MemoryRegion

ITERATIONS = 60
#: RSS growth allowed over all iterations, after a warm-up (allocator noise).
RSS_SLACK = 8 << 20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def mappings_of(pid: int, name: str) -> int:
    """How many mappings of the memfd ``name`` the daemon has."""
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if f"/memfd:{name}" in line)


class Usage:
    """fds, guest-memory mappings and RSS of the daemon, before and after."""

    def __init__(self, d: DaemonProcess, mem_name: str = "guest-ram") -> None:
        self.d = d
        self.mem_name = mem_name
        self.fds = d.fd_count()
        self.maps = mappings_of(d.pid, mem_name)
        self.rss = rss(d.pid)

    def check(self) -> None:
        fds = self.d.fd_count()
        assert fds == self.fds, f"fd leak: {self.fds} -> {fds}\n" + "\n".join(self.d.fd_targets())
        maps = mappings_of(self.d.pid, self.mem_name)
        assert maps == self.maps, f"guest memory mapped {maps} times, was {self.maps}"
        grown = rss(self.d.pid) - self.rss
        assert grown < RSS_SLACK, f"RSS grew by {grown >> 10} KiB"


@pytest.fixture
def running(frontend: VhostUserFrontend, host_tree: HostTree) -> Iterator[FuseClient]:
    frontend.connect_and_start(queues=2, queue_size=256)
    c = FuseClient(frontend)
    c.init()
    yield c


def warm_up(c: FuseClient, tree: HostTree) -> None:
    for _ in range(5):
        tree.check_serving(c.fe)


# -- fds nobody asked for -------------------------------------------------------------------
def test_unexpected_fds_are_closed_every_time(
    running: FuseClient, daemon: DaemonProcess, host_tree: HostTree
) -> None:
    fe = running.fe
    warm_up(running, host_tree)
    usage = Usage(daemon)
    for i in range(ITERATIONS):
        fds = [os.memfd_create(f"stray{i}"), os.eventfd(0), *os.pipe()]
        os.ftruncate(fds[0], 1 << 20)
        try:
            if i % 3 == 0:
                fe.send(MessageType.GET_FEATURES, fds=fds)
                fe.recv_reply(MessageType.GET_FEATURES)
            elif i % 3 == 1:
                fe.send(MessageType.SET_VRING_ENABLE, struct.pack("=II", 1, 1), fds=fds,
                        flags=VERSION | FLAG_NEED_REPLY)  # fmt: skip
                assert fe.recv_reply(MessageType.SET_VRING_ENABLE).u64() == 0
            else:  # an unknown request with fds: NAK'ed, fds closed
                fe.send(99, b"", fds=fds, flags=VERSION | FLAG_NEED_REPLY)
                assert fe.recv_reply(99).u64() != 0
        finally:
            for fd in fds:
                os.close(fd)
    host_tree.check_serving(fe)
    usage.check()
    assert fe.is_open()


# -- a new memory table under running rings ----------------------------------------------------
def test_second_set_mem_table_while_rings_run(
    running: FuseClient, daemon: DaemonProcess, host_tree: HostTree
) -> None:
    """QEMU resends the table on hotplug; old mappings go once no request holds them."""
    fe = running.fe
    assert fe.mem is not None
    ram2 = GuestMemory(1 << 20, gpa_base=fe.mem.gpa_end + (1 << 20), user_addr=0x7F55_0000_0000,
                       name="ram2")  # fmt: skip
    ram2_region = MemoryRegion(ram2.gpa_base, ram2.size, ram2.user_addr, 0)
    warm_up(running, host_tree)
    usage = Usage(daemon)
    for i in range(ITERATIONS):
        # Requests in flight while the table changes under them.
        pendings = [
            running.submit(abi.FUSE_GETATTR, 1, abi.GETATTR_IN.pack(0, 0, 0), abi.ATTR_OUT.size)
            for _ in range(4)
        ]
        if i % 2:
            fe.set_mem_table([(fe.region, fe.mem.fd)])
        else:  # hotplug and unplug of a second region
            fe.add_mem_reg(ram2_region, ram2.fd)
            fe.rem_mem_reg(ram2_region)
        running.wait(pendings)
        for pending in pendings:
            assert running.reply(pending).error == 0
        host_tree.check_serving(fe)
    usage.check()
    assert mappings_of(daemon.pid, "ram2") == 0
    ram2.close()


# -- disconnects -------------------------------------------------------------------------------
def _mem_table_message(fe: VhostUserFrontend) -> bytes:
    r = fe.region
    payload = MEM_TABLE_HEAD.pack(1, 0) + MEM_REGION.pack(
        r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset
    )
    return HEADER.pack(MessageType.SET_MEM_TABLE, VERSION, len(payload)) + payload


@pytest.mark.parametrize("cut", [1, 11, 12, 20, 44])
def test_disconnect_mid_message_with_fds_and_open_files(
    running: FuseClient, daemon: DaemonProcess, host_tree: HostTree, cut: int
) -> None:
    """Handles open, a SET_MEM_TABLE cut at ``cut`` bytes with its fd, then gone."""
    fe = running.fe
    assert fe.mem is not None
    e = running.lookup(1, "big.bin")
    fhs = [running.open(e.nodeid).fh for _ in range(5)]
    assert fhs
    msg = _mem_table_message(fe)
    fe.send_raw(msg[:cut], fds=[fe.mem.fd])
    fe.sock.shutdown(socket.SHUT_RDWR)
    fe.close()
    assert daemon.wait(10) == 0, daemon.log()
    # (the daemon fixture checks status 0 and no traceback again)


def test_front_end_dies_during_save(
    running: FuseClient, daemon: DaemonProcess, host_tree: HostTree
) -> None:
    """SET_DEVICE_STATE_FD(SAVE), then the front-end and its pipe end vanish."""
    fe = running.fe
    for i in range(50):  # some state: many nodes in the table
        running.lookup(1, "many")
        del i
    fe.stop()
    r, w = os.pipe()
    try:
        assert fe.set_device_state_fd(DEVICE_STATE_SAVE, w) & 0xFF == 0
    finally:
        os.close(w)
    os.close(r)
    fe.close()
    assert daemon.wait(10) == 0, daemon.log()


def test_front_end_dies_during_load(
    running: FuseClient, daemon: DaemonProcess, host_tree: HostTree
) -> None:
    """SET_DEVICE_STATE_FD(LOAD), half a state written, then the front-end is gone."""
    fe = running.fe
    state = fe_state(fe)
    fe.stop()
    r, w = os.pipe()
    try:
        assert fe.set_device_state_fd(DEVICE_STATE_LOAD, r) & 0xFF == 0
    finally:
        os.close(r)
    os.write(w, state[: len(state) // 2])
    fe.close()
    os.close(w)
    assert daemon.wait(10) == 0, daemon.log()


def fe_state(fe: VhostUserFrontend) -> bytes:
    """A real saved state of this daemon (then the rings are restarted)."""
    bases = fe.stop()
    state = fe.save_state()
    for q, base in zip(fe.queues, bases, strict=True):
        fe.start_queue(q, base=base)
        fe.set_vring_enable(q.index, True)
    return state


def test_aborted_transfers_leak_nothing(
    running: FuseClient, daemon: DaemonProcess, host_tree: HostTree
) -> None:
    """Over and over: the reader closes early, a LOAD gets garbage or half a state."""
    fe = running.fe
    warm_up(running, host_tree)
    fe.stop()
    good = fe.save_state()
    usage = Usage(daemon)
    for i in range(ITERATIONS):
        r, w = os.pipe()
        if i % 3 == 0:  # SAVE, reader gone before reading
            os.close(r)
            assert fe.set_device_state_fd(DEVICE_STATE_SAVE, w) & 0xFF == 0
            os.close(w)
            fe.check_device_state()  # either outcome; it must answer
            continue
        assert fe.set_device_state_fd(DEVICE_STATE_LOAD, r) & 0xFF == 0
        os.close(r)
        os.write(w, os.urandom(64) if i % 3 == 1 else good[: len(good) // 2])
        os.close(w)
        assert fe.check_device_state() != 0, "a broken state was accepted"
    usage.check()
    assert TRACEBACK not in daemon.log()
    assert fe.is_open()


# -- a memory table that lies about its fd ---------------------------------------------------
def test_region_larger_than_its_fd_is_refused(
    running: FuseClient, daemon: DaemonProcess, host_tree: HostTree
) -> None:
    """Mapping past the end of the file would SIGBUS on first touch: NAK it instead."""
    fe = running.fe
    small = os.memfd_create("small-ram")
    os.ftruncate(small, 1 << 20)
    try:
        region = MemoryRegion(0x1_0000_0000, 64 << 20, 0x7F66_0000_0000, 0)
        with pytest.raises(Nack):
            fe.add_mem_reg(region, small)
        # A region that fits is fine, and the device serves on.
        fe.add_mem_reg(MemoryRegion(0x1_0000_0000, 1 << 20, 0x7F66_0000_0000, 0), small)
    finally:
        os.close(small)
    host_tree.check_serving(fe)
    assert "ends past its file" in daemon.log()
