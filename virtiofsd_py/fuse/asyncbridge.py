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
to interrupt) cancels the awaitable the named request waits for (the task
driving that request is cancelled only while it awaits the backend); the
cancellation is turned into ``OSError(EINTR)`` inside the handler, so the
request is answered with EINTR (the kernel's protocol: an interrupted
request still gets exactly one reply).  An INTERRUPT may overtake its
request (it comes on the hiprio queue): one for a unique not seen yet is
kept (at most ``EARLY_INTERRUPTS``, oldest dropped first) and applied when
that request arrives, as libfuse keeps its list of pending interrupts; one
for a request recently completed is dropped.  ``drain`` waits until
nothing is in flight (vhost-user.rst, GET_VRING_BASE: the ring stops only
once every request it carried is on the used ring).
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
#: INTERRUPTs kept for requests not arrived yet, and completed uniques remembered.
EARLY_INTERRUPTS: Final = 1024
RECENT_UNIQUES: Final = 4096


class _Waiting:
    """A request parked on an awaitable: the task driving it, whether that task
    now awaits the backend, and whether it was interrupted (before it started,
    too)."""

    __slots__ = ("awaiting", "interrupted", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.awaiting = False
        self.interrupted = False


class AsyncRequests:
    """Runs requests in greenlets; the ones that wait complete later (module doc)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Handler) -> None:
        self._loop = loop
        self._handler = handler
        #: unique -> the request parked on an awaitable, while it waits.
        self._waiting: dict[int, _Waiting] = {}
        #: Interrupts that came before their request (insertion-ordered).
        self._early: dict[int, None] = {}
        #: Uniques of requests completed lately (insertion-ordered), so that a late
        #: INTERRUPT is not kept for a request that will not come again.
        self._recent: dict[int, None] = {}
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
            value = 0
        if g.dead:
            self._completed(unique)
            return int(value)
        self._inflight += 1
        self._idle.clear()
        w = _Waiting()
        if unique:
            self._waiting[unique] = w
            if self._early.pop(unique, 0) is None:
                w.interrupted = True
        self._loop.create_task(self._drive(g, w, value, done))
        return None

    def _completed(self, unique: int) -> None:
        self._early.pop(unique, None)
        recent = self._recent
        recent[unique] = None
        if len(recent) > RECENT_UNIQUES:
            del recent[next(iter(recent))]

    def _interrupt_request(self, readable: Sequence[Any]) -> None:
        data = b"".join(bytes(b) for b in readable)
        if len(data) < _HDR + abi.INTERRUPT_IN.size:
            log.warning("FUSE_INTERRUPT without fuse_interrupt_in: dropped")
            return
        (target,) = abi.INTERRUPT_IN.unpack_from(data, _HDR)
        self.interrupt(target)

    def interrupt(self, unique: int) -> bool:
        """Interrupt request ``unique`` (it is answered EINTR); whether it was waiting."""
        w = self._waiting.get(unique)
        if w is None:
            if unique not in self._recent:
                early = self._early
                early[unique] = None
                if len(early) > EARLY_INTERRUPTS:
                    del early[next(iter(early))]
            return False
        log.debug("FUSE request unique=%d interrupted", unique)
        w.interrupted = True
        if w.awaiting and w.task is not None:
            w.task.cancel()
        return True

    async def _drive(self, g: RequestGreenlet, w: _Waiting, value: Any, done: Done) -> None:
        used = 0
        task = w.task = asyncio.current_task()
        try:
            while not g.dead:
                if not isinstance(value, Await):
                    raise RuntimeError(f"request greenlet switched out with {value!r}")
                if w.interrupted:  # before its awaitable ran: it never will
                    w.interrupted = False
                    close = getattr(value.awaitable, "close", None)
                    if close is not None:
                        close()
                    value = g.throw(OSError(errno.EINTR, "request interrupted"))
                    continue
                w.awaiting = True
                try:
                    result = await value.awaitable
                except asyncio.CancelledError:
                    if not w.interrupted:
                        raise  # the loop is going away, not an INTERRUPT
                    w.interrupted = False
                    if task is not None:
                        task.uncancel()
                    value = g.throw(OSError(errno.EINTR, "request interrupted"))
                except Exception as e:
                    value = g.throw(e)
                else:
                    if w.interrupted and task is not None and task.cancelling():
                        task.uncancel()  # the backend swallowed the cancellation
                        w.interrupted = False
                    value = g.switch(result)
                finally:
                    w.awaiting = False
            used = int(value)
        except Exception:
            log.exception("async request unique=%d: bridge failure", g.unique)
            used = 0
        finally:
            if self._waiting.get(g.unique) is w:
                del self._waiting[g.unique]
            self._completed(g.unique)
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
        done(used)

    async def drain(self) -> None:
        """Wait until every submitted request has called ``done``."""
        await self._idle.wait()
