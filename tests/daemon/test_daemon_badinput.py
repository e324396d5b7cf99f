"""Malformed input from the front-end and the guest must never crash the daemon.

Each case either leaves the daemon serving (a LOOKUP/GETATTR/READ round trip
succeeds afterwards) or, where the stream cannot be trusted any more (the
framing is broken), the daemon closes the connection and exits cleanly: exit
status 0, no Python traceback in its log (checked by the ``daemon`` fixture
for every test here).

Where the spec leaves a choice, our daemon is held to one outcome ("nack":
REPLY_ACK with a non-zero value and carry on); another daemon
(``VIRTIOFSD_PY_TEST_DAEMON``) may also close the connection.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import TYPE_CHECKING

import pytest

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess, is_own_daemon
from virtiofsd_py.testing.frontend.driver import (
    DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    RawDesc,
    SplitQueue,
)
from virtiofsd_py.testing.frontend.fuse_client import FuseClient
from virtiofsd_py.testing.frontend.vhost_user import ConnectionClosed, VhostUserFrontend
from virtiofsd_py.vhost.protocol import (
    FLAG_NEED_REPLY,
    HEADER,
    MEM_TABLE_HEAD,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_STATE,
    MessageType,
)

if TYPE_CHECKING:
    from daemon_support import HostTree


#: virtiofsd 1.13 does not survive these (its queue thread panics, or the ring
#: stalls): run them against our daemon only.
REFERENCE_BREAKS = pytest.mark.ours_only


# -- helpers ---------------------------------------------------------------------
def ack_or_close(fe: VhostUserFrontend, request: int) -> int | None:
    """The REPLY_ACK value for ``request``, or None if the daemon hung up instead."""
    try:
        return fe.recv_reply(request).u64()
    except ConnectionClosed:
        return None


def expect_rejected(fe: VhostUserFrontend, daemon: DaemonProcess, request: int) -> bool:
    """The message just sent (with NEED_REPLY) must be refused; True if still usable.

    Our daemon must nack it (non-zero REPLY_ACK) and carry on.  Another daemon
    may also accept it, or nack and hang up, or just hang up (then it must exit
    cleanly); the test then only checks that it did not crash.
    """
    value = ack_or_close(fe, request)
    if is_own_daemon():
        assert value is not None, "daemon closed the connection instead of a nack"
        assert value != 0, "daemon accepted a malformed message"
        return True
    # Virtiofsd hangs up right after its nack; a short wait tells which it did.
    if value is None or fe.wait_closed(0.5):
        expect_clean_exit(fe, daemon)
        return False
    return True


def expect_clean_exit(
    fe: VhostUserFrontend, daemon: DaemonProcess, *, logged: str | None = None
) -> None:
    """The daemon hung up and exited with status 0; ours says why (naming ``logged``)."""
    assert fe.wait_closed(5.0), "daemon did not close the connection"
    assert daemon.wait(5.0) == 0, f"daemon exit status {daemon.returncode}"
    if logged is not None and is_own_daemon():
        lines = [ln for ln in daemon.log().splitlines() if "ERROR" in ln or "WARN" in ln]
        assert any(logged in ln for ln in lines), f"no warning or error naming {logged}"


def send_need_reply(fe: VhostUserFrontend, request: int, payload: bytes, **kw: object) -> None:
    fe.send(request, payload, flags=VERSION | FLAG_NEED_REPLY, **kw)  # type: ignore[arg-type]


@pytest.fixture
def started(frontend: VhostUserFrontend) -> VhostUserFrontend:
    """A running device after FUSE_INIT, ready for bad input."""
    frontend.connect_and_start(queues=2, queue_size=256)
    FuseClient(frontend).init()
    return frontend


@pytest.fixture
def before_rings(frontend: VhostUserFrontend) -> VhostUserFrontend:
    """Negotiated, memory table sent, rings not yet set up."""
    frontend.connect_and_start(queues=2, queue_size=256, start_rings=False)
    return frontend


def start_rings(fe: VhostUserFrontend) -> None:
    for q in fe.queues:
        fe.start_queue(q)
        fe.set_vring_enable(q.index, True)
    FuseClient(fe).init()


# -- vhost-user framing and messages ---------------------------------------------
@pytest.mark.parametrize("request_id", [0, 99, 0xFFFF_FFFF])
def test_unknown_message(
    started: VhostUserFrontend, daemon: DaemonProcess, host_tree: HostTree, request_id: int
) -> None:
    send_need_reply(started, request_id, U64.pack(0))
    if expect_rejected(started, daemon, request_id):
        host_tree.check_serving(started)


def test_truncated_header_then_eof(started: VhostUserFrontend, daemon: DaemonProcess) -> None:
    started.send_raw(HEADER.pack(MessageType.GET_FEATURES, VERSION, 0)[:6])
    started.sock.shutdown(socket.SHUT_WR)
    expect_clean_exit(started, daemon)


def test_payload_shorter_than_size_then_eof(
    started: VhostUserFrontend, daemon: DaemonProcess
) -> None:
    started.send(MessageType.SET_VRING_NUM, VRING_STATE.pack(1, 64), size=100)
    started.sock.shutdown(socket.SHUT_WR)
    expect_clean_exit(started, daemon)


@pytest.mark.parametrize("size", [1 << 20, 0x7FFF_FFFF, 0xFFFF_FFFF])
def test_huge_size_field_closes(
    started: VhostUserFrontend, daemon: DaemonProcess, size: int
) -> None:
    """No sane message is that large: the stream is unusable, the daemon must hang up
    (without trying to allocate or wait for gigabytes)."""
    started.send(
        MessageType.SET_VRING_NUM,
        VRING_STATE.pack(1, 64),
        size=size,
        flags=VERSION | FLAG_NEED_REPLY,
    )
    expect_clean_exit(started, daemon, logged="SET_VRING_NUM")


def test_bad_version_closes(started: VhostUserFrontend, daemon: DaemonProcess) -> None:
    """vhost-user.rst: version 1 is the only one; the framing cannot be trusted."""
    started.send(MessageType.GET_FEATURES, flags=0x2)
    expect_clean_exit(started, daemon, logged="GET_FEATURES")


@pytest.mark.parametrize(
    ("request_id", "payload"),
    [
        (MessageType.SET_VRING_NUM, b"\1\0\0\0"),
        (MessageType.SET_VRING_ENABLE, b""),
        (MessageType.SET_FEATURES, b"\0\0\0\0"),
        (MessageType.SET_VRING_ADDR, b"\1" + bytes(20)),
        pytest.param(
            MessageType.SET_MEM_TABLE, MEM_TABLE_HEAD.pack(2, 0) + bytes(32), marks=REFERENCE_BREAKS
        ),
    ],
    ids=["vring_num", "vring_enable", "features", "vring_addr", "mem_table"],
)
def test_payload_too_short(
    started: VhostUserFrontend,
    daemon: DaemonProcess,
    host_tree: HostTree,
    request_id: int,
    payload: bytes,
) -> None:
    send_need_reply(started, request_id, payload)
    if expect_rejected(started, daemon, request_id):
        host_tree.check_serving(started)


def leak_probe() -> int:
    return os.memfd_create("leak-probe", os.MFD_CLOEXEC)


def assert_no_probe_fds(daemon: DaemonProcess) -> None:
    leaked = [t for t in daemon.fd_targets() if "leak-probe" in t]
    assert not leaked, f"daemon kept fds it was not meant to get: {leaked}"


def test_fds_with_get_features_are_closed(
    started: VhostUserFrontend, daemon: DaemonProcess, host_tree: HostTree
) -> None:
    host_tree.check_serving(started)  # the daemon holds the fds of this lookup from now on
    before = daemon.fd_count()
    probes = [leak_probe() for _ in range(3)]
    try:
        started.send(MessageType.GET_FEATURES, fds=probes)
        reply = started.recv_reply(MessageType.GET_FEATURES)
    except ConnectionClosed:
        # virtiofsd refuses fds on messages that take none by hanging up
        assert not is_own_daemon(), "daemon closed on fds it can ignore"
        expect_clean_exit(started, daemon)
        return
    finally:
        for fd in probes:
            os.close(fd)
    assert reply.u64() == started.device_features
    host_tree.check_serving(started)
    assert_no_probe_fds(daemon)
    assert daemon.fd_count() == before


def test_fds_with_set_message_are_closed(
    started: VhostUserFrontend, daemon: DaemonProcess, host_tree: HostTree
) -> None:
    probe = leak_probe()
    try:
        send_need_reply(started, MessageType.SET_VRING_ENABLE, VRING_STATE.pack(1, 1), fds=[probe])
    finally:
        os.close(probe)
    value = ack_or_close(started, MessageType.SET_VRING_ENABLE)
    if is_own_daemon():
        assert value == 0, "an fd the daemon can ignore made it refuse the message"
    elif value is None or started.wait_closed(0.5):
        expect_clean_exit(started, daemon)
        return
    host_tree.check_serving(started)
    assert_no_probe_fds(daemon)


@pytest.mark.parametrize("num", [0, 3, 100, 65536, 0xFFFF_FFFF])
def test_vring_num_out_of_range(
    before_rings: VhostUserFrontend, daemon: DaemonProcess, host_tree: HostTree, num: int
) -> None:
    """virtio 2.7: a split queue size is a power of 2, at most 32768."""
    send_need_reply(before_rings, MessageType.SET_VRING_NUM, VRING_STATE.pack(1, num))
    if expect_rejected(before_rings, daemon, MessageType.SET_VRING_NUM):
        start_rings(before_rings)
        host_tree.check_serving(before_rings)


@pytest.mark.parametrize("index", [None, 255, 256, 0xFFFF_FFFF])
def test_vring_index_out_of_range(
    before_rings: VhostUserFrontend, daemon: DaemonProcess, host_tree: HostTree, index: int | None
) -> None:
    """A ring index the daemon does not have (None: the first one past GET_QUEUE_NUM)."""
    if index is None:
        index = before_rings.queue_num or 2
    send_need_reply(before_rings, MessageType.SET_VRING_NUM, VRING_STATE.pack(index, 64))
    if expect_rejected(before_rings, daemon, MessageType.SET_VRING_NUM):
        start_rings(before_rings)
        host_tree.check_serving(before_rings)


@pytest.mark.parametrize(
    "which", ["desc", pytest.param("used", marks=REFERENCE_BREAKS), "avail", "wraps"]
)
def test_ring_address_outside_memory(
    before_rings: VhostUserFrontend, daemon: DaemonProcess, host_tree: HostTree, which: str
) -> None:
    fe = before_rings
    mem = fe.mem
    assert mem is not None
    q = fe.queues[1]
    fe.set_vring_num(1, q.size)
    fe.set_vring_base(1, 0)
    addrs = {
        "desc": mem.gpa_to_user(q.desc_gpa),
        "used": mem.gpa_to_user(q.used_gpa),
        "avail": mem.gpa_to_user(q.avail_gpa),
    }
    if which == "wraps":
        addrs["desc"] = 0xFFFF_FFFF_FFFF_F000
    else:
        # just past the region: the ring does not fit
        addrs[which] = mem.user_addr + mem.size - 8
    payload = VRING_ADDR.pack(1, 0, addrs["desc"], addrs["used"], addrs["avail"], 0)
    send_need_reply(fe, MessageType.SET_VRING_ADDR, payload)
    value = ack_or_close(fe, MessageType.SET_VRING_ADDR)
    if value is None or (not is_own_daemon() and fe.wait_closed(0.5)):
        assert not is_own_daemon(), "daemon closed the connection on a bad ring address"
        expect_clean_exit(fe, daemon)
        return
    if value == 0:
        # Accepted: the addresses are translated when the ring starts, and
        # starting it must fail safely; GET_VRING_BASE must still answer.
        fe.set_vring_kick(1, q.kick_fd)
        fe.set_vring_call(1, q.call_fd)
        fe.set_vring_enable(1, True)
        os.eventfd_write(q.kick_fd, 1)
        fe.get_vring_base(1)
    start_rings(fe)
    host_tree.check_serving(fe)


def test_mem_table_without_fd(frontend: VhostUserFrontend, daemon: DaemonProcess) -> None:
    frontend.connect_and_start(queues=2, start_rings=False, mem_via="set_mem_table")
    region = frontend.region
    payload = (
        MEM_TABLE_HEAD.pack(1, 0)
        + U64.pack(region.guest_phys_addr)
        + U64.pack(region.size)
        + U64.pack(region.userspace_addr)
        + U64.pack(0)
    )
    send_need_reply(frontend, MessageType.SET_MEM_TABLE, payload)
    if expect_rejected(frontend, daemon, MessageType.SET_MEM_TABLE):
        frontend.set_mem_table([(region, frontend.mem.fd)])  # type: ignore[union-attr]
        start_rings(frontend)


# -- bad descriptor chains ----------------------------------------------------------
def header(opcode: int, nodeid: int, args_len: int, unique: int = 0x1000) -> bytes:
    return abi.IN_HEADER.pack(abi.IN_HEADER.size + args_len, opcode, unique, nodeid, 0, 0, 0, 0, 0)


GETATTR_ARGS = abi.GETATTR_IN.pack(0, 0, 0)


def put(fe: VhostUserFrontend, data: bytes) -> int:
    assert fe.mem is not None
    gpa = fe.mem.alloc(len(data))
    fe.mem.write(gpa, data)
    return gpa


def reply_buf(fe: VhostUserFrontend, size: int = 4096) -> int:
    assert fe.mem is not None
    return fe.mem.alloc(size)


def submit_raw_and_check(
    fe: VhostUserFrontend,
    host_tree: HostTree,
    descs: list[RawDesc],
    *,
    writable: int = 0,
    ids: list[int] | None = None,
) -> SplitQueue:
    q = fe.queues[1]
    q.add_raw(descs, ids=ids, writable=writable)
    q.kick(force=True)
    host_tree.check_serving(fe)
    return q


@REFERENCE_BREAKS
def test_desc_address_outside_memory(started: VhostUserFrontend, host_tree: HostTree) -> None:
    mem = started.mem
    assert mem is not None
    out = reply_buf(started)
    for bad in (mem.gpa_end, mem.gpa_base - 4096, 0, 0xFFFF_FFFF_FFFF_FFF0):
        # ``next`` names the second slot of this chain: a chain must never run
        # into a slot the driver hands to its next request.
        a, b = started.queues[1].reserve(2)
        submit_raw_and_check(
            started,
            host_tree,
            [RawDesc(bad, 56, VIRTQ_DESC_F_NEXT, b), RawDesc(out, 4096, VIRTQ_DESC_F_WRITE)],
            ids=[a, b],
            writable=4096,
        )


@REFERENCE_BREAKS
def test_writable_desc_outside_memory(started: VhostUserFrontend, host_tree: HostTree) -> None:
    mem = started.mem
    assert mem is not None
    req = put(started, header(abi.FUSE_GETATTR, 1, 16) + GETATTR_ARGS)
    for bad in (mem.gpa_end - 8, mem.gpa_end + 4096):
        a, b = started.queues[1].reserve(2)
        submit_raw_and_check(
            started,
            host_tree,
            [RawDesc(req, 56, VIRTQ_DESC_F_NEXT, b), RawDesc(bad, 4096, VIRTQ_DESC_F_WRITE)],
            ids=[a, b],
            writable=4096,
        )


@REFERENCE_BREAKS
def test_descriptor_loop(started: VhostUserFrontend, host_tree: HostTree) -> None:
    q = started.queues[1]
    req = put(started, header(abi.FUSE_GETATTR, 1, 16) + GETATTR_ARGS)
    a, b = q.reserve(2)
    submit_raw_and_check(
        started,
        host_tree,
        [RawDesc(req, 56, VIRTQ_DESC_F_NEXT, b), RawDesc(req, 56, VIRTQ_DESC_F_NEXT, a)],
        ids=[a, b],
    )


@REFERENCE_BREAKS
def test_next_index_out_of_range(started: VhostUserFrontend, host_tree: HostTree) -> None:
    req = put(started, header(abi.FUSE_GETATTR, 1, 16) + GETATTR_ARGS)
    submit_raw_and_check(started, host_tree, [RawDesc(req, 56, VIRTQ_DESC_F_NEXT, 0xFFFF)])


@REFERENCE_BREAKS
def test_avail_head_out_of_range(started: VhostUserFrontend, host_tree: HostTree) -> None:
    q = started.queues[1]
    (slot,) = q.reserve(1)
    # the avail ring names a head past the table
    q.add_raw([RawDesc(0, 0)], ids=[slot], head=q.size + 5)
    q.kick(force=True)
    # No used element can name that head: the ring may stay stopped until it
    # is set up again (virtio 2.1.2, DEVICE_NEEDS_RESET), the device must not.
    started.replace_queue(1)
    host_tree.check_serving(started)


def indirect_table(fe: VhostUserFrontend, descs: list[RawDesc]) -> int:
    return put(fe, b"".join(DESC.pack(d.addr, d.length, d.flags, d.next) for d in descs))


def getattr_chain(fe: VhostUserFrontend) -> list[RawDesc]:
    """A valid GETATTR of the root as two descriptors (for indirect tables)."""
    req = put(fe, header(abi.FUSE_GETATTR, 1, 16) + GETATTR_ARGS)
    return [
        RawDesc(req, 56, VIRTQ_DESC_F_NEXT, 1),
        RawDesc(reply_buf(fe), 4096, VIRTQ_DESC_F_WRITE),
    ]


@REFERENCE_BREAKS
def test_indirect_inside_indirect(started: VhostUserFrontend, host_tree: HostTree) -> None:
    """virtio 2.7.5.3.1: the driver MUST NOT set INDIRECT inside an indirect table."""
    inner = indirect_table(started, getattr_chain(started))
    outer = indirect_table(started, [RawDesc(inner, 32, VIRTQ_DESC_F_INDIRECT)])
    submit_raw_and_check(
        started, host_tree, [RawDesc(outer, 16, VIRTQ_DESC_F_INDIRECT)], writable=4096
    )


@REFERENCE_BREAKS
@pytest.mark.parametrize("length", [0, 8, 33, 0xFFFF_FFF0])
def test_indirect_table_bad_length(
    started: VhostUserFrontend, host_tree: HostTree, length: int
) -> None:
    table = indirect_table(started, getattr_chain(started))
    submit_raw_and_check(
        started, host_tree, [RawDesc(table, length, VIRTQ_DESC_F_INDIRECT)], writable=4096
    )


@REFERENCE_BREAKS
def test_indirect_with_next_flag(started: VhostUserFrontend, host_tree: HostTree) -> None:
    """virtio 2.7.5.3.1: INDIRECT and NEXT together are not allowed."""
    q = started.queues[1]
    table = indirect_table(started, getattr_chain(started))
    a, b = q.reserve(2)
    out = reply_buf(started)
    submit_raw_and_check(
        started,
        host_tree,
        [
            RawDesc(table, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, b),
            RawDesc(out, 4096, VIRTQ_DESC_F_WRITE),
        ],
        ids=[a, b],
        writable=8192,
    )


@REFERENCE_BREAKS
@pytest.mark.parametrize("length", [0xFFFF_FFFF, 0x8000_0000, 64 << 20])
def test_huge_descriptor_length(
    started: VhostUserFrontend, host_tree: HostTree, length: int
) -> None:
    req = put(started, header(abi.FUSE_GETATTR, 1, 16) + GETATTR_ARGS)
    out = reply_buf(started)
    submit_raw_and_check(
        started,
        host_tree,
        [RawDesc(req, length, VIRTQ_DESC_F_NEXT, 1), RawDesc(out, 4096, VIRTQ_DESC_F_WRITE)],
        ids=None,
        writable=4096,
    )
    submit_raw_and_check(
        started,
        host_tree,
        [RawDesc(req, 56, VIRTQ_DESC_F_NEXT, 1), RawDesc(out, length, VIRTQ_DESC_F_WRITE)],
        writable=length,
    )


@REFERENCE_BREAKS
def test_writable_before_readable(started: VhostUserFrontend, host_tree: HostTree) -> None:
    """virtio 2.7.4.2: device-writable descriptors come after all readable ones."""
    q = started.queues[1]
    req = put(started, header(abi.FUSE_GETATTR, 1, 16) + GETATTR_ARGS)
    out = reply_buf(started)
    a, b, c = q.reserve(3)
    submit_raw_and_check(
        started,
        host_tree,
        [
            RawDesc(req, 40, VIRTQ_DESC_F_NEXT, b),
            RawDesc(out, 4096, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, c),
            RawDesc(req + 40, 16),
        ],
        ids=[a, b, c],
        writable=4096,
    )


# -- bad FUSE requests ---------------------------------------------------------------------
@pytest.fixture
def fuse(started: VhostUserFrontend) -> FuseClient:
    return FuseClient(started)


@pytest.mark.parametrize("length", [0, 8, 39, 40, 57, 4096, 0xFFFF_FFFF])
def test_fuse_header_len_lies(fuse: FuseClient, host_tree: HostTree, length: int) -> None:
    """in.len disagrees with the bytes the chain carries (56 for GETATTR)."""
    r = fuse.request(abi.FUSE_GETATTR, 1, GETATTR_ARGS, abi.ATTR_OUT.size, header_len=length)
    if length != 56:
        assert r.error < 0 or not is_own_daemon(), "a lying header was accepted"
    host_tree.check_serving(fuse.fe)


@REFERENCE_BREAKS
@pytest.mark.parametrize(
    ("opcode", "args"),
    [
        (abi.FUSE_GETATTR, b"\0" * 4),
        (abi.FUSE_LOOKUP, b"small.txt"),  # no NUL terminator
        (abi.FUSE_LOOKUP, b""),
        (abi.FUSE_READ, b"\0" * 10),
        (abi.FUSE_OPEN, b"\0"),
        (abi.FUSE_GETXATTR, abi.GETXATTR_IN.pack(64, 0)),  # no name
        (abi.FUSE_INIT, b"\7\0\0\0"),
        (abi.FUSE_BATCH_FORGET, abi.BATCH_FORGET_IN.pack(1000, 0)),  # count lies
        (abi.FUSE_FORGET, b""),
    ],
    ids=[
        "getattr",
        "lookup-nonul",
        "lookup-empty",
        "read",
        "open",
        "getxattr",
        "init",
        "batch_forget",
        "forget",
    ],
)
def test_truncated_args(fuse: FuseClient, host_tree: HostTree, opcode: int, args: bytes) -> None:
    no_reply = opcode in (abi.FUSE_FORGET, abi.FUSE_BATCH_FORGET)
    r = fuse.request(opcode, 1, args, None if no_reply else 4096)
    if not no_reply and is_own_daemon():
        assert r.error < 0, "truncated arguments were accepted"
    host_tree.check_serving(fuse.fe)


def test_unknown_opcode(fuse: FuseClient, host_tree: HostTree) -> None:
    r = fuse.request(9999, 1, b"", 4096)
    assert r.error == -errno.ENOSYS
    host_tree.check_serving(fuse.fe)


def test_huge_read_size_small_buffer(fuse: FuseClient, host_tree: HostTree) -> None:
    nodeid = fuse.lookup(1, "big.bin").nodeid
    fh = fuse.open(nodeid).fh
    r = fuse.request(abi.FUSE_READ, nodeid, fuse.read_args(fh, 0, 0xFFFF_F000), 8192)
    # an error, or at most what the buffers hold (checked against the chain by the driver)
    if r.error == 0:
        assert r.payload == host_tree.big[: len(r.payload)]
    fuse.release(nodeid, fh)
    host_tree.check_serving(fuse.fe)


@REFERENCE_BREAKS
def test_reply_buffer_too_small(fuse: FuseClient, host_tree: HostTree) -> None:
    """Room for the out header only: an attr reply does not fit and must not overflow."""
    r = fuse.request(abi.FUSE_GETATTR, 1, GETATTR_ARGS, [0])
    assert r.error < 0
    r = fuse.request(abi.FUSE_GETATTR, 1, GETATTR_ARGS, 20)
    assert r.error < 0 or len(r.payload) <= 20
    host_tree.check_serving(fuse.fe)


@REFERENCE_BREAKS
def test_request_without_reply_buffers(fuse: FuseClient, host_tree: HostTree) -> None:
    """A GETATTR with no writable descriptor: nowhere to answer, but no crash."""
    fuse.request(abi.FUSE_GETATTR, 1, GETATTR_ARGS, None)
    host_tree.check_serving(fuse.fe)
