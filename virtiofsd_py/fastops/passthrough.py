"""Fast operations of the passthrough backend, in Python: the reference twin.

A queue worker offers each request to ``FastOps.handle`` before the FUSE
dispatcher: the commonest requests on open files and known nodes (GETATTR,
READ, WRITE, FLUSH) are answered here straight on the backend's tables,
with the reply bytes, errors and side effects the dispatcher and
``PassthroughFS`` would produce; everything else is declined (``DECLINED``)
and goes to the dispatcher.  The compiled twin (``_cpassthrough.pyx``) does
the same in C without the GIL, on a C mirror of the tables
(fs/passthrough/mirror.py); this module is the readable statement of every
rule both follow, and what the pure-Python worker calls.

STATFS of a node is answered too (one fstatvfs).

A request is declined, before anything changed, whenever answering it
needs something not mirrored here:

* no FUSE session (before INIT, after DESTROY or a device reset): the
  dispatcher reports the session to ``session_changed``;
* a header or arguments the dispatcher would refuse (short, lying lengths,
  request extensions), or writable buffers too small for the whole reply:
  the dispatcher answers EINVAL / EIO / nothing as it does;
* an unknown node or handle (the dispatcher answers EBADF), a node without
  an fd (kept as a file handle, or migrated and not found yet);
* uid/gid translation (GETATTR), ``--readonly``, killpriv (WRITE with
  FUSE_WRITE_KILL_SUIDGID under --killpriv-v2), a security.capability
  renamed by --xattrmap (WRITE), lock owners in the lock table (FLUSH);
* an offset beyond the signed 64-bit range (the dispatcher: EINVAL).

A syscall that fails is answered here with its errno, as the dispatcher
answers the ``OSError``.  The passthrough runs none of these opcodes under
the guest's credentials, so none is needed here either.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Final

from virtiofsd_py.fs.api import AttrReply
from virtiofsd_py.fs.passthrough.core import PassthroughCore
from virtiofsd_py.fuse import abi, codec, iov
from virtiofsd_py.fuse.dispatcher import SessionState
from virtiofsd_py.fuse.iov import Buffer

#: ``handle``'s answer for a request left to the dispatcher (VFSD_FAST_DECLINE).
DECLINED: Final = -1
#: The opcodes ``handle`` may answer (``vfsd_fast_ops.opcodes``).
OPCODES: Final = frozenset(
    {abi.FUSE_GETATTR, abi.FUSE_READ, abi.FUSE_WRITE, abi.FUSE_FLUSH, abi.FUSE_STATFS}
)

_HDR: Final = abi.IN_HEADER.size
_OUT: Final = abi.OUT_HEADER.size
_ATTR_REPLY: Final = _OUT + abi.ATTR_OUT.size
_WRITE_REPLY: Final = _OUT + abi.WRITE_OUT.size
_STATFS_REPLY: Final = _OUT + abi.STATFS_OUT.size
_S64_MAX: Final = (1 << 63) - 1
_IN_HEADER: Final = abi.IN_HEADER
_GETATTR_IN: Final = abi.GETATTR_IN
_READ_IN: Final = abi.READ_IN
_WRITE_IN: Final = abi.WRITE_IN
_FLUSH_IN: Final = abi.FLUSH_IN


def opcode_mask(opcodes: frozenset[int] = OPCODES) -> int:
    """Bit n set for opcode n (``vfsd_fast_ops.opcodes``)."""
    mask = 0
    for op in opcodes:
        mask |= 1 << op
    return mask


Bufs = Sequence[memoryview]


def _args(readable: Bufs, n: int) -> tuple[Buffer, int]:
    """(buffer, offset) of the ``n`` argument bytes after the in header; the
    caller checked that the chain holds them.  No copy in Linux's layouts."""
    first = readable[0]
    if len(first) >= _HDR + n:
        return first, _HDR
    if len(first) == _HDR and len(readable) > 1 and len(readable[1]) >= n:
        return readable[1], 0
    return iov.view(readable, _HDR, n), 0


def _room(writable: Bufs, need: int) -> bool:
    """Whether the writable buffers hold ``need`` bytes."""
    return (bool(writable) and len(writable[0]) >= need) or iov.total_len(writable) >= need


class FastOps:
    """GETATTR, READ, WRITE, FLUSH and STATFS of one ``PassthroughFS``; thread-safe."""

    def __init__(self, fs: PassthroughCore, *, readonly: bool = False) -> None:
        self.fs = fs
        #: Served behind ``ReadOnlyFS``: WRITE is the dispatcher's (EROFS).
        self.readonly = readonly
        self.opcodes = opcode_mask()
        #: (max_read, max_write) of the FUSE session; None: no session.
        self._limits: tuple[int, int] | None = None
        self._attr_timeout = fs.policy.attr_timeout
        self._ops: dict[int, _Op] = {
            abi.FUSE_GETATTR: self._getattr,
            abi.FUSE_READ: self._read,
            abi.FUSE_WRITE: self._write,
            abi.FUSE_FLUSH: self._flush,
            abi.FUSE_STATFS: self._statfs,
        }

    def session_changed(self, session: SessionState | None) -> None:
        """The dispatcher's session changed (``Dispatcher(on_session=...)``)."""
        self._limits = None if session is None else (session.max_read, session.max_write)

    def capsule(self) -> object | None:
        """The C interface (vfsd_fastops.h); the pure twin has none."""
        return None

    def close(self) -> None:
        """Nothing to let go of (the compiled twin detaches its mirror)."""

    def handle(self, readable: Bufs, writable: Bufs) -> int:
        """Answer one request: the reply length written, or ``DECLINED``."""
        limits = self._limits
        if limits is None:
            return DECLINED
        first = readable[0] if readable else b""
        if len(first) >= _HDR:
            hdr = _IN_HEADER.unpack_from(first)
        elif iov.total_len(readable) >= _HDR:
            hdr = _IN_HEADER.unpack_from(iov.view(readable, 0, _HDR))
        else:
            return DECLINED
        hlen, opcode, unique, nodeid, _, _, _, extlen, _ = hdr
        op = self._ops.get(opcode)
        if op is None or extlen or hlen < _HDR:
            return DECLINED
        if hlen > len(first) and hlen > iov.total_len(readable):
            return DECLINED  # the dispatcher: EINVAL
        return op(readable, writable, unique, nodeid, hlen - _HDR, limits)

    def _getattr(
        self, readable: Bufs, writable: Bufs, unique: int, nodeid: int, args_len: int,
        limits: tuple[int, int],
    ) -> int:  # fmt: skip
        fs = self.fs
        if args_len < _GETATTR_IN.size or not _room(writable, _ATTR_REPLY) or fs.translates_ids:
            return DECLINED
        flags, _, fh = _GETATTR_IN.unpack_from(*_args(readable, _GETATTR_IN.size))
        if flags & abi.FUSE_GETATTR_FH:
            h = fs.handles.find(fh, nodeid)
            if h is None:
                return DECLINED
            fd = h.fd
        else:
            node = fs.inodes.get(nodeid)
            # A migrated node found after the switch-over has its fd: the
            # dispatcher's ``deferred.ensure`` has nothing left to do for it.
            if node is None or node.fd < 0 or node.handle is not None:
                return DECLINED
            fd = node.fd
        try:
            st = os.stat(fd)
        except OSError as e:
            return codec.write_error(writable, unique, _errno(e))
        return codec.write_attr_out(writable, unique, AttrReply(st, self._attr_timeout))

    def _read(
        self, readable: Bufs, writable: Bufs, unique: int, nodeid: int, args_len: int,
        limits: tuple[int, int],
    ) -> int:  # fmt: skip
        if args_len < _READ_IN.size:
            return DECLINED
        fh, offset, size, _, _, _, _ = _READ_IN.unpack_from(*_args(readable, _READ_IN.size))
        room = iov.total_len(writable) - _OUT
        if offset > _S64_MAX or room < 0:
            return DECLINED
        h = self.fs.handles.find(fh, nodeid)
        if h is None:
            return DECLINED
        size = min(size, limits[0], room)
        if size and size == room and len(writable[0]) == _OUT:
            bufs = list(writable[1:])  # the usual layout, read in full
        else:
            bufs = iov.slices(writable, _OUT, size)
        try:
            got = os.preadv(h.fd, bufs, offset) if bufs else 0
        except OSError as e:
            return codec.write_error(writable, unique, _errno(e))
        codec.write_header(writable, unique, 0, _OUT + got)
        return _OUT + got

    def _write(
        self, readable: Bufs, writable: Bufs, unique: int, nodeid: int, args_len: int,
        limits: tuple[int, int],
    ) -> int:  # fmt: skip
        fs = self.fs
        start = _WRITE_IN.size
        if (
            args_len < start
            or not _room(writable, _WRITE_REPLY)
            or self.readonly
            or fs.remaps_capability
        ):
            return DECLINED
        fh, offset, size, write_flags, _, _, _ = _WRITE_IN.unpack_from(*_args(readable, start))
        if size > args_len - start or size > limits[1] or offset > _S64_MAX:
            return DECLINED
        if write_flags & abi.FUSE_WRITE_KILL_SUIDGID and fs.config.killpriv_v2:
            return DECLINED  # the write runs without CAP_FSETID (files.py)
        h = fs.handles.find(fh, nodeid)
        if h is None:
            return DECLINED
        bufs = iov.slices(readable, _HDR + start, size)
        try:
            done = os.pwritev(h.fd, bufs, offset) if bufs else 0
        except OSError as e:
            return codec.write_error(writable, unique, _errno(e))
        return codec.write_struct(writable, unique, abi.WRITE_OUT, done, 0)

    def _flush(
        self, readable: Bufs, writable: Bufs, unique: int, nodeid: int, args_len: int,
        limits: tuple[int, int],
    ) -> int:  # fmt: skip
        fs = self.fs
        if args_len < _FLUSH_IN.size or not _room(writable, _OUT) or len(fs.locks):
            return DECLINED  # with owners, FLUSH may have to close one's OFD
        fh, _, _, _ = _FLUSH_IN.unpack_from(*_args(readable, _FLUSH_IN.size))
        h = fs.handles.find(fh, nodeid)
        if h is None:
            return DECLINED
        try:
            os.close(os.dup(h.fd))  # what close(2) of the guest's fd means (files.py)
        except OSError as e:
            return codec.write_error(writable, unique, _errno(e))
        return codec.write_empty(writable, unique)

    def _statfs(
        self, readable: Bufs, writable: Bufs, unique: int, nodeid: int, args_len: int,
        limits: tuple[int, int],
    ) -> int:  # fmt: skip
        if not _room(writable, _STATFS_REPLY):
            return DECLINED
        node = self.fs.inodes.get(nodeid)
        if node is None or node.fd < 0 or node.handle is not None:
            return DECLINED
        try:
            sv = os.fstatvfs(node.fd)
        except OSError as e:
            return codec.write_error(writable, unique, _errno(e))
        return codec.write_struct(writable, unique, abi.STATFS_OUT, *codec.statfs_values(sv))


#: An operation: (readable, writable, unique, nodeid, argument bytes, (max_read, max_write)).
_Op = Callable[[Bufs, Bufs, int, int, int, tuple[int, int]], int]


def _errno(e: OSError) -> int:
    """The errno the dispatcher answers for ``e``."""
    return e.errno if e.errno is not None and 0 < e.errno < 4096 else 5  # EIO
