"""The vhost-user back-end state machine for a virtio-fs device.

Takes decoded ``Message`` objects, updates the protocol state (features,
memory table, rings) and returns a ``Reply``: the bytes and fds to send and,
for SET_DEVICE_STATE_FD, a transfer to run once they are sent.  It owns no
socket and no pipe and starts no task: ``vhost.connection`` feeds it and
runs the transfers it asks for.  Queue processing is delegated to a
``QueueRunner``; the fds that come with a message are kept (kick/call/err
eventfds, back-end channel, log fd) or closed here, never leaked.

The rules, from QEMU's docs/interop/vhost-user.rst (section names quoted);
"seed n/8" is the patch of Hanna Czenczek's v4 series (October 2023) that
added the rule to that document.

Ring states ("Ring states", seed 3/8).  Two independent states per ring;
every ring begins stopped and disabled:

    event                                        started  enabled
    connection, RESET_OWNER, RESET_DEVICE        no       no
    kick (kick eventfd readable, SET_VRING_KICK) yes      -
    GET_VRING_BASE                               no       -
    SET_VRING_ENABLE n (F_PROTOCOL_FEATURES)     -        n == 1
    SET_FEATURES without F_PROTOCOL_FEATURES     -        yes

- A ring is processed only while started, enabled, mapped and not broken
  (``Vring.ready``); the enabled state is kept while stopped and takes
  effect when the ring starts.  SET_FEATURES never disables a ring:
  toggling LOG_ALL must not halt the device.
- A started but disabled ring may only be processed "without side
  effects"; every FUSE request has some, so its chains wait until enabled.
- SET_VRING_KICK counts as a kick: a ring restored after migration may
  hold requests whose kick the source consumed.
- GET_VRING_BASE completes the ring's in-flight requests before it answers
  (GET_VRING_BASE_INFLIGHT is not offered); SET_VRING_BASE is refused while
  the ring is started.

Suspended device ("Suspended device state", seed 4/8).  While every ring
is stopped nothing is processed, so no guest memory is written and no call
eventfd signalled; the back-end never sends messages of its own; it still
answers every message.

Replies ("Communication", "VHOST_USER_PROTOCOL_F_REPLY_ACK").  A message
whose reply has a body (``protocol.REPLY_BODY``) always gets one, on
failure an error-shaped one (``protocol.encode_error_reply``).
Any other message gets a u64 status (0 ok, 1 failed) only with REPLY_ACK
negotiated and NEED_REPLY set.  Bad input never raises: logged and NAKed.

Device state ("Migrating back-end state", SET_DEVICE_STATE_FD,
CHECK_DEVICE_STATE; seed 5/8).  Phases of the transfer:

    phase     SET_DEVICE_STATE_FD                 CHECK_DEVICE_STATE
    none      reply, then running                 1 (error)
    running   refused, its fd closed              waits for the outcome -> none
    finished  reply, then running (old dropped)   the outcome, 0 or 1 -> none

- Valid only while suspended and for phase 0 (stopped); the reply comes
  first and the transfer after it, as QEMU touches the pipe only after the
  reply.  Our reply never carries an fd (bit 8, invalid fd, is set).
- Closing the connection cancels a running transfer.

Which message is valid in which state is ``_MESSAGES`` at the bottom: one
row per message type, its handler and the ``Requirement``s checked before
the handler runs.  Message types without a row are NAKed as unsupported.
Feature gates the code does not need are left out (CONFIG, MQ,
CONFIGURE_MEM_SLOTS, RESET_DEVICE): QEMU sends those messages only when
negotiated, and serving them regardless harms nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from virtiofsd_py.vhost import protocol as p
from virtiofsd_py.vhost.device import (
    DeviceState,
    config_space,
    offered_features,
    offered_protocol_features,
)
from virtiofsd_py.vhost.protocol import Message, MessageType, ProtocolError
from virtiofsd_py.vhost.rings import Vring
from virtiofsd_py.vhost.transfer import TransferError, TransferRequest
from virtiofsd_py.virtio.dirty_log import DirtyLog, DirtyLogError, logging_supported
from virtiofsd_py.virtio.memory import (
    GuestMemory,
    GuestMemoryError,
    close_fds,
    map_region,
    map_regions,
)
from virtiofsd_py.virtio.runner import QueueRunner
from virtiofsd_py.virtio.virtqueue import QueueError, valid_queue_size

log = logging.getLogger("virtiofsd_py.vhost")


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


MessageHandler = Callable[["VhostUserBackend", Message], Awaitable[Reply | None]]


@dataclass(frozen=True, slots=True)
class Requirement:
    """A state a message is valid in (a column of ``_MESSAGES``)."""

    holds: Callable[[VhostUserBackend, Message], bool]
    #: Logged when the message arrives in another state.
    otherwise: str


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
        row = _MESSAGES.get(msg.request)
        try:
            if row is None:
                raise ProtocolError("unsupported message")
            handler, requires = row
            for rule in requires:
                if not rule.holds(self, msg):
                    raise ProtocolError(rule.otherwise)
            if msg.request in RECONFIGURES:
                async with self.runner.paused():
                    reply = await handler(self, msg)
            else:
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
        """Failure reply: an error-shaped body where one is due, else REPLY_ACK's error."""
        data = p.encode_error_reply(msg)
        if data is None and msg.need_reply and self.reply_ack:
            data = p.encode_u64_reply(msg.request, 1)
        return None if data is None else Reply(data)

    def _ring(self, index: int) -> Vring:
        if not 0 <= index < len(self.rings):
            raise ProtocolError(f"ring index {index} out of range (have {len(self.rings)})")
        return self.rings[index]

    # -- features ----------------------------------------------------------------
    def _features_offered(self) -> int:
        return offered_features(migration=self.config.migration)

    def _protocol_features_offered(self) -> int:
        return offered_protocol_features(
            config_space=self.config.tag is not None, migration=self.config.migration
        )

    async def _get_features(self, msg: Message) -> Reply:
        return Reply(p.encode_u64_reply(msg.request, self._features_offered()))

    async def _set_features(self, msg: Message) -> None:
        value = p.decode_u64(msg)
        unknown = value & ~self._features_offered()
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
        return Reply(p.encode_u64_reply(msg.request, self._protocol_features_offered()))

    async def _set_protocol_features(self, msg: Message) -> None:
        value = p.decode_u64(msg)
        unknown = value & ~self._protocol_features_offered()
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
            mapped = map_regions(regions, fds)
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
        ring.map(self.memory, event_idx=bool(self.features & p.bit(p.VIRTIO_RING_F_EVENT_IDX)))
        ring.log_used(self.runner.dirty_log)

    async def _set_vring_base(self, msg: Message) -> None:
        index, num = p.decode_vring_state(msg)
        ring = self._ring(index)
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

    async def _get_config(self, msg: Message) -> Reply:
        req = p.decode_config(msg)
        assert self.config.tag is not None  # CONFIG_SPACE
        space = config_space(self.config.tag, len(self.rings) - 1)
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
            r.log_used(self.runner.dirty_log)
        if active != self._logging:
            self._logging = active
            log.info("dirty logging %s", "on" if active else "off")
            if self.state is not None:
                self.state.log_all_changed(active)

    # -- migration: device state ---------------------------------------------------
    async def _set_device_state_fd(self, msg: Message) -> Reply:
        direction, phase = p.decode_device_state_params(msg)
        if phase != p.DEVICE_STATE_PHASE_STOPPED:
            raise ProtocolError(f"unsupported migration phase {phase}")
        if direction not in (p.DEVICE_STATE_SAVE, p.DEVICE_STATE_LOAD):
            raise ProtocolError(f"unknown transfer direction {direction}")
        if not msg.fds:
            raise ProtocolError("no transfer fd attached")
        fds = _take_fds(msg)
        close_fds(fds[1:])
        assert self.state is not None  # DEVICE_STATE is offered only with a state
        self._transfer = TransferRequest(
            direction,
            fds[0],
            self.state,
            self.config.max_state_size,
            asyncio.get_running_loop().create_future(),
        )
        # Reply first: QEMU starts reading/writing the pipe only after it, so
        # the connection runs the transfer once this reply is sent.
        return Reply(p.encode_u64_reply(msg.request, p.VRING_NOFD_MASK), transfer=self._transfer)

    async def _check_device_state(self, msg: Message) -> Reply:
        job, self._transfer = self._transfer, None
        assert job is not None  # TRANSFER_ASKED
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


def _negotiated(feature: p.ProtocolFeature) -> Requirement:
    return Requirement(
        lambda b, m: bool(b.protocol_features & p.bit(feature)),
        f"{feature.name} was not negotiated",
    )


# -- the states messages are valid in ----------------------------------------------
#: "Ring states": SET_VRING_ENABLE exists only with VHOST_USER_F_PROTOCOL_FEATURES.
PROTOCOL_FEATURES: Final = Requirement(
    lambda b, m: bool(b.features & p.bit(p.VHOST_USER_F_PROTOCOL_FEATURES)),
    "VHOST_USER_F_PROTOCOL_FEATURES was not negotiated",
)
LOG_SHMFD: Final = _negotiated(p.ProtocolFeature.LOG_SHMFD)
DEVICE_STATE: Final = _negotiated(p.ProtocolFeature.DEVICE_STATE)
#: The base of a running ring belongs to the ring (it is stopped by GET_VRING_BASE).
RING_STOPPED: Final = Requirement(
    lambda b, m: not b._ring(p.decode_vring_state(m)[0]).started, "the ring is started"
)
#: "Migrating back-end state": the only phase is the stopped one, device suspended.
SUSPENDED: Final = Requirement(lambda b, m: b.suspended, "rings are running (not suspended)")
NO_TRANSFER_RUNNING: Final = Requirement(
    lambda b, m: b._transfer is None or b._transfer.outcome.done(),
    "a device state transfer is already in progress",
)
#: GET_CONFIG: the config space exists only with a tag.
CONFIG_SPACE: Final = Requirement(
    lambda b, m: b.config.tag is not None, "no config space (start with --tag to offer one)"
)
TRANSFER_ASKED: Final = Requirement(
    lambda b, m: b._transfer is not None, "no device state transfer to check"
)

#: Messages that change what a queue worker uses (memory, a ring's queue,
#: eventfds, features, the dirty log): handled while the workers are parked
#: (``QueueRunner.paused``), so no thread ever touches an unmapped region or
#: a closed fd.
RECONFIGURES: Final = frozenset(
    {
        MessageType.SET_FEATURES,
        MessageType.SET_MEM_TABLE,
        MessageType.ADD_MEM_REG,
        MessageType.REM_MEM_REG,
        MessageType.SET_VRING_NUM,
        MessageType.SET_VRING_ADDR,
        MessageType.SET_VRING_BASE,
        MessageType.SET_VRING_KICK,
        MessageType.SET_VRING_CALL,
        MessageType.SET_VRING_ERR,
        MessageType.SET_VRING_ENABLE,
        MessageType.SET_LOG_BASE,
    }
)

#: The message table: message type -> (handler, the states it is valid in).
_MESSAGES: Final[dict[int, tuple[MessageHandler, tuple[Requirement, ...]]]] = {
    MessageType.GET_FEATURES: (VhostUserBackend._get_features, ()),
    MessageType.SET_FEATURES: (VhostUserBackend._set_features, ()),
    MessageType.SET_OWNER: (VhostUserBackend._set_owner, ()),
    MessageType.RESET_OWNER: (VhostUserBackend._reset_owner, ()),
    MessageType.RESET_DEVICE: (VhostUserBackend._reset_device, ()),
    MessageType.GET_PROTOCOL_FEATURES: (VhostUserBackend._get_protocol_features, ()),
    MessageType.SET_PROTOCOL_FEATURES: (VhostUserBackend._set_protocol_features, ()),
    MessageType.GET_QUEUE_NUM: (VhostUserBackend._get_queue_num, ()),
    MessageType.SET_MEM_TABLE: (VhostUserBackend._set_mem_table, ()),
    MessageType.GET_MAX_MEM_SLOTS: (VhostUserBackend._get_max_mem_slots, ()),
    MessageType.ADD_MEM_REG: (VhostUserBackend._add_mem_reg, ()),
    MessageType.REM_MEM_REG: (VhostUserBackend._rem_mem_reg, ()),
    MessageType.SET_VRING_NUM: (VhostUserBackend._set_vring_num, ()),
    MessageType.SET_VRING_ADDR: (VhostUserBackend._set_vring_addr, ()),
    MessageType.SET_VRING_BASE: (VhostUserBackend._set_vring_base, (RING_STOPPED,)),
    MessageType.GET_VRING_BASE: (VhostUserBackend._get_vring_base, ()),
    MessageType.SET_VRING_KICK: (VhostUserBackend._set_vring_kick, ()),
    MessageType.SET_VRING_CALL: (VhostUserBackend._set_vring_call, ()),
    MessageType.SET_VRING_ERR: (VhostUserBackend._set_vring_err, ()),
    MessageType.SET_VRING_ENABLE: (VhostUserBackend._set_vring_enable, (PROTOCOL_FEATURES,)),
    MessageType.SET_BACKEND_REQ_FD: (VhostUserBackend._set_backend_req_fd, ()),
    MessageType.GET_CONFIG: (VhostUserBackend._get_config, (CONFIG_SPACE,)),
    MessageType.SET_CONFIG: (VhostUserBackend._set_config, ()),
    MessageType.SET_LOG_BASE: (VhostUserBackend._set_log_base, (LOG_SHMFD,)),
    MessageType.SET_LOG_FD: (VhostUserBackend._set_log_fd, ()),
    MessageType.SET_DEVICE_STATE_FD: (
        VhostUserBackend._set_device_state_fd,
        (DEVICE_STATE, SUSPENDED, NO_TRANSFER_RUNNING),
    ),
    MessageType.CHECK_DEVICE_STATE: (
        VhostUserBackend._check_device_state,
        (DEVICE_STATE, TRANSFER_ASKED),
    ),
}
