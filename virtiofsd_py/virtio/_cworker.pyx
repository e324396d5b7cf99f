# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of virtio/worker.py: one thread per request queue, ring work without the GIL.

Same API and behaviour as ``worker.QueueWorker`` (the reference: read it
for the rules).  What runs without the GIL: ``poll()`` on the kick and wake
eventfds, the avail-ring pop, the descriptor walk of ``Walker`` (direct and
one level of indirect, loop and length limits, readable-after-writable
refused, every buffer translated and bounds-checked against a C copy of the
guest memory regions), the backend's fast operations (a
``VFSD_FAST_OPS_CAPSULE``, include/vfsd_fastops.h), the used-ring push,
EVENT_IDX suppression (virtio 1.2 §2.7.7.2, §2.7.10) and the call eventfd.
A chain the fast operations decline (or when there are none) takes the GIL
and goes to the Python handler with memoryviews sliced from the regions'
views (they keep the mappings alive), exactly as the pure walker builds them.

The C tables (regions, ring areas, eventfds) are copied when the worker
starts or resumes; the vhost-user back-end changes memory and eventfds only
while the worker is parked (``QueueRunner.paused``), so no pointer into an
unmapped region is ever followed.
"""

import collections
import logging
import os
import threading

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.pycapsule cimport (
    PyCapsule_Destructor,
    PyCapsule_GetPointer,
    PyCapsule_IsValid,
    PyCapsule_New,
)
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset
from vfsd_fastops cimport (
    VFSD_FAST_ABI,
    VFSD_FAST_DECLINE,
    VFSD_FAST_OPS_CAPSULE,
    iovec,
    vfsd_chain,
    vfsd_fast_fn,
    vfsd_fast_ops,
)

from virtiofsd_py.host import syscalls
from virtiofsd_py.virtio import virtqueue as _vq
from virtiofsd_py.virtio import worker as _worker
from virtiofsd_py.virtio.virtqueue import Chain, ChainError, QueueError

log = logging.getLogger("virtiofsd_py.queue")

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLERR
        POLLHUP
        POLLNVAL

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EINTR

cdef extern from *:
    """
    #include <stdint.h>
    static inline uint16_t vfsd_load16(const void *p) {
        return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
    }
    static inline void vfsd_store16(void *p, uint16_t v) {
        __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
    }
    static inline int vfsd_load_int(const int *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void vfsd_store_int(int *p, int v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline void vfsd_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    """
    uint16_t vfsd_load16(const void *p) nogil
    void vfsd_store16(void *p, uint16_t v) nogil
    int vfsd_load_int(const int *p) nogil
    void vfsd_store_int(int *p, int v) nogil
    void vfsd_fence() nogil

# The ring's constants have one home, virtio/virtqueue.py (virtio 1.2 §2.7.5,
# §2.7.6), the batch size virtio/worker.py's.
cdef uint32_t MAX_QUEUE_SIZE = _vq.MAX_QUEUE_SIZE
cdef uint16_t F_NEXT = _vq.VIRTQ_DESC_F_NEXT
cdef uint16_t F_WRITE = _vq.VIRTQ_DESC_F_WRITE
cdef uint16_t F_INDIRECT = _vq.VIRTQ_DESC_F_INDIRECT
cdef uint16_t AVAIL_F_NO_INTERRUPT = _vq.VIRTQ_AVAIL_F_NO_INTERRUPT
cdef int BATCH = _worker.BATCH
DEF ERRNO_SLOTS = 134  # errno values Linux defines are below this; others share slot 0
DEF OP_SLOTS = 64

# Walk results (``Walker._walk``): 0 ok, else why the chain is refused.
DEF W_OK = 0
DEF W_NEXT_RANGE = 1
DEF W_LOOP = 2
DEF W_NESTED = 3
DEF W_INDIRECT_NEXT = 4
DEF W_INDIRECT_LEN = 5
DEF W_TABLE_MEMORY = 6
DEF W_TABLE_SIZE = 7
DEF W_READ_AFTER_WRITE = 8
DEF W_MEMORY = 9
DEF W_NOMEM = 10
# Pop results: 1 a chain, 0 none, negative: the ring is broken.
DEF P_CHAIN = 1
DEF P_NONE = 0
DEF P_AVAIL_AHEAD = -1
DEF P_HEAD_RANGE = -2

# Why ``QueueWorker._spin`` needs the GIL.
DEF G_CTL = 1  # pause or stop asked
DEF G_DONE = 2  # slow requests completed
DEF G_PUBLISH = 3  # publish with the used ring's dirty-log hook
DEF G_KICK_ERR = 4  # the kick eventfd failed
DEF G_BROKEN = 5  # the ring is broken (``_rc``)
DEF G_REFUSED = 6  # a chain was refused (``_rc``)
DEF G_CHAIN = 7  # a chain for the Python path
DEF G_FAST_LOGGED = 8  # answered by the fast operations while logging (``_n``)
DEF G_LOOKED = 9  # the ring was looked at after start/resume: tell the waiter

DEF RUN = 0
DEF PAUSE = 1
DEF STOP = 2

cdef struct region_t:
    uint64_t gpa
    uint64_t size
    char *host

cdef struct desc_t:
    uint64_t addr
    uint32_t len
    uint16_t flags
    uint16_t next

cdef struct seg_t:
    uint32_t region
    uint64_t gpa
    uint64_t len


cdef char *_address(object view) except NULL:
    """Where ``view``'s bytes are (the buffer is released again at once: the
    owner keeps the mapping; see the module docstring)."""
    cdef Py_buffer b
    PyObject_GetBuffer(view, &b, PyBUF_SIMPLE)
    cdef char *p = <char *>b.buf
    PyBuffer_Release(&b)
    if p == NULL:
        raise ValueError("empty buffer")
    return p


cdef class Walker:
    """The split ring of one ``SplitQueue`` walked in C: ``pop`` as ``SplitQueue.pop``.

    Holds a C copy of the guest memory regions and the ring's areas; the
    indices are its own while it serves (``load``/``store`` move them from and
    to the ``SplitQueue``).
    """

    cdef region_t *regions
    cdef int nregions
    cdef object views  # the regions' memoryviews, for the Python path's slices
    cdef char *desc
    cdef char *avail
    cdef char *used
    cdef uint32_t size
    cdef public uint16_t last_avail_idx
    cdef public uint16_t used_idx
    cdef public bint event_idx
    # the chain last popped: translated buffers (readable then writable) with
    # the region and guest address of each, and where the writable ones start
    cdef iovec *iov
    cdef seg_t *segs
    cdef uint32_t niov
    cdef uint32_t cap
    cdef uint32_t nrd
    cdef uint64_t rd_len
    cdef uint64_t wr_len
    cdef uint32_t head
    # why the last walk failed
    cdef uint64_t err_a
    cdef uint64_t err_b
    cdef bint err_wrapped

    def __cinit__(self):
        self.regions = NULL
        self.iov = NULL
        self.segs = NULL
        self.cap = 0

    def __dealloc__(self):
        free(self.regions)
        free(self.iov)
        free(self.segs)

    def __init__(self, queue):
        self.load(queue)

    def load(self, queue):
        """Copy the memory table, the ring areas and the indices of ``queue``."""
        cdef int i
        regions = queue.memory.regions
        cdef region_t *table = <region_t *>malloc(max(1, len(regions)) * sizeof(region_t))
        if table == NULL:
            raise MemoryError()
        try:
            for i, r in enumerate(regions):
                table[i].gpa = r.gpa
                table[i].size = r.size
                table[i].host = _address(r.view)
            desc, avail, used = queue.areas()
            self.desc = _address(desc)
            self.avail = _address(avail)
            self.used = _address(used)
        except BaseException:
            free(table)
            raise
        free(self.regions)
        self.regions = table
        self.nregions = len(regions)
        self.views = [r.view for r in regions]
        self.size = queue.size
        self.last_avail_idx = queue.last_avail_idx
        self.used_idx = queue.used_idx
        self.event_idx = queue.event_idx

    def store(self, queue):
        """Give the indices back to ``queue`` (what GET_VRING_BASE reports)."""
        queue.last_avail_idx = self.last_avail_idx
        queue.used_idx = self.used_idx

    # -- the walk (no GIL) -------------------------------------------------------
    cdef int _grow(self) noexcept nogil:
        cdef uint32_t cap = self.cap * 2 if self.cap else 64
        cdef iovec *iov = <iovec *>realloc(self.iov, cap * sizeof(iovec))
        if iov == NULL:
            return -1
        self.iov = iov
        cdef seg_t *segs = <seg_t *>realloc(self.segs, cap * sizeof(seg_t))
        if segs == NULL:
            return -1
        self.segs = segs
        self.cap = cap
        return 0

    cdef int _add(self, uint64_t addr, uint64_t length) noexcept nogil:
        """Translate a buffer, split at region ends (``GuestMemory.gpa_iov``)."""
        cdef int i
        cdef uint64_t off, n
        cdef region_t *r
        while True:
            for i in range(self.nregions):
                r = &self.regions[i]
                if addr >= r.gpa and addr - r.gpa < r.size:
                    break
            else:
                self.err_a = addr
                self.err_b = length
                return W_MEMORY
            off = addr - r.gpa
            n = r.size - off
            if length < n:
                n = length
            if self.niov == self.cap and self._grow() != 0:
                return W_NOMEM
            self.iov[self.niov].iov_base = r.host + off
            self.iov[self.niov].iov_len = n
            self.segs[self.niov].region = i
            self.segs[self.niov].gpa = addr
            self.segs[self.niov].len = n
            self.niov += 1
            length -= n
            if length == 0:
                return W_OK
            if addr + n < addr:  # the region ends at 2**64: nothing lies beyond
                self.err_a = 0
                self.err_b = length
                self.err_wrapped = True
                return W_MEMORY
            addr += n

    cdef int _walk(self, uint32_t head) noexcept nogil:
        """Follow the chain at ``head``; the rules and their order are
        ``SplitQueue._walk``'s."""
        cdef const char *table = self.desc
        cdef uint32_t limit = self.size
        cdef uint32_t idx = head
        cdef uint32_t seen = 0
        cdef bint indirect = False
        cdef bint have_writable = False
        cdef desc_t d
        cdef int i, rc, found
        cdef uint64_t off = 0
        cdef region_t *r = NULL
        self.niov = 0
        self.nrd = 0
        self.rd_len = 0
        self.wr_len = 0
        self.head = head
        self.err_wrapped = False
        while True:
            if idx >= limit:
                self.err_a = idx
                self.err_b = limit
                return W_NEXT_RANGE
            seen += 1
            if seen > limit:
                return W_LOOP
            memcpy(&d, table + 16 * <size_t>idx, 16)
            if d.flags & F_INDIRECT:
                if indirect:
                    return W_NESTED
                if d.flags & F_NEXT:
                    return W_INDIRECT_NEXT
                if d.len == 0 or d.len % 16:
                    self.err_a = d.len
                    return W_INDIRECT_LEN
                found = 0
                for i in range(self.nregions):
                    r = &self.regions[i]
                    if d.addr >= r.gpa and d.addr - r.gpa < r.size:
                        off = d.addr - r.gpa
                        found = off + d.len <= r.size
                        break
                if not found:
                    self.err_a = d.addr
                    self.err_b = d.len
                    return W_TABLE_MEMORY
                table = r.host + off
                limit = d.len >> 4
                if limit > MAX_QUEUE_SIZE:
                    self.err_a = limit
                    return W_TABLE_SIZE
                indirect = True
                idx = 0
                seen = 0
                continue
            if d.len:
                if d.flags & F_WRITE:
                    have_writable = True
                    self.wr_len += d.len
                elif have_writable:
                    return W_READ_AFTER_WRITE
                else:
                    self.rd_len += d.len
                rc = self._add(d.addr, d.len)
                if rc != W_OK:
                    return rc
                if not have_writable:
                    self.nrd = self.niov
            if not d.flags & F_NEXT:
                return W_OK
            idx = d.next

    cdef int _pop(self) noexcept nogil:
        """P_CHAIN (walked: see ``_walk``'s result in ``self.err_*``), P_NONE, or
        a broken ring; sets ``head``."""
        cdef uint16_t avail = vfsd_load16(self.avail + 2)
        cdef uint16_t last = self.last_avail_idx
        if avail == last:
            return P_NONE
        if <uint16_t>(avail - last) > self.size:
            self.err_a = avail
            return P_AVAIL_AHEAD
        cdef uint32_t slot = last % self.size
        cdef uint16_t head
        memcpy(&head, self.avail + 4 + 2 * slot, 2)
        self.last_avail_idx = last + 1
        self.head = head
        if head >= self.size:
            self.err_a = slot
            return P_HEAD_RANGE
        return P_CHAIN

    cdef void _add_used(self, uint32_t head, uint32_t length) noexcept nogil:
        cdef uint32_t elem[2]
        elem[0] = head
        elem[1] = length
        memcpy(self.used + 4 + 8 * (self.used_idx % self.size), elem, 8)
        self.used_idx += 1

    cdef bint _publish(self, uint16_t old) noexcept nogil:
        """``SplitQueue.publish``: store used idx; True if the driver wants a call."""
        cdef uint16_t new = self.used_idx
        cdef uint16_t used_event, flags
        vfsd_store16(self.used + 2, new)
        if new == old:
            return False
        vfsd_fence()
        if self.event_idx:
            used_event = vfsd_load16(self.avail + 4 + 2 * self.size)
            return <uint16_t>(new - used_event - 1) < <uint16_t>(new - old)
        flags = vfsd_load16(self.avail)
        return not flags & AVAIL_F_NO_INTERRUPT

    cdef bint _enable_notification(self) noexcept nogil:
        if self.event_idx:
            vfsd_store16(self.used + 4 + 8 * self.size, self.last_avail_idx)
            vfsd_fence()
        return vfsd_load16(self.avail + 2) != self.last_avail_idx

    # -- with the GIL ------------------------------------------------------------
    cdef object _reason(self, int rc):
        if rc == W_NEXT_RANGE:
            return f"next index {self.err_a} out of range {self.err_b}"
        if rc == W_LOOP:
            return "descriptor loop"
        if rc == W_NESTED:
            return "indirect descriptor inside an indirect table"
        if rc == W_INDIRECT_NEXT:
            return "indirect descriptor with NEXT set"
        if rc == W_INDIRECT_LEN:
            return f"indirect table length {self.err_a}"
        if rc == W_TABLE_SIZE:
            return f"indirect table of {self.err_a} entries"
        if rc == W_READ_AFTER_WRITE:
            return "readable descriptor after a writable one"
        if rc == W_NOMEM:
            return "out of memory for the chain's buffers"
        addr = (1 << 64) if self.err_wrapped else self.err_a
        return f"guest-physical range {addr:#x}+{self.err_b:#x} not in guest memory"

    cdef object _chain(self):
        """The chain last walked as ``SplitQueue`` makes it (views into the regions)."""
        cdef uint32_t i
        cdef uint64_t off
        readable = []
        writable = []
        gpas = []
        views = self.views
        for i in range(self.niov):
            off = <uint64_t>(<char *>self.iov[i].iov_base - self.regions[self.segs[i].region].host)
            v = views[self.segs[i].region][off : off + self.iov[i].iov_len]
            if i < self.nrd:
                readable.append(v)
            else:
                writable.append(v)
                gpas.append((self.segs[i].gpa, self.segs[i].len))
        return Chain(self.head, readable, writable, gpas)

    cdef object _written_gpas(self):
        cdef uint32_t i
        return [(self.segs[i].gpa, self.segs[i].len) for i in range(self.nrd, self.niov)]

    def pop(self):
        """As ``SplitQueue.pop``: a ``Chain``, None, or ChainError / QueueError."""
        cdef int rc
        with nogil:
            rc = self._pop()
        if rc == P_NONE:
            return None
        if rc == P_AVAIL_AHEAD:
            raise QueueError(
                f"avail index {self.err_a} is more than {self.size} ahead of"
                f" {(self.last_avail_idx) & 0xFFFF}"
            )
        if rc == P_HEAD_RANGE:
            raise QueueError(
                f"avail ring slot {self.err_a} names descriptor {self.head} >= {self.size}"
            )
        with nogil:
            rc = self._walk(self.head)
        if rc != W_OK:
            raise ChainError(self.head, self._reason(rc))
        return self._chain()

    def add_used(self, uint32_t head, uint32_t length):
        self._add_used(head, length)

    def publish(self, uint16_t old):
        return self._publish(old)

    def enable_notification(self):
        return self._enable_notification()


cdef class QueueWorker:
    """Serves one request ring on its own thread: see worker.QueueWorker."""

    compiled = True

    cdef object _ring
    cdef object _handler
    cdef object _slow_pool
    cdef object _dirty_log_of
    cdef object _may_block
    cdef object _fast_py
    cdef const vfsd_fast_ops *_fast
    cdef object _fast_owner
    cdef object _cv
    cdef int _ctl
    cdef bint _parked
    cdef bint _stopping
    cdef bint _exited
    cdef int _wake_fd
    cdef object _done
    cdef int _ndone
    cdef int _slow
    cdef object _thread
    cdef Walker _walker
    cdef object _queue
    cdef int _kick_fd
    cdef int _call_fd
    cdef int _ready
    cdef object _dlog
    cdef object _on_used_write
    cdef bint _look
    # the serving loop's state (worker thread only)
    cdef int _more  # chains may be waiting: serve before polling
    cdef int _look_asked  # ``wake`` was called
    cdef int _ack_wanted  # start/resume waits until the worker is about to poll
    cdef int _served  # chains in this batch
    cdef bint _dirty  # used elements (or a popped chain) not yet published
    cdef bint _ae_written  # avail_event written since the last publish
    cdef uint16_t _old  # used index at the last publish
    cdef int _rc  # why the walk refused a chain / the ring broke
    cdef int64_t _n  # a fast answer's length, while logging
    cdef int _err  # errno of a failed kick read
    cdef short _revents
    cdef bint _log  # dirty logging is on
    cdef bint _log_used  # the used ring's writes are logged
    cdef int _shown_slow  # ring.inflight as last set
    cdef uint64_t _counts[OP_SLOTS][ERRNO_SLOTS]

    def __init__(self, ring, handler, *, slow, dirty_log, may_block=None, fast=None):
        self._ring = ring
        self._handler = handler
        self._slow_pool = slow
        self._dirty_log_of = dirty_log
        self._may_block = may_block
        self._fast = NULL
        self._fast_py = None
        if fast is not None and PyCapsule_IsValid(fast, VFSD_FAST_OPS_CAPSULE):
            self._fast = <const vfsd_fast_ops *>PyCapsule_GetPointer(fast, VFSD_FAST_OPS_CAPSULE)
            if self._fast.abi != VFSD_FAST_ABI:
                raise ValueError(f"fast operations of ABI {self._fast.abi}, not {VFSD_FAST_ABI}")
            self._fast_owner = fast
        elif fast is not None:
            self._fast_py = fast
        self._cv = threading.Condition()
        self._ctl = RUN
        self._parked = False
        self._stopping = False
        self._exited = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._done = collections.deque()
        self._ndone = 0
        self._slow = 0
        self._thread = None
        self._walker = None
        self._queue = None
        self._kick_fd = -1
        self._call_fd = -1
        self._ready = 0
        self._dlog = None
        self._on_used_write = None
        self._more = 0
        self._look_asked = 0
        self._ack_wanted = 0
        self._served = 0
        self._dirty = False
        self._ae_written = False
        self._old = 0
        self._shown_slow = 0
        self._log = False
        self._log_used = False
        self._look = False
        memset(self._counts, 0, sizeof(self._counts))

    # -- control (event loop side) ------------------------------------------------
    def start(self):
        if self._thread is not None:
            return
        self._load()
        self._ack_wanted = 1
        self._thread = threading.Thread(
            target=self._main, name=f"vfsd-queue-{self._ring.index}", daemon=True
        )
        self._thread.start()
        with self._cv:
            self._cv.wait_for(self._looked)

    def _looked(self):
        return not self._ack_wanted or self._exited or self._ctl != RUN

    def _load(self):
        """Snapshot the ring; True if the queue, the kick fd or readiness changed."""
        ring = self._ring
        before = (self._queue, self._kick_fd, self._ready)
        q = ring.queue
        if q is not self._queue or self._walker is None:
            if self._walker is not None and self._queue is not None:
                self._walker.store(self._queue)
            self._queue = q
            self._walker = Walker(q) if q is not None else None
        elif q is not None:
            self._walker.load(q)  # memory may have changed; the indices are q's
        self._kick_fd = -1 if ring.kick_fd is None else ring.kick_fd
        self._call_fd = -1 if ring.call_fd is None else ring.call_fd
        self._ready = bool(ring.ready)
        self._dlog = self._dirty_log_of()
        self._on_used_write = q.on_used_write if q is not None else None
        self._log = self._dlog is not None
        self._log_used = self._on_used_write is not None
        if self._kick_fd >= 0:
            os.set_blocking(self._kick_fd, False)
        return before != (self._queue, self._kick_fd, self._ready)

    def _sync(self):
        """Indices back to the ``SplitQueue`` (while parked or stopped)."""
        if self._walker is not None and self._queue is not None:
            self._walker.store(self._queue)

    def wake(self):
        self._ready = bool(self._ring.ready)
        self._dlog = self._dirty_log_of()
        self._log = self._dlog is not None
        vfsd_store_int(&self._look_asked, 1)
        self._signal()

    def pause(self):
        with self._cv:
            if self._exited or self._thread is None:
                return
            self._ctl = PAUSE
            self._signal()
            self._cv.wait_for(lambda: self._parked or self._exited)

    def resume(self):
        if self._thread is None:
            self.start()
            return
        with self._cv:
            if self._ctl != PAUSE:
                return
            self._look = self._load()
            self._ack_wanted = 1
            vfsd_store_int(&self._ctl, RUN)
            self._cv.notify_all()
            self._cv.wait_for(self._looked)

    def begin_stop(self):
        with self._cv:
            if self._thread is None:
                return
            if self._ctl == PAUSE:
                self._load()
            vfsd_store_int(&self._ctl, STOP)
            self._signal()
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._stopping or self._exited)

    def stop(self):
        self.begin_stop()
        if self._thread is not None:
            self._thread.join()
        self._sync()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    @property
    def last_avail_idx(self):
        """The next avail-ring slot to pop (the walker's, while this serves)."""
        return self._walker.last_avail_idx if self._walker is not None else 0

    @property
    def inflight(self):
        return self._slow

    def fast_counts(self):
        """(opcode, errno) -> requests answered by the fast operations (errno 0: success)."""
        cdef int op, e
        out = {}
        for op in range(OP_SLOTS):
            for e in range(ERRNO_SLOTS):
                if self._counts[op][e]:
                    out[(op, e)] = self._counts[op][e]
        return out

    def _signal(self):
        if self._wake_fd >= 0:
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass

    # -- the worker thread ---------------------------------------------------------
    def _main(self):
        syscalls.set_thread_name(f"vfsd-queue-{self._ring.index}")
        try:
            self._run_loop()
        except BaseException:
            log.exception("ring %d: queue worker failed", self._ring.index)
        finally:
            with self._cv:
                self._exited = True
                self._cv.notify_all()

    def _park(self):
        with self._cv:
            self._sync()
            self._parked = True
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._ctl != PAUSE)
            self._parked = False

    def _ack_stop(self):
        with self._cv:
            self._stopping = True
            self._cv.notify_all()

    cdef _run_loop(self):
        """The thread: ``_spin`` serves without the GIL for as long as it can;
        whatever it stops for is handled here, with the GIL."""
        cdef int ctl, g
        cdef Walker w
        self._more = 1
        self._begin_window()
        while True:
            ctl = vfsd_load_int(&self._ctl)
            if ctl == PAUSE:
                self._publish_gil()
                self._park()
                # chains seen before the pause are still there; a changed ring is looked at
                self._more = self._more or self._look
                self._begin_window()
                continue
            w = self._walker
            if ctl == STOP:
                if not self._stopping:
                    self._ack_stop()
                if w is not None:
                    self._push_done(w)
                    self._publish_gil()
                else:
                    self._drop_done()
                if self._slow == 0:
                    return
                self._wait_wake()
                continue
            if w is None:  # no queue to serve: completions are dropped
                self._drop_done()
                self._ack_look()
                self._wait_wake()
                continue
            with nogil:
                g = self._spin(w)
            if g == G_LOOKED:
                self._ack_look()
            elif g == G_DONE:
                self._push_done(w)
            elif g == G_PUBLISH:
                self._publish_gil()
            elif g == G_KICK_ERR:
                log.error(
                    "ring %d: reading kick eventfd failed: %s; no longer watched",
                    self._ring.index,
                    os.strerror(self._err) if self._err else f"poll events {self._revents:#x}",
                )
                self._kick_fd = -1
            elif g == G_BROKEN:
                self._publish_gil()
                self._break(w, self._rc)
            elif g == G_REFUSED:
                log.error(
                    "ring %d: %s; returned unused",
                    self._ring.index,
                    ChainError(w.head, w._reason(self._rc)),
                )
                self._used(w, w.head, 0)
            elif g == G_CHAIN:
                self._python_path(w)
            elif g == G_FAST_LOGGED:
                if self._dlog is not None and self._n:
                    self._dlog.mark_written(w._written_gpas(), self._n)
                self._used(w, w.head, <uint32_t>self._n)
            if self._slow != self._shown_slow:
                self._shown_slow = self._slow
                self._ring.inflight = self._slow

    cdef int _spin(self, Walker w) noexcept nogil:
        """Serve the ring without the GIL: poll, pop, walk, fast operations,
        used ring, publish, call eventfd.  Returns what needs the GIL."""
        cdef pollfd fds[2]
        cdef int nfds, rc
        cdef int64_t n
        cdef uint64_t value
        while True:
            if vfsd_load_int(&self._ctl) != RUN:
                return G_CTL
            if vfsd_load_int(&self._ndone):
                return G_DONE
            if not self._more or self._served >= BATCH:
                if self._dirty or self._ae_written:
                    if self._log_used:
                        return G_PUBLISH
                    self._publish_nogil(w)
                self._served = 0
            if not self._more:
                if self._ack_wanted:
                    return G_LOOKED
                fds[0].fd = self._wake_fd
                fds[0].events = POLLIN
                fds[0].revents = 0
                nfds = 1
                if self._kick_fd >= 0:
                    fds[1].fd = self._kick_fd
                    fds[1].events = POLLIN
                    fds[1].revents = 0
                    nfds = 2
                rc = poll(fds, nfds, -1)
                if rc <= 0:
                    continue  # EINTR
                if fds[0].revents:
                    read(fds[0].fd, &value, 8)
                    if vfsd_load_int(&self._look_asked):  # ``wake``: look at the ring again
                        vfsd_store_int(&self._look_asked, 0)
                        self._more = 1
                if nfds == 2 and fds[1].revents:
                    self._revents = fds[1].revents
                    self._err = 0
                    if fds[1].revents & (POLLERR | POLLHUP | POLLNVAL):
                        return G_KICK_ERR
                    if read(fds[1].fd, &value, 8) < 0 and errno != EAGAIN and errno != EINTR:
                        self._err = errno
                        return G_KICK_ERR
                    self._more = 1
                continue
            if not self._ready:
                self._more = 0
                continue
            rc = w._pop()
            if rc == P_NONE:
                if w.event_idx:
                    self._ae_written = True
                if not w._enable_notification():
                    self._more = 0
                continue
            self._dirty = True  # from here on the chain goes to the used ring
            if rc < 0:
                self._rc = rc
                return G_BROKEN
            rc = w._walk(w.head)
            if rc != W_OK:
                self._rc = rc
                return G_REFUSED
            self._served += 1
            n = self._fast_answer(w)
            if n < 0:
                return G_CHAIN
            if self._log or self._log_used:
                self._n = n
                return G_FAST_LOGGED
            w._add_used(w.head, <uint32_t>n)

    cdef void _begin_window(self) noexcept:
        """A new publish window starts at the used index as it is now."""
        if self._walker is not None:
            self._old = self._walker.used_idx
        self._dirty = False
        self._ae_written = False
        self._served = 0

    cdef void _publish_nogil(self, Walker w) noexcept nogil:
        cdef uint64_t one = 1
        cdef bint notify = False
        if w.used_idx != self._old:
            notify = w._publish(self._old)
        self._old = w.used_idx
        self._dirty = False
        self._ae_written = False
        if notify and self._call_fd >= 0:
            write(self._call_fd, &one, 8)

    cdef _publish_gil(self):
        """Publish with the dirty-log hook of the used ring, if set."""
        cdef Walker w = self._walker
        if w is None or not (self._dirty or self._ae_written):
            return
        ae = self._ae_written
        changed = w.used_idx != self._old
        with nogil:
            self._publish_nogil(w)
        if self._on_used_write is not None:
            if changed:
                self._on_used_write(2, 2)
            if ae:
                self._on_used_write(4 + 8 * w.size, 2)

    cdef _ack_look(self):
        if self._ack_wanted:
            with self._cv:
                self._ack_wanted = 0
                self._cv.notify_all()

    cdef _wait_wake(self):
        cdef pollfd fd
        cdef uint64_t value
        fd.fd = self._wake_fd
        fd.events = POLLIN
        fd.revents = 0
        with nogil:
            if poll(&fd, 1, -1) > 0:
                read(fd.fd, &value, 8)

    cdef _drop_done(self):
        if self._ndone:
            self._slow -= len(self._done)
            self._done.clear()
            self._ndone = 0

    cdef int64_t _fast_answer(self, Walker w) noexcept nogil:
        """The fast operations' answer (used length) or -1 (declined / none)."""
        cdef const vfsd_fast_ops *ops = self._fast
        cdef vfsd_chain chain
        cdef uint32_t op
        cdef int32_t err
        cdef int64_t n
        if ops == NULL or w.nrd == 0 or w.iov[0].iov_len < 8:
            return -1
        memcpy(&op, <char *>w.iov[0].iov_base + 4, 4)
        if op >= 64 or not (ops.opcodes >> op) & 1:
            return -1
        chain.rd = w.iov
        chain.nrd = w.nrd
        chain.rd_len = w.rd_len
        chain.wr = w.iov + w.nrd
        chain.nwr = w.niov - w.nrd
        chain.wr_len = w.wr_len
        n = ops.handle(ops.ctx, &chain)
        if n < 0:
            return -1
        if <uint64_t>n > w.wr_len:
            n = w.wr_len  # never claim more than the chain's writable bytes
        err = 0
        if n >= 16 and chain.nwr and chain.wr[0].iov_len >= 16:
            memcpy(&err, <char *>chain.wr[0].iov_base + 4, 4)
            err = -err
        if err < 0 or err >= ERRNO_SLOTS:
            err = 0
        self._counts[op][err] += 1
        return n

    cdef _used(self, Walker w, uint32_t head, uint32_t n):
        cdef uint32_t slot = w.used_idx % w.size
        self._dirty = True
        w._add_used(head, n)
        if self._on_used_write is not None:
            self._on_used_write(4 + 8 * slot, 8)

    cdef _push_done(self, Walker w):
        done = self._done
        while done:
            head, n = done.popleft()
            self._slow -= 1
            self._ndone -= 1
            self._used(w, head, n)

    cdef _python_path(self, Walker w):
        chain = w._chain()
        if self._may_block is not None and self._may_block(chain.readable):
            self._slow += 1
            fut = self._slow_pool.submit(self._run, chain)
            head = chain.head
            fut.add_done_callback(lambda f: self._finished(head, f))
            return
        self._used(w, chain.head, self._run(chain))

    def _run(self, chain):
        try:
            n = -1
            if self._fast_py is not None:
                n = self._fast_py(chain.readable, chain.writable)
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

    def _finished(self, head, fut):
        n = 0 if fut.cancelled() else fut.result()
        self._done.append((head, n))
        self._ndone += 1
        self._signal()

    cdef _break(self, Walker w, int rc):
        if rc == P_AVAIL_AHEAD:
            reason = (
                f"avail index {w.err_a} is more than {w.size} ahead of"
                f" {(w.last_avail_idx) & 0xFFFF}"
            )
        else:
            reason = f"avail ring slot {w.err_a} names descriptor {w.head} >= {w.size}"
        ring = self._ring
        log.error("ring %d is broken and stops until reconfigured: %s", ring.index, reason)
        ring.broken = True
        self._ready = False
        ring.signal_error()


# -- a fast-operations capsule for the tests ------------------------------------------
cdef struct _reply_ops:
    vfsd_fast_ops ops
    int32_t error

cdef int64_t _reply_handle(void *ctx, const vfsd_chain *chain) noexcept nogil:
    """Answers with a bare fuse_out_header (the given error) if it fits, else declines."""
    cdef _reply_ops *me = <_reply_ops *>ctx
    cdef uint32_t out[4]
    if chain.nrd == 0 or chain.rd[0].iov_len < 16 or chain.nwr == 0 or chain.wr[0].iov_len < 16:
        return VFSD_FAST_DECLINE
    out[0] = 16
    memcpy(&out[1], &me.error, 4)
    memcpy(&out[2], <char *>chain.rd[0].iov_base + 8, 8)  # unique
    memcpy(chain.wr[0].iov_base, out, 16)
    return 16

cdef void _free_reply_ops(object capsule) noexcept:
    # a PyCapsule_Destructor
    free(PyCapsule_GetPointer(capsule, VFSD_FAST_OPS_CAPSULE))

def testing_fast_ops(uint64_t opcodes, int error):
    """A ``VFSD_FAST_OPS_CAPSULE`` answering requests of ``opcodes`` (a bit mask)
    with a bare out header carrying ``-error`` (for the tests of the fast path)."""
    cdef _reply_ops *me = <_reply_ops *>malloc(sizeof(_reply_ops))
    if me == NULL:
        raise MemoryError()
    me.ops.abi = VFSD_FAST_ABI
    me.ops.ctx = me
    me.ops.handle = _reply_handle
    me.ops.opcodes = opcodes
    me.error = -error
    return PyCapsule_New(me, VFSD_FAST_OPS_CAPSULE, <PyCapsule_Destructor>_free_reply_ops)
