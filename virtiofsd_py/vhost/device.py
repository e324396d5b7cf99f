"""The virtio-fs device as this back-end offers it: features and config space.

What GET_FEATURES, GET_PROTOCOL_FEATURES and GET_CONFIG answer, and what
migration needs from the daemon (``DeviceState``).  Pure values: the state
machine in ``vhost.backend`` decides when they apply.
"""

from __future__ import annotations

import struct
from typing import Final, Protocol

from virtiofsd_py.vhost import protocol as p
from virtiofsd_py.vhost.transfer import StateStore

#: virtio-fs config space (virtio 1.2, 5.11.4): tag[36], le32 num_request_queues.
FS_CONFIG: Final = struct.Struct("<36sI")
#: Longest tag, in bytes (the tag field; shorter tags are NUL-padded).
FS_TAG_MAX: Final = 36


class DeviceState(StateStore, Protocol):
    """What migration needs from the daemon: the state to move, and a notice
    when dirty logging starts or stops."""

    def log_all_changed(self, enabled: bool) -> None:
        """Migration starts (LOG_ALL on) or is cancelled (off): prepare or stop."""


def offered_features(*, migration: bool = False) -> int:
    """Virtio and vhost feature bits (GET_FEATURES); LOG_ALL only with migration."""
    bits = (
        p.bit(p.VIRTIO_F_VERSION_1)
        | p.bit(p.VIRTIO_RING_F_INDIRECT_DESC)
        | p.bit(p.VIRTIO_RING_F_EVENT_IDX)
        | p.bit(p.VHOST_USER_F_PROTOCOL_FEATURES)
    )
    if migration:
        bits |= p.bit(p.VHOST_F_LOG_ALL)
    return bits


def offered_protocol_features(*, config_space: bool, migration: bool) -> int:
    """Protocol feature bits (GET_PROTOCOL_FEATURES)."""
    bits = (
        p.bit(p.ProtocolFeature.MQ)
        | p.bit(p.ProtocolFeature.REPLY_ACK)
        | p.bit(p.ProtocolFeature.BACKEND_REQ)
        | p.bit(p.ProtocolFeature.CONFIGURE_MEM_SLOTS)
        | p.bit(p.ProtocolFeature.RESET_DEVICE)
    )
    if config_space:
        bits |= p.bit(p.ProtocolFeature.CONFIG)
    if migration:
        bits |= p.bit(p.ProtocolFeature.LOG_SHMFD) | p.bit(p.ProtocolFeature.DEVICE_STATE)
    return bits


def config_space(tag: str, request_queues: int) -> bytes:
    """The whole virtio-fs config space."""
    return FS_CONFIG.pack(tag.encode(), request_queues)
