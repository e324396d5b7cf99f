"""Drives the virtqueues: kick eventfds in, request handler, used ring + call out.

This module owns the rings' eventfds on the event loop.  A kick pops the
available chains and hands each to the request handler (the FUSE
dispatcher): inline on the loop when there is no thread pool (cheapest per
request, as the Rust virtiofsd's default), or in a worker thread otherwise.
Used entries are published from the loop thread only, in batches, with at
most one call-eventfd write per batch (EVENT_IDX suppression decides).

With an async backend (``submit``) every chain is handed to ``submit``,
which answers at once (a used length) or later: None now, then the
``done`` callback with the used length on the loop thread.  Such a request
counts as in flight until then, exactly as one in a worker thread.

The hiprio queue (0) only carries FORGET/BATCH_FORGET/INTERRUPT, always
runs inline and is never queued behind request queues: a request-queue batch
yields to the loop every ``BATCH`` chains.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from virtiofsd_py.virtio.dirty_log import DirtyLog
from virtiofsd_py.virtio.virtqueue import Chain, ChainError, QueueError, SplitQueue

log = logging.getLogger("virtiofsd_py.queue")

#: Serves one chain: (device-readable views, device-writable views) -> bytes written.
ChainHandler = Callable[[Sequence[memoryview], Sequence[memoryview]], int]
MayBlock = Callable[[Sequence[memoryview]], bool]
#: Serves one chain that may complete later: the used length now, or None and
#: then ``done(used_len)`` on the loop thread (fuse/asyncbridge.py).
AsyncSubmit = Callable[
    [Sequence[memoryview], Sequence[memoryview], Callable[[int], None]], "int | None"
]
#: Chains processed per loop turn before yielding to other rings and messages.
BATCH = 64
#: Threads for requests that may block (lock waits): beyond this they queue.
BLOCKING_THREADS = 64
HIPRIO = 0


class Ring(Protocol):
    """What the runner reads and updates of one ring (``vhost.rings.Vring``).

    Plain attributes, not methods, where the request path touches them: the
    runner reads them once per batch or per request.
    """

    index: int
    #: The eventfd the driver kicks; watched while the ring is served.
    kick_fd: int | None
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


class QueueRunner:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handler: ChainHandler,
        *,
        thread_pool_size: int = 0,
        may_block: MayBlock | None = None,
        interrupt: Callable[[], None] | None = None,
        submit: AsyncSubmit | None = None,
    ) -> None:
        self._loop = loop
        self._handler = handler
        self._submit_async = submit
        self._may_block = may_block
        self._interrupt = interrupt
        self._pool = (
            ThreadPoolExecutor(thread_pool_size, thread_name_prefix="vfsd-worker")
            if thread_pool_size > 0
            else None
        )
        #: Requests that may wait long (SETLKW, fsync) never run on the loop.
        self._slow_pool = ThreadPoolExecutor(BLOCKING_THREADS, thread_name_prefix="vfsd-slow")
        self._watched: dict[int, int] = {}  # ring index -> kick fd being watched
        #: Set while migration logs dirty pages (VHOST_F_LOG_ALL + SET_LOG_BASE).
        self.dirty_log: DirtyLog | None = None

    # -- kick watching ---------------------------------------------------------
    def watch(self, ring: Ring) -> None:
        """(Re)start watching ``ring``'s kick eventfd."""
        self.unwatch(ring)
        if ring.kick_fd is None:
            return
        os.set_blocking(ring.kick_fd, False)
        self._loop.add_reader(ring.kick_fd, self._on_kick, ring)
        self._watched[ring.index] = ring.kick_fd

    def unwatch(self, ring: Ring) -> None:
        fd = self._watched.pop(ring.index, None)
        if fd is not None:
            self._loop.remove_reader(fd)

    def _on_kick(self, ring: Ring) -> None:
        if ring.kick_fd is None:
            return
        try:
            os.eventfd_read(ring.kick_fd)
        except BlockingIOError:
            pass
        except OSError as e:
            log.error("ring %d: reading kick eventfd failed: %s; no longer watched", ring.index, e)
            self.unwatch(ring)
            return
        ring.started = True
        self.process(ring)

    # -- processing ------------------------------------------------------------
    def process(self, ring: Ring) -> None:
        """Handle what the driver made available, up to one batch."""
        if not ring.ready:
            return
        q = ring.queue
        assert q is not None
        old_used = q.used_idx
        inline = self._pool is None or ring.index == HIPRIO
        done = 0
        while True:
            if done >= BATCH:
                self._loop.call_soon(self.process, ring)
                break
            try:
                chain = q.pop()
            except ChainError as e:
                log.error("ring %d: %s; returned unused", ring.index, e)
                q.add_used(e.head, 0)
                continue
            except QueueError as e:
                self._break(ring, str(e))
                break
            if chain is None:
                if q.enable_notification():
                    continue
                break
            done += 1
            if self._submit_async is not None:
                self._start(ring, chain, self._submit_async)
            elif self._may_block is not None and self._may_block(chain.readable):
                self._submit(ring, chain, self._slow_pool)
            elif inline:
                q.add_used(chain.head, self._run(chain))
            else:
                assert self._pool is not None
                self._submit(ring, chain, self._pool)
        if q.publish(old_used):
            ring.notify()

    def _run(self, chain: Chain) -> int:
        try:
            n = self._handler(chain.readable, chain.writable)
        except Exception:
            log.exception("request handler failed on chain %d", chain.head)
            return 0
        dlog = self.dirty_log
        if dlog is not None and n:
            dlog.mark_written(chain.writable_gpas, n)
        return n

    def _start(self, ring: Ring, chain: Chain, submit: AsyncSubmit) -> None:
        """Hand ``chain`` to an async backend: used now, or in flight until ``done``."""
        try:
            n = submit(chain.readable, chain.writable, lambda n: self._finish(ring, chain, n))
        except Exception:
            log.exception("request handler failed on chain %d", chain.head)
            n = 0
        if n is None:
            ring.inflight += 1
            ring.idle.clear()
            return
        q = ring.queue
        assert q is not None
        q.add_used(chain.head, self._mark(chain, n))

    def _finish(self, ring: Ring, chain: Chain, n: int) -> None:
        self._complete_used(ring, chain, self._mark(chain, n))

    def _mark(self, chain: Chain, n: int) -> int:
        dlog = self.dirty_log
        if dlog is not None and n:
            dlog.mark_written(chain.writable_gpas, n)
        return n

    def _submit(self, ring: Ring, chain: Chain, pool: ThreadPoolExecutor) -> None:
        ring.inflight += 1
        ring.idle.clear()
        fut = pool.submit(self._run, chain)
        fut.add_done_callback(
            lambda f: self._loop.call_soon_threadsafe(self._complete, ring, chain, f)
        )

    def _complete(self, ring: Ring, chain: Chain, fut: Future[int]) -> None:
        self._complete_used(ring, chain, fut.result())

    def _complete_used(self, ring: Ring, chain: Chain, used: int) -> None:
        ring.inflight -= 1
        q = ring.queue
        if q is not None:
            if ring.publish_from is None:
                ring.publish_from = q.used_idx
                self._loop.call_soon(self._publish, ring)
            q.add_used(chain.head, used)
        if ring.inflight == 0:
            ring.idle.set()

    def _publish(self, ring: Ring) -> None:
        old, ring.publish_from = ring.publish_from, None
        q = ring.queue
        if old is not None and q is not None and q.publish(old):
            ring.notify()

    def _break(self, ring: Ring, reason: str) -> None:
        log.error("ring %d is broken and stops until reconfigured: %s", ring.index, reason)
        ring.broken = True
        self.unwatch(ring)
        ring.signal_error()

    async def drain(self, ring: Ring) -> None:
        """Wait until every request popped from ``ring`` is on its used ring.

        Requests waiting for a lock are interrupted first (they complete with
        EINTR), so that stopping a ring cannot hang on another process's lock.
        """
        if ring.inflight and self._interrupt is not None:
            self._interrupt()
        await ring.idle.wait()
        self._publish(ring)

    def close(self) -> None:
        for idx in list(self._watched):
            fd = self._watched.pop(idx)
            self._loop.remove_reader(fd)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=False)
        self._slow_pool.shutdown(wait=False, cancel_futures=True)
