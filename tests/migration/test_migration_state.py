"""Migrating the passthrough backend's tables between two daemons' backends.

Source and destination are two PassthroughFS instances on the same host
directory (as two daemons on one host are); the state goes through the real
msgpack envelope of virtiofsd_py.migration.envelope.  Broken states are made
by editing the plain msgpack data, as a hostile or buggy source would.
"""

from __future__ import annotations

import fcntl
import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from virtiofsd_py.fs.api import Context, Lock
from virtiofsd_py.fs.passthrough.filesystem import PassthroughFS
from virtiofsd_py.fs.passthrough.migration.config import MigrationConfig
from virtiofsd_py.fs.passthrough.migration.migratable import PassthroughMigration
from virtiofsd_py.fs.passthrough.migration.relock import LockRestorer
from virtiofsd_py.fuse.dispatcher import Dispatcher
from virtiofsd_py.migration.envelope import StateError, StateProvider, decode
from virtiofsd_py.migration.inspect import describe

CTX = Context(0, 0, 1)
O_RDWR = os.O_RDWR


MakeFS = Callable[..., PassthroughFS]


def provider(fs: PassthroughFS, share: object = "", **mig: object) -> StateProvider:
    """The daemon's device state over ``fs``; ``mig``: ``--migration-*`` (MigrationConfig)."""
    migration = PassthroughMigration(fs, MigrationConfig(**mig))  # type: ignore[arg-type]
    return StateProvider(Dispatcher(fs), migration, str(share))


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    (d / "dir" / "sub").mkdir(parents=True)
    (d / "dir" / "sub" / "file").write_bytes(b"hello world")
    (d / "append").write_bytes(b"start\n")
    (d / "gone").write_bytes(b"unlinked but open")
    (d / "link").symlink_to("dir/sub/file")
    return d


class Pair:
    def __init__(self, make_fs: MakeFS, share: Path, **mig: Any) -> None:
        self.src = make_fs(share)
        self.dst = make_fs(share)
        self.src_state = provider(self.src, share, **mig)
        self.dst_state = provider(self.dst, share, **mig)

    def lookup(self, path: str) -> int:
        node = 1
        for part in path.split("/"):
            node = self.src.lookup(CTX, node, part.encode()).nodeid
        return node

    def migrate(self) -> bytes:
        data = self.src_state.save()
        self.dst_state.load(data)
        return data

    def close(self) -> None:
        self.src.close()
        self.dst.close()


MakePair = Callable[..., Pair]


@pytest.fixture
def make_pair(make_fs: MakeFS) -> MakePair:
    """``make_pair(share, **migration_config)``: a source and a destination."""
    return functools.partial(Pair, make_fs)


@pytest.fixture
def pair(share: Path, make_pair: MakePair) -> Iterator[Pair]:
    p = make_pair(share)
    yield p
    p.close()


def tables(fs: PassthroughFS) -> dict[int, tuple[int, int, int]]:
    return {n.nodeid: (n.lookups, n.key[0], n.key[1]) for n in fs.inodes if n.nodeid != 1}


def test_nodes_and_handles_keep_their_ids(pair: Pair, share: Path) -> None:
    f = pair.lookup("dir/sub/file")
    pair.src.lookup(CTX, 1, b"dir")  # a second lookup of dir
    link = pair.lookup("link")
    fh = pair.src.open(CTX, f, os.O_RDONLY).fh
    dfh = pair.src.opendir(CTX, pair.lookup("dir"), os.O_RDONLY).fh
    pair.migrate()
    assert tables(pair.dst) == tables(pair.src)
    buf = bytearray(11)
    assert pair.dst.read(CTX, f, fh, 0, 11, [memoryview(buf)]) == 11
    assert bytes(buf) == b"hello world"
    assert pair.dst.readlink(CTX, link) == b"dir/sub/file"
    names = [e.name for e in pair.dst.readdir(CTX, pair.lookup("dir"), dfh, 0, False)]
    assert b"sub" in names
    # New ids on the destination never collide with migrated ones.
    fresh = pair.dst.lookup(CTX, 1, b"append").nodeid
    assert fresh not in tables(pair.src) or fresh == pair.lookup("append")


def test_renamed_directory_is_found_at_its_new_path(pair: Pair, share: Path) -> None:
    f = pair.lookup("dir/sub/file")
    pair.src_state.log_all_changed(True)  # paths prepared before the rename...
    pair.src.rename(CTX, 1, b"dir", 1, b"moved", 0)  # ...are stale after it
    pair.migrate()
    st = pair.dst.getattr(CTX, f, None).attr
    assert st.st_ino == (share / "moved" / "sub" / "file").stat().st_ino
    pair.src_state.log_all_changed(False)


def test_unlinked_flag_with_prepared_paths(share: Path, make_pair: MakePair) -> None:
    """Nodes with a confirmed path are linked; a guest unlink after prepare is seen
    (whether or not the preparation finished before it)."""
    p = make_pair(share, mode="file-handles")
    try:
        kept = p.lookup("dir/sub/file")
        g = p.lookup("gone")
        fh = p.src.open(CTX, g, O_RDWR).fh
        p.src_state.log_all_changed(True)
        p.src.unlink(CTX, 1, b"gone")
        env = decode(p.src_state.save())
        p.src_state.log_all_changed(False)
        entries = {i.id: i for i in env.fs.inodes}
        assert entries[kept].path == b"dir/sub/file" and not entries[kept].unlinked
        assert entries[g].path is None and entries[g].unlinked
        p.src.release(CTX, g, fh, O_RDWR)
    finally:
        p.close()


def test_host_side_rename_is_followed(pair: Pair, share: Path) -> None:
    f = pair.lookup("dir/sub/file")
    os.rename(share / "dir", share / "elsewhere")  # behind the guest's back
    pair.migrate()
    assert (
        pair.dst.getattr(CTX, f, None).attr.st_ino == os.stat(share / "elsewhere/sub/file").st_ino
    )


def test_unlinked_open_file_with_file_handles(share: Path, make_pair: MakePair) -> None:
    p = make_pair(share, mode="file-handles")
    try:
        g = p.lookup("gone")
        fh = p.src.open(CTX, g, O_RDWR).fh
        p.src.unlink(CTX, 1, b"gone")
        env = decode(p.migrate())
        (entry,) = [i for i in env.fs.inodes if i.id == g]
        assert entry.path is None and entry.unlinked and entry.handle
        buf = bytearray(17)
        assert p.dst.read(CTX, g, fh, 0, 17, [memoryview(buf)]) == 17
        assert bytes(buf) == b"unlinked but open"
    finally:
        p.close()


def test_unlinked_file_without_a_handle_fails_or_becomes_eio(
    share: Path, make_pair: MakePair, make_fs: MakeFS
) -> None:
    p = make_pair(share)
    try:
        g = p.lookup("gone")
        p.src.unlink(CTX, 1, b"gone")
        data = p.src_state.save()
        doc = msgpack.unpackb(data)
        for i in doc["fs"]["inodes"]:
            i["handle"] = None  # as a source that cannot make file handles
        with pytest.raises(StateError, match="inode"):
            p.dst_state.load(msgpack.packb(doc))
        guest_error = make_fs(share)
        try:
            provider(guest_error, on_error="guest-error").load(msgpack.packb(doc))
            with pytest.raises(OSError):
                guest_error.getattr(CTX, g, None)
            # Everything else still works.
            assert guest_error.lookup(CTX, 1, b"append").nodeid
        finally:
            guest_error.close()
    finally:
        p.close()


def _host_can_lock(path: Path, kind: str) -> bool:
    code = (
        "import fcntl, os, struct, sys\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR)\n"
        "try:\n"
        + (
            "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            if kind == "flock"
            else "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        )
        + "except OSError:\n    sys.exit(1)\n"
    )
    return subprocess.run([sys.executable, "-c", code], timeout=20).returncode == 0


def test_locks_are_taken_again_once_the_source_lets_go(share: Path, make_pair: MakePair) -> None:
    p = make_pair(share)
    try:
        a = p.lookup("append")
        fh = p.src.open(CTX, a, O_RDWR).fh
        p.src.setlk(CTX, a, fh, 0xAB, Lock(0, 9, fcntl.F_WRLCK), sleep=False, flock=False)
        f = p.lookup("dir/sub/file")
        ffh = p.src.open(CTX, f, O_RDWR).fh
        p.src.setlk(CTX, f, ffh, 0, Lock(0, 0, fcntl.F_WRLCK), sleep=False, flock=True)
        env = decode(p.migrate())
        assert {(lk.inode, lk.flock) for lk in env.fs.locks} == {(a, False), (f, True)}
        p.src.close()  # the source daemon exits: its locks go, the destination's come
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _host_can_lock(share / "append", "posix") and not _host_can_lock(
                share / "dir/sub/file", "flock"
            ):
                break
            time.sleep(0.05)
        assert not _host_can_lock(share / "append", "posix")
        assert not _host_can_lock(share / "dir/sub/file", "flock")
        # The guest's owner can still unlock through the destination.
        p.dst.setlk(CTX, a, fh, 0xAB, Lock(0, 9, fcntl.F_UNLCK), sleep=False, flock=False)
        assert _host_can_lock(share / "append", "posix")
    finally:
        p.dst.close()


def test_inspect_state_describes_it(pair: Pair) -> None:
    pair.lookup("dir/sub/file")
    text = describe(decode(pair.src_state.save()))
    assert "dir/sub/file" in text and "passthrough" in text


# -- hostile or broken states -------------------------------------------------------------
def state_doc(pair: Pair) -> dict:  # type: ignore[type-arg]
    pair.lookup("dir/sub/file")
    return msgpack.unpackb(pair.src_state.save())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(version=2),
        lambda d: d.update(format="something else"),
        lambda d: d.update(fs=None),
        lambda d: d["fs"].update(kind="memory"),
        lambda d: d["fs"].update(inodes="nope"),
        lambda d: d["fs"]["inodes"][0].update(id="x"),
        lambda d: d["fs"]["inodes"][0].update(id=1),
        lambda d: d["fs"]["inodes"].append(dict(d["fs"]["inodes"][0])),
        lambda d: d["fs"]["handles"].append({"fh": 5, "inode": 999999, "flags": 0}),
    ],
)
def test_malformed_states_are_refused(pair: Pair, mutate) -> None:  # type: ignore[no-untyped-def]
    doc = state_doc(pair)
    mutate(doc)
    with pytest.raises(StateError):
        pair.dst_state.load(msgpack.packb(doc))
    assert len(pair.dst.inodes) == 1  # nothing was installed


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01\x02", msgpack.packb({"format": 1})[:-1]])
def test_garbage_is_refused(pair: Pair, data: bytes) -> None:
    with pytest.raises(StateError):
        pair.dst_state.load(data)


@pytest.mark.parametrize(
    "path", [b"../outside", b"dir/../../outside", b"/etc/passwd", b"link/x", b"dir\0x", b"append\0"]
)
def test_paths_cannot_leave_the_share(pair: Pair, share: Path, path: bytes) -> None:
    (share.parent / "outside").write_bytes(b"secret")
    doc = state_doc(pair)
    for i in doc["fs"]["inodes"]:
        i["path"], i["handle"] = path, None
    with pytest.raises(StateError):
        pair.dst_state.load(msgpack.packb(doc))


def handle_of(path: Path) -> bytes:
    """The file handle of ``path``; the test is skipped where there are none."""
    from virtiofsd_py.host import syscalls

    fd = os.open(path, os.O_PATH)
    try:
        return syscalls.name_to_handle(fd)[0]
    except OSError as e:
        pytest.skip(f"no file handles here: {e}")
    finally:
        os.close(fd)


def test_file_handle_outside_the_share_is_refused(pair: Pair, share: Path) -> None:
    outside = share.parent / "outside"
    outside.write_bytes(b"secret")
    handle = handle_of(outside)
    doc = state_doc(pair)
    for i in doc["fs"]["inodes"]:
        i["path"], i["handle"], i["mode"] = None, handle, 0o100644
    with pytest.raises(StateError, match="outside"):
        pair.dst_state.load(msgpack.packb(doc))


@pytest.mark.parametrize(
    "handle",
    [
        b"\x01",  # shorter than the header
        b"\x40\x00\x00\x00\x01\x00\x00\x00" + b"x" * 8,  # says 64 bytes follow, holds 8
        b"\xff\x00\x00\x00\x01\x00\x00\x00" + b"x" * 255,  # longer than MAX_HANDLE_SZ
    ],
)
def test_malformed_file_handles_are_refused(pair: Pair, handle: bytes) -> None:
    from virtiofsd_py.host import syscalls

    assert not syscalls.well_formed_handle(handle)
    doc = state_doc(pair)
    for i in doc["fs"]["inodes"]:
        i["path"], i["handle"] = None, handle
    with pytest.raises(StateError, match="malformed file handle"):
        pair.dst_state.load(msgpack.packb(doc))


def test_own_file_handles_are_well_formed(share: Path) -> None:
    from virtiofsd_py.host import syscalls

    assert syscalls.well_formed_handle(handle_of(share / "append"))


def test_wrong_file_type_is_refused(pair: Pair) -> None:
    doc = state_doc(pair)
    for i in doc["fs"]["inodes"]:
        if i["path"] == b"dir/sub/file":
            i["mode"] = 0o040755
    with pytest.raises(StateError, match="file type"):
        pair.dst_state.load(msgpack.packb(doc))


def test_parent_cycles_are_broken(pair: Pair) -> None:
    doc = state_doc(pair)
    ids = [i["id"] for i in doc["fs"]["inodes"]]
    for i, nxt in zip(doc["fs"]["inodes"], ids[1:] + ids[:1], strict=True):
        i["parent"] = nxt  # every node the parent of the next: a cycle
    pair.dst_state.load(msgpack.packb(doc))
    for node in pair.dst.inodes:
        cur, seen = node, set()
        while cur.nodeid != 1:
            assert cur.nodeid not in seen
            seen.add(cur.nodeid)
            parent = pair.dst.inodes.get(cur.parent)
            assert parent is not None
            cur = parent


def test_state_into_a_used_daemon_is_refused(pair: Pair) -> None:
    data = pair.src_state.save()
    pair.dst.lookup(CTX, 1, b"append")
    with pytest.raises(StateError, match="in use"):
        pair.dst_state.load(data)


def test_rejected_state_is_kept_for_inspection(pair: Pair, tmp_path: Path) -> None:
    doc = state_doc(pair)
    doc["fs"]["inodes"][0]["path"] = b"no/such/file"
    doc["fs"]["inodes"][0]["handle"] = None
    data = msgpack.packb(doc)
    keeper = StateProvider(
        Dispatcher(pair.dst), PassthroughMigration(pair.dst), "", dump_dir=str(tmp_path)
    )
    with pytest.raises(StateError, match="inspect-state") as e:
        keeper.load(data)
    (kept,) = tmp_path.glob("virtiofsd-py-rejected-state-*")
    assert kept.read_bytes() == data and str(kept) in str(e.value)
    assert "no/such/file" in describe(decode(kept.read_bytes()))


def test_destroy_stops_waiting_for_the_sources_locks(share: Path, make_pair: MakePair) -> None:
    """FUSE_DESTROY on the destination while the source still holds a lock: the
    re-taking stops, and once the source lets go nobody holds the lock."""
    p = make_pair(share)
    try:
        a = p.lookup("append")
        fh = p.src.open(CTX, a, O_RDWR).fh
        p.src.setlk(CTX, a, fh, 0xAB, Lock(0, 9, fcntl.F_WRLCK), sleep=False, flock=False)
        p.migrate()
        restorer = p.dst.lock_restorer
        assert isinstance(restorer, LockRestorer)
        p.dst.destroy()
        assert p.dst.lock_restorer is None
        assert restorer._thread is not None and not restorer._thread.is_alive()
        p.src.close()  # the source lets go
        assert _host_can_lock(share / "append", "posix")
    finally:
        p.dst.close()
