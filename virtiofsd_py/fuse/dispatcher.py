"""FUSE dispatcher: one descriptor chain in, one reply written, used length out.

``Dispatcher.handle`` decodes the request in the chain's device-readable
buffers, calls one ``Filesystem`` method and encodes the reply into the
device-writable buffers.  It never raises: malformed requests, backend errors
and backend bugs all become error replies (or no reply when there is no room
for one, or the opcode has none).

Adding an opcode is one ``_op_*`` method plus one row in ``_TABLE``.

The rules, from Linux include/uapi/linux/fuse.h (and fs/fuse, whose
virtiofs driver sends one request per descriptor chain):

Session.  What FUSE_INIT negotiated is one frozen ``SessionState``, or
None: before the first INIT, after DESTROY, after a device reset
(``reset``).  It is replaced as a whole under a lock (INIT, DESTROY,
``reset``, ``restore_session``), so the threads calling ``handle`` read it
without locking; ``export_session`` / ``restore_session`` carry it across
a live migration (the destination gets no INIT).

    opcode                            no session    initialised
    INIT                              negotiate     backend state destroyed, negotiate
    FORGET, BATCH_FORGET, INTERRUPT   dropped       to the backend (INTERRUPT: ignored)
    DESTROY                           EIO           backend state destroyed, empty
                                                    reply -> no session
    a row of ``_TABLE``               EIO           its ``_op_*`` method
    any other                         EIO           ENOSYS

- FORGET, BATCH_FORGET and INTERRUPT never get a reply, errors included
  (fuse.h: no reply).  Linux's virtiofs sends no INTERRUPT; requests run
  to completion.
- INIT on a live session: a rebooted guest initialises the device again
  without DESTROY (no vhost-user message says so); it starts afresh.

INIT negotiation (fuse.h "Version negotiation", the INIT flags):

- major below 7: EPROTO.  Above 7: the reply carries major 7 and our
  minor, all else zero, and no session starts; the kernel sends a new INIT.
- minor below ``MIN_MINOR``: EPROTO.  Agreed minor: the lower of the
  kernel's and ``OUR_MAX_MINOR``.
- Flags: the kernel's 64-bit word (``flags2`` only with FUSE_INIT_EXT)
  and what ``FuseConfig.offered_flags`` offers.  ``max_readahead`` is the
  kernel's; ``max_write``, ``max_pages``, ``time_gran`` ours; no DAX
  (``map_alignment`` 0).
- The backend's ``init`` failing answers its errno; no session starts.

Errors.  Malformed arguments: EINVAL; an ``OSError``: its errno (EIO if out
of range); a reply larger than the writable buffers: EIO; anything else, a
backend bug: EIO, logged with its traceback.  No room even for an error
reply: used length 0.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

from virtiofsd_py.fs.api import (
    NOW,
    AttrReply,
    Context,
    Entry,
    Filesystem,
    Lock,
    Opened,
    SessionInfo,
    SetAttr,
)
from virtiofsd_py.fuse import abi, codec, iov
from virtiofsd_py.fuse.codec import Malformed, ReplyTooLarge

log = logging.getLogger(__name__)

#: Newest protocol minor we speak (fuse.h 7.41: nothing after it changes a
#: layout or behaviour we implement).  The reply carries min(guest's, this).
OUR_MAX_MINOR: Final = 41
#: Oldest minor accepted, as the Rust virtiofsd (older kernels lack virtiofs).
MIN_MINOR: Final = 27

#: INIT flags always offered: those the Rust virtiofsd 1.13 offers for a
#: passthrough share, minus ALLOW_IDMAP (needs id-mapping in the backend) and
#: SUBMOUNTS (a ``FuseConfig`` knob).  ``FuseConfig`` adds the optional ones.
DEFAULT_INIT_FLAGS: Final = (
    abi.FUSE_ASYNC_READ
    | abi.FUSE_PARALLEL_DIROPS
    | abi.FUSE_BIG_WRITES
    | abi.FUSE_AUTO_INVAL_DATA
    | abi.FUSE_ASYNC_DIO
    | abi.FUSE_HAS_IOCTL_DIR
    | abi.FUSE_ATOMIC_O_TRUNC
    | abi.FUSE_MAX_PAGES
    | abi.FUSE_INIT_EXT
    | abi.FUSE_CREATE_SUPP_GROUP
)

_NO_REPLY: Final = frozenset({abi.FUSE_FORGET, abi.FUSE_BATCH_FORGET, abi.FUSE_INTERRUPT})
#: Requests that may wait for a long time (another process's lock, disk
#: flushes): the daemon runs them off the event loop even in inline mode.
MAY_BLOCK: Final = frozenset({abi.FUSE_SETLKW, abi.FUSE_FSYNC, abi.FUSE_FSYNCDIR, abi.FUSE_SYNCFS})
_OPCODE = struct.Struct("<I")
_IN_HEADER: Final = abi.IN_HEADER
_HDR: Final = codec.IN_HEADER_SIZE
_OUT: Final = codec.OUT_HEADER_SIZE
_S64_MAX: Final = (1 << 63) - 1
_S32_MIN: Final = -(1 << 31)
_S32_MAX: Final = (1 << 31) - 1
_U32_MAX: Final = 0xFFFF_FFFF
_NS: Final = 1_000_000_000
_RENAME_FLAGS: Final = abi.RENAME_NOREPLACE | abi.RENAME_EXCHANGE | abi.RENAME_WHITEOUT
#: The lock types of fuse_file_lock are the kernel's F_RDLCK/F_WRLCK/F_UNLCK,
#: the same numbers as the host's (virtio-fs guests share the host's arch).
_LOCK_TYPES: Final = frozenset({fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK})


@dataclass(slots=True)
class FuseConfig:
    """What the daemon is willing to offer in FUSE_INIT, and request limits.

    The boolean knobs are the CLI options of the same names (``--writeback``,
    ``--killpriv-v2``, ``--posix-acl``, ``--security-label``, ``--allow-mmap``,
    ``--announce-submounts``); each adds INIT flags the guest may accept.
    """

    max_write: int = 1 << 20
    max_pages: int = 256
    #: Cap on one READ's size (the guest also caps it by its mount options).
    max_read: int = 1 << 20
    #: Base INIT flags offered; the knobs below add their own.
    flags: int = DEFAULT_INIT_FLAGS
    readdirplus: bool = True
    #: READDIRPLUS_AUTO with ``readdirplus``: the guest picks READDIR or
    #: READDIRPLUS per listing; without it, always READDIRPLUS (what pyfuse3 asks).
    readdirplus_auto: bool = True
    #: WRITEBACK_CACHE: the guest caches writes and sends them later.
    writeback: bool = False
    #: POSIX_LOCKS: fcntl() record locks go to the backend (host OFD locks,
    #: visible to host processes) instead of staying guest-local.
    posix_locks: bool = True
    #: FLOCK_LOCKS: flock() locks go to the backend likewise.
    flock_locks: bool = True
    #: HANDLE_KILLPRIV_V2: the backend clears set-id bits on write/truncate/chown.
    killpriv_v2: bool = False
    #: POSIX_ACL with DONT_MASK (the backend applies umask or default ACLs) and
    #: SETXATTR_EXT (ACL_KILL_SGID), as the Rust virtiofsd's --posix-acl.
    posix_acl: bool = False
    #: SECURITY_CTX: new nodes carry the guest's LSM label (Context.security_ctx).
    security_label: bool = False
    #: DIRECT_IO_ALLOW_MMAP: shared mmap of files opened with FOPEN_DIRECT_IO.
    allow_mmap: bool = False
    #: SUBMOUNTS: the guest may honour FUSE_ATTR_SUBMOUNT on entries.
    submounts: bool = True
    max_background: int = 0xFFFF
    congestion_threshold: int = 0xFFFF // 4 * 3
    time_gran: int = 1  # nanoseconds: the passthrough backend has ns timestamps

    def offered_flags(self) -> int:
        """The 64-bit INIT flag word offered to the guest."""
        flags = self.flags
        for on, bits in (
            (self.readdirplus, abi.FUSE_DO_READDIRPLUS),
            (self.readdirplus and self.readdirplus_auto, abi.FUSE_READDIRPLUS_AUTO),
            (self.writeback, abi.FUSE_WRITEBACK_CACHE),
            (self.posix_locks, abi.FUSE_POSIX_LOCKS),
            (self.flock_locks, abi.FUSE_FLOCK_LOCKS),
            (self.killpriv_v2, abi.FUSE_HANDLE_KILLPRIV_V2),
            (self.posix_acl, abi.FUSE_POSIX_ACL | abi.FUSE_DONT_MASK | abi.FUSE_SETXATTR_EXT),
            (self.security_label, abi.FUSE_SECURITY_CTX),
            (self.allow_mmap, abi.FUSE_DIRECT_IO_ALLOW_MMAP),
            (self.submounts, abi.FUSE_SUBMOUNTS),
        ):
            if on:
                flags |= bits
        return flags


@dataclass(frozen=True, slots=True)
class SessionState:
    """What FUSE_INIT negotiated; immutable, replaced as a whole."""

    major: int
    minor: int
    flags: int  # 64-bit agreed INIT flags (flags | flags2 << 32)
    max_write: int
    max_read: int
    max_readahead: int
    max_pages: int

    def to_dict(self) -> dict[str, int]:
        """Plain dict (msgpack-friendly) for the migration stream."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SessionState:
        """Inverse of ``to_dict``; raises ValueError on missing/mistyped fields."""
        kwargs: dict[str, int] = {}
        for f in fields(cls):
            v = d.get(f.name)
            if type(v) is not int or v < 0:
                raise ValueError(f"session state field {f.name!r} missing or invalid: {v!r}")
            kwargs[f.name] = v
        return cls(**kwargs)


#: Cached Contexts per dispatcher (see ``Request.ctx``): cleared when full.
_MAX_CONTEXTS: Final = 4096


class Request:
    """One decoded request: header fields plus where its arguments lie."""

    __slots__ = (
        "args",
        "args_len",
        "contexts",
        "ext",
        "gid",
        "nodeid",
        "opcode",
        "pid",
        "readable",
        "session",
        "uid",
        "unique",
        "writable",
    )

    def __init__(
        self,
        opcode: int,
        unique: int,
        nodeid: int,
        uid: int,
        gid: int,
        pid: int,
        ext: codec.Extensions,
        readable: Sequence[Any],
        writable: Sequence[Any],
        session: SessionState | None,
        args: memoryview,
        args_len: int,
        contexts: dict[tuple[int, int, int], Context],
    ) -> None:
        self.opcode = opcode
        self.unique = unique
        self.nodeid = nodeid
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.ext = ext
        self.readable = readable
        self.writable = writable
        self.session = session
        #: The operation's arguments: all of them (ops with names), or just
        #: the fixed struct (WRITE, IOCTL: their data is read where it lies).
        self.args = args
        #: Length of the whole argument region (extensions excluded).
        self.args_len = args_len
        #: The dispatcher's shared Contexts, by (uid, gid, pid).
        self.contexts = contexts

    def ctx(self) -> Context:
        """Credentials of the requesting guest process.

        Without extensions (no supplementary groups) the Context for the same
        (uid, gid, pid) is shared between the dispatcher's requests: Contexts
        are read-only, and a lookup is cheaper than building one.
        """
        if self.ext is codec.NO_EXTENSIONS:
            key = (self.uid, self.gid, self.pid)
            contexts = self.contexts
            ctx = contexts.get(key)
            if ctx is None:
                if len(contexts) >= _MAX_CONTEXTS:
                    contexts.clear()
                ctx = contexts[key] = Context(self.uid, self.gid, self.pid)
            return ctx
        return Context(self.uid, self.gid, self.pid, self.ext.groups)

    def creator_ctx(self, umask: int, tail: int) -> tuple[Context, int]:
        """Context of a request that creates a node, and the umask to pass on.

        The umask is the caller's only with FUSE_DONT_MASK (else the guest
        kernel applied it already: 0).  The security context arrives as an
        extension since 7.38; before, the kernel appended it to the
        arguments, at ``tail`` (fuse.h 7.36 FUSE_SECURITY_CTX).
        """
        assert self.session is not None
        flags = self.session.flags
        secctx = self.ext.secctx
        if not flags & abi.FUSE_SECURITY_CTX:
            secctx = None
        elif secctx is None and self.session.minor < 38 and tail < len(self.args):
            secctx = codec.parse_extensions(self.args[tail:]).secctx
        if not flags & abi.FUSE_DONT_MASK:
            umask = 0
            ctx_umask = None
        else:
            umask &= 0o777
            ctx_umask = umask
        return Context(self.uid, self.gid, self.pid, self.ext.groups, ctx_umask, secctx), umask


OpHandler = Callable[["Dispatcher", Request], int]


class Dispatcher:
    """Maps FUSE requests to ``Filesystem`` calls; safe to call from many threads."""

    def __init__(
        self,
        fs: Filesystem,
        config: FuseConfig | None = None,
        *,
        on_session: Callable[[SessionState | None], None] | None = None,
    ) -> None:
        self.fs = fs
        self.config = config if config is not None else FuseConfig()
        self._lock = threading.Lock()
        self._session: SessionState | None = None
        #: Told of every change of the session, under the lock (a backend's
        #: fast operations answer requests only while there is one).
        self._on_session = on_session
        #: Shared Contexts of requests without extensions (``Request.ctx``).
        self._contexts: dict[tuple[int, int, int], Context] = {}
        #: Trace every request by name: decided once, so that with debug off
        #: the hot path pays one attribute test, not argument formatting.
        self._trace = log.isEnabledFor(logging.DEBUG)

    # -- session state ----------------------------------------------------
    def _set_session_locked(self, state: SessionState | None) -> None:
        self._session = state
        if self._on_session is not None:
            self._on_session(state)

    @property
    def session(self) -> SessionState | None:
        """The negotiated session, or None before INIT / after DESTROY."""
        return self._session

    def export_session(self) -> dict[str, int] | None:
        """The session state as a plain dict (None if not initialized)."""
        s = self._session
        return None if s is None else s.to_dict()

    def restore_session(self, state: dict[str, Any] | None) -> None:
        """Adopt a session negotiated by another daemon (migration destination).

        The backend is not re-initialized: its own state travels separately.
        """
        new = None if state is None else SessionState.from_dict(state)
        with self._lock:
            self._set_session_locked(new)

    def reset(self) -> None:
        """Forget the session and the backend's state (device reset, guest reboot).

        The daemon calls this when the front-end resets the device, so that
        the next guest's FUSE_INIT starts afresh instead of getting EIO.
        """
        with self._lock:
            self._set_session_locked(None)
            self.fs.destroy()

    # -- entry point --------------------------------------------------------
    @staticmethod
    def may_block(readable: Sequence[Any]) -> bool:
        """Whether this request may wait long (see ``MAY_BLOCK``); a cheap peek."""
        first = readable[0] if readable else b""
        if len(first) < 8:
            return False
        return _OPCODE.unpack_from(first, 4)[0] in MAY_BLOCK

    def handle(self, readable: Sequence[Any], writable: Sequence[Any]) -> int:
        """Execute one request; write the reply into ``writable``; return bytes written."""
        first = readable[0] if readable else b""
        try:
            if len(first) >= _HDR:
                hdr = _IN_HEADER.unpack_from(first)
            else:
                hdr = codec.parse_in_header(readable)
        except Malformed as e:
            log.warning("FUSE request dropped: %s", e)
            return 0
        opcode, unique, nodeid = hdr[1], hdr[2], hdr[3]
        no_reply = opcode in _NO_REPLY
        try:
            return self._dispatch(hdr, readable, writable)
        except Malformed as e:
            log.warning(
                "FUSE %s unique=%d nodeid=%d: malformed: %s",
                abi.opcode_name(opcode), unique, nodeid, e,
            )  # fmt: skip
            return 0 if no_reply else self._error(writable, unique, errno.EINVAL, opcode, nodeid)
        except OSError as e:
            err = e.errno if e.errno is not None and 0 < e.errno < 4096 else errno.EIO
            log.debug("FUSE %s unique=%d nodeid=%d: %s", abi.opcode_name(opcode), unique, nodeid, e)
            return 0 if no_reply else self._error(writable, unique, err, opcode, nodeid)
        except ReplyTooLarge as e:
            log.warning(
                "FUSE %s unique=%d nodeid=%d: writable buffers too small: %s",
                abi.opcode_name(opcode), unique, nodeid, e,
            )  # fmt: skip
            return self._error(writable, unique, errno.EIO, opcode, nodeid)
        except Exception:
            log.exception(
                "FUSE %s unique=%d nodeid=%d: internal error",
                abi.opcode_name(opcode), unique, nodeid,
            )  # fmt: skip
            return 0 if no_reply else self._error(writable, unique, errno.EIO, opcode, nodeid)

    def _error(
        self, writable: Sequence[Any], unique: int, err: int, opcode: int, nodeid: int
    ) -> int:
        try:
            return codec.write_error(writable, unique, err)
        except ReplyTooLarge:
            log.warning(
                "FUSE %s unique=%d nodeid=%d: no room for a reply (error %d)",
                abi.opcode_name(opcode), unique, nodeid, err,
            )  # fmt: skip
            return 0

    def _dispatch(
        self,
        hdr: tuple[int, int, int, int, int, int, int, int, int],
        readable: Sequence[Any],
        writable: Sequence[Any],
    ) -> int:
        hlen, opcode, unique, nodeid, uid, gid, pid, extlen, _ = hdr
        if self._trace:
            log.debug(
                "FUSE %s unique=%d nodeid=%d uid=%d gid=%d pid=%d len=%d",
                abi.opcode_name(opcode), unique, nodeid, uid, gid, pid, hlen,
            )  # fmt: skip
        first = readable[0]
        if hlen > len(first):
            # Linux: the in header, then the arguments, in two buffers
            avail = len(first) + len(readable[1]) if len(readable) == 2 else iov.total_len(readable)
            if hlen > avail:
                raise Malformed(f"len {hlen} exceeds the {avail} readable bytes")
        ext_bytes = extlen * 8
        args_len = hlen - _HDR - ext_bytes
        if args_len < 0:
            raise Malformed(f"len {hlen} too small for header and {ext_bytes} extension bytes")
        ext = codec.NO_EXTENSIONS
        if ext_bytes:
            ext = codec.parse_extensions(iov.view(readable, _HDR + args_len, ext_bytes))

        session = self._session
        if session is None and opcode != abi.FUSE_INIT:
            if opcode in _NO_REPLY:
                return 0
            log.warning(
                "FUSE %s unique=%d nodeid=%d: request before INIT",
                abi.opcode_name(opcode), unique, nodeid,
            )  # fmt: skip
            raise OSError(errno.EIO, "request before FUSE_INIT")

        op = _OPS[opcode] if opcode < len(_OPS) else None
        if op is None:
            log.debug(
                "FUSE %s unique=%d nodeid=%d: not implemented",
                abi.opcode_name(opcode), unique, nodeid,
            )  # fmt: skip
            raise OSError(errno.ENOSYS, "opcode not implemented")
        handler, min_args, whole = op
        if args_len < min_args:
            raise Malformed(f"arguments are {args_len} bytes, need {min_args}")

        n = args_len if whole else min_args
        if len(first) >= _HDR + n:  # the layouts Linux produces, without iov calls
            args = memoryview(first)[_HDR : _HDR + n]
        elif len(first) == _HDR and len(readable) > 1 and len(readable[1]) >= n:
            args = memoryview(readable[1])[:n]
        else:
            args = iov.view(readable, _HDR, n)
        req = Request(
            opcode, unique, nodeid, uid, gid, pid, ext, readable, writable, session, args,
            args_len, self._contexts,
        )  # fmt: skip
        return handler(self, req)

    # -- session ops ----------------------------------------------------------
    def _op_init(self, req: Request) -> int:
        major, minor, max_readahead, flags = abi.INIT_IN_COMPAT.unpack_from(req.args)
        flags2 = 0
        if flags & abi.FUSE_INIT_EXT and len(req.args) >= abi.INIT_IN.size:
            flags2 = abi.INIT_IN.unpack_from(req.args)[4]
        cfg = self.config
        with self._lock:
            if self._session is not None:
                # A rebooted guest re-initialises the device without DESTROY (no
                # vhost-user message tells us); its INIT starts a new session, as
                # the Rust virtiofsd's passthrough init does.
                log.info("FUSE INIT unique=%d on a live session: starting afresh", req.unique)
                self._set_session_locked(None)
                self.fs.destroy()
            if major < abi.FUSE_KERNEL_VERSION:
                log.error("FUSE INIT: unsupported protocol %d.%d", major, minor)
                raise OSError(errno.EPROTO, "FUSE major too old")
            if major > abi.FUSE_KERNEL_VERSION:
                # fuse.h "Version negotiation": answer with our major only; the
                # kernel sends a new INIT with a matching major.
                return codec.write_struct(
                    req.writable, req.unique, abi.INIT_OUT,
                    abi.FUSE_KERNEL_VERSION, OUR_MAX_MINOR, *(0,) * 22,
                )  # fmt: skip
            if minor < MIN_MINOR:
                log.error("FUSE INIT: unsupported protocol %d.%d", major, minor)
                raise OSError(errno.EPROTO, "FUSE minor too old")
            agreed = abi.join_init_flags(flags, flags2) & cfg.offered_flags()
            state = SessionState(
                major=abi.FUSE_KERNEL_VERSION,
                minor=min(minor, OUR_MAX_MINOR),
                flags=agreed,
                max_write=cfg.max_write,
                max_read=cfg.max_read,
                max_readahead=max_readahead,
                max_pages=cfg.max_pages,
            )
            self.fs.init(
                SessionInfo(
                    major=state.major,
                    minor=state.minor,
                    max_write=state.max_write,
                    max_readahead=max_readahead,
                    writeback_cache=bool(agreed & abi.FUSE_WRITEBACK_CACHE),
                    create_supp_group=bool(agreed & abi.FUSE_CREATE_SUPP_GROUP),
                    posix_locks=bool(agreed & abi.FUSE_POSIX_LOCKS),
                    flock_locks=bool(agreed & abi.FUSE_FLOCK_LOCKS),
                    posix_acl=bool(agreed & abi.FUSE_POSIX_ACL),
                    handle_killpriv_v2=bool(agreed & abi.FUSE_HANDLE_KILLPRIV_V2),
                    security_ctx=bool(agreed & abi.FUSE_SECURITY_CTX),
                    submounts=bool(agreed & abi.FUSE_SUBMOUNTS),
                )
            )
            self._set_session_locked(state)
        lo, hi = abi.split_init_flags(agreed)
        return codec.write_struct(
            req.writable,
            req.unique,
            abi.INIT_OUT,
            state.major,
            state.minor,
            max_readahead,
            lo,
            cfg.max_background,
            cfg.congestion_threshold,
            cfg.max_write,
            cfg.time_gran,
            cfg.max_pages,
            0,  # map_alignment: no DAX
            hi,
            0,  # max_stack_depth: no FUSE_PASSTHROUGH
            0,  # request_timeout
            *(0,) * 11,
        )

    def _op_destroy(self, req: Request) -> int:
        # Linux waits for a DESTROY reply (fuse_send_destroy); a bare out
        # header is well-formed for an op without out args and satisfies
        # kernels that check len/unique.  (The Rust virtiofsd returns used
        # length 0 instead.)  A later INIT starts a new session (remount).
        self.reset()
        return codec.write_empty(req.writable, req.unique)

    def _op_interrupt(self, req: Request) -> int:
        # Requests run to completion; Linux's virtiofs never sends INTERRUPT.
        return 0

    # -- names ------------------------------------------------------------------
    def _op_lookup(self, req: Request) -> int:
        name, _ = codec.parse_name(req.args)
        return self._entry_reply(req, self.fs.lookup(req.ctx(), req.nodeid, name))

    def _op_forget(self, req: Request) -> int:
        (nlookup,) = abi.FORGET_IN.unpack_from(req.args)
        self.fs.forget(req.nodeid, nlookup)
        return 0

    def _op_batch_forget(self, req: Request) -> int:
        (count, _) = abi.BATCH_FORGET_IN.unpack_from(req.args)
        one = abi.FORGET_ONE.size
        start = abi.BATCH_FORGET_IN.size
        if count > (len(req.args) - start) // one:
            raise Malformed(f"count {count} exceeds the {len(req.args) - start} argument bytes")
        items = list(abi.FORGET_ONE.iter_unpack(req.args[start : start + count * one]))
        self.fs.batch_forget(items)
        return 0

    # -- attributes ---------------------------------------------------------------
    def _op_getattr(self, req: Request) -> int:
        getattr_flags, _, fh = abi.GETATTR_IN.unpack_from(req.args)
        reply = self.fs.getattr(
            req.ctx(), req.nodeid, fh if getattr_flags & abi.FUSE_GETATTR_FH else None
        )
        return self._attr_reply(req, reply)

    @staticmethod
    def _attr_reply(req: Request, reply: AttrReply) -> int:
        return codec.write_attr_out(req.writable, req.unique, reply)

    def _op_statfs(self, req: Request) -> int:
        sv = self.fs.statfs(req.ctx(), req.nodeid)
        return codec.write_struct(
            req.writable, req.unique, abi.STATFS_OUT, *codec.statfs_values(sv)
        )

    def _op_readlink(self, req: Request) -> int:
        target = self.fs.readlink(req.ctx(), req.nodeid)
        return codec.write_bytes(req.writable, req.unique, target)

    def _op_access(self, req: Request) -> int:
        (mask, _) = abi.ACCESS_IN.unpack_from(req.args)
        self.fs.access(req.ctx(), req.nodeid, mask)
        return codec.write_empty(req.writable, req.unique)

    # -- files ----------------------------------------------------------------------
    def _op_open(self, req: Request) -> int:
        flags, open_flags = abi.OPEN_IN.unpack_from(req.args)
        if open_flags & abi.FUSE_OPEN_KILL_SUIDGID:
            opened = self.fs.open(req.ctx(), req.nodeid, flags, kill_suidgid=True)
        else:  # backends without HANDLE_KILLPRIV_V2 need not know the keyword
            opened = self.fs.open(req.ctx(), req.nodeid, flags)
        return codec.write_open_out(req.writable, req.unique, opened)

    def _op_opendir(self, req: Request) -> int:
        flags, _ = abi.OPEN_IN.unpack_from(req.args)
        opened = self.fs.opendir(req.ctx(), req.nodeid, flags)
        return codec.write_open_out(req.writable, req.unique, opened)

    def _op_read(self, req: Request) -> int:
        fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(req.args)
        if offset > _S64_MAX:
            raise OSError(errno.EINVAL, "offset out of range")
        writable = req.writable
        room = sum(map(len, writable)) - _OUT
        if room < 0:
            raise ReplyTooLarge("no room for fuse_out_header")
        assert req.session is not None
        size = min(size, req.session.max_read, room)
        if size and size == room and len(writable[0]) == _OUT:
            bufs = list(writable[1:])  # the usual layout, read in full: no re-slicing
        else:
            bufs = iov.slices(writable, _OUT, size)
        got = self.fs.read(req.ctx(), req.nodeid, fh, offset, size, bufs)
        if type(got) is not int or not 0 <= got <= size:
            raise RuntimeError(f"backend read returned {got!r} for a {size}-byte request")
        codec.write_header(req.writable, req.unique, 0, _OUT + got)
        return _OUT + got

    def _op_release(self, req: Request) -> int:
        fh, flags, release_flags, lock_owner = abi.RELEASE_IN.unpack_from(req.args)
        if release_flags & abi.FUSE_RELEASE_FLOCK_UNLOCK:
            # The file had flock locks: the owner's go with its last close.
            self.fs.release(req.ctx(), req.nodeid, fh, flags, lock_owner=lock_owner)
        else:  # backends without FLOCK_LOCKS need not know the keyword
            self.fs.release(req.ctx(), req.nodeid, fh, flags)
        return codec.write_empty(req.writable, req.unique)

    def _op_releasedir(self, req: Request) -> int:
        fh, flags, _, _ = abi.RELEASE_IN.unpack_from(req.args)
        self.fs.releasedir(req.ctx(), req.nodeid, fh, flags)
        return codec.write_empty(req.writable, req.unique)

    def _op_flush(self, req: Request) -> int:
        fh, _, _, lock_owner = abi.FLUSH_IN.unpack_from(req.args)
        self.fs.flush(req.ctx(), req.nodeid, fh, lock_owner)
        return codec.write_empty(req.writable, req.unique)

    def _op_lseek(self, req: Request) -> int:
        fh, offset, whence, _ = abi.LSEEK_IN.unpack_from(req.args)
        if offset > _S64_MAX:
            raise OSError(errno.EINVAL, "offset out of range")
        pos = self.fs.lseek(req.ctx(), req.nodeid, fh, offset, whence)
        return codec.write_struct(req.writable, req.unique, abi.LSEEK_OUT, pos)

    # -- directories ------------------------------------------------------------------
    def _op_readdir(self, req: Request) -> int:
        return self._readdir(req, plus=False)

    def _op_readdirplus(self, req: Request) -> int:
        return self._readdir(req, plus=True)

    def _readdir(self, req: Request, plus: bool) -> int:
        fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(req.args)
        writable = req.writable
        room = iov.total_len(writable) - _OUT
        if room < 0:
            raise ReplyTooLarge("no room for fuse_out_header")
        size = min(size, room)
        win = iov.window(writable, _OUT, size)
        target = win if win is not None else memoryview(bytearray(size))
        fs = self.fs
        pos = 0
        taken: list[int] = []  # lookups handed out in this reply (plus only)
        packer = codec.DirentPacker(target, size)
        entries = fs.readdir(req.ctx(), req.nodeid, fh, offset, plus)
        try:
            try:
                if plus:
                    put = packer.direntplus
                    for de in entries:
                        e = de.entry
                        rec = put(pos, e, de.ino, de.offset, de.type, de.name)
                        if not rec:
                            if e is not None:
                                fs.forget(e.nodeid, 1)
                            break
                        if e is not None:
                            taken.append(e.nodeid)
                        pos += rec
                else:
                    put_plain = packer.dirent
                    for de in entries:
                        rec = put_plain(pos, de.ino, de.offset, de.type, de.name)
                        if not rec:
                            break
                        pos += rec
            except OSError:
                if pos == 0:
                    raise
                # Entries already packed are good; the guest asks again from
                # the last cookie and gets the error then.
            finally:
                close = getattr(entries, "close", None)
                if close is not None:
                    close()
            if win is None:
                iov.scatter(writable, _OUT, target[:pos])
            codec.write_header(writable, req.unique, 0, _OUT + pos)
        except BaseException:
            for nodeid in taken:  # the reply is not sent: give the lookups back
                fs.forget(nodeid, 1)
            raise
        return _OUT + pos

    # -- extended attributes ----------------------------------------------------------
    def _op_getxattr(self, req: Request) -> int:
        size, _ = abi.GETXATTR_IN.unpack_from(req.args)
        name, _ = codec.parse_xattr_name(req.args, abi.GETXATTR_IN.size)
        value = self.fs.getxattr(req.ctx(), req.nodeid, name)
        return self._xattr_reply(req, size, value)

    def _op_listxattr(self, req: Request) -> int:
        size, _ = abi.GETXATTR_IN.unpack_from(req.args)
        names = self.fs.listxattr(req.ctx(), req.nodeid)
        return self._xattr_reply(req, size, names)

    def _xattr_reply(self, req: Request, size: int, value: bytes) -> int:
        # getxattr(2)/listxattr(2) semantics: size 0 asks for the needed size
        # (fuse_getxattr_out); a non-zero size too small for the value is ERANGE.
        if size == 0:
            return codec.write_struct(req.writable, req.unique, abi.GETXATTR_OUT, len(value), 0)
        if len(value) > size or len(value) > iov.total_len(req.writable) - _OUT:
            raise OSError(errno.ERANGE, "xattr buffer too small")
        return codec.write_bytes(req.writable, req.unique, value)

    # -- creating and removing names -----------------------------------------------------
    def _entry_reply(self, req: Request, entry: Entry) -> int:
        try:
            return codec.write_entry_out(req.writable, req.unique, entry)
        except BaseException:
            self.fs.forget(entry.nodeid, 1)  # the guest never learns of it
            raise

    def _create_reply(self, req: Request, ctx: Context, entry: Entry, opened: Opened) -> int:
        try:
            return codec.write_create_out(req.writable, req.unique, entry, opened)
        except BaseException:
            with contextlib.suppress(OSError):  # the reply's failure is what gets reported
                self.fs.release(ctx, entry.nodeid, opened.fh, 0)
            self.fs.forget(entry.nodeid, 1)
            raise

    def _op_create(self, req: Request) -> int:
        flags, mode, umask, open_flags = abi.CREATE_IN.unpack_from(req.args)
        name, tail = codec.parse_name(req.args, abi.CREATE_IN.size)
        ctx, umask = req.creator_ctx(umask, tail)
        if open_flags & abi.FUSE_OPEN_KILL_SUIDGID:
            entry, opened = self.fs.create(
                ctx, req.nodeid, name, mode, flags, umask, kill_suidgid=True
            )
        else:
            entry, opened = self.fs.create(ctx, req.nodeid, name, mode, flags, umask)
        return self._create_reply(req, ctx, entry, opened)

    def _op_tmpfile(self, req: Request) -> int:
        flags, mode, umask, _ = abi.CREATE_IN.unpack_from(req.args)
        # The kernel sends the dentry name of an O_TMPFILE file, "/": not a component.
        _, tail = codec.parse_cstring(req.args, abi.CREATE_IN.size)
        ctx, umask = req.creator_ctx(umask, tail)
        entry, opened = self.fs.tmpfile(ctx, req.nodeid, mode, flags, umask)
        return self._create_reply(req, ctx, entry, opened)

    def _op_mknod(self, req: Request) -> int:
        mode, rdev, umask, _ = abi.MKNOD_IN.unpack_from(req.args)
        name, tail = codec.parse_name(req.args, abi.MKNOD_IN.size)
        ctx, umask = req.creator_ctx(umask, tail)
        return self._entry_reply(req, self.fs.mknod(ctx, req.nodeid, name, mode, rdev, umask))

    def _op_mkdir(self, req: Request) -> int:
        mode, umask = abi.MKDIR_IN.unpack_from(req.args)
        name, tail = codec.parse_name(req.args, abi.MKDIR_IN.size)
        ctx, umask = req.creator_ctx(umask, tail)
        return self._entry_reply(req, self.fs.mkdir(ctx, req.nodeid, name, mode, umask))

    def _op_symlink(self, req: Request) -> int:
        # fuse.h: the new entry's name, then the link target, both NUL-terminated.
        name, off = codec.parse_name(req.args)
        target, tail = codec.parse_cstring(req.args, off)
        ctx, _ = req.creator_ctx(0, tail)
        return self._entry_reply(req, self.fs.symlink(ctx, req.nodeid, name, target))

    def _op_link(self, req: Request) -> int:
        (oldnodeid,) = abi.LINK_IN.unpack_from(req.args)
        newname, _ = codec.parse_name(req.args, abi.LINK_IN.size)
        return self._entry_reply(req, self.fs.link(req.ctx(), oldnodeid, req.nodeid, newname))

    def _op_unlink(self, req: Request) -> int:
        name, _ = codec.parse_name(req.args)
        self.fs.unlink(req.ctx(), req.nodeid, name)
        return codec.write_empty(req.writable, req.unique)

    def _op_rmdir(self, req: Request) -> int:
        name, _ = codec.parse_name(req.args)
        self.fs.rmdir(req.ctx(), req.nodeid, name)
        return codec.write_empty(req.writable, req.unique)

    def _op_rename(self, req: Request) -> int:
        (newdir,) = abi.RENAME_IN.unpack_from(req.args)
        return self._rename(req, newdir, 0, abi.RENAME_IN.size)

    def _op_rename2(self, req: Request) -> int:
        newdir, flags, _ = abi.RENAME2_IN.unpack_from(req.args)
        if flags & ~_RENAME_FLAGS:
            raise OSError(errno.EINVAL, f"unknown rename flags {flags:#x}")  # as renameat2(2)
        return self._rename(req, newdir, flags, abi.RENAME2_IN.size)

    def _rename(self, req: Request, newdir: int, flags: int, off: int) -> int:
        name, newname, _ = codec.parse_two_names(req.args, off)
        self.fs.rename(req.ctx(), req.nodeid, name, newdir, newname, flags)
        return codec.write_empty(req.writable, req.unique)

    # -- changing files -----------------------------------------------------------------
    def _op_setattr(self, req: Request) -> int:
        (valid, _, fh, size, lock_owner, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
         mode, _, uid, gid, _) = abi.SETATTR_IN.unpack_from(req.args)  # fmt: skip
        if valid & abi.FATTR_SIZE and size > _S64_MAX:
            raise OSError(errno.EINVAL, "size out of range")
        attr = SetAttr(
            mode=mode if valid & abi.FATTR_MODE else None,
            uid=uid if valid & abi.FATTR_UID else None,
            gid=gid if valid & abi.FATTR_GID else None,
            size=size if valid & abi.FATTR_SIZE else None,
            # *_NOW wins over a given time (as UTIME_NOW in utimensat(2)).
            atime_ns=(
                NOW
                if valid & abi.FATTR_ATIME_NOW
                else _time_ns(valid, abi.FATTR_ATIME, atime, atimensec)
            ),
            mtime_ns=(
                NOW
                if valid & abi.FATTR_MTIME_NOW
                else _time_ns(valid, abi.FATTR_MTIME, mtime, mtimensec)
            ),
            ctime_ns=_time_ns(valid, abi.FATTR_CTIME, ctime, ctimensec),
            fh=fh if valid & abi.FATTR_FH else None,
            lock_owner=lock_owner if valid & abi.FATTR_LOCKOWNER else None,
            kill_suidgid=bool(valid & abi.FATTR_KILL_SUIDGID),
        )
        return self._attr_reply(req, self.fs.setattr(req.ctx(), req.nodeid, attr))

    def _op_write(self, req: Request) -> int:
        fh, offset, size, write_flags, _, _, _ = abi.WRITE_IN.unpack_from(req.args)
        start = abi.WRITE_IN.size
        if size > req.args_len - start:
            raise Malformed(f"size {size} exceeds the {req.args_len - start} data bytes")
        assert req.session is not None
        if size > req.session.max_write:
            raise Malformed(f"size {size} exceeds max_write {req.session.max_write}")
        if offset > _S64_MAX:
            raise OSError(errno.EINVAL, "offset out of range")
        # Zero copy: views of the guest's own buffers go to the backend (pwritev).
        bufs = iov.slices(req.readable, _HDR + start, size)
        kill = (write_flags & abi.FUSE_WRITE_KILL_SUIDGID) != 0
        done = self.fs.write(req.ctx(), req.nodeid, fh, offset, bufs, kill)
        if type(done) is not int or not 0 <= done <= size:
            raise RuntimeError(f"backend write returned {done!r} for a {size}-byte request")
        return codec.write_struct(req.writable, req.unique, abi.WRITE_OUT, done, 0)

    def _op_fsync(self, req: Request) -> int:
        fh, fsync_flags, _ = abi.FSYNC_IN.unpack_from(req.args)
        datasync = bool(fsync_flags & abi.FUSE_FSYNC_FDATASYNC)
        self.fs.fsync(req.ctx(), req.nodeid, fh, datasync)
        return codec.write_empty(req.writable, req.unique)

    def _op_fsyncdir(self, req: Request) -> int:
        fh, fsync_flags, _ = abi.FSYNC_IN.unpack_from(req.args)
        datasync = bool(fsync_flags & abi.FUSE_FSYNC_FDATASYNC)
        self.fs.fsyncdir(req.ctx(), req.nodeid, fh, datasync)
        return codec.write_empty(req.writable, req.unique)

    def _op_fallocate(self, req: Request) -> int:
        fh, offset, length, mode, _ = abi.FALLOCATE_IN.unpack_from(req.args)
        if offset > _S64_MAX or length > _S64_MAX:
            raise OSError(errno.EINVAL, "offset or length out of range")
        self.fs.fallocate(req.ctx(), req.nodeid, fh, mode, offset, length)
        return codec.write_empty(req.writable, req.unique)

    def _op_copy_file_range(self, req: Request) -> int:
        (fh_in, off_in, nodeid_out, fh_out, off_out, length,
         flags) = abi.COPY_FILE_RANGE_IN.unpack_from(req.args)  # fmt: skip
        if off_in > _S64_MAX or off_out > _S64_MAX:
            raise OSError(errno.EINVAL, "offset out of range")
        # fuse_write_out.size is 32 bits (COPY_FILE_RANGE_64 is 7.45, beyond
        # OUR_MAX_MINOR); Linux caps len so too.
        length = min(length, _U32_MAX)
        done = self.fs.copy_file_range(
            req.ctx(), req.nodeid, fh_in, off_in, nodeid_out, fh_out, off_out, length, flags
        )
        if type(done) is not int or not 0 <= done <= length:
            raise RuntimeError(f"backend copy_file_range returned {done!r} for {length} bytes")
        return codec.write_struct(req.writable, req.unique, abi.WRITE_OUT, done, 0)

    def _op_syncfs(self, req: Request) -> int:
        self.fs.syncfs(req.ctx(), req.nodeid)
        return codec.write_empty(req.writable, req.unique)

    def _op_statx(self, req: Request) -> int:
        getattr_flags, _, fh, sx_flags, sx_mask = abi.STATX_IN.unpack_from(req.args)
        reply = self.fs.statx(
            req.ctx(), req.nodeid,
            fh if getattr_flags & abi.FUSE_GETATTR_FH else None, sx_flags, sx_mask,
        )  # fmt: skip
        sec, nsec = codec.timeout_split(reply.timeout)
        return codec.write_struct(
            req.writable, req.unique, abi.STATX_OUT,
            sec, nsec, abi.FUSE_ATTR_SUBMOUNT if reply.submount else 0, 0, 0,
            *codec.statx_values(reply.fields),
        )  # fmt: skip

    def _op_ioctl(self, req: Request) -> int:
        fh, flags, cmd, arg, in_size, out_size = abi.IOCTL_IN.unpack_from(req.args)
        if flags & abi.FUSE_IOCTL_UNRESTRICTED:
            # Only CUSE sends unrestricted ioctls (their buffers need RETRY
            # round trips into guest memory); refused as the C virtiofsd does.
            raise OSError(errno.ENOSYS, "unrestricted ioctl")
        start = abi.IOCTL_IN.size
        if in_size > req.args_len - start:
            raise Malformed(f"in_size {in_size} exceeds the {req.args_len - start} data bytes")
        room = iov.total_len(req.writable) - _OUT - abi.IOCTL_OUT.size
        if room < 0:
            raise ReplyTooLarge("no room for fuse_ioctl_out")
        out_size = min(out_size, room)
        in_data = bytes(iov.view(req.readable, _HDR + start, in_size))
        try:
            result, out = self.fs.ioctl(
                req.ctx(), req.nodeid, fh, cmd, arg, in_data, out_size,
                compat32=bool(flags & abi.FUSE_IOCTL_32BIT),
            )  # fmt: skip
        except OSError as e:
            if e.errno == errno.ENOSYS:  # a backend without ioctls: "not a tty" to the caller
                raise OSError(errno.ENOTTY, "ioctl not supported") from e
            raise
        if type(result) is not int or not _S32_MIN <= result <= _S32_MAX:
            raise RuntimeError(f"backend ioctl returned result {result!r}")
        if len(out) > out_size:
            raise RuntimeError(f"backend ioctl returned {len(out)} bytes, room for {out_size}")
        return codec.write_struct_bytes(
            req.writable, req.unique, abi.IOCTL_OUT, (result, 0, 0, 0), bytes(out)
        )

    # -- locks ------------------------------------------------------------------------
    @staticmethod
    def _lock_args(req: Request) -> tuple[int, int, Lock, int]:
        fh, owner, start, end, typ, pid, lk_flags, _ = abi.LK_IN.unpack_from(req.args)
        if typ not in _LOCK_TYPES:
            raise OSError(errno.EINVAL, f"lock type {typ}")
        if start > _S64_MAX or end > _S64_MAX or start > end:
            raise OSError(errno.EINVAL, f"lock range {start}..{end}")
        return fh, owner, Lock(start, end, typ, pid), lk_flags

    def _op_getlk(self, req: Request) -> int:
        fh, owner, lock, _ = self._lock_args(req)
        got = self.fs.getlk(req.ctx(), req.nodeid, fh, owner, lock)
        if got.type not in _LOCK_TYPES:
            raise RuntimeError(f"backend getlk returned lock type {got.type!r}")
        # A holder outside the guest has no guest pid (OFD locks report -1): 0.
        pid = got.pid if 0 < got.pid <= _U32_MAX else 0
        return codec.write_struct(
            req.writable, req.unique, abi.LK_OUT,
            min(got.start, _S64_MAX), min(got.end, _S64_MAX), got.type, pid,
        )  # fmt: skip

    def _op_setlk(self, req: Request) -> int:
        return self._setlk(req, sleep=False)

    def _op_setlkw(self, req: Request) -> int:
        return self._setlk(req, sleep=True)

    def _setlk(self, req: Request, sleep: bool) -> int:
        fh, owner, lock, lk_flags = self._lock_args(req)
        flock = bool(lk_flags & abi.FUSE_LK_FLOCK)
        self.fs.setlk(req.ctx(), req.nodeid, fh, owner, lock, sleep=sleep, flock=flock)
        return codec.write_empty(req.writable, req.unique)

    # -- extended attributes (changes) -----------------------------------------------------
    def _op_setxattr(self, req: Request) -> int:
        assert req.session is not None
        if req.session.flags & abi.FUSE_SETXATTR_EXT:
            if len(req.args) < abi.SETXATTR_IN.size:
                raise Malformed(f"arguments are {len(req.args)} bytes, need 16")
            size, flags, setxattr_flags, _ = abi.SETXATTR_IN.unpack_from(req.args)
            off = abi.SETXATTR_IN.size
        else:  # fuse.h: the 8-byte fuse_setxattr_in unless FUSE_SETXATTR_EXT
            size, flags = abi.SETXATTR_IN_COMPAT.unpack_from(req.args)
            setxattr_flags = 0
            off = abi.SETXATTR_IN_COMPAT.size
        name, off = codec.parse_xattr_name(req.args, off)
        value = bytes(req.args[off:])
        if len(value) != size:
            raise Malformed(f"value is {len(value)} bytes, size says {size}")
        kill_sgid = bool(setxattr_flags & abi.FUSE_SETXATTR_ACL_KILL_SGID)
        self.fs.setxattr(req.ctx(), req.nodeid, name, value, flags, kill_sgid)
        return codec.write_empty(req.writable, req.unique)

    def _op_removexattr(self, req: Request) -> int:
        name, _ = codec.parse_xattr_name(req.args)
        self.fs.removexattr(req.ctx(), req.nodeid, name)
        return codec.write_empty(req.writable, req.unique)


def _time_ns(valid: int, bit: int, sec: int, nsec: int) -> int | None:
    """A fuse_setattr_in timestamp as signed nanoseconds, or None without ``bit``."""
    if not valid & bit:
        return None
    if nsec >= _NS:
        raise OSError(errno.EINVAL, f"nanoseconds {nsec} out of range")  # as utimensat(2)
    if sec > _S64_MAX:
        sec -= 1 << 64  # u64 on the wire, time64_t to the kernel
    return sec * _NS + nsec


# opcode -> (handler, fixed argument bytes required, whether the handler needs
# all argument bytes contiguous (True) or only the fixed part (False)).
_TABLE: Final[tuple[tuple[int, OpHandler, int, bool], ...]] = (
    (abi.FUSE_INIT, Dispatcher._op_init, abi.INIT_IN_COMPAT.size, True),
    (abi.FUSE_DESTROY, Dispatcher._op_destroy, 0, True),
    (abi.FUSE_INTERRUPT, Dispatcher._op_interrupt, 0, True),
    (abi.FUSE_LOOKUP, Dispatcher._op_lookup, 0, True),
    (abi.FUSE_FORGET, Dispatcher._op_forget, abi.FORGET_IN.size, True),
    (abi.FUSE_BATCH_FORGET, Dispatcher._op_batch_forget, abi.BATCH_FORGET_IN.size, True),
    (abi.FUSE_GETATTR, Dispatcher._op_getattr, abi.GETATTR_IN.size, True),
    (abi.FUSE_STATFS, Dispatcher._op_statfs, 0, True),
    (abi.FUSE_READLINK, Dispatcher._op_readlink, 0, True),
    (abi.FUSE_ACCESS, Dispatcher._op_access, abi.ACCESS_IN.size, True),
    (abi.FUSE_OPEN, Dispatcher._op_open, abi.OPEN_IN.size, True),
    (abi.FUSE_OPENDIR, Dispatcher._op_opendir, abi.OPEN_IN.size, True),
    (abi.FUSE_READ, Dispatcher._op_read, abi.READ_IN.size, False),
    (abi.FUSE_RELEASE, Dispatcher._op_release, abi.RELEASE_IN.size, True),
    (abi.FUSE_RELEASEDIR, Dispatcher._op_releasedir, abi.RELEASE_IN.size, True),
    (abi.FUSE_FLUSH, Dispatcher._op_flush, abi.FLUSH_IN.size, True),
    (abi.FUSE_LSEEK, Dispatcher._op_lseek, abi.LSEEK_IN.size, True),
    (abi.FUSE_READDIR, Dispatcher._op_readdir, abi.READ_IN.size, False),
    (abi.FUSE_READDIRPLUS, Dispatcher._op_readdirplus, abi.READ_IN.size, False),
    (abi.FUSE_GETXATTR, Dispatcher._op_getxattr, abi.GETXATTR_IN.size, True),
    (abi.FUSE_LISTXATTR, Dispatcher._op_listxattr, abi.GETXATTR_IN.size, True),
    (abi.FUSE_SETXATTR, Dispatcher._op_setxattr, abi.SETXATTR_IN_COMPAT.size, True),
    (abi.FUSE_REMOVEXATTR, Dispatcher._op_removexattr, 0, True),
    (abi.FUSE_CREATE, Dispatcher._op_create, abi.CREATE_IN.size, True),
    (abi.FUSE_TMPFILE, Dispatcher._op_tmpfile, abi.CREATE_IN.size, True),
    (abi.FUSE_MKNOD, Dispatcher._op_mknod, abi.MKNOD_IN.size, True),
    (abi.FUSE_MKDIR, Dispatcher._op_mkdir, abi.MKDIR_IN.size, True),
    (abi.FUSE_SYMLINK, Dispatcher._op_symlink, 0, True),
    (abi.FUSE_LINK, Dispatcher._op_link, abi.LINK_IN.size, True),
    (abi.FUSE_UNLINK, Dispatcher._op_unlink, 0, True),
    (abi.FUSE_RMDIR, Dispatcher._op_rmdir, 0, True),
    (abi.FUSE_RENAME, Dispatcher._op_rename, abi.RENAME_IN.size, True),
    (abi.FUSE_RENAME2, Dispatcher._op_rename2, abi.RENAME2_IN.size, True),
    (abi.FUSE_SETATTR, Dispatcher._op_setattr, abi.SETATTR_IN.size, True),
    (abi.FUSE_WRITE, Dispatcher._op_write, abi.WRITE_IN.size, False),
    (abi.FUSE_FSYNC, Dispatcher._op_fsync, abi.FSYNC_IN.size, True),
    (abi.FUSE_FSYNCDIR, Dispatcher._op_fsyncdir, abi.FSYNC_IN.size, True),
    (abi.FUSE_FALLOCATE, Dispatcher._op_fallocate, abi.FALLOCATE_IN.size, True),
    (abi.FUSE_COPY_FILE_RANGE, Dispatcher._op_copy_file_range, abi.COPY_FILE_RANGE_IN.size, True),
    (abi.FUSE_SYNCFS, Dispatcher._op_syncfs, abi.SYNCFS_IN.size, True),
    (abi.FUSE_IOCTL, Dispatcher._op_ioctl, abi.IOCTL_IN.size, False),
    (abi.FUSE_GETLK, Dispatcher._op_getlk, abi.LK_IN.size, True),
    (abi.FUSE_SETLK, Dispatcher._op_setlk, abi.LK_IN.size, True),
    (abi.FUSE_SETLKW, Dispatcher._op_setlkw, abi.LK_IN.size, True),
    (abi.FUSE_STATX, Dispatcher._op_statx, abi.STATX_IN.size, True),  # fuse.h 7.39
    # COPY_FILE_RANGE_64 (7.45) stays ENOSYS while OUR_MAX_MINOR < 45.
)


def _build_ops() -> list[tuple[OpHandler, int, bool] | None]:
    ops: list[tuple[OpHandler, int, bool] | None] = [None] * (max(t[0] for t in _TABLE) + 1)
    for opcode, handler, min_args, whole in _TABLE:
        ops[opcode] = (handler, min_args, whole)
    return ops


_OPS: Final = _build_ops()

#: Opcodes with a handler (for tests and docs).
IMPLEMENTED: Final = frozenset(t[0] for t in _TABLE)
