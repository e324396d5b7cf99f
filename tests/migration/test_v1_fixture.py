"""A device state written by the code before the typed schema still loads.

``fixtures/v1_state.msgpack`` was saved by commit a3fd86a (the tree before
the package move, with ``fs/passthrough_migration.py`` and
``migration/state.py``) running ``fixtures/make_v1_state.py`` (its docstring
has the command): a ``PassthroughFS`` on a temporary copy of the tree
``make_tree`` rebuilds here, with a directory chain a/b/c, a symlink, open
file and directory handles, a POSIX lock on locked.txt, a flock on top.txt
and gone.txt unlinked while open; FUSE_INIT done; host name "fixture-host".
Its bytes are kept as they were written: this test decodes them with today's
schema and loads them into today's passthrough backend on a new copy of the
tree (another host, as far as the state can tell: paths are followed, inode
numbers not checked).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtiofsd_py.fs.api import Context
from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.fs.passthrough.migration.config import MigrationConfig
from virtiofsd_py.fs.passthrough.migration.migratable import PassthroughMigration
from virtiofsd_py.fuse.dispatcher import Dispatcher
from virtiofsd_py.migration.envelope import StateError, StateProvider, decode

FIXTURE = Path(__file__).parent / "fixtures" / "v1_state.msgpack"
CTX = Context(0, 0, 1)
#: As make_v1_state.FILES, without gone.txt (unlinked on the source).
FILES = {
    "a/b/c/deep.txt": b"deep in the chain\n",
    "a/b/sibling.txt": b"next to c\n",
    "top.txt": b"at the top\n",
    "locked.txt": b"0123456789\n",
}
#: node id -> (lookups, parent, name, path) as the source had them.
NODES = {
    2: (4, 1, b"a", b"a"),
    3: (3, 2, b"b", b"a/b"),
    4: (1, 3, b"c", b"a/b/c"),
    5: (1, 4, b"deep.txt", b"a/b/c/deep.txt"),
    6: (1, 3, b"sibling.txt", b"a/b/sibling.txt"),
    7: (1, 1, b"link", b"link"),
    8: (1, 1, b"top.txt", b"top.txt"),
    9: (1, 1, b"locked.txt", b"locked.txt"),
    10: (1, 1, b"gone.txt", None),
}
GONE = 10
WAIT = 10.0


def make_tree(root: Path) -> None:
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "link").symlink_to("a/b/c/deep.txt")


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    make_tree(d)
    return d


@pytest.fixture
def dst(share: Path) -> Iterator[PassthroughFS]:
    fs = PassthroughFS(PassthroughConfig(share))
    yield fs
    fs.close()


def provider(fs: PassthroughFS, on_error: str) -> StateProvider:
    config = MigrationConfig(on_error=on_error)  # type: ignore[arg-type]
    return StateProvider(Dispatcher(fs), PassthroughMigration(fs, config), "")


def test_the_fixture_decodes_to_the_sources_tables() -> None:
    env = decode(FIXTURE.read_bytes())
    assert env.source.host == "fixture-host"
    assert env.fuse is not None and (env.fuse.major, env.fuse.minor) == (7, 38)
    tables = env.fs
    assert tables.host == "fixture-host" and tables.root_key is not None
    assert {i.id: (i.lookups, i.parent, i.name, i.path) for i in tables.inodes} == NODES
    gone = next(i for i in tables.inodes if i.id == GONE)
    assert gone.unlinked and gone.handle is not None
    assert all(i.key is not None for i in tables.inodes)
    assert {(h.fh, h.inode) for h in tables.handles} == {(1, 5), (2, 2), (3, 9), (4, 8), (5, 10)}
    assert {h.fh: h.flags & os.O_ACCMODE for h in tables.handles}[3] == os.O_RDWR
    assert sorted((lk.inode, lk.owner, lk.type, lk.start, lk.flock) for lk in tables.locks) == [
        (8, 4, fcntl.F_WRLCK, 0, True),  # flock: its owner is the fh
        (9, 0xAB, fcntl.F_WRLCK, 0, False),
    ]
    assert (tables.next_nodeid, tables.next_fh) == (11, 6) and not tables.skipped_locks


def test_the_fixture_loads_into_todays_backend(dst: PassthroughFS, share: Path) -> None:
    state = provider(dst, "guest-error")
    state.load(FIXTURE.read_bytes())
    session = state.dispatcher.session
    assert session is not None and (session.major, session.minor) == (7, 38)
    live = {n.nodeid: (n.lookups, n.parent, n.name) for n in dst.inodes if n.nodeid != 1}
    assert live == {i: (lk, p, name) for i, (lk, p, name, _) in NODES.items()}
    for nodeid, (*_, path) in NODES.items():
        if path is not None:
            st = os.lstat(share / os.fsdecode(path))
            assert dst.getattr(CTX, nodeid, None).attr.st_ino == st.st_ino, path
    # The unlinked file cannot be found on another host: it alone gives EIO.
    with pytest.raises(OSError) as e:
        dst.getattr(CTX, GONE, None)
    assert e.value.errno == errno.EIO
    buf = bytearray(18)
    assert dst.read(CTX, 5, 1, 0, 18, [memoryview(buf)]) == 18
    assert bytes(buf) == FILES["a/b/c/deep.txt"]
    assert {e.name for e in dst.readdir(CTX, 2, 2, 0, False)} >= {b"b"}
    assert dst.readlink(CTX, 7) == b"a/b/c/deep.txt"
    # The guest's locks are held again, by the destination.
    wait_until(lambda: posix_locked(share / "locked.txt") and flocked(share / "top.txt"))
    # New ids never collide with migrated ones.
    (share / "new").touch()
    assert dst.lookup(CTX, 1, b"new").nodeid == 11


def test_with_abort_the_unlinked_file_fails_the_load(dst: PassthroughFS) -> None:
    with pytest.raises(StateError, match=f"inode {GONE} \\(unlinked\\)"):
        provider(dst, "abort").load(FIXTURE.read_bytes())
    assert len(dst.inodes) == 1


def wait_until(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, "the destination never took the locks again"
        time.sleep(0.02)


def posix_locked(path: Path) -> bool:
    """Whether another open file description would conflict with a write lock on 0..9."""
    fd = os.open(path, os.O_RDWR)
    try:
        probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 10, 0)
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
        return bool(struct.unpack("hhqqi4x", got)[0] != fcntl.F_UNLCK)
    finally:
        os.close(fd)


def flocked(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
