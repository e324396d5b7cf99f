"""Migrated nodes found after the switch-over (``--migration-on-error guest-error``).

The destination installs placeholders, answers the load at once, and finds
the nodes afterwards (virtiofsd_py/fs/passthrough/migration/deferred.py).  ``held`` keeps
the background pass from starting, so that each test decides which node is
still a placeholder when a request reaches it; the rest let it run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_migration_state import CTX, MakePair, Pair, tables
from test_migration_state import make_pair as make_pair  # the fixtures
from test_migration_state import share as share

from virtiofsd_py.fs.api import Lock
from virtiofsd_py.fs.passthrough.filesystem import PassthroughFS
from virtiofsd_py.fs.passthrough.migration.deferred import DeferredNodes
from virtiofsd_py.migration.envelope import StateError, decode

WAIT = 20.0


@pytest.fixture
def gpair(share: Path, make_pair: MakePair) -> Iterator[Pair]:
    p = make_pair(share, on_error="guest-error")
    yield p
    p.close()


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DeferredNodes, "start", lambda self: None)


def placeholders(fs: PassthroughFS) -> set[int]:
    return {n.nodeid for n in fs.inodes if not n.usable}


def fd_holders(fs: PassthroughFS) -> int:
    """Nodes holding an fd (all of them, unless they are kept as file handles)."""
    return sum(1 for n in fs.inodes if n.fd >= 0)


def wait_finished(fs: PassthroughFS) -> None:
    deferred = fs.deferred
    if deferred is not None:
        assert deferred.finished.wait(WAIT), "the background pass did not finish"
    assert fs.deferred is None


def test_load_installs_placeholders_and_a_request_finds_its_node(
    gpair: Pair, share: Path, held: None
) -> None:
    f = gpair.lookup("dir/sub/file")
    a = gpair.lookup("append")
    gpair.migrate()
    assert placeholders(gpair.dst) == set(tables(gpair.src))
    st = gpair.dst.getattr(CTX, f, None).attr
    assert st.st_ino == (share / "dir/sub/file").stat().st_ino
    assert f not in placeholders(gpair.dst) and a in placeholders(gpair.dst)
    gpair.dst.settle_migration()
    assert not placeholders(gpair.dst)
    assert tables(gpair.dst) == tables(gpair.src)


def test_background_pass_finds_every_node(gpair: Pair) -> None:
    for path in ("dir/sub/file", "append", "link", "gone"):
        gpair.lookup(path)
    gpair.migrate()
    wait_finished(gpair.dst)
    assert not placeholders(gpair.dst)
    assert tables(gpair.dst) == tables(gpair.src)
    assert gpair.dst.inodes.fd_nodes == fd_holders(gpair.dst)


def test_nodes_with_open_files_are_found_during_the_load(gpair: Pair, held: None) -> None:
    f = gpair.lookup("dir/sub/file")
    a = gpair.lookup("append")
    fh = gpair.src.open(CTX, f, os.O_RDONLY).fh
    gpair.migrate()
    assert placeholders(gpair.dst) == set(tables(gpair.src)) - {f}
    buf = bytearray(11)
    assert gpair.dst.read(CTX, f, fh, 0, 11, [memoryview(buf)]) == 11
    assert bytes(buf) == b"hello world"
    assert a in placeholders(gpair.dst)


def test_guest_rename_first_finds_the_nodes_below(gpair: Pair, share: Path, held: None) -> None:
    f = gpair.lookup("dir/sub/file")
    gpair.migrate()
    gpair.dst.rename(CTX, 1, b"dir", 1, b"moved", 0)
    assert not placeholders(gpair.dst)
    st = gpair.dst.getattr(CTX, f, None).attr
    assert st.st_ino == (share / "moved/sub/file").stat().st_ino


def test_guest_unlink_first_finds_the_node(gpair: Pair, share: Path, held: None) -> None:
    a = gpair.lookup("append")
    st = (share / "append").stat()
    gpair.migrate()
    gpair.dst.unlink(CTX, 1, b"append")
    node = gpair.dst.inodes.get(a)  # found before its path went away
    assert node is not None and node.usable
    assert node.key[:2] == (st.st_dev, st.st_ino)
    if node.fd >= 0:  # an O_PATH fd keeps the inode: the guest can still use it
        attr = gpair.dst.getattr(CTX, a, None).attr
        assert (attr.st_ino, attr.st_nlink) == (st.st_ino, 0)


def test_lookup_of_a_placeholder_keeps_its_node_id(gpair: Pair, held: None) -> None:
    f = gpair.lookup("dir/sub/file")
    sub = gpair.lookup("dir/sub")
    gpair.migrate()
    before = gpair.src.inodes.get(f)
    assert before is not None
    assert gpair.dst.lookup(CTX, sub, b"file").nodeid == f
    node = gpair.dst.inodes.get(f)
    assert node is not None and node.usable and node.lookups == before.lookups + 1
    assert len(gpair.dst.inodes) == len(gpair.src.inodes)


def test_node_gone_before_it_is_found_gives_errors(
    gpair: Pair, share: Path, held: None, caplog: pytest.LogCaptureFixture
) -> None:
    a = gpair.lookup("append")
    f = gpair.lookup("dir/sub/file")
    gpair.migrate()
    (share / "append").unlink()  # behind the guest's back, after the switch-over
    with caplog.at_level(logging.ERROR, "virtiofsd_py.migration"), pytest.raises(OSError) as e:
        gpair.dst.getattr(CTX, a, None)
    assert e.value.errno == errno.EIO
    assert "the guest gets errors" in caplog.text and "append" in caplog.text
    assert gpair.dst.getattr(CTX, f, None).attr.st_size == 11


def test_forgotten_placeholder_is_not_found(gpair: Pair, held: None) -> None:
    a = gpair.lookup("append")
    gpair.migrate()
    gpair.dst.forget(a, 1)
    assert gpair.dst.inodes.get(a) is None
    gpair.dst.settle_migration()
    assert gpair.dst.inodes.get(a) is None
    assert gpair.dst.inodes.fd_nodes == fd_holders(gpair.dst)


def test_migrating_on_finds_every_node_first(gpair: Pair, held: None) -> None:
    gpair.lookup("dir/sub/file")
    gpair.lookup("append")
    gpair.migrate()
    env = decode(gpair.dst_state.save())
    assert all(i.path is not None for i in env.fs.inodes)
    assert not placeholders(gpair.dst)


@pytest.mark.parametrize(
    "path", [b"../outside", b"dir/../../outside", b"/etc/passwd", b"link/x", b"dir\0x", b"append\0"]
)
def test_paths_cannot_leave_the_share(gpair: Pair, share: Path, path: bytes) -> None:
    (share.parent / "outside").write_bytes(b"secret")
    f = gpair.lookup("dir/sub/file")
    doc = msgpack.unpackb(gpair.src_state.save())
    for i in doc["fs"]["inodes"]:
        i["path"], i["handle"] = path, None
    gpair.dst_state.load(msgpack.packb(doc))
    wait_finished(gpair.dst)
    with pytest.raises(OSError):
        gpair.dst.getattr(CTX, f, None)
    assert placeholders(gpair.dst) == set(tables(gpair.src))


def test_destroy_stops_the_pass(gpair: Pair) -> None:
    gpair.lookup("dir/sub/file")
    gpair.migrate()
    deferred = gpair.dst.deferred
    gpair.dst.destroy()
    assert gpair.dst.deferred is None
    assert deferred is None or deferred.finished.wait(WAIT)
    assert len(gpair.dst.inodes) == 1


def test_abort_finds_every_node_during_the_load(share: Path, make_pair: MakePair) -> None:
    p = make_pair(share)
    try:
        p.lookup("dir/sub/file")
        p.migrate()
        assert p.dst.deferred is None and not placeholders(p.dst)
    finally:
        p.close()


def test_bad_path_of_a_node_found_during_the_load_only_fails_that_node(gpair: Pair) -> None:
    """A NUL byte in a path (no such name) is a node not found, not a broken state."""
    f = gpair.lookup("dir/sub/file")
    a = gpair.lookup("append")
    gpair.src.open(CTX, f, os.O_RDONLY)  # found during the load
    doc = msgpack.unpackb(gpair.src_state.save())
    for i in doc["fs"]["inodes"]:
        if i["id"] == f:
            i["path"], i["handle"] = b"dir/sub/fi\0le", None
    gpair.dst_state.load(msgpack.packb(doc))
    with pytest.raises(OSError) as e:
        gpair.dst.getattr(CTX, f, None)
    assert e.value.errno == errno.EIO
    assert gpair.dst.getattr(CTX, a, None).attr.st_size == 6


def test_garbage_keys_fail_their_nodes_not_the_load(gpair: Pair) -> None:
    """Unhashable keys: the load still works; each node fails its identity check."""
    f = gpair.lookup("dir/sub/file")
    doc = msgpack.unpackb(gpair.src_state.save())
    for i in doc["fs"]["inodes"]:
        i["key"] = [[1], {"x": 2}]
    gpair.dst_state.load(msgpack.packb(doc))
    wait_finished(gpair.dst)
    with pytest.raises(OSError) as e:
        gpair.dst.getattr(CTX, f, None)
    assert e.value.errno == errno.EIO


_INT = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)  # what msgpack carries
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    _INT,
    st.binary(max_size=40),
    st.text(max_size=8),
    st.lists(st.integers(min_value=-5, max_value=1 << 40), max_size=4),
    st.dictionaries(st.text(max_size=3), _INT, max_size=2),
)
_HANDLE_FIELDS = ("fh", "inode", "flags")
_LOCK_FIELDS = ("owner", "type", "start", "end", "flock")
_TOP_FIELDS = ("next_nodeid", "next_fh", "root_key", "host")
_FIELDS = (
    *("id", "lookups", "mode", "key", "parent", "name", "path", "handle", "unlinked"),
    *_HANDLE_FIELDS,
    *_LOCK_FIELDS,
    *_TOP_FIELDS,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    changes=st.lists(st.tuples(st.integers(0, 5), st.sampled_from(_FIELDS), _VALUES), max_size=6)
)
@pytest.mark.parametrize("on_error", ["abort", "guest-error"])
def test_hostile_inode_fields_never_break_the_daemon(
    share: Path, make_pair: MakePair, on_error: str, changes: list[tuple[int, str, object]]
) -> None:
    """Any field of any inode, of the open handle, of the held lock or of the
    tables replaced by any value: the load succeeds or is refused with
    StateError; afterwards every request gets an answer or an OSError."""
    p = make_pair(share, on_error=on_error)
    try:
        for path in ("dir/sub/file", "append", "link"):
            p.lookup(path)
        a = p.lookup("append")
        fh = p.src.open(CTX, a, os.O_RDWR).fh
        p.src.setlk(CTX, a, fh, 7, Lock(0, 9, fcntl.F_WRLCK), sleep=False, flock=False)
        doc = msgpack.unpackb(p.src_state.save())
        fs = doc["fs"]
        for index, name, value in changes:
            if name in _HANDLE_FIELDS:
                fs["handles"][0][name] = value
            elif name in _LOCK_FIELDS:
                fs["locks"][0][name] = value
            elif name in _TOP_FIELDS:
                fs[name] = value
            else:
                fs["inodes"][index % len(fs["inodes"])][name] = value
        try:
            p.dst_state.load(msgpack.packb(doc))
        except StateError:
            assert len(p.dst.inodes) == 1
            return
        p.dst.settle_migration()
        for node in list(p.dst.inodes):
            with contextlib.suppress(OSError):
                p.dst.getattr(CTX, node.nodeid, None)
    finally:
        p.close()


def test_lookup_finds_every_placeholder_of_the_inode(gpair: Pair, held: None) -> None:
    """Two state entries with the source's (dev, ino) of one file (a stale
    file-handle node and the live one): a LOOKUP still reaches the live one."""
    a = gpair.lookup("append")
    doc = msgpack.unpackb(gpair.src_state.save())
    live = next(i for i in doc["fs"]["inodes"] if i["id"] == a)
    stale = {**live, "id": doc["fs"]["next_nodeid"], "path": b"gone-long-ago", "parent": 1}
    doc["fs"]["inodes"].append(stale)
    doc["fs"]["next_nodeid"] += 1
    gpair.dst_state.load(msgpack.packb(doc))
    assert gpair.dst.lookup(CTX, 1, b"append").nodeid == a


@pytest.mark.fd_per_node("placeholders of file-handle nodes hold no fd")
def test_placeholders_count_against_the_fd_budget(gpair: Pair, held: None) -> None:
    for path in ("dir/sub/file", "append", "link"):
        gpair.lookup(path)
    gpair.migrate()
    dst = gpair.dst
    deferred = dst.deferred
    assert deferred is not None and len(deferred.pending) == 5
    dst.fd_limit = dst.inodes.fd_nodes + 3  # room for 3 fds; 5 nodes will want one
    with pytest.raises(OSError) as e:
        dst.lookup(CTX, 1, b"gone")
    assert e.value.errno == errno.ENFILE
