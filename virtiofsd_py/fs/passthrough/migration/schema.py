"""The passthrough backend's tables as they travel: typed, one decoder, one encoder.

The ``fs`` map of a device state (docs/migration-format.md, "fs: the
passthrough backend"), version 1 of the envelope (the version lives there:
virtiofsd_py/migration/envelope.py; a change that today's ``decode`` could
not read is a new envelope version).  ``decode`` is the one place that looks
at the plain data msgpack gives; everything after it works on these types.
The tables are a frozen dataclass, their entries NamedTuples: as immutable,
and a third of the cost to make, which counts here because the source's
save and the destination's load each make one per inode while the guest is
stopped.

``decode`` sorts what is wrong with a state by what it breaks:

* the whole state (``MigrationError``, the load fails whatever
  ``--migration-on-error`` says): not the passthrough's tables; ``inodes`` or
  ``handles`` not a list, ``locks`` neither absent nor a list; an inode that
  is not a map, whose id is not an int above the root's and below 2^63 or is
  repeated, whose mode is not a u32 or lookups not an int; a handle that is
  not a map, whose fh, inode or flags is not an int, whose fh is not in
  (0, 2^63), or whose inode is not in the state.
* one node (normalised here, the loader then fails that node alone): a
  ``path`` or ``handle`` of the wrong type is absent, a ``key`` that is not
  three ints is no identity (such a node fails the identity check where one
  is made); a parent that is not an inode of the state, or a parent chain
  that never reaches the root (a cycle), puts the node under the root with
  no name; negative lookups are 0.
* one lock: one that is not well formed is left out, and why is kept in
  ``skipped_locks`` (the loader logs it; the other locks are re-taken).
* nothing: counters of the wrong type are 0 (the tables then start past the
  largest id they hold); ``host`` or ``root_key`` of the wrong type are
  absent (the state is then not from this host and file system).
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from virtiofsd_py.fs.api import ROOT_ID
from virtiofsd_py.fs.passthrough.inodes import InodeKey

#: ``kind`` of the passthrough backend's tables.
KIND: Final = "passthrough"
_U32: Final = 0xFFFF_FFFF
_ID_LIMIT: Final = 1 << 63


class MigrationError(ValueError):
    """A state that cannot be loaded (or a node that cannot be found); says why."""


class InodeState(NamedTuple):
    """One node the guest knows (the root excluded)."""

    id: int
    lookups: int
    mode: int
    #: The source's (st_dev, st_ino, mount id); None: the state gave none.
    key: InodeKey | None
    #: The root or another node of the state, never a cycle (``decode`` sees to it).
    parent: int
    name: bytes
    #: Relative to the share, as the source confirmed it; None: none known.
    path: bytes | None
    #: ``struct file_handle`` (header included); None: none sent.
    handle: bytes | None
    unlinked: bool


class HandleState(NamedTuple):
    """One open file or directory: the guest's fh and the open(2) flags."""

    fh: int
    inode: int
    flags: int


class LockState(NamedTuple):
    """One lock the guest holds; ``owner`` is the fh for a flock(2) lock."""

    inode: int
    owner: int
    type: int
    start: int
    end: int
    flock: bool


@dataclass(frozen=True, slots=True)
class PassthroughState:
    """The passthrough backend's tables (``kind`` "passthrough")."""

    #: The source's host name, and its share's (st_dev, st_ino, mount id): when
    #: both are the destination's, node keys and file handles still name the
    #: same inodes.
    host: str | None
    root_key: InodeKey | None
    next_nodeid: int
    next_fh: int
    inodes: tuple[InodeState, ...]
    handles: tuple[HandleState, ...]
    locks: tuple[LockState, ...]
    #: Why entries of the state's lock list were left out of ``locks``.
    skipped_locks: tuple[str, ...] = ()


# -- decoding ------------------------------------------------------------------------------
def decode(raw: object) -> PassthroughState:
    """The tables in ``raw`` (the ``fs`` map, as msgpack decoded it), checked."""
    if type(raw) is not dict:
        raise MigrationError("state: the backend tables are not a map")
    if raw.get("kind") != KIND:
        raise MigrationError(f"state of a {raw.get('kind')!r} backend, not passthrough")
    raw_inodes = _field(raw, "inodes", list, "state")
    raw_handles = _field(raw, "handles", list, "state")
    raw_locks = raw.get("locks", [])
    if type(raw_locks) is not list:
        raise MigrationError("state: locks is not a list")
    inodes, ids = _inodes(raw_inodes)
    locks, skipped = _locks(raw_locks)
    return PassthroughState(
        host=_typed(raw.get("host"), str),
        root_key=_key(raw.get("root_key")),
        next_nodeid=_int_or_zero(raw.get("next_nodeid")),
        next_fh=_int_or_zero(raw.get("next_fh")),
        inodes=inodes,
        handles=tuple(_handle(d, ids) for d in raw_handles),
        locks=locks,
        skipped_locks=skipped,
    )


def _field(d: Any, key: str, kind: type, what: str) -> Any:
    """``d[key]``, of exactly type ``kind`` (an int is never a bool here)."""
    value = d.get(key) if type(d) is dict else None
    if type(value) is kind:
        return value
    raise _wrong(d, key, what)


def _wrong(d: object, key: str, what: str) -> MigrationError:
    if type(d) is not dict:
        return MigrationError(f"{what}: not a map")
    return MigrationError(f"{what}: field {key!r} missing or of the wrong type")


def _typed(value: object, kind: type[Any]) -> Any:
    return value if type(value) is kind else None


def _int_or_zero(value: object) -> int:
    return value if type(value) is int else 0


def _key(value: object) -> InodeKey | None:
    if type(value) is list and len(value) == 3:
        dev, ino, mnt = value
        if type(dev) is type(ino) is type(mnt) is int:
            return dev, ino, mnt
    return None


def _inodes(raw: list[Any]) -> tuple[tuple[InodeState, ...], set[int]]:
    # One pass for the ids (a parent may come after its children), one that
    # makes the entries: this runs once per inode while the guest is stopped.
    ids: set[int] = set()
    for d in raw:
        nodeid = d.get("id") if type(d) is dict else None
        if type(nodeid) is not int:
            raise _wrong(d, "id", "inode")
        if nodeid <= ROOT_ID or nodeid in ids or nodeid >= _ID_LIMIT:
            raise MigrationError(f"inode id {nodeid} is invalid or repeated")
        ids.add(nodeid)
    out: list[InodeState] = []
    parents: dict[int, int] = {}
    #: Nodes to put under the root with no name.
    loose: set[int] = set()
    for d in raw:
        get = d.get
        nodeid = d["id"]
        mode = get("mode")
        lookups = get("lookups")
        if type(mode) is not int or type(lookups) is not int or not 0 <= mode <= _U32:
            raise MigrationError(f"inode {nodeid}: mode or lookups missing or out of range")
        parent = get("parent")
        if type(parent) is not int or (parent not in ids and parent != ROOT_ID):
            parent = ROOT_ID
            loose.add(nodeid)
        parents[nodeid] = parent
        key = get("key")
        if type(key) is list and len(key) == 3:
            dev, ino, mnt = key
            key = (dev, ino, mnt) if type(dev) is type(ino) is type(mnt) is int else None
        else:
            key = None
        name = get("name")
        path = get("path")
        handle = get("handle")
        out.append(
            InodeState(
                nodeid,
                lookups if lookups > 0 else 0,
                mode,
                key,
                parent,
                name if type(name) is bytes else b"",
                path if type(path) is bytes else None,
                handle if type(handle) is bytes and handle else None,
                get("unlinked") is True,
            )
        )
    _break_cycles(parents, loose)
    if loose:  # a hostile or broken state
        out = [i._replace(parent=ROOT_ID, name=b"") if i.id in loose else i for i in out]
    return tuple(out), ids


def _break_cycles(parents: dict[int, int], loose: set[int]) -> None:
    """Put under the root each node, in the state's order, whose parent chain
    comes back to a node of it before it reaches the root.

    A walk that reaches the root, or comes back to its own start (now under
    the root), leaves every node it passed reaching the root: later walks
    stop there.
    """
    rooted = {ROOT_ID}
    for nodeid in parents:
        seen = {nodeid}
        cur = parents[nodeid]
        while cur not in rooted:
            if cur in seen:
                parents[nodeid] = ROOT_ID
                loose.add(nodeid)
                if cur != nodeid:  # it led into a cycle that it is not part of
                    seen = {nodeid}
                break
            seen.add(cur)
            cur = parents[cur]
        rooted |= seen


def _handle(d: Any, ids: set[int]) -> HandleState:
    fh = _field(d, "fh", int, "handle")
    nodeid = _field(d, "inode", int, f"handle {fh}")
    flags = _field(d, "flags", int, f"handle {fh}")
    if fh <= 0 or fh >= _ID_LIMIT:
        raise MigrationError(f"handle {fh} is invalid")
    if nodeid not in ids:
        raise MigrationError(f"handle {fh} refers to unknown inode {nodeid}")
    return HandleState(fh, nodeid, flags)


def _locks(raw: list[Any]) -> tuple[tuple[LockState, ...], tuple[str, ...]]:
    locks: list[LockState] = []
    skipped: list[str] = []
    for d in raw:
        try:
            nodeid = _field(d, "inode", int, "lock")
            owner = _field(d, "owner", int, "lock")
            ltype = _field(d, "type", int, "lock")
            start = _field(d, "start", int, "lock")
            end = _field(d, "end", int, "lock")
        except MigrationError as e:
            skipped.append(str(e))
            continue
        if ltype not in (fcntl.F_RDLCK, fcntl.F_WRLCK) or not 0 <= start <= end:
            skipped.append(f"invalid lock on inode {nodeid}")
            continue
        locks.append(LockState(nodeid, owner, ltype, start, end, bool(d.get("flock"))))
    return tuple(locks), tuple(skipped)


# -- encoding ------------------------------------------------------------------------------
def encode(state: PassthroughState) -> dict[str, Any]:
    """``state`` as the plain data ``decode`` reads (for msgpack, which writes a
    tuple as the array a key is)."""
    return {
        "kind": KIND,
        "host": state.host,
        "root_key": state.root_key,
        "next_nodeid": state.next_nodeid,
        "next_fh": state.next_fh,
        "inodes": [
            {
                "id": i.id,
                "gen": 0,
                "lookups": i.lookups,
                "mode": i.mode,
                "key": i.key,
                "parent": i.parent,
                "name": i.name,
                "path": i.path,
                "handle": i.handle,
                "unlinked": i.unlinked,
            }
            for i in state.inodes
        ],
        "handles": [{"fh": h.fh, "inode": h.inode, "flags": h.flags} for h in state.handles],
        "locks": [
            {
                "inode": lk.inode,
                "owner": lk.owner,
                "type": lk.type,
                "start": lk.start,
                "end": lk.end,
                "flock": lk.flock,
            }
            for lk in state.locks
        ],
    }
