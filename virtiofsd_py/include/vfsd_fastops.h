/*
 * The C interface between a queue worker (virtio/_cworker.pyx) and a
 * backend's compiled fast operations (fs/passthrough/_cfast.pyx).
 *
 * The worker pops and checks a descriptor chain, then offers it to the
 * backend's fast operations, without the GIL.  They answer the request in
 * C (writing the whole reply into the writable buffers) or decline it, in
 * which case the worker hands the same chain to the Python dispatcher.  A
 * fast operation declines only before it has changed anything, so the
 * Python path then does exactly what it would have done alone.
 *
 * The object travels from Python to the worker as a PyCapsule named
 * VFSD_FAST_OPS_CAPSULE; whoever holds the capsule keeps its owner alive.
 */
#ifndef VFSD_FASTOPS_H
#define VFSD_FASTOPS_H

#include <stdint.h>
#include <sys/uio.h>

#define VFSD_FAST_ABI 1
#define VFSD_FAST_OPS_CAPSULE "virtiofsd_py.vfsd_fast_ops"

/* handle() result: not answered here, give the chain to the Python path. */
#define VFSD_FAST_DECLINE (-1)

/* One checked descriptor chain: guest buffers already translated to this
 * process's addresses and bounds-checked, device-readable then -writable. */
struct vfsd_chain {
    const struct iovec *rd;
    uint32_t nrd;
    uint64_t rd_len; /* sum of rd[i].iov_len */
    const struct iovec *wr;
    uint32_t nwr;
    uint64_t wr_len; /* sum of wr[i].iov_len */
};

/* Answer one FUSE request.  Returns the reply length written at the start
 * of the writable buffers (>= sizeof(struct fuse_out_header)), 0 for a
 * request that has no reply (FORGET, BATCH_FORGET), or VFSD_FAST_DECLINE.
 * Called from several worker threads at once: must be thread-safe, must
 * never block for long, must never touch Python objects. */
typedef int64_t (*vfsd_fast_fn)(void *ctx, const struct vfsd_chain *chain);

struct vfsd_fast_ops {
    uint32_t abi;         /* VFSD_FAST_ABI */
    void *ctx;            /* first argument of handle */
    vfsd_fast_fn handle;
    uint64_t opcodes;     /* bit n set: FUSE opcode n (< 64) may be answered */
};

#endif
