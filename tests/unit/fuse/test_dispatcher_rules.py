"""The session table of fuse/dispatcher.py's rules header, row by row.

What tests/unit/fuse/test_fuse_dispatcher.py does not already check: the
rows for a dispatcher without a session, replies of FORGET-like opcodes, a
newer major on a live session, and the per-dispatcher Context cache.
"""

from __future__ import annotations

import errno

import pytest
from dispatcher_rig import call, init_args, init_out, lookup, make, request

from virtiofsd_py.fuse import abi
from virtiofsd_py.fuse.dispatcher import OUR_MAX_MINOR


def _no_reply_requests() -> list[tuple[bytes, int]]:
    return [
        request(abi.FUSE_FORGET, abi.FORGET_IN.pack(1), nodeid=2),
        request(abi.FUSE_BATCH_FORGET, abi.BATCH_FORGET_IN.pack(1, 0) + abi.FORGET_ONE.pack(2, 1)),
        request(abi.FUSE_INTERRUPT, abi.INTERRUPT_IN.pack(5)),
    ]


def test_without_a_session_every_other_opcode_is_eio() -> None:
    d, fs = make(init=False)
    assert call(d, request(abi.FUSE_DESTROY, nodeid=0)).error == -errno.EIO
    assert fs.destroyed == 0  # nothing to destroy
    # not ENOSYS: the session check comes first
    assert call(d, request(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"x\0")).error == (
        -errno.EIO
    )
    assert call(d, request(999, b"x" * 64)).error == -errno.EIO
    for req in _no_reply_requests():
        assert call(d, req).n == 0
    assert fs.calls == [] and fs.forgets == []


def test_after_destroy_forgets_are_dropped() -> None:
    d, fs = make()
    assert call(d, request(abi.FUSE_DESTROY, nodeid=0)).error == 0
    for req in _no_reply_requests():
        assert call(d, req).n == 0
    assert fs.forgets == []
    assert call(d, request(abi.FUSE_DESTROY, nodeid=0)).error == -errno.EIO
    assert fs.destroyed == 1


def test_forgets_get_no_reply_even_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    d, fs = make()

    def broken(*args: object) -> None:
        raise OSError(errno.EIO, "backend failure")

    monkeypatch.setattr(fs, "forget", broken)
    monkeypatch.setattr(fs, "batch_forget", broken)
    for req in _no_reply_requests():
        assert call(d, req).n == 0


def test_newer_major_on_a_live_session_ends_it() -> None:
    d, fs = make()
    out = init_out(call(d, request(abi.FUSE_INIT, init_args(1, major=8))))
    assert (out["major"], out["minor"]) == (7, OUR_MAX_MINOR)
    assert d.session is None and fs.destroyed == 1
    assert lookup(d, b"hello").error == -errno.EIO


def test_contexts_are_the_dispatchers_own() -> None:
    """The Context cache is per dispatcher: two daemons in one process share nothing."""
    one, fs_one = make()
    two, fs_two = make()
    call(one, request(abi.FUSE_LOOKUP, b"hello\0", uid=1, gid=2, pid=3))
    call(two, request(abi.FUSE_LOOKUP, b"hello\0", uid=1, gid=2, pid=3))
    assert fs_one.calls[-1][1] is not fs_two.calls[-1][1]
    assert fs_one.calls[-1][1] == fs_two.calls[-1][1]
