"""Migration-state benchmark: size and save/load time of the passthrough tables.

A tree of N regular files (100 per directory) is looked up through the
Filesystem API of one PassthroughFS (the source), so its inode table holds
N + N/100 nodes; ``StateProvider.save`` serialises it and a second
PassthroughFS on the same directory (the destination) ``load``\\ s it, finding
every inode again (virtiofsd_py/migration/envelope.py, docs/migration-format.md).

Each size runs twice: nodes held as O_PATH fds (the default; skipped when
RLIMIT_NOFILE cannot hold one fd per inode -- the 100k row on a machine whose
hard limit is 20000) and nodes held as file handles
(``--inode-file-handles=prefer``, no fd per inode: every size fits).

Measured: the state's size; ``prepare`` (the paths worked out when LOG_ALL
is turned on, while the guest still runs); ``save`` after preparation (the
switch-over part on the source) and ``save`` cold (nothing prepared); and
``load`` on the destination.
"""

from __future__ import annotations

import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.micro import new_workdir
from virtiofsd_py.fs.api import Context
from virtiofsd_py.fs.passthrough.file_handles import InodeFileHandles
from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.fs.passthrough.migration.migratable import PassthroughMigration
from virtiofsd_py.fuse.dispatcher import Dispatcher
from virtiofsd_py.migration.envelope import StateProvider

CTX = Context(0, 0, 1)
PER_DIR = 100


class TooManyFiles(Exception):
    """The fd limit cannot hold that many inodes (the daemon would hit it too)."""


@dataclass
class MigResult:
    inodes: int
    #: "fds" or "handles" (--inode-file-handles=prefer on source and destination).
    nodes: str
    state_bytes: int
    lookup_s: float
    prepare_s: float
    save_s: float
    save_cold_s: float
    load_s: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    # Raising the hard limit needs CAP_SYS_RESOURCE; without it take what we can.
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(need, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if hard < need:
            raise TooManyFiles(f"need {need} fds, RLIMIT_NOFILE hard limit is {hard}") from None


def make_tree(root: Path, files: int) -> None:
    for d in range((files + PER_DIR - 1) // PER_DIR):
        sub = root / f"d{d:05d}"
        sub.mkdir()
        for i in range(min(PER_DIR, files - d * PER_DIR)):
            (sub / f"f{i:03d}").touch()


def _wait_prepared(migration: PassthroughMigration) -> None:
    """Join the preparation thread (an implementation detail: fine for a benchmark)."""
    prep = migration.preparer
    thread = prep._thread if prep is not None else None
    if thread is not None:
        thread.join()


def measure(files: int, workdir: Path, handles: bool = False) -> MigResult:
    share = workdir / f"tree-{files}-{'handles' if handles else 'fds'}"
    mode: InodeFileHandles = "prefer" if handles else "never"
    if not handles:
        # Source and destination each hold one O_PATH fd per inode; they live one
        # after the other so that the fd limit needs to cover only one of them.
        _raise_nofile(files + files // PER_DIR + 1000)
    share.mkdir()
    make_tree(share, files)
    src = PassthroughFS(PassthroughConfig(share, inode_file_handles=mode))
    if handles and not src.file_handles.enabled:
        src.close()
        shutil.rmtree(share, ignore_errors=True)
        raise TooManyFiles("this file system or process cannot use file handles")
    try:
        t = time.monotonic()
        for dname in sorted(p.name for p in share.iterdir()):
            d = src.lookup(CTX, 1, dname.encode()).nodeid
            for f in range(min(PER_DIR, files - int(dname[1:]) * PER_DIR)):
                src.lookup(CTX, d, f"f{f:03d}".encode())
        lookup_s = time.monotonic() - t
        src_migration = PassthroughMigration(src)
        src_state = StateProvider(Dispatcher(src), src_migration, str(share))
        t = time.monotonic()
        data = src_state.save()
        save_cold_s = time.monotonic() - t
        t = time.monotonic()
        src_state.log_all_changed(True)
        _wait_prepared(src_migration)
        prepare_s = time.monotonic() - t
        t = time.monotonic()
        data = src_state.save()
        save_s = time.monotonic() - t
        src_state.log_all_changed(False)
    finally:
        src.close()
    dst = PassthroughFS(PassthroughConfig(share, inode_file_handles=mode))
    try:
        dst_state = StateProvider(Dispatcher(dst), PassthroughMigration(dst), str(share))
        t = time.monotonic()
        dst_state.load(data)
        load_s = time.monotonic() - t
    finally:
        dst.close()
        shutil.rmtree(share, ignore_errors=True)
    inodes = files + files // PER_DIR
    nodes = "handles" if handles else "fds"
    return MigResult(inodes, nodes, len(data), lookup_s, prepare_s, save_s, save_cold_s, load_s)


def run_migstate(
    sizes: Sequence[int] = (10_000, 100_000), *, log: Callable[[str], None] = print
) -> list[MigResult]:
    out = []
    workdir = new_workdir("vfb-mig-")
    try:
        for n in sizes:
            for handles in (False, True):
                what = f"{n} files, nodes as {'handles' if handles else 'fds'}"
                try:
                    r = measure(n, workdir, handles)
                except TooManyFiles as e:
                    log(f"  migration state {what}: skipped: {e}")
                    continue
                log(f"  migration state {what}: {r.state_bytes} bytes")
                out.append(r)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def mig_table(results: list[MigResult]) -> tuple[list[str], list[list[object]]]:
    headers = [
        "inodes", "nodes", "state KiB", "B/inode", "lookup s", "prepare s", "save s", "save cold s",
        "load s", "load us/inode",
    ]  # fmt: skip
    rows: list[list[object]] = [
        [
            r.inodes,
            r.nodes,
            r.state_bytes / 1024,
            r.state_bytes / r.inodes,
            r.lookup_s,
            r.prepare_s,
            r.save_s,
            r.save_cold_s,
            r.load_s,
            1e6 * r.load_s / r.inodes,
        ]
        for r in results
    ]
    return headers, rows
