"""``virtiofsd-py inspect-state FILE``: a saved device state, for humans.

For debugging failed migrations: the destination keeps a state it could not
load and names the file in its log; this prints what it holds (session,
inodes with their paths and file handles, open handles, locks).
"""

from __future__ import annotations

import stat
import sys
from typing import Any

from virtiofsd_py.migration.envelope import StateError, decode


def _name(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return "-" if value is None else str(value)


def describe(doc: dict[str, Any]) -> str:
    out: list[str] = []
    src = doc.get("source", {})
    out.append(f"format {doc['format']} version {doc['version']}")
    out.append(
        f"source: host {src.get('host')} pid {src.get('pid')} shared dir {src.get('shared_dir')}"
    )
    fuse = doc.get("fuse")
    if fuse:
        out.append(
            f"FUSE session: {fuse.get('major')}.{fuse.get('minor')} flags {fuse.get('flags', 0):#x}"
            f" max_write {fuse.get('max_write')}"
        )
    else:
        out.append("FUSE session: none (guest had not mounted)")
    fs = doc["fs"]
    inodes = fs.get("inodes", [])
    handles = fs.get("handles", [])
    locks = fs.get("locks", [])
    counts = f"{len(inodes)} inodes, {len(handles)} handles, {len(locks)} locks"
    out.append(f"backend {fs.get('kind')}: {counts}")
    out.append(
        f"{'node':>8} {'lookups':>8} {'type':4} {'dev:ino':>20}  path / parent+name / handle"
    )
    for ino in inodes:
        key = ino.get("key") or [0, 0, 0]
        kind = stat.filemode(ino.get("mode", 0))[0]
        where = ino.get("path")
        where = (
            _name(where) if where is not None else f"{ino.get('parent')}/{_name(ino.get('name'))}"
        )
        if ino.get("handle"):
            where += "  [file handle]"
        if ino.get("unlinked"):
            where += "  (unlinked)"
        out.append(
            f"{ino.get('id'):>8} {ino.get('lookups'):>8} {kind:4} {key[0]:>10}:{key[1]:<9}  {where}"
        )
    for h in handles:
        out.append(f"handle {h.get('fh')}: node {h.get('inode')} flags {h.get('flags', 0):#o}")
    for lk in locks:
        out.append(
            f"lock node {lk.get('inode')} owner {lk.get('owner'):#x} type {lk.get('type')}"
            f" [{lk.get('start')}, {lk.get('end')}]{' flock' if lk.get('flock') else ''}"
        )
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
