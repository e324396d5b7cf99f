"""Fast operations: FUSE requests answered straight on a backend's tables.

``FastOps`` is the compiled twin (``_cpassthrough``, which a queue worker
calls without the GIL through the C interface of include/vfsd_fastops.h)
or, when it is not built or ``VIRTIOFSD_PY_PUREPYTHON=1``, the pure-Python
one (``passthrough``); both decide alike (passthrough.py says how).

This layer sits above the FUSE codec and the backend it serves, both of
which it reads: the FUSE layer knows no backend, a backend no FUSE bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from virtiofsd_py.fastops import passthrough
from virtiofsd_py.fastops.passthrough import DECLINED, OPCODES
from virtiofsd_py.fs.passthrough.core import PassthroughCore
from virtiofsd_py.fuse.dispatcher import SessionState
from virtiofsd_py.host import native

__all__ = [
    "DECLINED",
    "OPCODES",
    "FastOperations",
    "FastOps",
    "PureFastOps",
    "first",
    "for_passthrough",
]

#: (readable, writable) -> used length: a request handler (virtio.runner.ChainHandler).
Handler = Callable[[Sequence[memoryview], Sequence[memoryview]], int]


class FastOperations(Protocol):
    """What a queue worker and the daemon use of either twin."""

    #: Bit n set: FUSE opcode n may be answered (vfsd_fast_ops.opcodes).
    opcodes: int

    def session_changed(self, session: SessionState | None) -> None:
        """Give to ``Dispatcher(on_session=...)``: answer only while there is a session."""

    def handle(self, readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        """Answer one request: the reply length (0: no reply), or ``DECLINED``."""

    def capsule(self) -> object | None:
        """The ``VFSD_FAST_OPS_CAPSULE`` PyCapsule for a compiled worker; None if pure."""

    def close(self) -> None:
        """Stop mirroring the backend's tables (before the backend closes)."""


PureFastOps = passthrough.FastOps
FastOps: type[FastOperations] = PureFastOps

if not native.PURE:
    try:
        from virtiofsd_py.fastops._cpassthrough import FastOps as _Compiled
    except ImportError as e:
        native.loaded("fastops._cpassthrough", False, str(e))
    else:
        FastOps = _Compiled
        native.loaded("fastops._cpassthrough", True)
else:
    native.loaded("fastops._cpassthrough", False)


def for_passthrough(fs: PassthroughCore, *, readonly: bool = False) -> FastOperations:
    """The fast operations of ``fs`` (served behind ``ReadOnlyFS`` if ``readonly``)."""
    if FastOps is PureFastOps:
        return PureFastOps(fs, readonly=readonly)
    return _Compiled(fs, readonly=readonly)


def first(fast: FastOperations, fallback: Handler) -> Handler:
    """A request handler that offers each request to ``fast`` and gives what it
    declines to ``fallback`` (the dispatcher): for a runner that calls Python
    per request (a compiled worker calls the capsule instead)."""
    answer = fast.handle

    def handle(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        n = answer(readable, writable)
        return fallback(readable, writable) if n == DECLINED else n

    return handle
