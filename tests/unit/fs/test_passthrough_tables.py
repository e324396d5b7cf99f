"""Inode/handle table invariants and the ctypes syscall wrappers."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtiofsd_py.fs.api import ROOT_ID, Context
from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.fs.passthrough.open_files import HandleTable
from virtiofsd_py.host.syscalls import getdents64, stat_fd

CTX = Context(uid=0, gid=0, pid=1)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def fdinfo_mnt_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise AssertionError("no mnt_id in fdinfo")


def test_stat_fd_matches_lstat_and_fdinfo(tmp_path: Path) -> None:
    os.symlink("nowhere", tmp_path / "sym")
    for p in (tmp_path, tmp_path / "sym", Path("/proc/self")):
        fd = os.open(p, os.O_PATH | os.O_NOFOLLOW)
        try:
            st, mnt_id = stat_fd(fd)
            assert tuple(st) == tuple(os.lstat(p))
            assert st.st_mtime_ns == os.lstat(p).st_mtime_ns
            assert mnt_id == fdinfo_mnt_id(fd)
        finally:
            os.close(fd)


def test_getdents64_cookies_resume(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"n{i}").mkdir() if i % 2 else (tmp_path / f"n{i}").write_bytes(b"")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(512)  # several calls
        ents = []
        while batch := getdents64(fd, buf):
            ents.extend(batch)
        assert sorted(e.name for e in ents) == sorted(
            [b".", b".."] + [os.fsencode(n) for n in os.listdir(tmp_path)]
        )
        types = {e.name: e.type for e in ents}
        assert types[b"n1"] == 4 and types[b"n2"] == 8  # DT_DIR, DT_REG
        os.lseek(fd, ents[9].off, os.SEEK_SET)
        again = []
        while batch := getdents64(fd, buf):
            again.extend(batch)
        assert again == ents[10:]
    finally:
        os.close(fd)


def test_handle_table() -> None:
    t = HandleTable()
    r, w = os.pipe()
    h = t.add(5, r, os.O_RDONLY)
    assert t.get(h.fh, 5) is h
    for bad in ((h.fh, 6), (h.fh + 1, 5)):
        try:
            t.get(*bad)
        except OSError as e:
            assert e.errno == 9
        else:
            raise AssertionError("expected EBADF")
    t.remove(h.fh, 5)
    # The caller still holds ``h``: the fd stays open until it lets go.
    assert h.fd == r and os.fstat(r)
    del h
    assert not is_open(r)
    assert t.add(5, w, 0).fh == 2
    t.clear()
    assert not is_open(w) and len(t) == 0


# -- a model of lookup counts ------------------------------------------------

PATHS = ["a", "a/b", "a/x", "a/b/y", "a/b/z"]  # a/b/z is a hard link of a/x


def make_tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "x").write_bytes(b"x")
    (root / "a" / "b" / "y").write_bytes(b"y")
    os.link(root / "a" / "x", root / "a" / "b" / "z")


ops = st.lists(
    st.tuples(st.sampled_from(["lookup", "forget"]), st.sampled_from(PATHS), st.integers(1, 3)),
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=ops)
def test_lookup_counts_follow_a_model(tmp_path_factory: object, ops: list) -> None:  # type: ignore[type-arg]
    root = tmp_path_factory.mktemp("share")  # type: ignore[attr-defined]
    make_tree(root)
    ino = {p: os.lstat(root / p).st_ino for p in PATHS}
    baseline = open_fds()
    fs = PassthroughFS(PassthroughConfig(shared_dir=root))
    try:
        counts: Counter[int] = Counter()  # host inode -> guest lookup count
        nodeid: dict[int, int] = {}  # host inode -> node id while counted
        for op, path, n in ops:
            parent_path, _, name = path.rpartition("/")
            if op == "lookup":
                if parent_path and counts[ino[parent_path]] == 0:
                    continue  # the kernel only looks up in a node it holds
                parent = nodeid[ino[parent_path]] if parent_path else ROOT_ID
                e = fs.lookup(CTX, parent, name.encode())
                if counts[ino[path]]:
                    assert e.nodeid == nodeid[ino[path]]
                nodeid[ino[path]] = e.nodeid
                counts[ino[path]] += 1
            else:
                have = counts[ino[path]]
                if not have:
                    continue
                k = min(n, have)
                fs.forget(nodeid[ino[path]], k)
                counts[ino[path]] -= k
            check_invariants(fs, counts, nodeid)
        fs.batch_forget([(nodeid[i], c) for i, c in counts.items() if c])
        assert len(fs.inodes) == 1
    finally:
        fs.close()
    assert open_fds() == baseline


def check_invariants(fs: PassthroughFS, counts: Counter[int], nodeid: dict[int, int]) -> None:
    nodes = {n.nodeid: n for n in fs.inodes}
    for i, c in counts.items():
        if c:
            assert nodes[nodeid[i]].lookups == c
            assert nodes[nodeid[i]].key[1] == i
    children = Counter(n.parent for n in nodes.values() if n.nodeid != ROOT_ID)
    for n in nodes.values():
        if n.nodeid == ROOT_ID:
            continue
        assert n.children == children[n.nodeid]
        assert n.lookups > 0 or n.children > 0, "unreferenced node kept"
        assert n.parent in nodes
        # The record finds the inode again: parent node + name.
        found = os.stat(n.name, dir_fd=nodes[n.parent].fd, follow_symlinks=False)
        assert found.st_ino == n.key[1]
    assert len({n.fd for n in nodes.values()}) == len(nodes)
