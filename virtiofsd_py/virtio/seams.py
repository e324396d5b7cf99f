"""The seams of queue serving: what serves a chain, and what a served ring is.

Shared by the loop-side runner (virtio/runner.py) and the queue workers
(virtio/worker.py, virtio/_cworker.pyx), so that neither imports the other's
module for its types.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from virtiofsd_py.virtio.virtqueue import SplitQueue

#: Serves one chain: (device-readable views, device-writable views) -> bytes written.
ChainHandler = Callable[[Sequence[memoryview], Sequence[memoryview]], int]
#: Whether a request may wait long (SETLKW, FSYNC): it then runs on a slow pool.
MayBlock = Callable[[Sequence[memoryview]], bool]


class Ring(Protocol):
    """What the runner reads and updates of one ring (``vhost.rings.Vring``).

    Plain attributes, not methods, where the request path touches them: the
    runner reads them once per batch or per request.
    """

    index: int
    #: The eventfd the driver kicks; watched while the ring is served.
    kick_fd: int | None
    #: The eventfd ``notify`` writes (a queue worker writes it itself).
    call_fd: int | None
    #: Set by the runner on a kick (vhost-user.rst, "Ring states": a kick
    #: starts the ring; the owner stops it).
    started: bool
    queue: SplitQueue | None
    #: Requests popped but not yet on the used ring (worker threads).
    inflight: int
    #: Set while nothing is in flight; ``drain`` waits on it.
    idle: asyncio.Event
    #: A fatal ring error was logged: not served until reconfigured.
    broken: bool
    #: Used index before the first completion not yet published, or None.
    publish_from: int | None
    #: The queue worker serving the ring (set and cleared by the runner).
    served_by: Any

    @property
    def ready(self) -> bool:
        """Whether to process the ring now (started, enabled, mapped, not broken)."""
        ...

    def notify(self) -> None:
        """Signal the driver (call eventfd)."""
        ...

    def signal_error(self) -> None:
        """Tell the front-end the ring broke (err eventfd)."""
        ...
