"""vhost-user wire protocol: constants, framing and payload codecs (sans-IO).

Everything here is pure: bytes and file descriptor numbers in, typed values
out, and back.  No sockets.  The rules come from QEMU's
docs/interop/vhost-user.rst ("Message Specification", "Front-end message
types", "Protocol features"); the numbers are those of the document as
merged (checked against QEMU 10), not of the patch series' drafts.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from virtiofsd_py.virtio.types import MemoryRegion, VringAddr

# -- "Header" (vhost-user.rst, "Message Specification") -------------------
HEADER = struct.Struct("=III")  # request, flags, size; native byte order
HEADER_SIZE = HEADER.size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
#: Largest payload any message we accept carries (GET_CONFIG: 12 + 256 bytes
#: of config space; SET_MEM_TABLE: 8 + 8 * 32).  Anything larger means the
#: stream is corrupt and cannot be resynchronised.
MAX_PAYLOAD = 4096
#: Largest number of fds one message may carry (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_FDS = 8


class MessageType(enum.IntEnum):
    """Front-end message types (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


def request_name(request: int) -> str:
    try:
        return MessageType(request).name
    except ValueError:
        return f"UNKNOWN({request})"


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of VHOST_USER_PROTOCOL_F_* (vhost-user.rst, Protocol features)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    GET_VRING_BASE_INFLIGHT = 20


# -- virtio / vhost feature bits (virtio spec 6, "Reserved Feature Bits") --
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VHOST_F_LOG_ALL = 26
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32


def bit(n: int) -> int:
    return 1 << n


# -- payload layouts -------------------------------------------------------
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")  # index, num
VRING_ADDR = struct.Struct("=IIQQQQ")  # index, flags, desc, used, avail, log
MEM_REGION = struct.Struct("=QQQQ")  # guest_phys_addr, size, userspace_addr, mmap_offset
MEM_TABLE_HEAD = struct.Struct("=II")  # nregions, padding
SINGLE_MEM_REGION_PAD = struct.Struct("=Q")
LOG_DESC = struct.Struct("=QQ")  # mmap_size, mmap_offset
CONFIG_HEAD = struct.Struct("=III")  # offset, size, flags
DEVICE_STATE_PARAMS = struct.Struct("=II")  # direction, phase
DEVICE_STATE_SAVE = 0
DEVICE_STATE_LOAD = 1
DEVICE_STATE_PHASE_STOPPED = 0

VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8
VRING_F_LOG = 1 << 0  # SET_VRING_ADDR flags: log the used ring
MEM_TABLE_MAX_REGIONS = 8


class ProtocolError(Exception):
    """A message that breaks the protocol; the text names what is wrong."""


# -- framing ---------------------------------------------------------------
@dataclass(slots=True)
class Message:
    """One framed message: header fields, raw payload and received fds.

    The receiver owns ``fds`` and must close the ones it does not keep.
    """

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return request_name(self.request)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


class FrameParser:
    """Incremental splitter of the byte stream into ``Message`` objects.

    ``next_read_size`` tells the transport how many bytes complete the
    current header or payload, so that it can read exactly one message at a
    time and keep fds attached to the message they came with.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: list[int] = []
        self._header: tuple[int, int, int] | None = None

    def next_read_size(self) -> int:
        if self._header is None:
            return HEADER_SIZE - len(self._buf)
        return self._header[2] - len(self._buf)

    def pending_fds(self) -> list[int]:
        """Fds received for a message not yet complete (to close on EOF)."""
        fds, self._fds = self._fds, []
        return fds

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Message]:
        """Add received bytes (and the fds that came with them).

        Raises ``ProtocolError`` when a header is unusable (bad version or an
        oversized payload): the stream cannot be trusted after that.
        """
        self._fds.extend(fds)
        out: list[Message] = []
        view = memoryview(data)
        while view:
            need = self.next_read_size()
            take = view[:need]
            self._buf += take
            view = view[len(take) :]
            if self._header is None:
                if len(self._buf) < HEADER_SIZE:
                    break
                request, flags, size = HEADER.unpack(self._buf)
                self._buf.clear()
                if flags & VERSION_MASK != VERSION:
                    raise ProtocolError(
                        f"{request_name(request)}: unsupported version {flags & VERSION_MASK}"
                    )
                if size > MAX_PAYLOAD:
                    raise ProtocolError(
                        f"{request_name(request)}: payload size {size} exceeds {MAX_PAYLOAD}"
                    )
                self._header = (request, flags, size)
            if self._header is not None and len(self._buf) == self._header[2]:
                request, flags, _ = self._header
                out.append(Message(request, flags, bytes(self._buf), self._fds))
                self._buf.clear()
                self._fds = []
                self._header = None
        return out


def encode_message(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    return encode_message(request, payload, VERSION | FLAG_REPLY)


def encode_u64_reply(request: int, value: int) -> bytes:
    return encode_reply(request, U64.pack(value))


#: Message types whose reply has a payload ("Front-end message types": a
#: reply payload other than N/A): it is due even when the message fails,
#: and replaces REPLY_ACK's status.  Includes types we do not serve.
REPLY_BODY: Final = frozenset(
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


def encode_error_reply(msg: Message) -> bytes | None:
    """The reply to a failed message of a ``REPLY_BODY`` type, else None.

    SET_DEVICE_STATE_FD: an error with the invalid-fd flag (never an error
    and an fd); GET_VRING_BASE: the ring's index with base 0; GET_CONFIG: no
    config bytes; CHECK_DEVICE_STATE: 1; other u64 replies: 0 (nothing).
    """
    request = msg.request
    if request == MessageType.SET_DEVICE_STATE_FD:
        return encode_u64_reply(request, 1 | VRING_NOFD_MASK)
    if request == MessageType.GET_VRING_BASE:
        index = msg.payload[:4] if len(msg.payload) >= 4 else b"\0\0\0\0"
        return encode_reply(request, index + b"\0\0\0\0")
    if request == MessageType.GET_CONFIG:
        return encode_reply(request, b"")
    if request in REPLY_BODY:
        return encode_u64_reply(request, 1 if request == MessageType.CHECK_DEVICE_STATE else 0)
    return None


# -- typed payloads ------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class ConfigSpace:
    offset: int
    size: int
    flags: int
    data: bytes


def _exact(msg: Message, st: struct.Struct) -> tuple[int, ...]:
    if len(msg.payload) < st.size:
        raise ProtocolError(f"{msg.name}: payload of {len(msg.payload)} bytes, need {st.size}")
    return st.unpack_from(msg.payload)


def decode_u64(msg: Message) -> int:
    return _exact(msg, U64)[0]


def decode_vring_state(msg: Message) -> tuple[int, int]:
    index, num = _exact(msg, VRING_STATE)
    return index, num


def decode_vring_addr(msg: Message) -> VringAddr:
    return VringAddr(*_exact(msg, VRING_ADDR))


def decode_vring_fd(msg: Message) -> tuple[int, bool]:
    """SET_VRING_KICK/CALL/ERR: (ring index, whether an fd is attached)."""
    value = decode_u64(msg)
    if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise ProtocolError(f"{msg.name}: reserved bits set in {value:#x}")
    return value & VRING_IDX_MASK, not (value & VRING_NOFD_MASK)


def decode_mem_table(msg: Message) -> list[MemoryRegion]:
    nregions, _pad = _exact(msg, MEM_TABLE_HEAD)
    if nregions > MEM_TABLE_MAX_REGIONS:
        raise ProtocolError(f"{msg.name}: {nregions} regions, at most {MEM_TABLE_MAX_REGIONS}")
    need = MEM_TABLE_HEAD.size + nregions * MEM_REGION.size
    if len(msg.payload) < need:
        raise ProtocolError(f"{msg.name}: {nregions} regions need {need} bytes")
    return [
        MemoryRegion(
            *MEM_REGION.unpack_from(msg.payload, MEM_TABLE_HEAD.size + i * MEM_REGION.size)
        )
        for i in range(nregions)
    ]


def decode_single_region(msg: Message) -> MemoryRegion:
    need = SINGLE_MEM_REGION_PAD.size + MEM_REGION.size
    if len(msg.payload) < need:
        raise ProtocolError(f"{msg.name}: payload of {len(msg.payload)} bytes, need {need}")
    return MemoryRegion(*MEM_REGION.unpack_from(msg.payload, SINGLE_MEM_REGION_PAD.size))


def encode_single_region(region: MemoryRegion) -> bytes:
    return SINGLE_MEM_REGION_PAD.pack(0) + MEM_REGION.pack(
        region.guest_phys_addr, region.size, region.userspace_addr, region.mmap_offset
    )


def decode_log_desc(msg: Message) -> tuple[int, int]:
    size, offset = _exact(msg, LOG_DESC)
    return size, offset


def decode_config(msg: Message) -> ConfigSpace:
    offset, size, flags = _exact(msg, CONFIG_HEAD)
    data = msg.payload[CONFIG_HEAD.size :]
    if size > MAX_PAYLOAD - CONFIG_HEAD.size:
        raise ProtocolError(f"{msg.name}: config size {size} too large")
    return ConfigSpace(offset, size, flags, data)


def encode_config(space: ConfigSpace) -> bytes:
    return CONFIG_HEAD.pack(space.offset, space.size, space.flags) + space.data


def decode_device_state_params(msg: Message) -> tuple[int, int]:
    direction, phase = _exact(msg, DEVICE_STATE_PARAMS)
    return direction, phase
