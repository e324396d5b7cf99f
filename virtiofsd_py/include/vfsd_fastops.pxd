# The Cython declarations of vfsd_fastops.h: the one home both sides of the
# interface (virtio/_cworker.pyx, fastops/_cpassthrough.pyx) cimport.
from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "vfsd_fastops.h" nogil:
    struct vfsd_chain:
        const iovec *rd
        uint32_t nrd
        uint64_t rd_len
        const iovec *wr
        uint32_t nwr
        uint64_t wr_len
    ctypedef int64_t (*vfsd_fast_fn)(void *ctx, const vfsd_chain *chain) noexcept nogil
    struct vfsd_fast_ops:
        uint32_t abi
        void *ctx
        vfsd_fast_fn handle
        uint64_t opcodes
    enum:
        VFSD_FAST_ABI
        VFSD_FAST_DECLINE
    const char *VFSD_FAST_OPS_CAPSULE
