"""One thread per request queue: kick in, chains served, used ring and call out.

``QueueWorker`` serves one ring on its own thread, the way the Rust
virtiofsd serves a queue, so that N request queues use N threads instead of
sharing the event loop.  This module is the readable reference;
``virtio/_cworker.pyx`` is its compiled twin with the same API (chosen once,
at import, by ``virtio.workers``).

The thread blocks in ``poll()`` on the ring's kick eventfd and the worker's
own wake eventfd.  On a kick it drains the eventfd and serves a batch: pops
chains with ``SplitQueue`` (a bad chain is returned with length 0 and
logged, a broken ring signals the err eventfd and is no longer served),
offers each to the optional fast operations ``fast(readable, writable)``
(``-1``: declined, as ``VFSD_FAST_DECLINE`` in include/vfsd_fastops.h) and
otherwise calls the ``ChainHandler``; requests that may wait long
(``may_block``: SETLKW, FSYNC...) run on the slow pool and come back to the
worker through a queue and the wake eventfd.  Only the worker thread writes
the used ring, so it needs no lock; the batch is published once, with
EVENT_IDX suppression (virtio 1.2 §2.7.7.2, §2.7.10), and the call eventfd
is written at most once per batch.

Control comes from the event loop's side, each call blocking until done:

- ``pause``/``resume``: the worker ends its batch and parks; nothing of the
  ring (memory, eventfds, queue object, dirty log) is used while parked, so
  the vhost-user back-end changes them in between and ``resume`` takes a
  fresh snapshot.  Slow completions wait in the queue meanwhile.
- ``stop`` (GET_VRING_BASE, vhost-user.rst "Ring states"): no more chains
  are popped; the worker waits until every slow request is on the used
  ring, publishes and exits; the queue's ``last_avail_idx`` is then what
  GET_VRING_BASE reports.  The caller interrupts lock waits first.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future

from virtiofsd_py.host import syscalls
from virtiofsd_py.virtio.dirty_log import DirtyLog
from virtiofsd_py.virtio.seams import ChainHandler, MayBlock, Ring
from virtiofsd_py.virtio.virtqueue import Chain, ChainError, QueueError, SplitQueue

log = logging.getLogger("virtiofsd_py.queue")

#: Pure-Python fast operations: like the handler, or -1 to decline the chain.
FastCall = Callable[[Sequence[memoryview], Sequence[memoryview]], int]
#: Chains served before the batch is published (the guest sees progress).
BATCH = 64

RUN = 0
PAUSE = 1
STOP = 2

_POLL_IN = select.POLLIN
_POLL_BAD = select.POLLERR | select.POLLHUP | select.POLLNVAL


class QueueWorker:
    """Serves one request ring on its own thread (see the module docstring)."""

    #: Which twin this is (``fast_counts`` is empty for the pure one).
    compiled = False

    def __init__(
        self,
        ring: Ring,
        handler: ChainHandler,
        *,
        slow: Executor,
        dirty_log: Callable[[], DirtyLog | None],
        may_block: MayBlock | None = None,
        fast: FastCall | None = None,
    ) -> None:
        self._ring = ring
        self._handler = handler
        self._slow_pool = slow
        self._dirty_log_of = dirty_log
        self._may_block = may_block
        self._fast = fast
        self._cv = threading.Condition()
        self._ctl = RUN
        self._parked = False
        self._stopping = False  # the worker has seen STOP: it pops no more
        self._exited = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: (head, used length) of slow requests done, pushed by the worker.
        self._done: collections.deque[tuple[int, int]] = collections.deque()
        self._slow = 0  # slow requests submitted, not yet pushed (worker thread only)
        self._thread: threading.Thread | None = None
        # The snapshot of the ring, taken on the loop's side (``_load``).
        self._queue: SplitQueue | None = None
        self._kick_fd: int | None = None
        self._call_fd: int | None = None
        self._ready = False
        self._dlog: DirtyLog | None = None
        self._look = False  # set by resume: serve before waiting for a kick
        self._look_asked = False  # set by wake: serve after the wake-up
        self._ack_wanted = False  # start/resume waits until the worker is about to poll

    # -- control (event loop side) ------------------------------------------------
    def start(self) -> None:
        """Snapshot the ring and start serving it; returns once the worker has
        looked at the ring (blocks)."""
        if self._thread is not None:
            return
        self._load()
        self._ack_wanted = True
        self._thread = threading.Thread(
            target=self._main, name=f"vfsd-queue-{self._ring.index}", daemon=True
        )
        self._thread.start()
        with self._cv:
            self._cv.wait_for(self._looked)

    def _load(self) -> bool:
        """Snapshot the ring; True if what decides serving changed (the queue,
        the kick fd, readiness): the worker then looks at the ring at once."""
        ring = self._ring
        before = (self._queue, self._kick_fd, self._ready)
        self._queue = ring.queue
        self._kick_fd = ring.kick_fd
        self._call_fd = ring.call_fd
        self._ready = ring.ready
        self._dlog = self._dirty_log_of()
        if self._kick_fd is not None:
            os.set_blocking(self._kick_fd, False)
        return before != (self._queue, self._kick_fd, self._ready)

    def wake(self) -> None:
        """Look at the ring again (enabled, features or logging changed)."""
        self._ready = self._ring.ready
        self._dlog = self._dirty_log_of()
        self._look_asked = True
        self._signal()

    def pause(self) -> None:
        """Block until the worker has parked (its batch published)."""
        with self._cv:
            if self._exited or self._thread is None:
                return
            self._ctl = PAUSE
            self._signal()
            self._cv.wait_for(lambda: self._parked or self._exited)

    def resume(self) -> None:
        """Take a new snapshot of the ring and serve it again (start it if new)."""
        if self._thread is None:
            self.start()
            return
        with self._cv:
            if self._ctl != PAUSE:
                return
            self._look = self._load()
            self._ack_wanted = True
            self._ctl = RUN
            self._cv.notify_all()
            # As a loop-side ``process`` would: the ring has been looked at on return.
            self._cv.wait_for(self._looked)

    def _looked(self) -> bool:
        return not self._ack_wanted or self._exited or self._ctl != RUN

    def begin_stop(self) -> None:
        """Stop popping chains; returns once the worker pops no more (blocks)."""
        with self._cv:
            if self._thread is None:
                return
            if self._ctl == PAUSE:
                self._load()
            self._ctl = STOP
            self._signal()
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._stopping or self._exited)

    def stop(self) -> None:
        """Complete every popped request, publish, end the thread (blocks)."""
        self.begin_stop()
        if self._thread is not None:
            self._thread.join()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    @property
    def last_avail_idx(self) -> int:
        """The next avail-ring slot to pop (the queue's, while this serves it)."""
        q = self._queue
        return q.last_avail_idx if q is not None else 0

    @property
    def inflight(self) -> int:
        """Slow requests not yet on the used ring."""
        return self._slow

    def fast_counts(self) -> dict[tuple[int, int], int]:
        """(opcode, errno) -> requests answered by the fast operations in C."""
        return {}

    def _signal(self) -> None:
        if self._wake_fd >= 0:
            try:  # noqa: SIM105 (also called from slow-pool threads)
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass

    # -- the worker thread ---------------------------------------------------------
    def _main(self) -> None:
        syscalls.set_thread_name(f"vfsd-queue-{self._ring.index}")
        try:
            self._loop()
        except Exception:  # pragma: no cover - a bug; the ring stops, the daemon lives
            log.exception("ring %d: queue worker failed", self._ring.index)
        finally:
            with self._cv:
                self._exited = True
                self._cv.notify_all()

    def _loop(self) -> None:
        poller, kick = self._poller()
        more = True  # serve once first: a new kick fd counts as a kick
        while True:
            ctl = self._ctl
            if ctl == PAUSE:
                with self._cv:
                    self._parked = True
                    self._cv.notify_all()
                    self._cv.wait_for(lambda: self._ctl != PAUSE)
                    self._parked = False
                poller, kick = self._poller()
                # a full batch before the pause is still there; a changed ring is looked at
                more = more or self._look
                continue
            if ctl == STOP:
                if not self._stopping:
                    with self._cv:
                        self._stopping = True
                        self._cv.notify_all()
                self._serve(popping=False)
                if self._slow == 0:
                    return
                more = False
            if not more:
                if self._ack_wanted:
                    with self._cv:
                        self._ack_wanted = False
                        self._cv.notify_all()
                for fd, ev in poller.poll():
                    if fd == kick:
                        kick = self._read_kick(poller, ev)
                        more = kick is not None
                    else:
                        try:  # noqa: SIM105
                            os.eventfd_read(fd)
                        except OSError:
                            pass
                if self._look_asked:
                    self._look_asked = False
                    more = True
                if self._ctl != RUN or not (more or self._done):
                    continue  # a pause, a stop or a spurious wake-up: no look at the ring
            more = self._serve(popping=True)

    def _poller(self) -> tuple[select.poll, int | None]:
        poller = select.poll()
        poller.register(self._wake_fd, _POLL_IN)
        kick = self._kick_fd
        if kick is not None:
            poller.register(kick, _POLL_IN)
        return poller, kick

    def _read_kick(self, poller: select.poll, events: int) -> int | None:
        assert self._kick_fd is not None
        try:
            if events & _POLL_BAD:
                raise OSError(f"poll events {events:#x}")
            os.eventfd_read(self._kick_fd)
        except BlockingIOError:
            pass
        except OSError as e:
            log.error(
                "ring %d: reading kick eventfd failed: %s; no longer watched", self._ring.index, e
            )
            poller.unregister(self._kick_fd)
            return None
        self._ring.started = True
        return self._kick_fd

    def _serve(self, *, popping: bool) -> bool:
        """Push slow completions and, if ``popping``, serve up to a batch;
        True if chains may remain (the batch was full)."""
        q = self._queue
        if q is None:
            self._slow -= len(self._done)  # the ring is gone: nowhere to put them
            self._done.clear()
            return False
        old = q.used_idx
        done = self._done
        while done:
            head, n = done.popleft()
            self._slow -= 1
            q.add_used(head, n)
        served = 0
        if popping and self._ready:
            may_block = self._may_block
            while served < BATCH:
                try:
                    chain = q.pop()
                except ChainError as e:
                    log.error("ring %d: %s; returned unused", self._ring.index, e)
                    q.add_used(e.head, 0)
                    continue
                except QueueError as e:
                    self._break(str(e))
                    break
                if chain is None:
                    if q.enable_notification():
                        continue
                    break
                served += 1
                if may_block is not None and may_block(chain.readable):
                    self._submit_slow(chain)
                else:
                    q.add_used(chain.head, self._run(chain))
        self._ring.inflight = self._slow
        if q.used_idx != old and q.publish(old) and self._call_fd is not None:
            try:  # noqa: SIM105
                os.eventfd_write(self._call_fd, 1)
            except OSError:
                pass
        return served >= BATCH

    def _run(self, chain: Chain) -> int:
        try:
            n = -1
            if self._fast is not None:
                n = self._fast(chain.readable, chain.writable)
            if n < 0:
                n = self._handler(chain.readable, chain.writable)
            if not 0 <= n <= 0xFFFF_FFFF:
                raise ValueError(f"used length {n} (a u32, virtio 1.2 §2.7.8)")
        except Exception:
            log.exception("request handler failed on chain %d", chain.head)
            return 0
        dlog = self._dlog
        if dlog is not None and n:
            dlog.mark_written(chain.writable_gpas, n)
        return n

    def _submit_slow(self, chain: Chain) -> None:
        self._slow += 1
        fut = self._slow_pool.submit(self._run, chain)
        fut.add_done_callback(lambda f: self._finished(chain.head, f))

    def _finished(self, head: int, fut: Future[int]) -> None:
        n = 0 if fut.cancelled() else fut.result()
        self._done.append((head, n))
        self._signal()

    def _break(self, reason: str) -> None:
        ring = self._ring
        log.error("ring %d is broken and stops until reconfigured: %s", ring.index, reason)
        ring.broken = True
        self._ready = False
        ring.signal_error()
