# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Fast operations of the passthrough backend, compiled: the twin of passthrough.py.

The same rules as passthrough.py (read it first), answered in C on threads
that do not hold the GIL.  Python objects are out of reach there, so the
node and handle tables are mirrored in C (fs/passthrough/mirror.py): node id
-> O_PATH fd, fh -> (node id, open fd).  Each entry counts the fast
operations using its fd; a table that drops an entry waits (without the
GIL) until that count is zero before Python may close the fd, so an fd
number is never used here after it was closed and perhaps reused.

One mutex guards the mirror and the session limits; it is held only to find
an entry and count a use, never across a syscall.
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.pycapsule cimport PyCapsule_GetContext, PyCapsule_New, PyCapsule_SetContext
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from vfsd_fastops cimport (
    VFSD_FAST_ABI,
    VFSD_FAST_DECLINE,
    VFSD_FAST_OPS_CAPSULE,
    iovec,
    vfsd_chain,
    vfsd_fast_fn,
    vfsd_fast_ops,
)

from virtiofsd_py.fastops import passthrough as _pure
from virtiofsd_py.fuse import codec as _codec


cdef extern from "<sys/uio.h>" nogil:
    ssize_t preadv(int fd, const iovec *iov, int iovcnt, long offset)
    ssize_t pwritev(int fd, const iovec *iov, int iovcnt, long offset)

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    enum:
        F_DUPFD_CLOEXEC

cdef extern from "<sys/stat.h>" nogil:
    ctypedef struct timespec_t "struct timespec":
        long tv_sec
        long tv_nsec
    ctypedef struct stat_t "struct stat":
        unsigned long st_ino
        unsigned long st_nlink
        unsigned int st_mode
        unsigned int st_uid
        unsigned int st_gid
        unsigned long st_rdev
        long st_size
        long st_blksize
        long st_blocks
        timespec_t st_atim
        timespec_t st_mtim
        timespec_t st_ctim
    int fstat(int fd, stat_t *st)

cdef extern from "<time.h>" nogil:
    ctypedef struct timespec_req "struct timespec":
        long tv_sec
        long tv_nsec
    int nanosleep(const timespec_req *req, timespec_req *rem)

cdef extern from "<sys/statvfs.h>" nogil:
    ctypedef struct statvfs_t "struct statvfs":
        unsigned long f_bsize
        unsigned long f_frsize
        unsigned long f_blocks
        unsigned long f_bfree
        unsigned long f_bavail
        unsigned long f_files
        unsigned long f_ffree
        unsigned long f_namemax
    int fstatvfs(int fd, statvfs_t *buf)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_broadcast(pthread_cond_t *c)

# Layouts from linux/fuse.h (the system's copy: these structs are unchanged
# since 7.9), the same ABI fuse/abi.py spells for the Python side.
cdef extern from "<linux/fuse.h>" nogil:
    struct fuse_in_header:
        uint32_t len
        uint32_t opcode
        uint64_t unique
        uint64_t nodeid
        uint16_t total_extlen
    struct fuse_out_header:
        uint32_t len
        int32_t error
        uint64_t unique
    struct fuse_attr:
        uint64_t ino
        uint64_t size
        uint64_t blocks
        uint64_t atime
        uint64_t mtime
        uint64_t ctime
        uint32_t atimensec
        uint32_t mtimensec
        uint32_t ctimensec
        uint32_t mode
        uint32_t nlink
        uint32_t uid
        uint32_t gid
        uint32_t rdev
        uint32_t blksize
        uint32_t flags
    struct fuse_attr_out:
        uint64_t attr_valid
        uint32_t attr_valid_nsec
        uint32_t dummy
        fuse_attr attr
    struct fuse_getattr_in:
        uint32_t getattr_flags
        uint64_t fh
    struct fuse_read_in:
        uint64_t fh
        uint64_t offset
        uint32_t size
    struct fuse_write_in:
        uint64_t fh
        uint64_t offset
        uint32_t size
        uint32_t write_flags
    struct fuse_write_out:
        uint32_t size
        uint32_t padding
    struct fuse_flush_in:
        uint64_t fh
        uint64_t lock_owner
    struct fuse_kstatfs:
        uint64_t blocks
        uint64_t bfree
        uint64_t bavail
        uint64_t files
        uint64_t ffree
        uint32_t bsize
        uint32_t namelen
        uint32_t frsize
        uint32_t padding
        uint32_t spare[6]
    struct fuse_statfs_out:
        fuse_kstatfs st
    enum:
        FUSE_GETATTR
        FUSE_READ
        FUSE_WRITE
        FUSE_FLUSH
        FUSE_STATFS
        FUSE_GETATTR_FH
        FUSE_WRITE_KILL_SUIDGID

cdef enum:
    SMALL_CHAIN = 16  # buffers of a chain handle() takes without allocating
cdef enum:
    IOV_MAX = 1024  # the kernel's UIO_MAXIOV: longer chains go to the Python path
cdef uint64_t S64_MAX = 0x7FFFFFFFFFFFFFFF
cdef int EIO = 5
cdef uint64_t ROOT_ID = 1


# -- the mirror: open addressing, node id / fh -> entry ---------------------------

cdef struct entry:
    uint64_t key
    uint64_t nodeid     # a handle's node (nodes: the key again)
    int fd
    uint32_t uses       # fast operations using fd now
    bint dropped        # removed from its table: wake the dropper at uses == 0

cdef struct table:
    entry **slots
    size_t mask         # capacity - 1 (capacity a power of two, or 0)
    size_t filled       # live + tombstones
    size_t live

cdef entry TOMB         # a removed slot's marker (its address only)


cdef inline size_t slot_of(uint64_t key, size_t mask) noexcept nogil:
    return <size_t>((key * <uint64_t>0x9E3779B97F4A7C15) >> 17) & mask


cdef entry *table_find(table *t, uint64_t key) noexcept nogil:
    if t.mask == 0:
        return NULL
    cdef size_t i = slot_of(key, t.mask)
    cdef entry *e
    while True:
        e = t.slots[i]
        if e == NULL:
            return NULL
        if e != &TOMB and e.key == key:
            return e
        i = (i + 1) & t.mask


cdef bint table_grow(table *t) noexcept nogil:
    """Rehash into room for twice the live entries; False when out of memory."""
    cdef size_t cap = 16
    while cap < (t.live + 1) * 4:
        cap <<= 1
    cdef entry **slots = <entry **>calloc(cap, sizeof(entry *))
    if slots == NULL:
        return False
    cdef size_t i, j
    cdef entry *e
    for i in range(t.mask + 1 if t.mask else 0):
        e = t.slots[i]
        if e != NULL and e != &TOMB:
            j = slot_of(e.key, cap - 1)
            while slots[j] != NULL:
                j = (j + 1) & (cap - 1)
            slots[j] = e
    free(t.slots)
    t.slots = slots
    t.mask = cap - 1
    t.filled = t.live
    return True


cdef bint table_insert(table *t, entry *e) noexcept nogil:
    """Add ``e`` (its key absent); False when out of memory."""
    if t.mask == 0 or (t.filled + 1) * 2 > t.mask + 1:
        if not table_grow(t):
            return False
    cdef size_t i = slot_of(e.key, t.mask)
    while t.slots[i] != NULL and t.slots[i] != &TOMB:
        i = (i + 1) & t.mask
    if t.slots[i] == NULL:
        t.filled += 1
    t.slots[i] = e
    t.live += 1
    return True


cdef entry *table_take(table *t, uint64_t key) noexcept nogil:
    """Remove and return the entry of ``key``, or NULL."""
    if t.mask == 0:
        return NULL
    cdef size_t i = slot_of(key, t.mask)
    cdef entry *e
    while True:
        e = t.slots[i]
        if e == NULL:
            return NULL
        if e != &TOMB and e.key == key:
            t.slots[i] = &TOMB
            t.live -= 1
            return e
        i = (i + 1) & t.mask


# -- the shared state of one FastOps --------------------------------------------------

cdef struct state:
    vfsd_fast_ops ops       # what the capsule points at (ctx = this state)
    pthread_mutex_t mu
    pthread_cond_t idle     # an entry's uses reached zero
    table nodes
    table handles
    bint armed              # a FUSE session exists
    uint32_t max_read
    uint32_t max_write
    uint64_t lock_owners
    # Constant after construction (the backend's configuration):
    bint translates_ids
    bint readonly
    bint remaps_capability
    bint killpriv_v2
    uint64_t attr_sec
    uint32_t attr_nsec
    long use_delay_ns       # tests only: a pause between finding an fd and using it


cdef inline void release(state *s, entry *e) noexcept nogil:
    pthread_mutex_lock(&s.mu)
    e.uses -= 1
    if e.uses == 0 and e.dropped:
        pthread_cond_broadcast(&s.idle)
    pthread_mutex_unlock(&s.mu)


# Removal never waits while it holds the GIL: the entry leaves its table at
# once, and only an entry some fast operation still uses is waited for,
# with the GIL let go (``wait_unused``).

cdef entry *retire_locked(state *s, entry *e) noexcept nogil:
    """``e`` (out of its table): freed if unused, else returned to ``wait_unused``."""
    if e.uses == 0:
        free(e)
        return NULL
    e.dropped = True
    return e


cdef void wait_unused(state *s, entry *e) noexcept nogil:
    """Wait until the last fast operation using ``e`` let go of it; free it."""
    pthread_mutex_lock(&s.mu)
    while e.uses:
        pthread_cond_wait(&s.idle, &s.mu)
    pthread_mutex_unlock(&s.mu)
    free(e)


cdef entry *take_key(state *s, table *t, uint64_t key) noexcept nogil:
    """Remove ``key``; its entry if still in use (``wait_unused`` it), else NULL."""
    pthread_mutex_lock(&s.mu)
    cdef entry *e = table_take(t, key)
    if e != NULL:
        e = retire_locked(s, e)
    pthread_mutex_unlock(&s.mu)
    return e


cdef entry *take_some(state *s, table *t, bint keep_root) noexcept nogil:
    """Remove every entry (the root's too unless ``keep_root``) until one is in
    use: that one is returned (``wait_unused`` it, then call again); NULL: done."""
    pthread_mutex_lock(&s.mu)
    cdef size_t i = 0
    cdef entry *e
    cdef entry *busy = NULL
    while t.mask and i <= t.mask and busy == NULL:
        e = t.slots[i]
        if e != NULL and e != &TOMB and not (keep_root and e.key == ROOT_ID):
            t.slots[i] = &TOMB
            t.live -= 1
            busy = retire_locked(s, e)
        i += 1
    pthread_mutex_unlock(&s.mu)
    return busy


cdef entry *add_entry(state *s, table *t, uint64_t key, uint64_t nodeid, int fd) noexcept nogil:
    """Mirror ``key``, replacing an entry of the same key: returns that one if it
    is still in use (``wait_unused`` it).  Out of memory leaves ``key`` out
    (its requests are declined)."""
    cdef entry *e = <entry *>malloc(sizeof(entry))
    cdef entry *old
    pthread_mutex_lock(&s.mu)
    old = table_take(t, key)
    if old != NULL:
        old = retire_locked(s, old)
    if e != NULL:
        e.key = key
        e.nodeid = nodeid
        e.fd = fd
        e.uses = 0
        e.dropped = False
        if not table_insert(t, e):
            free(e)
    pthread_mutex_unlock(&s.mu)
    return old


cdef void drop_key(state *s, table *t, uint64_t key) noexcept:
    """Remove ``key`` and wait (without the GIL) until its fd is unused."""
    cdef entry *e = take_key(s, t, key)
    if e != NULL:
        with nogil:
            wait_unused(s, e)


cdef void drop_all(state *s, table *t, bint keep_root) noexcept:
    """Remove every entry (but the root with ``keep_root``) and wait until unused."""
    cdef entry *e = take_some(s, t, keep_root)
    while e != NULL:
        with nogil:
            wait_unused(s, e)
        e = take_some(s, t, keep_root)


cdef struct struct_reply_attr:
    fuse_out_header hdr
    fuse_attr_out out


cdef struct struct_reply_write:
    fuse_out_header hdr
    fuse_write_out out


cdef struct struct_reply_statfs:
    fuse_out_header hdr
    fuse_statfs_out out


# -- chain access -------------------------------------------------------------------

cdef bint gather(const vfsd_chain *c, uint64_t off, void *dst, size_t n) noexcept nogil:
    """Copy ``n`` readable bytes at chain offset ``off`` to ``dst``."""
    if off + n > c.rd_len:
        return False
    cdef char *out = <char *>dst
    cdef uint32_t i
    cdef size_t take
    for i in range(c.nrd):
        if n == 0:
            break
        if off >= c.rd[i].iov_len:
            off -= c.rd[i].iov_len
            continue
        take = c.rd[i].iov_len - off
        if take > n:
            take = n
        memcpy(out, <char *>c.rd[i].iov_base + off, take)
        out += take
        n -= take
        off = 0
    return n == 0


cdef void scatter(const vfsd_chain *c, uint64_t off, const void *src, size_t n) noexcept nogil:
    """Copy ``n`` bytes to the writable chain at ``off`` (the caller checked room)."""
    cdef const char *p = <const char *>src
    cdef uint32_t i
    cdef size_t take
    for i in range(c.nwr):
        if n == 0:
            break
        if off >= c.wr[i].iov_len:
            off -= c.wr[i].iov_len
            continue
        take = c.wr[i].iov_len - off
        if take > n:
            take = n
        memcpy(<char *>c.wr[i].iov_base + off, p, take)
        p += take
        n -= take
        off = 0


cdef int slice_iov(const iovec *src, uint32_t nsrc, uint64_t off, uint64_t n,
                   iovec *out) noexcept nogil:
    """iovecs of ``n`` bytes from offset ``off`` of ``src``; -1 past IOV_MAX."""
    cdef int k = 0
    cdef uint32_t i
    cdef size_t take
    for i in range(nsrc):
        if n == 0:
            break
        if off >= src[i].iov_len:
            off -= src[i].iov_len
            continue
        take = src[i].iov_len - off
        if take > n:
            take = n
        if k == IOV_MAX:
            return -1
        out[k].iov_base = <char *>src[i].iov_base + off
        out[k].iov_len = take
        k += 1
        n -= take
        off = 0
    return k


cdef int64_t reply_header(const vfsd_chain *c, uint64_t unique, int32_t error,
                          uint32_t length) noexcept nogil:
    cdef fuse_out_header h
    h.len = length
    h.error = error
    h.unique = unique
    scatter(c, 0, &h, sizeof(h))
    return length


cdef inline int64_t reply_error(const vfsd_chain *c, uint64_t unique, int err) noexcept nogil:
    if err <= 0 or err >= 4096:
        err = EIO
    return reply_header(c, unique, -err, sizeof(fuse_out_header))


# -- the operations -------------------------------------------------------------------

cdef entry *use_handle(state *s, uint64_t fh, uint64_t nodeid) noexcept nogil:
    """The handle's entry, its use counted (``release`` it), or NULL."""
    pthread_mutex_lock(&s.mu)
    cdef entry *e = table_find(&s.handles, fh)
    if e != NULL and e.nodeid == nodeid:
        e.uses += 1
    else:
        e = NULL
    pthread_mutex_unlock(&s.mu)
    cdef timespec_req pause
    if e != NULL and s.use_delay_ns:
        pause.tv_sec = 0
        pause.tv_nsec = s.use_delay_ns
        nanosleep(&pause, NULL)
    return e


cdef int64_t op_getattr(state *s, const vfsd_chain *c, uint64_t unique, uint64_t nodeid,
                        uint64_t args_len) noexcept nogil:
    cdef fuse_getattr_in arg
    cdef entry *e
    cdef stat_t st
    cdef int rc, err
    cdef struct_reply_attr reply
    if (args_len < sizeof(fuse_getattr_in) or s.translates_ids
            or c.wr_len < sizeof(fuse_out_header) + sizeof(fuse_attr_out)):
        return VFSD_FAST_DECLINE
    if not gather(c, sizeof(fuse_in_header), &arg, sizeof(arg)):
        return VFSD_FAST_DECLINE  # a chain shorter than its rd_len says
    if arg.getattr_flags & FUSE_GETATTR_FH:
        e = use_handle(s, arg.fh, nodeid)
    else:
        pthread_mutex_lock(&s.mu)
        e = table_find(&s.nodes, nodeid)
        if e != NULL:
            e.uses += 1
        pthread_mutex_unlock(&s.mu)
    if e == NULL:
        return VFSD_FAST_DECLINE
    rc = fstat(e.fd, &st)
    err = errno
    release(s, e)
    if rc < 0:
        return reply_error(c, unique, err)
    reply.out.attr_valid = s.attr_sec
    reply.out.attr_valid_nsec = s.attr_nsec
    reply.out.dummy = 0
    pack_attr(&reply.out.attr, &st)
    reply.hdr.len = sizeof(reply)
    reply.hdr.error = 0
    reply.hdr.unique = unique
    scatter(c, 0, &reply, sizeof(reply))
    return sizeof(reply)



cdef void pack_attr(fuse_attr *a, const stat_t *st) noexcept nogil:
    """fuse_attr from a stat, as codec.pack_attr does it (u64 seconds, low 32 bits
    of rdev and blksize, nlink capped at u32)."""
    a.ino = st.st_ino
    a.size = <uint64_t>st.st_size
    a.blocks = <uint64_t>st.st_blocks
    a.atime = <uint64_t>st.st_atim.tv_sec
    a.mtime = <uint64_t>st.st_mtim.tv_sec
    a.ctime = <uint64_t>st.st_ctim.tv_sec
    a.atimensec = <uint32_t>st.st_atim.tv_nsec
    a.mtimensec = <uint32_t>st.st_mtim.tv_nsec
    a.ctimensec = <uint32_t>st.st_ctim.tv_nsec
    a.mode = st.st_mode
    a.nlink = 0xFFFFFFFFU
    if st.st_nlink < 0xFFFFFFFFU:
        a.nlink = <uint32_t>st.st_nlink
    a.uid = st.st_uid
    a.gid = st.st_gid
    a.rdev = <uint32_t>st.st_rdev
    a.blksize = <uint32_t>st.st_blksize
    a.flags = 0


cdef int64_t op_read(state *s, const vfsd_chain *c, uint64_t unique, uint64_t nodeid,
                     uint64_t args_len) noexcept nogil:
    cdef fuse_read_in arg
    cdef iovec iov[IOV_MAX]
    cdef uint64_t size
    cdef int n
    cdef ssize_t got
    cdef int err = 0
    if args_len < sizeof(fuse_read_in) or c.wr_len < sizeof(fuse_out_header):
        return VFSD_FAST_DECLINE
    if not gather(c, sizeof(fuse_in_header), &arg, sizeof(arg)):
        return VFSD_FAST_DECLINE  # a chain shorter than its rd_len says
    if arg.offset > S64_MAX:
        return VFSD_FAST_DECLINE
    size = arg.size
    if size > s.max_read:
        size = s.max_read
    if size > c.wr_len - sizeof(fuse_out_header):
        size = c.wr_len - sizeof(fuse_out_header)
    if size > 0xFFFFFFFFU - sizeof(fuse_out_header):
        return VFSD_FAST_DECLINE  # no u32 reply length for it
    n = slice_iov(c.wr, c.nwr, sizeof(fuse_out_header), size, iov)
    if n < 0:
        return VFSD_FAST_DECLINE
    cdef entry *e = use_handle(s, arg.fh, nodeid)
    if e == NULL:
        return VFSD_FAST_DECLINE
    got = 0
    if n:
        while True:
            got = preadv(e.fd, iov, n, <long>arg.offset)
            if got >= 0 or errno != EINTR:
                break
        err = errno
    release(s, e)
    if got < 0:
        return reply_error(c, unique, err)
    return reply_header(c, unique, 0, <uint32_t>(sizeof(fuse_out_header) + got))


cdef int64_t op_write(state *s, const vfsd_chain *c, uint64_t unique, uint64_t nodeid,
                      uint64_t args_len) noexcept nogil:
    cdef fuse_write_in arg
    cdef iovec iov[IOV_MAX]
    cdef int n
    cdef ssize_t done
    cdef int err = 0
    cdef struct_reply_write reply
    cdef uint64_t start = sizeof(fuse_in_header) + sizeof(fuse_write_in)
    if (args_len < sizeof(fuse_write_in) or s.readonly or s.remaps_capability
            or c.wr_len < sizeof(reply)):
        return VFSD_FAST_DECLINE
    if not gather(c, sizeof(fuse_in_header), &arg, sizeof(arg)):
        return VFSD_FAST_DECLINE  # a chain shorter than its rd_len says
    if (arg.size > args_len - sizeof(fuse_write_in) or arg.size > s.max_write
            or arg.offset > S64_MAX):
        return VFSD_FAST_DECLINE
    if arg.write_flags & FUSE_WRITE_KILL_SUIDGID and s.killpriv_v2:
        return VFSD_FAST_DECLINE
    n = slice_iov(c.rd, c.nrd, start, arg.size, iov)
    if n < 0:
        return VFSD_FAST_DECLINE
    cdef entry *e = use_handle(s, arg.fh, nodeid)
    if e == NULL:
        return VFSD_FAST_DECLINE
    done = 0
    if n:
        while True:
            done = pwritev(e.fd, iov, n, <long>arg.offset)
            if done >= 0 or errno != EINTR:
                break
        err = errno
    release(s, e)
    if done < 0:
        return reply_error(c, unique, err)
    reply.hdr.len = sizeof(reply)
    reply.hdr.error = 0
    reply.hdr.unique = unique
    reply.out.size = <uint32_t>done
    reply.out.padding = 0
    scatter(c, 0, &reply, sizeof(reply))
    return sizeof(reply)



cdef int64_t op_flush(state *s, const vfsd_chain *c, uint64_t unique, uint64_t nodeid,
                      uint64_t args_len) noexcept nogil:
    cdef fuse_flush_in arg
    cdef int d, rc
    cdef int err = 0
    if args_len < sizeof(fuse_flush_in) or c.wr_len < sizeof(fuse_out_header):
        return VFSD_FAST_DECLINE
    if not gather(c, sizeof(fuse_in_header), &arg, sizeof(arg)):
        return VFSD_FAST_DECLINE  # a chain shorter than its rd_len says
    pthread_mutex_lock(&s.mu)
    cdef uint64_t owners = s.lock_owners
    pthread_mutex_unlock(&s.mu)
    if owners:
        return VFSD_FAST_DECLINE
    cdef entry *e = use_handle(s, arg.fh, nodeid)
    if e == NULL:
        return VFSD_FAST_DECLINE
    rc = 0
    d = fcntl(e.fd, F_DUPFD_CLOEXEC, 0)  # as os.dup: never inherited by a child
    if d < 0:
        rc = -1
        err = errno
    elif close(d) < 0:
        rc = -1
        err = errno
    release(s, e)
    if rc < 0:
        return reply_error(c, unique, err)
    return reply_header(c, unique, 0, sizeof(fuse_out_header))


cdef int64_t op_statfs(state *s, const vfsd_chain *c, uint64_t unique,
                       uint64_t nodeid) noexcept nogil:
    cdef statvfs_t sv
    cdef struct_reply_statfs reply
    cdef int rc, err, i
    if c.wr_len < sizeof(reply):
        return VFSD_FAST_DECLINE
    pthread_mutex_lock(&s.mu)
    cdef entry *e = table_find(&s.nodes, nodeid)
    if e != NULL:
        e.uses += 1
    pthread_mutex_unlock(&s.mu)
    if e == NULL:
        return VFSD_FAST_DECLINE
    rc = fstatvfs(e.fd, &sv)
    err = errno
    release(s, e)
    if rc < 0:
        return reply_error(c, unique, err)
    reply.hdr.len = sizeof(reply)
    reply.hdr.error = 0
    reply.hdr.unique = unique
    reply.out.st.blocks = sv.f_blocks
    reply.out.st.bfree = sv.f_bfree
    reply.out.st.bavail = sv.f_bavail
    reply.out.st.files = sv.f_files
    reply.out.st.ffree = sv.f_ffree
    reply.out.st.bsize = <uint32_t>sv.f_bsize
    reply.out.st.namelen = <uint32_t>sv.f_namemax
    reply.out.st.frsize = <uint32_t>sv.f_frsize
    reply.out.st.padding = 0
    for i in range(6):
        reply.out.st.spare[i] = 0
    scatter(c, 0, &reply, sizeof(reply))
    return sizeof(reply)


cdef int64_t fast_handle(void *ctx, const vfsd_chain *c) noexcept nogil:
    """vfsd_fast_fn: answer one request or decline it (passthrough.py's ``handle``)."""
    cdef state *s = <state *>ctx
    cdef fuse_in_header h
    cdef uint64_t args_len
    if c.rd_len < sizeof(fuse_in_header):
        return VFSD_FAST_DECLINE
    if not gather(c, 0, &h, sizeof(h)):
        return VFSD_FAST_DECLINE  # a chain shorter than its rd_len says
    if h.len > c.rd_len or h.len < sizeof(fuse_in_header) or h.total_extlen:
        return VFSD_FAST_DECLINE
    args_len = h.len - sizeof(fuse_in_header)
    pthread_mutex_lock(&s.mu)
    cdef bint armed = s.armed
    pthread_mutex_unlock(&s.mu)
    if not armed:
        return VFSD_FAST_DECLINE
    if h.opcode == FUSE_GETATTR:
        return op_getattr(s, c, h.unique, h.nodeid, args_len)
    if h.opcode == FUSE_READ:
        return op_read(s, c, h.unique, h.nodeid, args_len)
    if h.opcode == FUSE_WRITE:
        return op_write(s, c, h.unique, h.nodeid, args_len)
    if h.opcode == FUSE_FLUSH:
        return op_flush(s, c, h.unique, h.nodeid, args_len)
    if h.opcode == FUSE_STATFS:
        return op_statfs(s, c, h.unique, h.nodeid)
    return VFSD_FAST_DECLINE


cdef void capsule_gone(object capsule) noexcept:
    cdef void *owner = PyCapsule_GetContext(capsule)
    if owner != NULL:
        Py_DECREF(<object>owner)


DECLINED = _pure.DECLINED


cdef class FastOps:
    """The compiled twin of ``passthrough.FastOps``: same constructor and methods,
    plus the C interface (``capsule``) the compiled worker calls."""

    cdef state *s
    cdef readonly object fs
    cdef bint _readonly
    cdef readonly uint64_t opcodes
    cdef bint attached

    def __cinit__(self):
        self.s = <state *>calloc(1, sizeof(state))
        if self.s == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.s.mu, NULL)
        pthread_cond_init(&self.s.idle, NULL)

    def __init__(self, fs, *, bint readonly=False):
        cdef state *s = self.s
        self.fs = fs
        self._readonly = readonly
        self.opcodes = _pure.opcode_mask()
        sec, nsec = _codec.timeout_split(fs.policy.attr_timeout)
        s.attr_sec = sec
        s.attr_nsec = nsec
        s.translates_ids = fs.translates_ids
        s.readonly = readonly
        s.remaps_capability = fs.remaps_capability
        s.killpriv_v2 = fs.config.killpriv_v2
        s.ops.abi = VFSD_FAST_ABI
        s.ops.ctx = s
        s.ops.handle = fast_handle
        s.ops.opcodes = self.opcodes
        fs.inodes.attach_mirror(self)
        fs.handles.attach_mirror(self)
        fs.locks.attach_mirror(self)
        self.attached = True

    def __dealloc__(self):
        if self.s == NULL:
            return
        drop_all(self.s, &self.s.nodes, False)
        drop_all(self.s, &self.s.handles, False)
        free(self.s.nodes.slots)
        free(self.s.handles.slots)
        pthread_cond_destroy(&self.s.idle)
        pthread_mutex_destroy(&self.s.mu)
        free(self.s)
        self.s = NULL

    @property
    def readonly(self):
        """Served behind ``ReadOnlyFS``: WRITE is the dispatcher's (EROFS)."""
        return self._readonly

    def close(self):
        """Detach from the backend's tables (their mirror is emptied)."""
        if self.attached:
            self.attached = False
            self.fs.inodes.detach_mirror()
            self.fs.handles.detach_mirror()
            self.fs.locks.detach_mirror()

    def session_changed(self, session):
        pthread_mutex_lock(&self.s.mu)
        if session is None:
            self.s.armed = False
        else:
            self.s.max_read = min(session.max_read, 0xFFFFFFFFU)
            self.s.max_write = min(session.max_write, 0xFFFFFFFFU)
            self.s.armed = True
        pthread_mutex_unlock(&self.s.mu)

    def capsule(self):
        """A PyCapsule (VFSD_FAST_OPS_CAPSULE) of the struct vfsd_fast_ops; it keeps
        this object alive."""
        cap = PyCapsule_New(&self.s.ops, VFSD_FAST_OPS_CAPSULE, capsule_gone)
        Py_INCREF(self)
        PyCapsule_SetContext(cap, <void *><PyObject *>self)
        return cap

    def handle(self, readable, writable):
        """Answer one request held in Python buffers (tests, the pure worker): the
        reply length, or DECLINED."""
        return self._call(readable, writable, 1)

    def _repeat(self, readable, writable, Py_ssize_t count):
        """``handle`` ``count`` times in C on the same buffers (bench/fastops.py:
        the cost a compiled worker pays per request)."""
        return self._call(readable, writable, count)

    cdef object _call(self, readable, writable, Py_ssize_t count):
        cdef Py_ssize_t nrd = len(readable), nwr = len(writable), n, i, j
        cdef Py_buffer small_views[SMALL_CHAIN]
        cdef iovec small_vecs[SMALL_CHAIN]
        cdef Py_buffer *views = small_views
        cdef iovec *vecs = small_vecs
        cdef vfsd_chain chain
        cdef int64_t got = VFSD_FAST_DECLINE
        cdef Py_ssize_t held = 0
        cdef uint32_t opcode
        if nrd == 0 or nrd > IOV_MAX or nwr > IOV_MAX:
            return DECLINED
        n = nrd + nwr
        if n > SMALL_CHAIN:
            views = <Py_buffer *>calloc(n, sizeof(Py_buffer))
            vecs = <iovec *>calloc(n, sizeof(iovec))
            if views == NULL or vecs == NULL:
                free(views)
                free(vecs)
                raise MemoryError()
        try:
            chain.rd_len = 0
            chain.wr_len = 0
            for i in range(n):
                obj = readable[i] if i < nrd else writable[i - nrd]
                PyObject_GetBuffer(obj, &views[i], PyBUF_SIMPLE if i < nrd else PyBUF_WRITABLE)
                held += 1
                vecs[i].iov_base = views[i].buf
                vecs[i].iov_len = <size_t>views[i].len
                if i == 0 and vecs[0].iov_len >= 8:
                    # An opcode not answered here: declined before touching the rest.
                    memcpy(&opcode, <char *>vecs[0].iov_base + 4, 4)
                    if opcode >= 64 or not (self.opcodes >> opcode) & 1:
                        return DECLINED
                if i < nrd:
                    chain.rd_len += vecs[i].iov_len
                else:
                    chain.wr_len += vecs[i].iov_len
            chain.rd = vecs
            chain.nrd = <uint32_t>nrd
            chain.wr = vecs + nrd
            chain.nwr = <uint32_t>nwr
            with nogil:
                for j in range(count):
                    got = fast_handle(self.s, &chain)
            return got
        finally:
            for i in range(held):
                PyBuffer_Release(&views[i])
            if views != small_views:
                free(views)
                free(vecs)

    def _widen_race_window(self, long ns):
        """Pause ``ns`` between finding a handle's fd and using it (stress tests:
        a RELEASE then has time to race the use)."""
        self.s.use_delay_ns = ns

    # -- TableMirror (fs/passthrough/mirror.py) ------------------------------------
    def node_added(self, uint64_t nodeid, int fd):
        cdef entry *old = add_entry(self.s, &self.s.nodes, nodeid, nodeid, fd)
        if old != NULL:
            with nogil:
                wait_unused(self.s, old)

    def node_dropped(self, uint64_t nodeid):
        drop_key(self.s, &self.s.nodes, nodeid)

    def nodes_cleared(self):
        drop_all(self.s, &self.s.nodes, True)

    def handle_added(self, uint64_t fh, uint64_t nodeid, int fd, int flags):
        cdef entry *old = add_entry(self.s, &self.s.handles, fh, nodeid, fd)
        if old != NULL:
            with nogil:
                wait_unused(self.s, old)

    def handle_dropped(self, uint64_t fh):
        drop_key(self.s, &self.s.handles, fh)

    def handles_cleared(self):
        drop_all(self.s, &self.s.handles, False)

    def lock_owners(self, uint64_t count):
        pthread_mutex_lock(&self.s.mu)
        self.s.lock_owners = count
        pthread_mutex_unlock(&self.s.mu)

    def detached(self):
        drop_all(self.s, &self.s.nodes, False)
