"""The vhost-user back-end state machine for a virtio-fs device.

Takes decoded ``Message`` objects, updates the protocol state (features,
memory table, rings) and returns the reply bytes, if any.  It owns no
socket: ``vhost.connection`` feeds it.  Queue processing is delegated to a
``QueueRunner``; file descriptors received with a message are either kept
(kick/call/err eventfds, backend channel) or closed here, never leaked.

Rules are those of QEMU's docs/interop/vhost-user.rst; section names are
cited where they decide something.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from virtiofsd_py.vhost import protocol as p
from virtiofsd_py.vhost.protocol import Message, MessageType, ProtocolError
from virtiofsd_py.vhost.rings import Vring
from virtiofsd_py.vhost.transfer import StateStore, TransferError, TransferRequest
from virtiofsd_py.virtio.dirty_log import DirtyLog, DirtyLogError, logging_supported
from virtiofsd_py.virtio.memory import GuestMemory, GuestMemoryError, close_fds, map_region
from virtiofsd_py.virtio.runner import QueueRunner
from virtiofsd_py.virtio.virtqueue import QueueError, SplitQueue, valid_queue_size

log = logging.getLogger("virtiofsd_py.vhost")

#: virtio-fs config space (virtio 1.2, 5.11.4): tag[36], le32 num_request_queues.
FS_CONFIG = struct.Struct("<36sI")
FS_TAG_MAX = 36


@dataclass(slots=True)
class BackendConfig:
    #: Rings we can serve: hiprio + request queues (GET_QUEUE_NUM).
    max_queues: int = 1 + 16
    max_mem_slots: int = 509
    #: With a tag we offer PROTOCOL_F_CONFIG and serve the config space.
    tag: str | None = None
    #: Offer migration (LOG_ALL, LOG_SHMFD, DEVICE_STATE) when a state
    #: provider exists and dirty logging works here.
    migration: bool = True
    #: Largest device state accepted on LOAD.
    max_state_size: int = 1 << 30


class DeviceState(StateStore, Protocol):
    """What migration needs from the daemon: the state to move, and a notice
    when dirty logging starts or stops."""

    def log_all_changed(self, enabled: bool) -> None:
        """Migration starts (LOG_ALL on) or is cancelled (off): prepare or stop."""


def offered_features(config: BackendConfig | None = None) -> int:
    bits = (
        p.bit(p.VIRTIO_F_VERSION_1)
        | p.bit(p.VIRTIO_RING_F_INDIRECT_DESC)
        | p.bit(p.VIRTIO_RING_F_EVENT_IDX)
        | p.bit(p.VHOST_USER_F_PROTOCOL_FEATURES)
    )
    if config is not None and config.migration:
        bits |= p.bit(p.VHOST_F_LOG_ALL)
    return bits


def offered_protocol_features(config: BackendConfig) -> int:
    bits = (
        p.bit(p.ProtocolFeature.MQ)
        | p.bit(p.ProtocolFeature.REPLY_ACK)
        | p.bit(p.ProtocolFeature.BACKEND_REQ)
        | p.bit(p.ProtocolFeature.CONFIGURE_MEM_SLOTS)
        | p.bit(p.ProtocolFeature.RESET_DEVICE)
    )
    if config.tag is not None:
        bits |= p.bit(p.ProtocolFeature.CONFIG)
    if config.migration:
        bits |= p.bit(p.ProtocolFeature.LOG_SHMFD) | p.bit(p.ProtocolFeature.DEVICE_STATE)
    return bits


#: Messages whose reply carries a body: they never get an extra REPLY_ACK.
_REPLY_BODY = frozenset(
    {
        MessageType.GET_FEATURES,
        MessageType.GET_PROTOCOL_FEATURES,
        MessageType.GET_VRING_BASE,
        MessageType.GET_QUEUE_NUM,
        MessageType.GET_CONFIG,
        MessageType.GET_MAX_MEM_SLOTS,
        MessageType.SET_DEVICE_STATE_FD,
        MessageType.CHECK_DEVICE_STATE,
        MessageType.GET_INFLIGHT_FD,
        MessageType.GET_STATUS,
        MessageType.GET_SHARED_OBJECT,
    }
)


class Reply:
    """What handling one message produced: bytes to send and fds to pass, and
    a device-state transfer to run once they are sent."""

    __slots__ = ("data", "fds", "transfer")

    def __init__(
        self,
        data: bytes,
        fds: tuple[int, ...] = (),
        transfer: TransferRequest | None = None,
    ) -> None:
        self.data = data
        self.fds = fds
        self.transfer = transfer


Handler = Callable[["VhostUserBackend", Message], Awaitable[Reply | None]]


class VhostUserBackend:
    def __init__(
        self,
        runner: QueueRunner,
        config: BackendConfig | None = None,
        *,
        on_reset: Callable[[], None] | None = None,
        state: DeviceState | None = None,
    ) -> None:
        self.config = config or BackendConfig()
        if self.config.migration and (state is None or not logging_supported()):
            if state is not None:
                log.warning("dirty logging unavailable (libatomic missing): migration off")
            self.config.migration = False
        #: Device reset (RESET_DEVICE/RESET_OWNER): the FUSE session ends too.
        self.on_reset = on_reset
        self.state = state
        self.dirty_log: DirtyLog | None = None
        self.log_fd: int | None = None
        self._logging = False
        #: The transfer asked for by the last SET_DEVICE_STATE_FD, until checked.
        self._transfer: TransferRequest | None = None
        self.runner = runner
        self.memory = GuestMemory()
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.backend_req_fd: int | None = None
        self.rings = [Vring(i) for i in range(self.config.max_queues)]

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & p.bit(p.ProtocolFeature.REPLY_ACK))

    @property
    def suspended(self) -> bool:
        """All rings stopped ("Suspended device state")."""
        return not any(r.started for r in self.rings)

    # -- entry point -------------------------------------------------------------
    async def handle(self, msg: Message) -> Reply | None:
        """Handle one message; never raises for bad input (logs and NAKs)."""
        handler = _HANDLERS.get(msg.request)
        try:
            if handler is None:
                raise ProtocolError("unsupported message")
            reply = await handler(self, msg)
        except (ProtocolError, GuestMemoryError, QueueError) as e:
            log.error("vhost-user %s: %s", msg.name, e)
            return self._nak(msg)
        finally:
            close_fds(_take_fds(msg))  # whatever the handler did not keep
        if reply is None and msg.need_reply and self.reply_ack:
            reply = Reply(p.encode_u64_reply(msg.request, 0))
        return reply

    def _nak(self, msg: Message) -> Reply | None:
        """Failure reply: REPLY_ACK error, or an error-shaped body where one is due."""
        if msg.request == MessageType.SET_DEVICE_STATE_FD:
            return Reply(p.encode_u64_reply(msg.request, 1 | p.VRING_NOFD_MASK))
        if msg.request == MessageType.GET_VRING_BASE:
            index = msg.payload[:4] if len(msg.payload) >= 4 else b"\0\0\0\0"
            return Reply(p.encode_reply(msg.request, index + b"\0\0\0\0"))
        if msg.request == MessageType.GET_CONFIG:
            return Reply(p.encode_reply(msg.request, b""))
        if msg.request in _REPLY_BODY:
            return Reply(p.encode_u64_reply(msg.request, 1 if msg.request in _U64_ERR else 0))
        if msg.need_reply and self.reply_ack:
            return Reply(p.encode_u64_reply(msg.request, 1))
        return None

    def _ring(self, index: int) -> Vring:
        if not 0 <= index < len(self.rings):
            raise ProtocolError(f"ring index {index} out of range (have {len(self.rings)})")
        return self.rings[index]

    # -- features ----------------------------------------------------------------
    async def _get_features(self, msg: Message) -> Reply:
        return Reply(p.encode_u64_reply(msg.request, offered_features(self.config)))

    async def _set_features(self, msg: Message) -> None:
        value = p.decode_u64(msg)
        unknown = value & ~offered_features(self.config)
        if unknown:
            raise ProtocolError(f"features {unknown:#x} were not offered")
        self.features = value
        if not value & p.bit(p.VHOST_USER_F_PROTOCOL_FEATURES):
            # "Ring states": enables all rings, never disables any.
            for r in self.rings:
                r.enabled = True
                self.runner.process(r)
        event_idx = bool(value & p.bit(p.VIRTIO_RING_F_EVENT_IDX))
        for r in self.rings:
            if r.queue is not None:
                r.queue.event_idx = event_idx
        self._update_logging()

    async def _get_protocol_features(self, msg: Message) -> Reply:
        return Reply(p.encode_u64_reply(msg.request, offered_protocol_features(self.config)))

    async def _set_protocol_features(self, msg: Message) -> None:
        value = p.decode_u64(msg)
        unknown = value & ~offered_protocol_features(self.config)
        if unknown:
            raise ProtocolError(f"protocol features {unknown:#x} were not offered")
        self.protocol_features = value

    async def _set_owner(self, msg: Message) -> None:
        self.owner = True

    async def _reset_owner(self, msg: Message) -> None:
        await self._reset()
        self.owner = False

    async def _reset_device(self, msg: Message) -> None:
        await self._reset()

    async def _reset(self) -> None:
        for r in self.rings:
            await self._stop_ring(r)
            r.close()
            self.rings[r.index] = Vring(r.index)
        self.features = 0
        if self.on_reset is not None:
            self.on_reset()

    async def _get_queue_num(self, msg: Message) -> Reply:
        return Reply(p.encode_u64_reply(msg.request, len(self.rings)))

    # -- memory ------------------------------------------------------------------
    async def _set_mem_table(self, msg: Message) -> None:
        fds = _take_fds(msg)
        try:
            regions = p.decode_mem_table(msg)
            if len(fds) != len(regions):
                raise ProtocolError(f"{len(regions)} regions but {len(fds)} fds")
            mapped = []
            try:
                for region, fd in zip(regions, fds, strict=True):
                    mapped.append(map_region(region, fd))
            except GuestMemoryError:
                for m in mapped:
                    m.release()
                raise
        finally:
            close_fds(fds)
        self.memory.replace(mapped)
        self._remap_rings()

    async def _get_max_mem_slots(self, msg: Message) -> Reply:
        return Reply(p.encode_u64_reply(msg.request, self.config.max_mem_slots))

    async def _add_mem_reg(self, msg: Message) -> None:
        fds = _take_fds(msg)
        try:
            region = p.decode_single_region(msg)
            if len(fds) != 1:
                raise ProtocolError(f"expected 1 fd, got {len(fds)}")
            if len(self.memory.regions) >= self.config.max_mem_slots:
                raise ProtocolError("no free memory slot")
            mapped = map_region(region, fds[0])
        finally:
            close_fds(fds)
        try:
            self.memory.add(mapped)
        except GuestMemoryError:
            mapped.release()
            raise
        self._remap_rings()

    async def _rem_mem_reg(self, msg: Message) -> None:
        self.memory.remove(p.decode_single_region(msg))
        self._remap_rings()

    def _remap_rings(self) -> None:
        """Ring views point into mappings; rebuild them after a memory change."""
        for r in self.rings:
            if r.addr is not None and r.num:
                self._build_queue(r)

    # -- rings ---------------------------------------------------------------------
    async def _set_vring_num(self, msg: Message) -> None:
        index, num = p.decode_vring_state(msg)
        ring = self._ring(index)
        if not valid_queue_size(num):
            raise ProtocolError(f"ring {index}: invalid size {num}")
        ring.num = num
        ring.queue = None

    async def _set_vring_addr(self, msg: Message) -> None:
        addr = p.decode_vring_addr(msg)
        ring = self._ring(addr.index)
        ring.addr = addr
        self._build_queue(ring)

    def _build_queue(self, ring: Vring) -> None:
        """Map the ring's areas, keeping the indices of a running ring."""
        if ring.addr is None or not ring.num:
            return
        old = ring.queue
        base = old.last_avail_idx if old is not None else ring.base
        try:
            ring.queue = SplitQueue(
                self.memory,
                ring.num,
                ring.addr,
                event_idx=bool(self.features & p.bit(p.VIRTIO_RING_F_EVENT_IDX)),
                base=base,
            )
        except QueueError:
            ring.queue = None
            if ring.started:
                raise
            # Memory may still arrive (QEMU sends SET_MEM_TABLE later on some
            # paths); mapping is retried when the ring starts or memory changes.
            return
        if old is not None:
            ring.queue.used_idx = old.used_idx
        ring.broken = False
        self._log_used_ring(ring)

    async def _set_vring_base(self, msg: Message) -> None:
        index, num = p.decode_vring_state(msg)
        ring = self._ring(index)
        if ring.started:
            raise ProtocolError(f"ring {index}: SET_VRING_BASE while started")
        if num > 0xFFFF:
            raise ProtocolError(f"ring {index}: base {num} does not fit a split ring")
        ring.base = num
        if ring.queue is not None:
            ring.queue.last_avail_idx = num
            ring.queue.used_idx = num

    async def _get_vring_base(self, msg: Message) -> Reply:
        index, _ = p.decode_vring_state(msg)
        ring = self._ring(index)
        await self._stop_ring(ring)
        base = ring.queue.last_avail_idx if ring.queue is not None else ring.base
        ring.base = base
        ring.queue = None
        return Reply(p.encode_reply(msg.request, p.VRING_STATE.pack(index, base)))

    async def _stop_ring(self, ring: Vring) -> None:
        """GET_VRING_BASE: complete in-flight requests, then stop ("Ring states")."""
        self.runner.unwatch(ring)
        await self.runner.drain(ring)
        ring.started = False
        ring.set_kick(None)

    def _vring_fd(self, msg: Message) -> tuple[Vring, int | None]:
        index, has_fd = p.decode_vring_fd(msg)
        ring = self._ring(index)
        fds = _take_fds(msg)
        fd = fds.pop(0) if has_fd and fds else None
        close_fds(fds)
        if has_fd and fd is None:
            raise ProtocolError(f"ring {index}: no fd attached")
        return ring, fd

    async def _set_vring_kick(self, msg: Message) -> None:
        ring, fd = self._vring_fd(msg)
        ring.set_kick(fd)
        if fd is None:
            log.warning("ring %d: polling mode (no kick fd) is not supported", ring.index)
            self.runner.unwatch(ring)
            return
        if ring.queue is None:
            self._build_queue(ring)
        self.runner.watch(ring)
        # Treated as a kick, as libvhost-user does: a ring restored after
        # migration may hold requests whose kick the source consumed.
        ring.started = True
        self.runner.process(ring)

    async def _set_vring_call(self, msg: Message) -> None:
        ring, fd = self._vring_fd(msg)
        ring.set_call(fd)

    async def _set_vring_err(self, msg: Message) -> None:
        ring, fd = self._vring_fd(msg)
        ring.set_err(fd)

    async def _set_vring_enable(self, msg: Message) -> None:
        index, num = p.decode_vring_state(msg)
        if not self.features & p.bit(p.VHOST_USER_F_PROTOCOL_FEATURES):
            raise ProtocolError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        ring = self._ring(index)
        if num not in (0, 1):
            raise ProtocolError(f"ring {index}: enable value {num}")
        ring.enabled = bool(num)
        if ring.enabled:
            self.runner.process(ring)

    # -- misc ----------------------------------------------------------------------
    async def _set_backend_req_fd(self, msg: Message) -> None:
        fds = _take_fds(msg)
        if len(fds) != 1:
            close_fds(fds)
            raise ProtocolError(f"expected 1 fd, got {len(fds)}")
        if self.backend_req_fd is not None:
            close_fds([self.backend_req_fd])
        self.backend_req_fd = fds[0]

    def _config_space(self) -> bytes:
        tag = (self.config.tag or "").encode()
        return FS_CONFIG.pack(tag, len(self.rings) - 1)

    async def _get_config(self, msg: Message) -> Reply:
        req = p.decode_config(msg)
        if self.config.tag is None:
            raise ProtocolError("no config space (start with --tag to offer one)")
        space = self._config_space()
        if req.offset + req.size > len(space):
            raise ProtocolError(f"config range {req.offset}+{req.size} beyond {len(space)} bytes")
        data = space[req.offset : req.offset + req.size]
        return Reply(
            p.encode_reply(
                msg.request, p.encode_config(p.ConfigSpace(req.offset, req.size, req.flags, data))
            )
        )

    async def _set_config(self, msg: Message) -> None:
        p.decode_config(msg)
        raise ProtocolError("the virtio-fs config space is read-only")

    # -- migration: dirty log ---------------------------------------------------
    @property
    def log_all(self) -> bool:
        return bool(self.features & p.bit(p.VHOST_F_LOG_ALL))

    async def _set_log_base(self, msg: Message) -> Reply:
        if not self.protocol_features & p.bit(p.ProtocolFeature.LOG_SHMFD):
            raise ProtocolError("LOG_SHMFD was not negotiated")
        size, offset = p.decode_log_desc(msg)
        fds = _take_fds(msg)
        try:
            if len(fds) != 1:
                raise ProtocolError(f"expected 1 fd, got {len(fds)}")
            try:
                new = DirtyLog(fds[0], size, offset)
            except DirtyLogError as e:
                raise ProtocolError(str(e)) from e
        finally:
            close_fds(fds)
        old, self.dirty_log = self.dirty_log, new
        self._update_logging()
        if old is not None:
            old.close()
        log.info("dirty log mapped: %d bytes", size)
        return Reply(p.encode_u64_reply(msg.request, 0))

    async def _set_log_fd(self, msg: Message) -> None:
        fds = _take_fds(msg)
        if len(fds) != 1:
            close_fds(fds)
            raise ProtocolError(f"expected 1 fd, got {len(fds)}")
        if self.log_fd is not None:
            close_fds([self.log_fd])
        self.log_fd = fds[0]

    def _update_logging(self) -> None:
        """Log writes iff LOG_ALL is on and a log is mapped; tell the state
        provider when migration starts or is cancelled."""
        active = self.log_all and self.dirty_log is not None
        self.runner.dirty_log = self.dirty_log if active else None
        for r in self.rings:
            self._log_used_ring(r)
        if active != self._logging:
            self._logging = active
            log.info("dirty logging %s", "on" if active else "off")
            if self.state is not None:
                self.state.log_all_changed(active)

    def _log_used_ring(self, ring: Vring) -> None:
        q = ring.queue
        if q is None:
            return
        dlog = self.runner.dirty_log
        addr = ring.addr
        if dlog is None or addr is None or not addr.flags & p.VRING_F_LOG:
            q.on_used_write = None
            return
        base = addr.log_guest_addr
        q.on_used_write = lambda off, n: dlog.mark(base + off, n)

    # -- migration: device state ---------------------------------------------------
    async def _set_device_state_fd(self, msg: Message) -> Reply:
        if not self.protocol_features & p.bit(p.ProtocolFeature.DEVICE_STATE):
            raise ProtocolError("DEVICE_STATE was not negotiated")
        direction, phase = p.decode_device_state_params(msg)
        fds = _take_fds(msg)
        fd = fds.pop(0) if fds else None
        close_fds(fds)
        try:
            if fd is None:
                raise ProtocolError("no transfer fd attached")
            if phase != p.DEVICE_STATE_PHASE_STOPPED:
                raise ProtocolError(f"unsupported migration phase {phase}")
            if direction not in (p.DEVICE_STATE_SAVE, p.DEVICE_STATE_LOAD):
                raise ProtocolError(f"unknown transfer direction {direction}")
            if not self.suspended:
                raise ProtocolError("device state transfer while rings are running")
            if self._transfer is not None and not self._transfer.outcome.done():
                raise ProtocolError("a device state transfer is already in progress")
        except ProtocolError:
            if fd is not None:
                close_fds([fd])
            raise
        assert self.state is not None
        self._transfer = TransferRequest(
            direction,
            fd,
            self.state,
            self.config.max_state_size,
            asyncio.get_running_loop().create_future(),
        )
        # Reply first: QEMU starts reading/writing the pipe only after it, so
        # the connection runs the transfer once this reply is sent.
        return Reply(p.encode_u64_reply(msg.request, p.VRING_NOFD_MASK), transfer=self._transfer)

    async def _check_device_state(self, msg: Message) -> Reply:
        job, self._transfer = self._transfer, None
        if job is None:
            log.error("CHECK_DEVICE_STATE without a transfer")
            return Reply(p.encode_u64_reply(msg.request, 1))
        await asyncio.wait((job.outcome,))
        error = TransferError("cancelled") if job.outcome.cancelled() else job.outcome.result()
        if error is None:
            return Reply(p.encode_u64_reply(msg.request, 0))
        if isinstance(error, (TransferError, OSError, ValueError)):
            log.error("device state transfer failed: %s", error)
        else:
            log.error("device state transfer failed", exc_info=error)
        return Reply(p.encode_u64_reply(msg.request, 1))

    async def close(self) -> None:
        """Connection gone: stop every ring and release everything.

        A running transfer belongs to the connection, which cancels it.
        """
        self._transfer = None
        for r in self.rings:
            await self._stop_ring(r)
            r.close()
        self.runner.dirty_log = None
        if self.dirty_log is not None:
            self.dirty_log.close()
            self.dirty_log = None
        if self.log_fd is not None:
            close_fds([self.log_fd])
            self.log_fd = None
        if self.backend_req_fd is not None:
            close_fds([self.backend_req_fd])
            self.backend_req_fd = None
        self.memory.clear()


def _take_fds(msg: Message) -> list[int]:
    """Move the message's fds to the caller, who now owns (keeps or closes) them."""
    fds, msg.fds = msg.fds, []
    return fds


_U64_ERR = frozenset({MessageType.CHECK_DEVICE_STATE})

_HANDLERS: dict[int, Handler] = {
    MessageType.GET_FEATURES: VhostUserBackend._get_features,
    MessageType.SET_FEATURES: VhostUserBackend._set_features,
    MessageType.SET_OWNER: VhostUserBackend._set_owner,
    MessageType.RESET_OWNER: VhostUserBackend._reset_owner,
    MessageType.RESET_DEVICE: VhostUserBackend._reset_device,
    MessageType.GET_PROTOCOL_FEATURES: VhostUserBackend._get_protocol_features,
    MessageType.SET_PROTOCOL_FEATURES: VhostUserBackend._set_protocol_features,
    MessageType.GET_QUEUE_NUM: VhostUserBackend._get_queue_num,
    MessageType.SET_MEM_TABLE: VhostUserBackend._set_mem_table,
    MessageType.GET_MAX_MEM_SLOTS: VhostUserBackend._get_max_mem_slots,
    MessageType.ADD_MEM_REG: VhostUserBackend._add_mem_reg,
    MessageType.REM_MEM_REG: VhostUserBackend._rem_mem_reg,
    MessageType.SET_VRING_NUM: VhostUserBackend._set_vring_num,
    MessageType.SET_VRING_ADDR: VhostUserBackend._set_vring_addr,
    MessageType.SET_VRING_BASE: VhostUserBackend._set_vring_base,
    MessageType.GET_VRING_BASE: VhostUserBackend._get_vring_base,
    MessageType.SET_VRING_KICK: VhostUserBackend._set_vring_kick,
    MessageType.SET_VRING_CALL: VhostUserBackend._set_vring_call,
    MessageType.SET_VRING_ERR: VhostUserBackend._set_vring_err,
    MessageType.SET_VRING_ENABLE: VhostUserBackend._set_vring_enable,
    MessageType.SET_BACKEND_REQ_FD: VhostUserBackend._set_backend_req_fd,
    MessageType.GET_CONFIG: VhostUserBackend._get_config,
    MessageType.SET_CONFIG: VhostUserBackend._set_config,
    MessageType.SET_LOG_BASE: VhostUserBackend._set_log_base,
    MessageType.SET_LOG_FD: VhostUserBackend._set_log_fd,
    MessageType.SET_DEVICE_STATE_FD: VhostUserBackend._set_device_state_fd,
    MessageType.CHECK_DEVICE_STATE: VhostUserBackend._check_device_state,
}
