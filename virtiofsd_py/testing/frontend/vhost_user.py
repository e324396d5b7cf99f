"""A vhost-user front-end that plays QEMU's vhost-user-fs device, for tests and benchmarks.

It speaks the protocol of QEMU's docs/interop/vhost-user.rst over a unix
socket to a back-end daemon, hands it guest memory (:mod:`.driver`) and the
eventfds of each virtqueue, and follows QEMU 10's message order when
starting and stopping the device.  Everything is synchronous with
timeouts: the daemon is another process, so nothing here can deadlock it.

Three levels of API:

* raw: :meth:`VhostUserFrontend.send_raw` / :meth:`send` / :meth:`recv` put
  arbitrary bytes, headers and fds on the wire (malformed-message tests);
  :meth:`wait_closed` tells whether the daemon hung up.
* one method per message (``get_features``, ``set_vring_addr``, ...), each
  asking for and checking the REPLY_ACK ack when it has no reply body.
* :meth:`connect_and_start` / :meth:`stop`: the whole QEMU-like handshake.
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from virtiofsd_py.testing.frontend.driver import GuestMemory, SplitQueue
from virtiofsd_py.vhost.protocol import (
    CONFIG_HEAD,
    DEVICE_STATE_LOAD,
    DEVICE_STATE_PARAMS,
    DEVICE_STATE_SAVE,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    HEADER_SIZE,
    MAX_FDS,
    MEM_REGION,
    MEM_TABLE_HEAD,
    U64,
    VERSION,
    VERSION_MASK,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_ADDR,
    VRING_NOFD_MASK,
    VRING_STATE,
    MessageType,
    ProtocolFeature,
    bit,
    encode_single_region,
    request_name,
)
from virtiofsd_py.virtio.types import MemoryRegion

#: Protocol features the front-end asks for by default (what QEMU 10 asks a
#: vhost-user-fs back-end for, minus STATUS/INFLIGHT which QEMU's fs device
#: does not rely on).
DEFAULT_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.LOG_SHMFD)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.BACKEND_REQ)
    | bit(ProtocolFeature.BACKEND_SEND_FD)
    | bit(ProtocolFeature.RESET_DEVICE)
    | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | bit(ProtocolFeature.DEVICE_STATE)
)

_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)


class VhostUserError(Exception):
    """The back-end answered wrongly (bad reply header, nack, ...)."""


class ConnectionClosed(VhostUserError):
    """The back-end closed the connection."""


class Nack(VhostUserError):
    """A REPLY_ACK ack with a non-zero value."""

    def __init__(self, request: int, value: int) -> None:
        super().__init__(f"back-end rejected {request_name(request)} (ack {value:#x})")
        self.request = request
        self.value = value


@dataclass(frozen=True, slots=True)
class Reply:
    """A message from the back-end (the caller owns any ``fds`` that came with it)."""

    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()

    def u64(self) -> int:
        if len(self.payload) != U64.size:
            raise VhostUserError(
                f"{request_name(self.request)}: reply of {len(self.payload)} bytes, expected 8"
            )
        return int(U64.unpack(self.payload)[0])


class VhostUserFrontend:
    """One front-end connection; owns the socket, guest memory and queues once started."""

    def __init__(self, sock: socket.socket, *, timeout: float = 5.0) -> None:
        self.sock = sock
        self.timeout = timeout
        sock.settimeout(timeout)
        self.features = 0  # what SET_FEATURES sent last
        self.device_features = 0
        self.protocol_features = 0  # negotiated (what SET_PROTOCOL_FEATURES sent)
        self.device_protocol_features = 0
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None
        self.mem: GuestMemory | None = None
        self.queues: list[SplitQueue] = []
        self.backend_sock: socket.socket | None = None
        self.log: list[str] = []  # names of the messages sent, in order
        self._closed = False

    # -- connection ----------------------------------------------------------
    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, timeout: float = 5.0) -> VhostUserFrontend:
        """Connect to a listening back-end, retrying while the socket is not ready."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(os.fspath(path))
                return cls(s, timeout=timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @property
    def peer_pid(self) -> int:
        """The pid of the process listening on the socket (SO_PEERCRED)."""
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return int(struct.unpack("=iII", creds)[0])

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & bit(ProtocolFeature.REPLY_ACK))

    def has_protocol_feature(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & bit(feature))

    def close(self) -> None:
        """Close the connection and free memory and queues (the daemon then exits)."""
        if not self._closed:
            self._closed = True
            self.sock.close()
            if self.backend_sock is not None:
                self.backend_sock.close()
        for q in self.queues:
            q.close()
        self.queues = []
        if self.mem is not None:
            self.mem.close()
            self.mem = None

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw wire access ---------------------------------------------------------
    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are; ``fds`` go as SCM_RIGHTS with the first byte."""
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _pack_fds(fds))]
                sent = self.sock.sendmsg([data[:1]], anc)
                if sent != 1:  # pragma: no cover
                    raise VhostUserError("short sendmsg")
                data = data[1:]
            if data:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ConnectionClosed(f"back-end closed the connection ({e})") from e

    def send(
        self,
        request: int,
        payload: bytes = b"",
        *,
        fds: Sequence[int] = (),
        flags: int = VERSION,
        size: int | None = None,
    ) -> None:
        """Send one message; ``size`` overrides the header's size field (to lie)."""
        self.log.append(request_name(request))
        header = HEADER.pack(request, flags, len(payload) if size is None else size)
        self.send_raw(header + payload, fds)

    def _recv_exact(self, n: int, fds: list[int], deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply from back-end within {self.timeout}s")
            self.sock.settimeout(remaining)
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(n - len(buf), _CMSG_SPACE)
            except TimeoutError:
                raise TimeoutError(f"no reply from back-end within {self.timeout}s") from None
            except ConnectionResetError as e:
                raise ConnectionClosed(f"back-end closed the connection ({e})") from e
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(_unpack_fds(cdata))
            if not data:
                raise ConnectionClosed("back-end closed the connection")
            buf += data
        return bytes(buf)

    def recv(self, timeout: float | None = None) -> Reply:
        """Receive one message (header, payload and any fds)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        fds: list[int] = []
        request, flags, size = HEADER.unpack(self._recv_exact(HEADER_SIZE, fds, deadline))
        payload = self._recv_exact(size, fds, deadline) if size else b""
        return Reply(request, flags, payload, tuple(fds))

    def recv_reply(self, request: int) -> Reply:
        """Receive the reply to ``request`` and check its header (vhost-user.rst, Header)."""
        reply = self.recv()
        if reply.request != request:
            raise VhostUserError(
                f"reply to {request_name(request)} has request {request_name(reply.request)}"
            )
        if reply.flags & VERSION_MASK != VERSION or not reply.flags & FLAG_REPLY:
            raise VhostUserError(f"reply to {request_name(request)} has flags {reply.flags:#x}")
        return reply

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """Wait until the back-end closes the connection; True if it did.

        Returns False on timeout; raises if the back-end sends a message instead.
        """
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        if not p.poll(int(timeout * 1000)):
            return False
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except ConnectionResetError:
            return True
        except BlockingIOError:  # pragma: no cover - poll said readable
            return False
        if data:
            raise VhostUserError("back-end sent data while we waited for it to close")
        return True

    def is_open(self) -> bool:
        """Whether the back-end still has the connection open (nothing pending to read)."""
        return not self.wait_closed(0)

    # -- one message each ------------------------------------------------------------
    def get_u64(self, request: int) -> int:
        self.send(request)
        return self.recv_reply(request).u64()

    def request_ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Send a message without a reply body, with NEED_REPLY when REPLY_ACK is on.

        vhost-user.rst, "REPLY_ACK": the back-end answers with a u64, 0 for
        success; a non-zero value raises :class:`Nack`.
        """
        flags = VERSION | (FLAG_NEED_REPLY if self.reply_ack else 0)
        self.send(request, payload, fds=fds, flags=flags)
        if self.reply_ack:
            value = self.recv_reply(request).u64()
            if value != 0:
                raise Nack(request, value)

    def get_features(self) -> int:
        self.device_features = self.get_u64(MessageType.GET_FEATURES)
        return self.device_features

    def set_features(self, features: int) -> None:
        # SET_FEATURES has no reply body; QEMU asks for the ack (vhost_user_set_features).
        self.request_ack(MessageType.SET_FEATURES, U64.pack(features))
        self.features = features

    def get_protocol_features(self) -> int:
        self.device_protocol_features = self.get_u64(MessageType.GET_PROTOCOL_FEATURES)
        return self.device_protocol_features

    def set_protocol_features(self, features: int) -> None:
        # The ack can only be asked for once REPLY_ACK is negotiated, i.e. after this.
        self.send(MessageType.SET_PROTOCOL_FEATURES, U64.pack(features))
        self.protocol_features = features

    def set_owner(self) -> None:
        self.request_ack(MessageType.SET_OWNER)

    def reset_owner(self) -> None:
        self.request_ack(MessageType.RESET_OWNER)

    def reset_device(self) -> None:
        self.request_ack(MessageType.RESET_DEVICE)

    def get_queue_num(self) -> int:
        self.queue_num = self.get_u64(MessageType.GET_QUEUE_NUM)
        return self.queue_num

    def get_max_mem_slots(self) -> int:
        self.max_mem_slots = self.get_u64(MessageType.GET_MAX_MEM_SLOTS)
        return self.max_mem_slots

    def set_mem_table(self, regions: Sequence[tuple[MemoryRegion, int]]) -> None:
        """SET_MEM_TABLE: regions with their fds (one fd per region, in order)."""
        payload = MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(
            _pack_region(r) for r, _fd in regions
        )
        self.request_ack(MessageType.SET_MEM_TABLE, payload, [fd for _r, fd in regions])

    def add_mem_reg(self, region: MemoryRegion, fd: int) -> None:
        self.request_ack(MessageType.ADD_MEM_REG, encode_single_region(region), [fd])

    def rem_mem_reg(self, region: MemoryRegion, fd: int | None = None) -> None:
        """REM_MEM_REG; QEMU sends no fd, the spec lets a back-end ignore one if sent."""
        self.request_ack(
            MessageType.REM_MEM_REG, encode_single_region(region), [] if fd is None else [fd]
        )

    def set_vring_num(self, index: int, num: int) -> None:
        self.request_ack(MessageType.SET_VRING_NUM, VRING_STATE.pack(index, num))

    def set_vring_base(self, index: int, num: int) -> None:
        self.request_ack(MessageType.SET_VRING_BASE, VRING_STATE.pack(index, num))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stops the ring; returns the next avail index the back-end would use."""
        self.send(MessageType.GET_VRING_BASE, VRING_STATE.pack(index, 0))
        reply = self.recv_reply(MessageType.GET_VRING_BASE)
        if len(reply.payload) != VRING_STATE.size:
            raise VhostUserError(f"GET_VRING_BASE reply of {len(reply.payload)} bytes")
        ridx, num = VRING_STATE.unpack(reply.payload)
        if ridx != index:
            raise VhostUserError(f"GET_VRING_BASE for ring {index} answered for ring {ridx}")
        return int(num)

    def set_vring_addr(
        self, index: int, desc: int, used: int, avail: int, *, log: int = 0, flags: int = 0
    ) -> None:
        """Ring addresses are front-end user addresses (vhost-user.rst, "Vring address")."""
        self.request_ack(
            MessageType.SET_VRING_ADDR, VRING_ADDR.pack(index, flags, desc, used, avail, log)
        )

    def _set_vring_fd(self, request: MessageType, index: int, fd: int | None) -> None:
        value = index | (VRING_NOFD_MASK if fd is None else 0)
        self.request_ack(request, U64.pack(value), [] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(MessageType.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(MessageType.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(MessageType.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request_ack(MessageType.SET_VRING_ENABLE, VRING_STATE.pack(index, int(enable)))

    def set_backend_req_fd(self) -> socket.socket:
        """Give the back-end a socket for its requests; returns our end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.request_ack(MessageType.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
        finally:
            theirs.close()
        self.backend_sock = ours
        return ours

    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """GET_CONFIG: the payload is echoed back with the config bytes filled in."""
        self.send(MessageType.GET_CONFIG, CONFIG_HEAD.pack(offset, size, flags) + bytes(size))
        reply = self.recv_reply(MessageType.GET_CONFIG)
        if len(reply.payload) < CONFIG_HEAD.size:
            raise VhostUserError(f"GET_CONFIG reply of {len(reply.payload)} bytes")
        roff, rsize, _rflags = CONFIG_HEAD.unpack_from(reply.payload)
        if (roff, rsize) != (offset, size) or len(reply.payload) != CONFIG_HEAD.size + size:
            raise VhostUserError(
                f"GET_CONFIG reply offset {roff} size {rsize} ({len(reply.payload)} bytes)"
            )
        return reply.payload[CONFIG_HEAD.size :]

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.request_ack(MessageType.SET_CONFIG, CONFIG_HEAD.pack(offset, len(data), flags) + data)

    # -- the QEMU-like sequence -------------------------------------------------------------
    def negotiate(
        self,
        *,
        queues: int | None,
        indirect: bool = True,
        event_idx: bool = True,
        protocol_features: int | None = DEFAULT_PROTOCOL_FEATURES,
        extra_features: int = 0,
    ) -> int:
        """The init part of QEMU's vhost_dev_init; returns the features for SET_FEATURES.

        Order as QEMU's vhost_user_backend_init: GET_FEATURES,
        GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
        SET_BACKEND_REQ_FD, then SET_OWNER and GET_FEATURES again.
        ``protocol_features=None`` leaves VHOST_USER_F_PROTOCOL_FEATURES out
        (a legacy front-end: no REPLY_ACK, MQ, ... and rings enabled at once).
        """
        dev = self.get_features()
        want = bit(VIRTIO_F_VERSION_1) | extra_features
        if protocol_features is not None:
            want |= bit(VHOST_USER_F_PROTOCOL_FEATURES)
        if indirect:
            want |= bit(VIRTIO_RING_F_INDIRECT_DESC)
        if event_idx:
            want |= bit(VIRTIO_RING_F_EVENT_IDX)
        features = dev & want
        if features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            pdev = self.get_protocol_features()
            self.set_protocol_features(pdev & (protocol_features or 0))
            if self.has_protocol_feature(ProtocolFeature.MQ):
                if self.get_queue_num() < (queues or 0):
                    raise VhostUserError(f"back-end has {self.queue_num} queues, {queues} wanted")
            elif (queues or 0) > 2:
                raise VhostUserError("back-end does not offer MQ; at most hiprio + 1 queue")
            if self.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS):
                self.get_max_mem_slots()
            if self.has_protocol_feature(ProtocolFeature.BACKEND_REQ):
                self.set_backend_req_fd()
        elif (queues or 0) > 2:
            raise VhostUserError("without protocol features (MQ) at most hiprio + 1 queue")
        self.set_owner()
        self.get_features()
        return features

    def connect_and_start(
        self,
        *,
        queues: int | None = 2,
        max_queues: int = 8,
        queue_size: int = 128,
        indirect: bool = True,
        event_idx: bool = True,
        mem_via: str = "add_mem_reg",
        mem_size: int = 64 << 20,
        gpa_base: int = 0x4000_0000,
        user_addr: int = 0x7F12_3400_0000,
        fd_offset: int = 0,
        protocol_features: int | None = DEFAULT_PROTOCOL_FEATURES,
        start_rings: bool = True,
        enable: bool = True,
    ) -> None:
        """The whole handshake QEMU does for vhost-user-fs, then the device is running.

        ``queues`` counts all virtqueues: 1 hiprio + ``queues - 1`` request
        queues; ``None`` takes all the back-end has (GET_QUEUE_NUM), up to
        ``max_queues``.  ``mem_via`` picks ADD_MEM_REG (QEMU's choice once
        CONFIGURE_MEM_SLOTS is negotiated) or SET_MEM_TABLE.  With
        ``start_rings=False`` it stops after the memory table (the caller
        starts rings with :meth:`start_queue`); with ``enable=False`` no
        SET_VRING_ENABLE is sent.
        """
        if mem_via not in ("add_mem_reg", "set_mem_table"):
            raise ValueError(f"mem_via must be add_mem_reg or set_mem_table, not {mem_via!r}")
        features = self.negotiate(
            queues=queues,
            indirect=indirect,
            event_idx=event_idx,
            protocol_features=protocol_features,
        )
        if queues is None:
            queues = min(self.queue_num or 2, max_queues)
        mem = GuestMemory(mem_size, gpa_base=gpa_base, user_addr=user_addr, fd_offset=fd_offset)
        self.mem = mem
        self.queues = [
            SplitQueue(
                mem,
                i,
                queue_size,
                event_idx=bool(features & bit(VIRTIO_RING_F_EVENT_IDX)),
                indirect=bool(features & bit(VIRTIO_RING_F_INDIRECT_DESC)),
            )
            for i in range(queues)
        ]
        # vhost_virtqueue_init: call and error notifiers are set up at init.
        for q in self.queues:
            self.set_vring_call(q.index, q.call_fd)
            self.set_vring_err(q.index, q.err_fd)
        # vhost_dev_start
        self.set_features(features)
        if mem_via == "add_mem_reg" and self.has_protocol_feature(
            ProtocolFeature.CONFIGURE_MEM_SLOTS
        ):
            self.add_mem_reg(self.region, mem.fd)
        elif mem_via == "add_mem_reg":
            raise VhostUserError("ADD_MEM_REG wanted but CONFIGURE_MEM_SLOTS is not negotiated")
        else:
            self.set_mem_table([(self.region, mem.fd)])
        if not start_rings:
            return
        for q in self.queues:
            self.start_queue(q)
        if enable and features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            for q in self.queues:
                self.set_vring_enable(q.index, True)

    @property
    def region(self) -> MemoryRegion:
        """The memory region describing :attr:`mem`."""
        mem = self._mem()
        return MemoryRegion(mem.gpa_base, mem.size, mem.user_addr, mem.fd_offset)

    def _mem(self) -> GuestMemory:
        if self.mem is None:
            raise VhostUserError("the device has no guest memory yet")
        return self.mem

    def start_queue(self, q: SplitQueue, *, base: int = 0) -> None:
        """vhost_virtqueue_start: NUM, BASE, ADDR (user addresses), KICK, CALL."""
        mem = self._mem()
        self.set_vring_num(q.index, q.size)
        self.set_vring_base(q.index, base)
        self.set_vring_addr(
            q.index,
            mem.gpa_to_user(q.desc_gpa),
            mem.gpa_to_user(q.used_gpa),
            mem.gpa_to_user(q.avail_gpa),
        )
        self.set_vring_kick(q.index, q.kick_fd)
        self.set_vring_call(q.index, q.call_fd)

    def replace_queue(self, index: int) -> SplitQueue:
        """Stop ring ``index`` and start it again on fresh ring memory (indices 0).

        What a driver does after resetting a broken queue; returns the new queue.
        """
        old = self.queues[index]
        protocol = bool(self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES))
        if protocol:
            self.set_vring_enable(index, False)
        self.get_vring_base(index)
        q = SplitQueue(self._mem(), index, old.size, event_idx=old.event_idx, indirect=old.indirect)
        self.queues[index] = q
        old.close()
        self.start_queue(q)
        if protocol:
            self.set_vring_enable(index, True)
        return q

    # -- migration (vhost-user.rst, "Migrating back-end state") -------------------------
    def set_device_state_fd(self, direction: int, fd: int, phase: int = 0) -> int:
        """SET_DEVICE_STATE_FD with our end ``fd``; the raw u64 result."""
        self.send(
            MessageType.SET_DEVICE_STATE_FD, DEVICE_STATE_PARAMS.pack(direction, phase), fds=[fd]
        )
        return self.recv_reply(MessageType.SET_DEVICE_STATE_FD).u64()

    def check_device_state(self) -> int:
        return self.get_u64(MessageType.CHECK_DEVICE_STATE)

    def save_state(self) -> bytes:
        """What QEMU's vhost_save_backend_state does: pipe, read to EOF, check."""
        r, w = os.pipe()
        try:
            result = self.set_device_state_fd(DEVICE_STATE_SAVE, w)
        finally:
            os.close(w)
        try:
            if result & 0xFF:
                raise Nack(MessageType.SET_DEVICE_STATE_FD, result)
            chunks = []
            while chunk := os.read(r, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(r)
        check = self.check_device_state()
        if check:
            raise Nack(MessageType.CHECK_DEVICE_STATE, check)
        return b"".join(chunks)

    def load_state(self, data: bytes) -> int:
        """What QEMU's vhost_load_backend_state does; the CHECK_DEVICE_STATE result."""
        r, w = os.pipe()
        try:
            result = self.set_device_state_fd(DEVICE_STATE_LOAD, r)
        finally:
            os.close(r)
        try:
            if result & 0xFF:
                raise Nack(MessageType.SET_DEVICE_STATE_FD, result)
            view = memoryview(data)
            while view:
                view = view[os.write(w, view[: 1 << 20]) :]
        finally:
            os.close(w)
        return self.check_device_state()

    def stop(self, *, disable: bool = True) -> list[int]:
        """QEMU's vhost_dev_stop: disable each ring, then GET_VRING_BASE each; returns the bases."""
        if disable and self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            for q in self.queues:
                self.set_vring_enable(q.index, False)
        return [self.get_vring_base(q.index) for q in self.queues]


def _pack_region(r: MemoryRegion) -> bytes:
    return MEM_REGION.pack(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)


def _pack_fds(fds: Iterable[int]) -> bytes:
    return array.array("i", fds).tobytes()


def _unpack_fds(data: bytes) -> list[int]:
    arr = array.array("i")
    arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
    return list(arr)


__all__ = [
    "DEFAULT_PROTOCOL_FEATURES",
    "ConnectionClosed",
    "Nack",
    "Reply",
    "VhostUserError",
    "VhostUserFrontend",
]
