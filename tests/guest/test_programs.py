"""Real programs in a real guest on a read-write share: tar, cp -a, rsync, git, sqlite3, python3.

One daemon (``--cache auto --xattr``) and one guest with the programs image
serve the module. Results are checked on the host: trees compared entry by
entry (type, mode, owner, size, content, link targets, mtimes where the
program preserves them), databases and repositories opened by the host.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from rw_support import MNT, daemon_and_guest, ours_only, tree

from virtiofsd_py.testing.qemu.guest import Guest

pytestmark = pytest.mark.guest

GIT_FILES = 1500


def build_source_tree(root: Path) -> None:
    """A few hundred files: varied sizes, modes, owners, symlinks, hard links, exact times."""
    rng = random.Random(99)
    for d in range(12):
        sub = root / f"dir{d:02d}" / f"inner{d % 3}"
        sub.mkdir(parents=True)
        for i in range(25):
            f = sub / f"file{i:03d}.dat"
            f.write_bytes(rng.randbytes(rng.choice((0, 1, 100, 4096, 5000, 70000))))
            os.chmod(f, rng.choice((0o644, 0o600, 0o755, 0o444)))
    (root / "owned").write_bytes(b"owned\n")
    os.chown(root / "owned", 1000, 1000)
    os.symlink("dir00/inner0/file000.dat", root / "link")
    os.symlink("../dangling", root / "dangling")
    os.link(root / "dir01/inner1/file001.dat", root / "hardlink")
    (root / "empty-dir").mkdir()
    for i, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(root), reverse=True)):
        for n, name in enumerate(sorted(dirnames + filenames)):
            t = 1_500_000_000_000_000_000 + (i * 1000 + n) * 1_000_000_001
            os.utime(os.path.join(dirpath, name), ns=(t, t), follow_symlinks=False)


def mtimes(root: Path, *, dirs: bool = False, symlinks: bool = True) -> dict[bytes, int]:
    """mtime in ns of the entries under ``root``: files, and optionally dirs and symlinks.

    Directories are left out by default (their mtime changes as a copy fills
    them); busybox tar and cp do not set the times of symlinks.
    """
    r = os.fsencode(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(r):
        for name in filenames + (dirnames if dirs else []):
            full = os.path.join(dirpath, name)
            if symlinks or not os.path.islink(full):
                out[os.path.relpath(full, r)] = os.lstat(full).st_mtime_ns
    return out


@pytest.fixture(scope="module")
def guest_shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("progshare")
    src = root / "src"
    src.mkdir()
    build_source_tree(src)
    with tarfile.open(root / "src.tar", "w") as tf:
        tf.add(src, arcname="src")
    repo = root / "repo"
    for i in range(GIT_FILES):
        d = repo / f"pkg{i % 40:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"mod{i:04d}.txt").write_text(f"module {i}\n" * (1 + i % 7))
    return root


@pytest.fixture(scope="module")
def pg(
    guest_support: None, guest_shared_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guest]:
    with daemon_and_guest(guest_shared_dir, tmp_path_factory) as (_, g):
        yield g


def _need(guest: Guest, program: str) -> None:
    if guest.run(f"command -v {program}").rc != 0:
        pytest.skip(f"{program} is not in the guest image")


def test_tar_extract_and_create(pg: Guest, guest_shared_dir: Path) -> None:
    pg.run(f"mkdir {MNT}/untar && tar -xf {MNT}/src.tar -C {MNT}/untar").check()
    src, out = guest_shared_dir / "src", guest_shared_dir / "untar" / "src"
    assert tree(out) == tree(src)
    seconds = {k: v // 10**9 * 10**9 for k, v in mtimes(src, symlinks=False).items()}
    assert mtimes(out, symlinks=False) == seconds
    pg.run(f"cd {MNT}/untar && tar -cf {MNT}/again.tar src").check()
    with tarfile.open(guest_shared_dir / "again.tar") as tf:
        names = {m.name for m in tf.getmembers()}
        data = tf.extractfile("src/dir03/inner0/file007.dat")
        assert data is not None
        assert data.read() == (src / "dir03/inner0/file007.dat").read_bytes()
    assert names == {"src", *(f"src/{os.fsdecode(p)}" for p in tree(src))}


def test_cp_a(pg: Guest, guest_shared_dir: Path) -> None:
    pg.run(f"cp -a {MNT}/src {MNT}/cp-copy").check()
    src, out = guest_shared_dir / "src", guest_shared_dir / "cp-copy"
    assert tree(out) == tree(src)
    # busybox cp -a keeps whole seconds (utime(2)).
    seconds = {k: v // 10**9 * 10**9 for k, v in mtimes(src, symlinks=False).items()}
    assert mtimes(out, symlinks=False) == seconds


def test_rsync_a(pg: Guest, guest_shared_dir: Path) -> None:
    _need(pg, "rsync")
    pg.run(f"rsync -aH {MNT}/src/ {MNT}/rsync-copy/", timeout=300).check()
    src, out = guest_shared_dir / "src", guest_shared_dir / "rsync-copy"
    assert tree(out) == tree(src)
    assert mtimes(out, dirs=True) == mtimes(src, dirs=True)
    # Nothing changed, so a second run (size + mtime check) transfers nothing.
    again = pg.run(f"rsync -aH -i {MNT}/src/ {MNT}/rsync-copy/", timeout=300).check()
    assert again.out == ""
    (guest_shared_dir / "src/dir05/inner2/file010.dat").write_bytes(b"changed on the host")
    pg.run("sleep 1.2").check()  # the guest's attribute cache (cache=auto) times out
    third = pg.run(f"rsync -aH -i {MNT}/src/ {MNT}/rsync-copy/", timeout=300).check()
    assert third.out.split() == [">f.st......", "dir05/inner2/file010.dat"]
    assert (out / "dir05/inner2/file010.dat").read_bytes() == b"changed on the host"


def test_git_over_thousands_of_files(pg: Guest, guest_shared_dir: Path) -> None:
    _need(pg, "git")
    git = "git -c user.name=Guest -c user.email=guest@example.invalid"
    res = pg.run(
        f"cd {MNT}/repo && export HOME=/tmp && git init -q && git add -A && "
        f"{git} commit -q -m initial && git status --porcelain && "
        "echo change >> pkg07/mod0007.txt && rm pkg01/mod0001.txt && "
        "echo new > pkg02/new.txt && git status --porcelain && "
        f"git add -A && {git} commit -q -m second && git log --oneline | wc -l && "
        "git fsck --no-progress 2>&1 && git status --porcelain && git count-objects",
        timeout=600,
    ).check()
    lines = res.out.splitlines()
    assert lines[:3] == [" M pkg07/mod0007.txt", " D pkg01/mod0001.txt", "?? pkg02/new.txt"] or (
        sorted(lines[:3])
        == sorted([" M pkg07/mod0007.txt", " D pkg01/mod0001.txt", "?? pkg02/new.txt"])
    )
    assert lines[3] == "2"
    host_git = shutil.which("git")
    if host_git is not None:
        repo = guest_shared_dir / "repo"
        env = {**os.environ, "HOME": str(repo)}
        run = [host_git, "-c", f"safe.directory={repo}", "-C", str(repo)]
        files = subprocess.run(
            [*run, "ls-files"], capture_output=True, text=True, check=True, env=env
        ).stdout.split()
        assert len(files) == GIT_FILES
        status = subprocess.run(
            [*run, "status", "--porcelain"], capture_output=True, text=True, check=True, env=env
        )
        assert status.stdout == ""
        subprocess.run([*run, "fsck", "--no-progress"], check=True, capture_output=True, env=env)


def test_sqlite_two_guest_writers(pg: Guest, guest_shared_dir: Path) -> None:
    _need(pg, "sqlite3")
    db = f"{MNT}/guest.db"
    pg.run(f"sqlite3 {db} 'CREATE TABLE t(who TEXT, n INTEGER)'").check()
    script = (
        "i=0; while [ $i -lt 40 ]; do "
        f"echo \".timeout 20000\nINSERT INTO t VALUES('$1', $i);\" | sqlite3 {db} || exit 1; "
        "i=$((i+1)); done"
    )
    pg.run(f"cat > /tmp/w.sh <<'EOF'\n{script}\nEOF").check()
    pg.run("sh /tmp/w.sh a & sh /tmp/w.sh b & wait %1 && wait %2", timeout=300).check()
    with sqlite3.connect(guest_shared_dir / "guest.db") as conn:
        rows = conn.execute("SELECT who, COUNT(*) FROM t GROUP BY who").fetchall()
        assert rows == [("a", 40), ("b", 40)]
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


@ours_only("the Rust virtiofsd keeps locks guest-local: the host's transaction does not block")
def test_sqlite_host_transaction_blocks_guest(pg: Guest, guest_shared_dir: Path) -> None:
    _need(pg, "sqlite3")
    path = guest_shared_dir / "shared.db"
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE t(n INTEGER)")
    setup.commit()
    setup.close()
    host = sqlite3.connect(path, isolation_level=None)
    try:
        host.execute("BEGIN EXCLUSIVE")
        host.execute("INSERT INTO t VALUES (1)")
        res = pg.run(f"sqlite3 {MNT}/shared.db 'INSERT INTO t VALUES (2)'")
        assert res.rc != 0
        assert "locked" in res.err
        host.execute("COMMIT")
    finally:
        host.close()
    pg.run(f"sqlite3 {MNT}/shared.db 'INSERT INTO t VALUES (3)'").check()
    with sqlite3.connect(path) as conn:
        assert sorted(r[0] for r in conn.execute("SELECT n FROM t")) == [1, 3]
    conn.close()


PY_SCRIPT = r"""
import hashlib, os, sys
root = sys.argv[1]
for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
        p = os.path.join(dirpath, name)
        if os.path.islink(p):
            continue
        with open(p, "rb") as f:
            print(hashlib.sha256(f.read()).hexdigest(), os.path.relpath(p, root))
fd = os.open(os.path.join(root, "..", "py-out"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
os.write(fd, b"written by python\n")
os.fsync(fd)
os.close(fd)
os.replace(os.path.join(root, "..", "py-out"), os.path.join(root, "..", "py-final"))
"""


def test_python3_script(pg: Guest, guest_shared_dir: Path) -> None:
    _need(pg, "python3")
    pg.run(f"cat > /tmp/walk.py <<'EOF'\n{PY_SCRIPT}\nEOF").check()
    out = pg.run(f"python3 /tmp/walk.py {MNT}/src", timeout=300).check().out
    src = guest_shared_dir / "src"
    expected = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not p.is_symlink():
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                expected.append(f"{digest} {p.relative_to(src)}")
    assert out.splitlines() == expected
    final = guest_shared_dir / "py-final"
    assert final.read_bytes() == b"written by python\n"
    assert final.stat().st_mode & 0o777 == 0o640
    assert not (guest_shared_dir / "py-out").exists()
