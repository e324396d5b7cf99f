"""vhost-user behaviour of a real daemon process, driven by the test front-end.

Spec: QEMU docs/interop/vhost-user.rst (sections "Communication",
"Ring states", "Front-end message types", "REPLY_ACK").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess, is_own_daemon
from virtiofsd_py.testing.frontend.driver import Buffer, GuestMemory, SplitQueue, Timeout
from virtiofsd_py.testing.frontend.fuse_client import FuseClient, FuseReply, Pending
from virtiofsd_py.testing.frontend.vhost_user import DEFAULT_PROTOCOL_FEATURES, VhostUserFrontend
from virtiofsd_py.vhost.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    U64,
    VERSION,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_STATE,
    MessageType,
    ProtocolFeature,
    bit,
)
from virtiofsd_py.virtio.types import MemoryRegion

if TYPE_CHECKING:
    from daemon_support import HostTree

#: How long a test waits for something that must *not* happen (a ring that
#: must stay idle).  Not a timing assertion: a daemon that wrongly processes
#: the ring does so within microseconds.
IDLE_WAIT = 0.3


@pytest.mark.parametrize("mem_via", ["add_mem_reg", "set_mem_table"])
def test_handshake_and_requests(
    frontend: VhostUserFrontend, host_tree: HostTree, mem_via: str
) -> None:
    frontend.connect_and_start(queues=2, mem_via=mem_via)
    FuseClient(frontend).init()
    host_tree.check_serving(frontend)
    bases = frontend.stop()
    # GET_VRING_BASE returns the next avail index the daemon would consume.
    assert bases == [0, 1 + host_tree.check_requests]
    assert frontend.queues[1].avail_idx == 1 + host_tree.check_requests


@pytest.mark.parametrize(("indirect", "event_idx"), [(False, False), (True, False), (False, True)])
def test_ring_feature_combinations(
    frontend: VhostUserFrontend, host_tree: HostTree, indirect: bool, event_idx: bool
) -> None:
    frontend.connect_and_start(queues=2, indirect=indirect, event_idx=event_idx)
    assert bool(frontend.features & bit(VIRTIO_RING_F_INDIRECT_DESC)) == indirect
    assert bool(frontend.features & bit(VIRTIO_RING_F_EVENT_IDX)) == event_idx
    FuseClient(frontend).init()
    host_tree.check_serving(frontend)
    assert frontend.stop() == [0, 1 + host_tree.check_requests]


def test_nonzero_mmap_offset(frontend: VhostUserFrontend, host_tree: HostTree) -> None:
    """The region starts 1 MiB into the memfd: the daemon must honour mmap_offset."""
    frontend.connect_and_start(queues=2, fd_offset=1 << 20, gpa_base=0x2_0000_0000)
    FuseClient(frontend).init()
    host_tree.check_serving(frontend)


def test_feature_values(frontend: VhostUserFrontend) -> None:
    features = frontend.get_features()
    for b in (
        VIRTIO_F_VERSION_1,
        VHOST_USER_F_PROTOCOL_FEATURES,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
    ):
        assert features & bit(b), f"feature bit {b} not offered ({features:#x})"
    assert not features & bit(34), "VIRTIO_F_RING_PACKED offered: not supported by vhost-user-fs"
    pfeatures = frontend.get_protocol_features()
    for pf in (
        ProtocolFeature.MQ,
        ProtocolFeature.REPLY_ACK,
        ProtocolFeature.CONFIGURE_MEM_SLOTS,
    ):
        assert pfeatures & bit(pf), f"protocol feature {pf.name} not offered ({pfeatures:#x})"
    frontend.set_protocol_features(pfeatures & DEFAULT_PROTOCOL_FEATURES)
    # hiprio + at least one request queue
    assert frontend.get_queue_num() >= 2
    # at least what SET_MEM_TABLE can carry (VHOST_MEMORY_BASELINE_NREGIONS)
    assert frontend.get_max_mem_slots() >= 8


@pytest.mark.ours_only
def test_migration_feature_values(frontend: VhostUserFrontend) -> None:
    """QEMU blocks migration without LOG_ALL + LOG_SHMFD; vhost-user-fs needs DEVICE_STATE."""
    assert frontend.get_features() & bit(VHOST_F_LOG_ALL)
    pfeatures = frontend.get_protocol_features()
    assert pfeatures & bit(ProtocolFeature.LOG_SHMFD)
    assert pfeatures & bit(ProtocolFeature.DEVICE_STATE)


def test_reply_ack_only_when_asked(frontend: VhostUserFrontend) -> None:
    frontend.get_features()
    frontend.set_protocol_features(
        frontend.get_protocol_features() & bit(ProtocolFeature.REPLY_ACK)
    )
    # With NEED_REPLY: a u64 0 ack with REPLY set and the same request id.
    frontend.send(MessageType.SET_OWNER, flags=VERSION | FLAG_NEED_REPLY)
    ack = frontend.recv()
    assert (ack.request, ack.flags, ack.payload) == (
        MessageType.SET_OWNER,
        VERSION | FLAG_REPLY,
        U64.pack(0),
    )
    # Without NEED_REPLY no ack: the next message we receive answers GET_FEATURES.
    frontend.send(MessageType.SET_VRING_NUM, VRING_STATE.pack(0, 64))
    features = frontend.get_u64(MessageType.GET_FEATURES)
    assert features & bit(VIRTIO_F_VERSION_1)


def test_get_config(frontend: VhostUserFrontend) -> None:
    frontend.get_features()
    pf = frontend.get_protocol_features()
    if not pf & bit(ProtocolFeature.CONFIG):
        pytest.skip("daemon does not offer VHOST_USER_PROTOCOL_F_CONFIG (e.g. no --tag)")
    frontend.connect_and_start(
        queues=2, protocol_features=DEFAULT_PROTOCOL_FEATURES | bit(ProtocolFeature.CONFIG)
    )
    # virtio-fs config space (virtio spec 5.11.4): u8 tag[36], le32 num_request_queues
    config = frontend.get_config(0, 40)
    tag = config[:36].rstrip(b"\0")
    assert tag and b"\0" not in tag
    assert int.from_bytes(config[36:40], "little") == (frontend.queue_num or 2) - 1


def test_vring_base_after_requests_and_resume(
    frontend: VhostUserFrontend, host_tree: HostTree
) -> None:
    frontend.connect_and_start(queues=2)
    client = FuseClient(frontend)
    client.init()
    entry = client.lookup(abi.FUSE_ROOT_ID, "small.txt")
    client.forget(entry.nodeid, 1)  # one request on hiprio
    bases = frontend.stop()
    assert bases == [1, 2]
    # A stopped ring is not processed, even when kicked.
    q = frontend.queues[1]
    pending = client.submit(abi.FUSE_GETATTR, abi.FUSE_ROOT_ID, abi.GETATTR_IN.pack(0, 0, 0), 104)
    with pytest.raises(Timeout):
        q.wait_used(IDLE_WAIT)
    assert q.used_idx == 2
    # Restart every ring where it stopped (as QEMU does after a stop/cont).
    for ring, base in zip(frontend.queues, bases, strict=True):
        frontend.start_queue(ring, base=base)
        frontend.set_vring_enable(ring.index, True)
    q.kick(force=True)
    client.wait([pending])
    assert client.reply(pending).error == 0
    host_tree.check_serving(frontend)
    assert frontend.stop() == [1, 3 + host_tree.check_requests]


def test_no_processing_before_kick(frontend: VhostUserFrontend, host_tree: HostTree) -> None:
    """vhost-user.rst, Ring states: a ring starts on its first kick."""
    frontend.connect_and_start(queues=2)
    client = FuseClient(frontend)
    pending = client.submit(
        abi.FUSE_INIT, 0, abi.INIT_IN.pack(7, 31, 0, 0, 0, *[0] * 11), abi.INIT_OUT.size, kick=False
    )
    q = frontend.queues[1]
    q.publish()
    with pytest.raises(Timeout):
        q.wait_used(IDLE_WAIT)
    q.kick(force=True)
    client.wait([pending])
    assert client.reply(pending).error == 0
    host_tree.check_serving(frontend)


def test_disabled_ring_is_not_processed(frontend: VhostUserFrontend, host_tree: HostTree) -> None:
    frontend.connect_and_start(queues=2, enable=False)
    client = FuseClient(frontend)
    pending = client.submit(
        abi.FUSE_INIT, 0, abi.INIT_IN.pack(7, 31, 0, 0, 0, *[0] * 11), abi.INIT_OUT.size
    )
    q = frontend.queues[1]
    with pytest.raises(Timeout):
        q.wait_used(IDLE_WAIT)
    for ring in frontend.queues:
        frontend.set_vring_enable(ring.index, True)
    q.kick(force=True)
    client.wait([pending])
    assert client.reply(pending).error == 0
    host_tree.check_serving(frontend)


def test_without_protocol_features_rings_are_enabled(
    frontend: VhostUserFrontend, host_tree: HostTree
) -> None:
    """SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES enables every ring."""
    frontend.connect_and_start(queues=2, protocol_features=None, mem_via="set_mem_table")
    assert not frontend.features & bit(VHOST_USER_F_PROTOCOL_FEATURES)
    assert "SET_VRING_ENABLE" not in frontend.log
    FuseClient(frontend).init()
    host_tree.check_serving(frontend)
    assert frontend.stop() == [0, 1 + host_tree.check_requests]


def test_toggling_log_all_does_not_halt(frontend: VhostUserFrontend, host_tree: HostTree) -> None:
    frontend.connect_and_start(queues=2)
    FuseClient(frontend).init()
    frontend.set_features(frontend.features | bit(VHOST_F_LOG_ALL))
    host_tree.check_serving(frontend)
    frontend.set_features(frontend.features & ~bit(VHOST_F_LOG_ALL))
    host_tree.check_serving(frontend)


def test_multiple_request_queues(frontend: VhostUserFrontend, host_tree: HostTree) -> None:
    frontend.connect_and_start(queues=None, max_queues=4)
    nqueues = len(frontend.queues)
    if nqueues < 3:
        pytest.skip(f"daemon has only {nqueues} queues (hiprio + 1 request queue)")
    FuseClient(frontend).init()
    clients = [FuseClient(frontend, queue=q) for q in range(1, nqueues)]
    # Requests in flight on every request queue at once, each kicked separately.
    pendings = [
        c.submit(abi.FUSE_LOOKUP, abi.FUSE_ROOT_ID, b"small.txt\0", abi.ENTRY_OUT.size)
        for c in clients
        for _ in range(3)
    ]
    clients[0].wait(pendings)
    ino = host_tree.path("small.txt").stat().st_ino
    for c, p in zip([c for c in clients for _ in range(3)], pendings, strict=True):
        reply = c.reply(p)
        assert reply.error == 0
        assert abi.ENTRY_OUT.unpack(reply.payload)[6] == ino  # attr.ino
    for q in range(1, nqueues):
        host_tree.check_serving(frontend, queue=q)
    expected = [0, 1 + 3 + host_tree.check_requests] + [3 + host_tree.check_requests] * (
        nqueues - 2
    )
    assert frontend.stop() == expected


def test_disconnect_ends_daemon(frontend: VhostUserFrontend) -> None:
    frontend.connect_and_start(queues=2)
    FuseClient(frontend).init()
    frontend.close()
    # the daemon fixture then requires a clean exit (status 0, no traceback)


def second_region(fe: VhostUserFrontend) -> GuestMemory:
    """Another memfd region right after the first one in guest-physical space."""
    assert fe.mem is not None
    return GuestMemory(
        1 << 20, gpa_base=fe.mem.gpa_end + (1 << 20), user_addr=0x7F55_0000_0000, name="ram2"
    )


def getattr_root_into(fe: VhostUserFrontend, client: FuseClient, mem: GuestMemory) -> FuseReply:
    """GETATTR of the root whose reply buffer lies in ``mem``."""
    assert fe.mem is not None
    q = fe.queues[1]
    unique = client.next_unique()
    req = client.in_header(abi.FUSE_GETATTR, 1, abi.GETATTR_IN.size, unique)
    req += abi.GETATTR_IN.pack(0, 0, 0)
    req_gpa = fe.mem.alloc(len(req))
    fe.mem.write(req_gpa, req)
    out_gpa = mem.alloc(4096)
    pending = Pending(q, abi.FUSE_GETATTR, unique)
    pending.chain = q.add([Buffer(req_gpa, len(req))], [Buffer(out_gpa, 4096)], token=pending)
    q.kick()
    client.wait([pending])
    assert pending.used is not None
    data = mem.read(out_gpa, pending.used.length)
    fe.mem.free(req_gpa)
    mem.free(out_gpa)
    _len, error, runique = abi.OUT_HEADER.unpack_from(data.ljust(16, b"\0"))
    return FuseReply(runique, error, data[16:], pending.used.length)


def test_add_memory_region(frontend: VhostUserFrontend, host_tree: HostTree) -> None:
    """ADD_MEM_REG while running; a reply lands in the new region."""
    frontend.connect_and_start(queues=2)
    client = FuseClient(frontend)
    client.init()
    with second_region(frontend) as ram2:
        frontend.add_mem_reg(MemoryRegion(ram2.gpa_base, ram2.size, ram2.user_addr, 0), ram2.fd)
        reply = getattr_root_into(frontend, client, ram2)
        assert reply.error == 0
        attr = abi.ATTR_OUT.unpack_from(reply.payload)
        assert attr[3] == host_tree.root.stat().st_ino  # attr.ino (after valid, nsec, dummy)
        host_tree.check_serving(frontend)


@pytest.mark.ours_only  # virtiofsd 1.13's queue thread panics on the stale address
def test_removed_memory_region_is_not_used(
    frontend: VhostUserFrontend, host_tree: HostTree
) -> None:
    frontend.connect_and_start(queues=2)
    client = FuseClient(frontend)
    client.init()
    with second_region(frontend) as ram2:
        region2 = MemoryRegion(ram2.gpa_base, ram2.size, ram2.user_addr, 0)
        frontend.add_mem_reg(region2, ram2.fd)
        assert getattr_root_into(frontend, client, ram2).error == 0
        ram2.fill(ram2.gpa_base, ram2.size, 0)
        frontend.rem_mem_reg(region2)
        # The region is gone: a reply into it fails without touching it.
        reply = getattr_root_into(frontend, client, ram2)
        assert reply.used_len == 0
        assert ram2.read(ram2.gpa_base, ram2.size) == bytes(ram2.size)
        host_tree.check_serving(frontend)


@pytest.mark.ours_only  # virtiofsd 1.13 does not process the rings again after the reset
def test_reset_device_and_start_again(frontend: VhostUserFrontend, host_tree: HostTree) -> None:
    """RESET_DEVICE (vhost-user.rst): rings stop, state resets, the device can be set up anew."""
    frontend.connect_and_start(queues=2)
    if not frontend.has_protocol_feature(ProtocolFeature.RESET_DEVICE):
        pytest.skip("daemon does not offer VHOST_USER_PROTOCOL_F_RESET_DEVICE")
    FuseClient(frontend).init()
    host_tree.check_serving(frontend)
    frontend.reset_device()
    # As QEMU's vhost_dev_start after a guest reset: features, memory, fresh rings.
    frontend.set_features(frontend.features)
    frontend.set_mem_table([(frontend.region, frontend.mem.fd)])  # type: ignore[union-attr]
    for i in range(len(frontend.queues)):
        old = frontend.queues[i]
        frontend.queues[i] = SplitQueue(
            old.mem, i, old.size, event_idx=old.event_idx, indirect=old.indirect
        )
        old.close()
        frontend.start_queue(frontend.queues[i])
        frontend.set_vring_enable(i, True)
    FuseClient(frontend).init()
    host_tree.check_serving(frontend)
    assert frontend.stop() == [0, 1 + host_tree.check_requests]


def test_sigterm_exits_cleanly(host_tree: HostTree, tmp_path: Path) -> None:
    """SIGTERM while a front-end is connected and requests were served: a clean exit."""
    d = DaemonProcess(host_tree.root, tmp_path / "run-sigterm").start()
    try:
        with VhostUserFrontend.connect(d.socket_path) as fe:
            fe.connect_and_start(queues=2)
            FuseClient(fe).init()
            host_tree.check_serving(fe)
            status = d.terminate(5.0)
            print(d.log())
            assert status is not None, "daemon ignored SIGTERM"
            if is_own_daemon():
                assert status == 0
                assert "Traceback" not in d.log()
            # (virtiofsd 1.13 exits with status 1 here)
            assert fe.wait_closed(1.0)
    finally:
        d.kill()
