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
from typing import Any

from virtiofsd_py.vhost.protocol import VRING_F_LOG
from virtiofsd_py.virtio.dirty_log import DirtyLog
from virtiofsd_py.virtio.memory import GuestMemory
from virtiofsd_py.virtio.types import VringAddr
from virtiofsd_py.virtio.virtqueue import QueueError, SplitQueue


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
    #: The queue worker serving the ring on its own thread, if one does: its
    #: indices are the ring's while it serves (``last_avail_idx``).
    served_by: Any = None

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def ready(self) -> bool:
        """Can be processed: started, enabled, mapped and not broken."""
        return self.started and self.enabled and self.queue is not None and not self.broken

    def map(self, memory: GuestMemory, *, event_idx: bool) -> None:
        """(Re)build the queue over ``memory``, keeping the indices of a running ring.

        Without a size and an address there is nothing to map yet.  A ring
        not in guest memory raises ``QueueError`` only if started: memory
        may still arrive (QEMU sends SET_MEM_TABLE later on some paths), and
        mapping is retried when the ring starts or memory changes.
        """
        if self.addr is None or not self.num:
            return
        old = self.queue
        base = old.last_avail_idx if old is not None else self.base
        try:
            self.queue = SplitQueue(memory, self.num, self.addr, event_idx=event_idx, base=base)
        except QueueError:
            self.queue = None
            if self.started:
                raise
            return
        if old is not None:
            self.queue.used_idx = old.used_idx
        self.broken = False

    def log_used(self, dirty_log: DirtyLog | None) -> None:
        """Log writes to the used ring in ``dirty_log`` if SET_VRING_ADDR asked
        for it (VHOST_VRING_F_LOG, at the ring's guest-physical log address)."""
        q = self.queue
        if q is None:
            return
        addr = self.addr
        if dirty_log is None or addr is None or not addr.flags & VRING_F_LOG:
            q.on_used_write = None
            return
        base = addr.log_guest_addr
        q.on_used_write = lambda off, n: dirty_log.mark(base + off, n)

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
            try:  # noqa: SIM105 (on the request path: a plain try is cheaper)
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
