"""Per-ring state as the vhost-user front-end configures it.

vhost-user.rst, "Ring states": two independent states, started/stopped and
enabled/disabled.  Every ring begins stopped and disabled; a kick starts it,
GET_VRING_BASE stops it, SET_VRING_ENABLE toggles enabled, and SET_FEATURES
without VHOST_USER_F_PROTOCOL_FEATURES enables all rings.  The enabled state
is tracked while stopped and takes effect when the ring starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field

from virtiofsd_py.virtio.types import VringAddr
from virtiofsd_py.virtio.virtqueue import SplitQueue


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass(slots=True, eq=False)
class Vring:
    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False
    enabled: bool = False
    queue: SplitQueue | None = None
    #: Requests popped but not yet returned to the used ring.
    inflight: int = 0
    #: Set while nothing is in flight; GET_VRING_BASE waits on it.
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    #: The ring is unusable until reconfigured (a fatal ring error was logged).
    broken: bool = False
    #: Used index before the first used element not yet published (batched
    #: completions from worker threads), or None.
    publish_from: int | None = None

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def ready(self) -> bool:
        """Can be processed: started, enabled, mapped and not broken."""
        return self.started and self.enabled and self.queue is not None and not self.broken

    def set_kick(self, fd: int | None) -> None:
        _close(self.kick_fd)
        self.kick_fd = fd

    def set_call(self, fd: int | None) -> None:
        _close(self.call_fd)
        self.call_fd = fd

    def set_err(self, fd: int | None) -> None:
        _close(self.err_fd)
        self.err_fd = fd

    def notify(self) -> None:
        """Signal the driver (call eventfd); no-op without one."""
        if self.call_fd is not None:
            try:  # noqa: SIM105 (contextlib.suppress costs ~1 us: once per batch)
                os.eventfd_write(self.call_fd, 1)
            except OSError:
                pass

    def signal_error(self) -> None:
        if self.err_fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(self.err_fd, 1)

    def close(self) -> None:
        self.set_kick(None)
        self.set_call(None)
        self.set_err(None)
        self.queue = None
