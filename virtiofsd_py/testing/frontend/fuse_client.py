"""FUSE requests and replies over the virtqueues of a :class:`VhostUserFrontend`.

This plays the guest's virtiofs driver (Linux fs/fuse/virtio_fs.c): each
request is a descriptor chain whose device-readable part is the
``fuse_in_header`` plus arguments and whose device-writable part is the
``fuse_out_header`` plus room for the reply (virtio spec 5.11.6, "Device
Operation").  Buffers are split into 4 KiB descriptors like guest pages;
with VIRTIO_RING_F_INDIRECT_DESC every multi-element chain goes through an
indirect table, as Linux does.  Queue 0 is hiprio (FORGET, BATCH_FORGET);
request queues are 1..N.

Struct layouts come from :mod:`virtiofsd_py.fuse.abi`.  Each reply is checked
the way newer kernels do: ``len`` must equal the used length and ``unique``
must match the request.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.frontend.driver import (
    PAGE_SIZE,
    Buffer,
    Chain,
    GuestMemory,
    SplitQueue,
    Used,
)
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend

#: INIT flags the client offers by default: what a Linux 6.x virtiofs mount
#: asks for, minus those that change request formats (SECURITY_CTX,
#: CREATE_SUPP_GROUP) or need DAX / writeback caching.
DEFAULT_INIT_FLAGS = (
    abi.FUSE_ASYNC_READ
    | abi.FUSE_POSIX_LOCKS
    | abi.FUSE_ATOMIC_O_TRUNC
    | abi.FUSE_EXPORT_SUPPORT
    | abi.FUSE_BIG_WRITES
    | abi.FUSE_DONT_MASK
    | abi.FUSE_FLOCK_LOCKS
    | abi.FUSE_HAS_IOCTL_DIR
    | abi.FUSE_AUTO_INVAL_DATA
    | abi.FUSE_DO_READDIRPLUS
    | abi.FUSE_READDIRPLUS_AUTO
    | abi.FUSE_ASYNC_DIO
    | abi.FUSE_PARALLEL_DIROPS
    | abi.FUSE_HANDLE_KILLPRIV
    | abi.FUSE_ABORT_ERROR
    | abi.FUSE_MAX_PAGES
    | abi.FUSE_CACHE_SYMLINKS
    | abi.FUSE_EXPLICIT_INVAL_DATA
    | abi.FUSE_SUBMOUNTS
    | abi.FUSE_HANDLE_KILLPRIV_V2
    | abi.FUSE_SETXATTR_EXT
    | abi.FUSE_INIT_EXT
)
#: The protocol minor the client announces in INIT (Linux 6.12 sends 7.41).
CLIENT_MINOR = 41

HIPRIO = 0


class FuseError(OSError):
    """A FUSE reply with a negative ``error``: ``errno`` is set, ``opcode`` says what failed."""

    def __init__(self, err: int, opcode: int) -> None:
        super().__init__(err, f"{abi.opcode_name(opcode)}: {os.strerror(err)}")
        self.opcode = opcode


class FuseProtocolError(Exception):
    """A reply the kernel would reject (wrong ``len``, ``unique``, impossible sizes)."""


class Fields(dict[str, int]):
    """An unpacked C struct: fields by name, as items or as attributes."""

    def __getattr__(self, name: str) -> int:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def unpack(
        cls, st: struct.Struct, names: Sequence[str], data: bytes, offset: int = 0
    ) -> Fields:
        if len(data) - offset < st.size:
            raise FuseProtocolError(f"reply of {len(data) - offset} bytes, need {st.size}")
        return cls(zip(names, st.unpack_from(data, offset), strict=False))


class Opened(NamedTuple):
    """fuse_open_out."""

    fh: int
    open_flags: int


class DirEntry(NamedTuple):
    """One fuse_dirent (``entry`` is the fuse_entry_out of READDIRPLUS, else None)."""

    ino: int
    off: int
    type: int
    name: bytes
    entry: Fields | None = None


@dataclass(slots=True)
class FuseReply:
    """A completed request: the out header and the reply bytes after it."""

    unique: int
    error: int
    payload: bytes
    used_len: int


@dataclass(slots=True)
class Pending:
    """A request on a queue, waiting for its used element."""

    queue: SplitQueue
    opcode: int
    unique: int
    chain: Chain | None = None
    allocations: list[int] = field(default_factory=list)
    used: Used | None = None

    @property
    def done(self) -> bool:
        return self.used is not None


def _as_name(name: bytes | str) -> bytes:
    return name.encode() if isinstance(name, str) else name


class FuseClient:
    """FUSE session over a started :class:`VhostUserFrontend`.

    ``queue`` is the default request queue; ``split`` the size of each data
    descriptor; ``indirect`` forces (True/False) or leaves to the Linux rule
    (None) the use of indirect tables.
    """

    def __init__(
        self,
        fe: VhostUserFrontend,
        *,
        queue: int = 1,
        split: int = PAGE_SIZE,
        indirect: bool | None = None,
        timeout: float = 5.0,
        uid: int = 0,
        gid: int = 0,
        pid: int = 1,
    ) -> None:
        if fe.mem is None or not fe.queues:
            raise ValueError("the front-end must be started (connect_and_start) first")
        self.fe = fe
        self.mem: GuestMemory = fe.mem
        self.queue = queue
        self.split = split
        self.indirect = indirect
        self.timeout = timeout
        self.uid, self.gid, self.pid = uid, gid, pid
        self._unique = 0
        self.init_out: Fields | None = None

    # -- requests as bytes -------------------------------------------------------
    def next_unique(self) -> int:
        # Linux uses even ids (odd ones were interrupts); keep that shape.
        self._unique += 2
        return self._unique

    def in_header(
        self, opcode: int, nodeid: int, args_len: int, unique: int, *, length: int | None = None
    ) -> bytes:
        total = abi.IN_HEADER.size + args_len if length is None else length
        return abi.IN_HEADER.pack(total, opcode, unique, nodeid, self.uid, self.gid, self.pid, 0, 0)

    def _buffers(self, data: bytes, split: int, allocs: list[int]) -> list[Buffer]:
        out = []
        for pos in range(0, len(data), split):
            piece = data[pos : pos + split]
            gpa = self.mem.alloc(len(piece))
            allocs.append(gpa)
            self.mem.write(gpa, piece)
            out.append(Buffer(gpa, len(piece)))
        return out

    def _writable(self, size: int, split: int, allocs: list[int]) -> list[Buffer]:
        out = []
        for pos in range(0, size, split):
            n = min(split, size - pos)
            gpa = self.mem.alloc(n)
            allocs.append(gpa)
            # Poison, so bytes the daemon claims but never wrote stand out.
            self.mem.fill(gpa, n, 0xA5)
            out.append(Buffer(gpa, n))
        return out

    def submit(
        self,
        opcode: int,
        nodeid: int,
        args: bytes | Sequence[bytes] = b"",
        reply_sizes: int | Sequence[int] | None = 0,
        *,
        queue: int | None = None,
        split: int | None = None,
        indirect: bool | None = None,
        header_len: int | None = None,
        kick: bool = True,
    ) -> Pending:
        """Put one request on a queue (and kick it); collect it with :meth:`wait`.

        ``args`` are the request arguments after the in header (each part of
        a sequence gets its own descriptors, as Linux's in_args); the
        writable part is the 16-byte out header, then ``reply_sizes`` bytes
        (``None``: no writable part at all, for FORGET and BATCH_FORGET).
        ``header_len`` overrides the in header's ``len`` (to lie).
        """
        q = self.fe.queues[self.queue if queue is None else queue]
        split = split or self.split
        parts = [args] if isinstance(args, bytes | bytearray) else list(args)
        if reply_sizes is None:
            sizes = None
        else:
            sizes = [reply_sizes] if isinstance(reply_sizes, int) else list(reply_sizes)
        unique = self.next_unique()
        pending = Pending(q, opcode, unique)
        allocs = pending.allocations
        hdr = self.in_header(opcode, nodeid, sum(map(len, parts)), unique, length=header_len)
        out = self._buffers(hdr, split, allocs)
        for part in parts:
            out += self._buffers(bytes(part), split, allocs)
        in_: list[Buffer] = []
        if sizes is not None:
            in_ = self._writable(abi.OUT_HEADER.size, split, allocs)
            for size in sizes:
                in_ += self._writable(size, split, allocs)
        ind = self.indirect if indirect is None else indirect
        pending.chain = q.add(out, in_, indirect=ind, token=pending)
        if kick:
            q.kick()
        return pending

    def wait(self, pendings: Iterable[Pending], timeout: float | None = None) -> None:
        """Wait until every request in ``pendings`` completed (on whatever queues)."""
        todo = [p for p in pendings if not p.done]
        timeout = self.timeout if timeout is None else timeout
        while todo:
            q = todo[0].queue
            for used in q.wait_used(timeout):
                token = used.chain.token
                if isinstance(token, Pending):
                    token.used = used
            todo = [p for p in todo if not p.done]

    def reply(self, pending: Pending) -> FuseReply:
        """Parse and check the reply of a completed request, and free its buffers."""
        if pending.used is None or pending.chain is None:
            raise ValueError("request not completed")
        used, chain = pending.used, pending.chain
        try:
            data = b"".join(self.mem.read(b.gpa, b.length) for b in chain.in_)[: used.length]
        finally:
            for gpa in pending.allocations:
                self.mem.free(gpa)
            pending.allocations.clear()
        if not chain.in_:
            if used.length != 0:
                raise FuseProtocolError(f"used len {used.length} for a request without reply")
            return FuseReply(pending.unique, 0, b"", 0)
        if used.length < abi.OUT_HEADER.size:
            raise FuseProtocolError(
                f"{abi.opcode_name(pending.opcode)}: used len {used.length} < out header"
            )
        length, error, unique = abi.OUT_HEADER.unpack_from(data)
        if length != used.length:
            raise FuseProtocolError(
                f"{abi.opcode_name(pending.opcode)}: out header len {length} != used len"
                f" {used.length}"
            )
        if unique != pending.unique:
            raise FuseProtocolError(f"reply unique {unique} for request {pending.unique}")
        if error > 0 or error < -4095 or (error and length != abi.OUT_HEADER.size):
            raise FuseProtocolError(f"bad error reply: error {error}, len {length}")
        return FuseReply(unique, error, data[abi.OUT_HEADER.size :], used.length)

    def request(
        self,
        opcode: int,
        nodeid: int,
        args: bytes | Sequence[bytes] = b"",
        reply_sizes: int | Sequence[int] | None = 0,
        **kw: Any,
    ) -> FuseReply:
        """Submit one request, wait for it, return its checked reply (errors included)."""
        pending = self.submit(opcode, nodeid, args, reply_sizes, **kw)
        self.wait([pending])
        return self.reply(pending)

    def call(
        self,
        opcode: int,
        nodeid: int,
        args: bytes | Sequence[bytes] = b"",
        reply_sizes: int | Sequence[int] | None = 0,
        **kw: Any,
    ) -> bytes:
        """Like :meth:`request`, raising :class:`FuseError` for an error reply."""
        r = self.request(opcode, nodeid, args, reply_sizes, **kw)
        if r.error:
            raise FuseError(-r.error, opcode)
        return r.payload

    # -- operations -----------------------------------------------------------------
    def init(
        self,
        *,
        flags: int = DEFAULT_INIT_FLAGS,
        minor: int = CLIENT_MINOR,
        max_readahead: int = 128 * 1024,
        major: int = abi.FUSE_KERNEL_VERSION,
    ) -> Fields:
        f1, f2 = abi.split_init_flags(flags)
        args = abi.INIT_IN.pack(major, minor, max_readahead, f1, f2, *([0] * 11))
        data = self.call(abi.FUSE_INIT, 0, args, abi.INIT_OUT.size)
        out = Fields.unpack(abi.INIT_OUT, abi.INIT_OUT_FIELDS, data.ljust(abi.INIT_OUT.size, b"\0"))
        self.init_out = out
        return out

    def lookup(self, parent: int, name: bytes | str) -> Fields:
        data = self.call(abi.FUSE_LOOKUP, parent, _as_name(name) + b"\0", abi.ENTRY_OUT.size)
        return Fields.unpack(abi.ENTRY_OUT, abi.ENTRY_OUT_FIELDS, data)

    def forget(self, nodeid: int, nlookup: int, *, queue: int = HIPRIO) -> None:
        """FORGET on the hiprio queue: no reply, only the used element (len 0)."""
        self.call(abi.FUSE_FORGET, nodeid, abi.FORGET_IN.pack(nlookup), None, queue=queue)

    def batch_forget(self, items: Sequence[tuple[int, int]], *, queue: int = HIPRIO) -> None:
        args = abi.BATCH_FORGET_IN.pack(len(items), 0) + b"".join(
            abi.FORGET_ONE.pack(n, c) for n, c in items
        )
        self.call(abi.FUSE_BATCH_FORGET, 0, args, None, queue=queue)

    def getattr(self, nodeid: int, fh: int | None = None) -> Fields:
        args = abi.GETATTR_IN.pack(0 if fh is None else abi.FUSE_GETATTR_FH, 0, fh or 0)
        data = self.call(abi.FUSE_GETATTR, nodeid, args, abi.ATTR_OUT.size)
        return Fields.unpack(abi.ATTR_OUT, abi.ATTR_OUT_FIELDS, data)

    def readlink(self, nodeid: int, size: int = 4096) -> bytes:
        return self.call(abi.FUSE_READLINK, nodeid, b"", size)

    def statfs(self, nodeid: int = abi.FUSE_ROOT_ID) -> Fields:
        data = self.call(abi.FUSE_STATFS, nodeid, b"", abi.STATFS_OUT.size)
        return Fields.unpack(abi.KSTATFS, abi.KSTATFS_FIELDS, data)

    def access(self, nodeid: int, mask: int) -> None:
        self.call(abi.FUSE_ACCESS, nodeid, abi.ACCESS_IN.pack(mask, 0), 0)

    def _open(self, opcode: int, nodeid: int, flags: int) -> Opened:
        data = self.call(opcode, nodeid, abi.OPEN_IN.pack(flags, 0), abi.OPEN_OUT.size)
        fh, open_flags, _backing = abi.OPEN_OUT.unpack_from(data)
        return Opened(fh, open_flags)

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> Opened:
        return self._open(abi.FUSE_OPEN, nodeid, flags)

    def opendir(self, nodeid: int, flags: int = os.O_RDONLY | os.O_DIRECTORY) -> Opened:
        return self._open(abi.FUSE_OPENDIR, nodeid, flags)

    def read_args(self, fh: int, offset: int, size: int, flags: int = os.O_RDONLY) -> bytes:
        return abi.READ_IN.pack(fh, offset, size, 0, 0, flags, 0)

    def read(self, nodeid: int, fh: int, offset: int, size: int, **kw: Any) -> bytes:
        data = self.call(abi.FUSE_READ, nodeid, self.read_args(fh, offset, size), size, **kw)
        if len(data) > size:
            raise FuseProtocolError(f"READ of {size} bytes returned {len(data)}")
        return data

    def write(self, nodeid: int, fh: int, offset: int, data: bytes, **kw: Any) -> int:
        args = abi.WRITE_IN.pack(fh, offset, len(data), 0, 0, os.O_WRONLY, 0)
        out = self.call(abi.FUSE_WRITE, nodeid, [args, data], abi.WRITE_OUT.size, **kw)
        return int(abi.WRITE_OUT.unpack_from(out)[0])

    def release(self, nodeid: int, fh: int, flags: int = os.O_RDONLY) -> None:
        self.call(abi.FUSE_RELEASE, nodeid, abi.RELEASE_IN.pack(fh, flags, 0, 0), 0)

    def releasedir(self, nodeid: int, fh: int) -> None:
        self.call(abi.FUSE_RELEASEDIR, nodeid, abi.RELEASE_IN.pack(fh, 0, 0, 0), 0)

    def flush(self, nodeid: int, fh: int, lock_owner: int = 0) -> None:
        self.call(abi.FUSE_FLUSH, nodeid, abi.FLUSH_IN.pack(fh, 0, 0, lock_owner), 0)

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> int:
        data = self.call(
            abi.FUSE_LSEEK, nodeid, abi.LSEEK_IN.pack(fh, offset, whence, 0), abi.LSEEK_OUT.size
        )
        return int(abi.LSEEK_OUT.unpack_from(data)[0])

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096) -> list[DirEntry]:
        data = self.call(abi.FUSE_READDIR, nodeid, self.read_args(fh, offset, size), size)
        return parse_dirents(data, plus=False)

    def readdirplus(
        self, nodeid: int, fh: int, offset: int = 0, size: int = 4096
    ) -> list[DirEntry]:
        data = self.call(abi.FUSE_READDIRPLUS, nodeid, self.read_args(fh, offset, size), size)
        return parse_dirents(data, plus=True)

    def _xattr(self, opcode: int, nodeid: int, args: bytes, size: int) -> bytes | int:
        data = self.call(opcode, nodeid, args, size if size else abi.GETXATTR_OUT.size)
        if size == 0:
            return int(abi.GETXATTR_OUT.unpack_from(data)[0])
        return data

    def getxattr(self, nodeid: int, name: bytes | str, size: int) -> bytes | int:
        """The value (``size`` > 0; ERANGE if too small) or, with ``size`` 0, its length."""
        args = abi.GETXATTR_IN.pack(size, 0) + _as_name(name) + b"\0"
        return self._xattr(abi.FUSE_GETXATTR, nodeid, args, size)

    def listxattr(self, nodeid: int, size: int) -> bytes | int:
        return self._xattr(abi.FUSE_LISTXATTR, nodeid, abi.GETXATTR_IN.pack(size, 0), size)

    def destroy(self) -> None:
        self.call(abi.FUSE_DESTROY, 0, b"", 0)


def parse_dirents(data: bytes, *, plus: bool) -> list[DirEntry]:
    """Split a READDIR(PLUS) reply into entries, checking the record framing."""
    entries = []
    pos = 0
    head = abi.DIRENTPLUS if plus else abi.DIRENT
    while pos < len(data):
        if len(data) - pos < head.size:
            raise FuseProtocolError(f"truncated dirent at {pos} of {len(data)}")
        entry = None
        if plus:
            entry = Fields.unpack(abi.ENTRY_OUT, abi.ENTRY_OUT_FIELDS, data, pos)
            ino, off, namelen, dtype = abi.DIRENT.unpack_from(data, pos + abi.ENTRY_OUT.size)
            size = abi.direntplus_size(namelen)
        else:
            ino, off, namelen, dtype = abi.DIRENT.unpack_from(data, pos)
            size = abi.dirent_size(namelen)
        if pos + size > len(data):
            raise FuseProtocolError(f"dirent at {pos} of {size} bytes overruns {len(data)}")
        name = data[pos + head.size : pos + head.size + namelen]
        entries.append(DirEntry(ino, off, dtype, name, entry))
        pos += size
    return entries
