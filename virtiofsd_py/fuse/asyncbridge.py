"""Many requests of an async backend in flight on one event loop.

``AsyncRequests.submit`` runs the (synchronous) request handler, the FUSE
dispatcher, in a fresh ``RequestGreenlet`` (fs/awaiting.py).  When the
handler finishes without waiting (a sync backend, or an answer at hand) the
used length comes back at once.  When it waits (``await_``), the greenlet is
parked and an asyncio task awaits the awaitable, switches back with its
result, and so on until the handler returns; then ``done(used_len)`` is
called on the loop thread.  The caller (virtio/runner.py) publishes those
completions in batches.

FUSE_INTERRUPT (fuse.h ``fuse_interrupt_in``: the ``unique`` of the request
to interrupt) cancels the awaitable the named request waits for; the
cancellation is turned into ``OSError(EINTR)`` inside the handler, so the
request is answered with EINTR (the kernel's protocol: an interrupted
request still gets exactly one reply).  An INTERRUPT for a request not (or
no longer) waiting is dropped, as libfuse does when it has nothing to
interrupt.  ``drain`` waits until nothing is in flight (vhost-user.rst,
GET_VRING_BASE: the ring stops only once every request it carried is on
the used ring).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final

from virtiofsd_py.fs.awaiting import Await, RequestGreenlet
from virtiofsd_py.fuse import abi

log = logging.getLogger(__name__)

Handler = Callable[[Sequence[Any], Sequence[Any]], int]
Done = Callable[[int], None]

_HDR: Final = abi.IN_HEADER.size


class AsyncRequests:
    """Runs requests in greenlets; the ones that wait complete later (module doc)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Handler) -> None:
        self._loop = loop
        self._handler = handler
        #: unique -> the task driving that request, while it waits.
        self._waiting: dict[int, asyncio.Task[None]] = {}
        self._interrupted: set[int] = set()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def inflight(self) -> int:
        """Requests submitted that have not called ``done`` yet."""
        return self._inflight

    def submit(self, readable: Sequence[Any], writable: Sequence[Any], done: Done) -> int | None:
        """The used length now, or None: ``done(used_len)`` follows on the loop thread."""
        first = readable[0] if readable else b""
        unique = 0
        if len(first) >= _HDR:
            _, opcode, unique, *_ = abi.IN_HEADER.unpack_from(first)
            if opcode == abi.FUSE_INTERRUPT:
                self._interrupt_request(readable)
                return 0  # INTERRUPT has no reply (fuse.h)
        g = RequestGreenlet(self._handler)
        g.unique = unique
        try:
            value = g.switch(readable, writable)
        except Exception:
            log.exception("request handler failed")
            return 0
        if g.dead:
            return int(value)
        self._inflight += 1
        self._idle.clear()
        task = self._loop.create_task(self._drive(g, value, done))
        if unique:
            self._waiting[unique] = task
        return None

    def _interrupt_request(self, readable: Sequence[Any]) -> None:
        data = b"".join(bytes(b) for b in readable)
        if len(data) < _HDR + abi.INTERRUPT_IN.size:
            log.warning("FUSE_INTERRUPT without fuse_interrupt_in: dropped")
            return
        (target,) = abi.INTERRUPT_IN.unpack_from(data, _HDR)
        self.interrupt(target)

    def interrupt(self, unique: int) -> bool:
        """Cancel what request ``unique`` waits for (it is answered EINTR); whether it waited."""
        task = self._waiting.get(unique)
        if task is None:
            return False
        log.debug("FUSE request unique=%d interrupted", unique)
        self._interrupted.add(unique)
        task.cancel()
        return True

    async def _drive(self, g: RequestGreenlet, value: Any, done: Done) -> None:
        used = 0
        cancelled = False
        try:
            while not g.dead:
                if not isinstance(value, Await):
                    raise RuntimeError(f"request greenlet switched out with {value!r}")
                try:
                    result = await value.awaitable
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                    if g.unique in self._interrupted:
                        self._interrupted.discard(g.unique)
                    else:
                        cancelled = True  # the loop is going away: answer, then stop
                    value = g.throw(OSError(errno.EINTR, "request interrupted"))
                except Exception as e:
                    value = g.throw(e)
                else:
                    value = g.switch(result)
            used = int(value)
        except Exception:
            log.exception("async request unique=%d: bridge failure", g.unique)
            used = 0
        finally:
            if self._waiting.get(g.unique) is asyncio.current_task():
                del self._waiting[g.unique]
            self._interrupted.discard(g.unique)
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
        done(used)
        if cancelled:
            raise asyncio.CancelledError

    async def drain(self) -> None:
        """Wait until every submitted request has called ``done``."""
        await self._idle.wait()
