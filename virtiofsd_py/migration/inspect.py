"""``virtiofsd-py inspect-state FILE``: a saved device state, for humans.

For debugging failed migrations: the destination keeps a state it could not
load and names the file in its log; this prints what it holds (session,
inodes with their paths and file handles, open handles, locks), or, for a
state that cannot even be decoded, what is wrong with it.
"""

from __future__ import annotations

import stat
import sys

from virtiofsd_py.migration.envelope import FORMAT, VERSION, Envelope, StateError, decode


def _name(value: bytes | str | int | float | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return "-" if value is None else str(value)


def describe(env: Envelope) -> str:
    out: list[str] = []
    src = env.source
    out.append(f"format {FORMAT} version {VERSION}")
    out.append(
        f"source: host {_name(src.host)} pid {_name(src.pid)} shared dir {_name(src.shared_dir)}"
    )
    fuse = env.fuse
    if fuse is not None:
        out.append(
            f"FUSE session: {fuse.major}.{fuse.minor} flags {fuse.flags:#x}"
            f" max_write {fuse.max_write}"
        )
    else:
        out.append("FUSE session: none (guest had not mounted)")
    fs = env.fs
    counts = f"{len(fs.inodes)} inodes, {len(fs.handles)} handles, {len(fs.locks)} locks"
    out.append(f"backend passthrough: {counts}")
    out.append(
        f"{'node':>8} {'lookups':>8} {'type':4} {'dev:ino':>20}  path / parent+name / handle"
    )
    for ino in fs.inodes:
        dev, inum = ino.key[:2] if ino.key is not None else ("-", "-")
        kind = stat.filemode(ino.mode)[0]
        where = _name(ino.path) if ino.path is not None else f"{ino.parent}/{_name(ino.name)}"
        if ino.handle is not None:
            where += "  [file handle]"
        if ino.unlinked:
            where += "  (unlinked)"
        out.append(f"{ino.id:>8} {ino.lookups:>8} {kind:4} {dev:>10}:{inum:<9}  {where}")
    for h in fs.handles:
        out.append(f"handle {h.fh}: node {h.inode} flags {h.flags:#o}")
    for lk in fs.locks:
        out.append(
            f"lock node {lk.inode} owner {lk.owner:#x} type {lk.type}"
            f" [{lk.start}, {lk.end}]{' flock' if lk.flock else ''}"
        )
    for reason in fs.skipped_locks:
        out.append(f"lock left out: {reason}")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: virtiofsd-py inspect-state FILE", file=sys.stderr)
        return 2
    try:
        with open(argv[0], "rb") as f:
            data = f.read()
        print(describe(decode(data)))
    except (OSError, StateError) as e:
        print(f"virtiofsd-py inspect-state: {e}", file=sys.stderr)
        return 1
    return 0
