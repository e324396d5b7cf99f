"""``--translate-uid`` / ``--translate-gid``: map ids between guest and host.

Syntax (Rust virtiofsd ``soft_idmap/cmdline.rs``): a type, then numbers,
each field after a separator (any character that is not alphanumeric, ``-``
or ``_``; ``:`` in practice), one mapping per option::

    guest:FROM_GUEST:TO_HOST:COUNT         guest range -> host range (requests)
    host:FROM_HOST:TO_GUEST:COUNT          host range -> guest range (replies)
    squash-guest:FROM_GUEST:TO_HOST:COUNT  guest range -> one host id
    squash-host:FROM_HOST:TO_GUEST:COUNT   host range -> one guest id
    map:GUEST:HOST:COUNT                   both directions, 1:1
    forbid-guest:FROM_GUEST:COUNT          requests with these guest ids: EPERM

Ids no mapping covers map to themselves.  Ranges of one direction must not
overlap.  Guest ids are translated to host ids for the credentials a request
runs with and for SETATTR's uid/gid; host ids to guest ids in every
attribute reply.
"""

from __future__ import annotations

import bisect
import errno
from dataclasses import dataclass, field
from typing import Final

_TYPES: Final = {
    "guest": 3,
    "host": 3,
    "squash-guest": 3,
    "squash-host": 3,
    "map": 3,
    "forbid-guest": 2,
}
_ID_MAX: Final = 1 << 32


class IdMapError(ValueError):
    """An id mapping that does not parse or overlaps another."""


@dataclass(frozen=True, slots=True)
class _Entry:
    start: int
    end: int  # exclusive
    kind: str  # "range", "squash", "fail"
    to: int = 0

    def apply(self, ident: int) -> int:
        if self.kind == "range":
            return self.to + (ident - self.start)
        if self.kind == "squash":
            return self.to
        raise OSError(errno.EPERM, f"use of guest id {ident} is forbidden (--translate-*)")


@dataclass(slots=True)
class _RangeMap:
    starts: list[int] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)

    def add(self, e: _Entry, spec: str) -> None:
        if e.end > _ID_MAX or e.start >= e.end:
            raise IdMapError(f"{spec}: empty range or ids beyond 2^32-1")
        i = bisect.bisect_right(self.starts, e.start)
        if (i > 0 and self.entries[i - 1].end > e.start) or (
            i < len(self.entries) and self.entries[i].start < e.end
        ):
            raise IdMapError(f"{spec}: overlaps an earlier mapping")
        self.starts.insert(i, e.start)
        self.entries.insert(i, e)

    def map(self, ident: int) -> int:
        i = bisect.bisect_right(self.starts, ident) - 1
        if i >= 0 and ident < self.entries[i].end:
            return self.entries[i].apply(ident)
        return ident


def parse_one(spec: str) -> tuple[str, list[int]]:
    """Split one mapping into its type and numbers (IdMapError if malformed)."""
    i = 0
    while i < len(spec) and (spec[i].isalnum() or spec[i] in "-_"):
        i += 1
    kind = spec[:i].lower()
    if i == len(spec):
        raise IdMapError(f"{spec!r}: expected TYPE:numbers")
    if kind not in _TYPES:
        raise IdMapError(f"{spec!r}: unknown type {kind!r} (one of {', '.join(_TYPES)})")
    parts = spec[i + 1 :].split(spec[i])
    try:
        nums = [int(p, 10) for p in parts]
    except ValueError:
        raise IdMapError(f"{spec!r}: the fields after the type must be numbers") from None
    if len(nums) != _TYPES[kind] or any(not 0 <= n < _ID_MAX for n in nums):
        raise IdMapError(f"{spec!r}: {kind} takes {_TYPES[kind]} numbers in 0..2^32-1")
    return kind, nums


class IdMap:
    """Translation of one kind of id (uids or gids); empty means identity."""

    def __init__(self, specs: list[str] | tuple[str, ...] = ()) -> None:
        self.specs = tuple(specs)
        self._g2h = _RangeMap()
        self._h2g = _RangeMap()
        for spec in specs:
            kind, n = parse_one(spec)
            if kind == "guest":
                self._g2h.add(_Entry(n[0], n[0] + n[2], "range", n[1]), spec)
            elif kind == "host":
                self._h2g.add(_Entry(n[0], n[0] + n[2], "range", n[1]), spec)
            elif kind == "squash-guest":
                self._g2h.add(_Entry(n[0], n[0] + n[2], "squash", n[1]), spec)
            elif kind == "squash-host":
                self._h2g.add(_Entry(n[0], n[0] + n[2], "squash", n[1]), spec)
            elif kind == "map":
                self._g2h.add(_Entry(n[0], n[0] + n[2], "range", n[1]), spec)
                self._h2g.add(_Entry(n[1], n[1] + n[2], "range", n[0]), spec)
            else:
                self._g2h.add(_Entry(n[0], n[0] + n[1], "fail"), spec)

    def __bool__(self) -> bool:
        return bool(self.specs)

    def to_host(self, guest_id: int) -> int:
        """Host id for a guest id; EPERM for a forbidden one."""
        return self._g2h.map(guest_id)

    def to_guest(self, host_id: int) -> int:
        return self._h2g.map(host_id)
