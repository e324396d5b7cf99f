"""Drives the virtqueues: kick eventfds in, request handler, used ring + call out.

Two ways to serve a request queue (ring index >= 1):

- ``queue_threads=True`` (the daemon's default with the compiled worker,
  ``--thread-pool-size 0``):
  each request queue has its own thread, a ``QueueWorker`` (virtio/worker.py,
  or its compiled twin virtio/_cworker.pyx, chosen once at import by
  ``virtio.workers``), so N queues are served by N threads, as the Rust
  virtiofsd serves each queue on its own thread.  The loop thread only
  starts, pauses, resumes and stops workers: ``paused()`` is the window in
  which the vhost-user back-end may change what a worker uses (memory,
  eventfds, the queue, the dirty log); ``drain`` stops a worker.
- otherwise, on the event loop: a kick pops the available chains and hands
  each to the request handler (the FUSE dispatcher), inline on the loop, or
  in a pool of ``thread_pool_size`` threads.  Used entries are published
  from the loop thread only, in batches, with at most one call-eventfd
  write per batch (EVENT_IDX suppression decides).

With an async backend (``submit``, loop path only) every chain is handed to
``submit``, which answers at once (a used length) or later: None now, then
the ``done`` callback with the used length on the loop thread.  Such a
request counts as in flight until then, exactly as one in a pool thread.

The hiprio queue (0) only carries FORGET/BATCH_FORGET/INTERRUPT and always
runs inline on the loop; it is never queued behind request queues (a
request-queue batch on the loop yields every ``BATCH`` chains).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from virtiofsd_py.virtio.dirty_log import DirtyLog
from virtiofsd_py.virtio.seams import ChainHandler, MayBlock, Ring
from virtiofsd_py.virtio.virtqueue import Chain, ChainError, QueueError
from virtiofsd_py.virtio.workers import FastOps, QueueWorker

__all__ = ["BATCH", "HIPRIO", "ChainHandler", "MayBlock", "QueueRunner", "Ring"]

log = logging.getLogger("virtiofsd_py.queue")

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


class QueueRunner:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handler: ChainHandler,
        *,
        thread_pool_size: int = 0,
        may_block: MayBlock | None = None,
        interrupt: Callable[[], None] | None = None,
        queue_threads: bool = False,
        fast: FastOps | None = None,
        worker: type[QueueWorker] | None = None,
        submit: AsyncSubmit | None = None,
    ) -> None:
        self._loop = loop
        self._handler = handler
        if submit is not None and queue_threads:
            raise ValueError("an async backend is served on the event loop, not queue threads")
        self._submit_async = submit
        self._may_block = may_block
        self._interrupt = interrupt
        #: Request queues on their own threads (``QueueWorker``), else on the loop.
        self.queue_threads = queue_threads
        #: Fast operations offered to the workers (a capsule or a callable).
        self._fast = fast
        #: The worker class (both twins in tests): by default the one chosen at import.
        self._worker_class = worker or QueueWorker
        self._workers: dict[int, QueueWorker] = {}
        self._window = 0  # nesting depth of ``paused()``
        self._fast_done: dict[tuple[int, int], int] = {}
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
        """(Re)start watching ``ring``'s kick eventfd.

        A request queue served by a worker gets one (started now, or when
        the ``paused()`` window this runs in ends); a worker that exists
        takes the new kick fd when its window ends.
        """
        if self.queue_threads and ring.index != HIPRIO:
            if ring.index not in self._workers:
                w = self._worker_class(
                    ring,
                    self._handler,
                    slow=self._slow_pool,
                    dirty_log=lambda: self.dirty_log,
                    may_block=self._may_block,
                    fast=self._fast,
                )
                self._workers[ring.index] = w
                ring.served_by = w
                if not self._window:
                    w.start()
            return
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
        """Handle what the driver made available, up to one batch (a worker's
        ring: tell the worker to look at the ring again)."""
        w = self._workers.get(ring.index)
        if w is not None:
            if not self._window:
                w.wake()
            return
        if self.queue_threads and ring.index != HIPRIO:
            return
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

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """A window in which no worker touches its ring: on entry each worker
        ends its batch and parks; on exit each takes a new snapshot of its
        ring (memory, eventfds, queue, dirty log) and serves it again."""
        if self._window or not self._workers:
            self._window += 1
            try:
                yield
            finally:
                self._window -= 1
                if not self._window and self._workers:
                    await asyncio.to_thread(_resume_all, list(self._workers.values()))
            return
        workers = list(self._workers.values())
        await asyncio.to_thread(_pause_all, workers)
        self._window += 1
        try:
            yield
        finally:
            self._window -= 1
            await asyncio.to_thread(_resume_all, list(self._workers.values()))

    def fast_counts(self) -> dict[tuple[int, int], int]:
        """(opcode, errno) -> requests answered by compiled fast operations,
        summed over the running workers and the ones already stopped."""
        total = dict(self._fast_done)
        for w in list(self._workers.values()):
            for k, n in w.fast_counts().items():
                total[k] = total.get(k, 0) + n
        return total

    async def drain(self, ring: Ring) -> None:
        """Wait until every request popped from ``ring`` is on its used ring.

        Requests waiting for a lock are interrupted first (they complete with
        EINTR), so that stopping a ring cannot hang on another process's lock.
        A worker's ring: the worker stops popping, its slow requests finish,
        the batch is published and the thread ends.
        """
        w = self._workers.pop(ring.index, None)
        if w is not None:
            ring.served_by = None
            await asyncio.to_thread(w.begin_stop)
            if w.inflight and self._interrupt is not None:
                self._interrupt()
            await asyncio.to_thread(w.stop)
            self._keep_counts(w)
            ring.inflight = 0
            return
        if ring.inflight and self._interrupt is not None:
            self._interrupt()
        await ring.idle.wait()
        self._publish(ring)

    def _keep_counts(self, w: QueueWorker) -> None:
        for k, n in w.fast_counts().items():
            self._fast_done[k] = self._fast_done.get(k, 0) + n

    def close(self) -> None:
        for w in list(self._workers.values()):
            if self._interrupt is not None and w.inflight:
                self._interrupt()
            w.stop()
            self._keep_counts(w)
        self._workers.clear()
        for idx in list(self._watched):
            fd = self._watched.pop(idx)
            self._loop.remove_reader(fd)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=False)
        self._slow_pool.shutdown(wait=False, cancel_futures=True)


def _pause_all(workers: list[QueueWorker]) -> None:
    for w in workers:
        w.pause()


def _resume_all(workers: list[QueueWorker]) -> None:
    for w in workers:
        w.resume()
