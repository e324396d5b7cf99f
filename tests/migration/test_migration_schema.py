"""The passthrough tables' schema on its own: one decoder, one encoder.

What a broken field costs (the whole load, one node, one lock) is the
decoder's promise to the loader; the load-level tests (test_migration_state,
test_migration_deferred) check what the guest then sees.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import msgpack
import pytest

from virtiofsd_py.fs.passthrough.migration import schema
from virtiofsd_py.fs.passthrough.migration.schema import MigrationError

FIXTURE = Path(__file__).parent / "fixtures" / "v1_state.msgpack"


def raw_tables() -> dict[str, Any]:
    tables: dict[str, Any] = msgpack.unpackb(FIXTURE.read_bytes(), raw=False)["fs"]
    return tables


def inode(tables: dict[str, Any], nodeid: int) -> dict[str, Any]:
    found: dict[str, Any] = next(i for i in tables["inodes"] if i["id"] == nodeid)
    return found


def test_encode_writes_what_decode_read() -> None:
    raw = raw_tables()
    state = schema.decode(raw)
    wire = msgpack.packb(schema.encode(state), use_bin_type=True)
    assert wire == msgpack.packb(raw, use_bin_type=True)  # the old code's bytes, to the byte
    assert schema.decode(msgpack.unpackb(wire, raw=False)) == state


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.update(kind="memory"), "'memory' backend"),
        (lambda t: t.update(handles={}), "field 'handles'"),
        (lambda t: t.update(locks=5), "locks is not a list"),
        (lambda t: t["inodes"].append(7), "inode: not a map"),
        (lambda t: inode(t, 2).update(id=True), "field 'id'"),
        (lambda t: inode(t, 2).update(id=1 << 63), "invalid or repeated"),
        (lambda t: inode(t, 3).update(mode=1 << 32), "inode 3: mode or lookups"),
        (lambda t: inode(t, 3).update(lookups=None), "inode 3: mode or lookups"),
        (lambda t: t["handles"][0].update(fh=0), "handle 0 is invalid"),
        (lambda t: t["handles"][0].update(inode=99), "unknown inode 99"),
        (lambda t: t["handles"][0].pop("flags"), "handle 1: field 'flags'"),
    ],
)
def test_what_breaks_the_whole_state(mutate: Any, message: str) -> None:
    raw = raw_tables()
    mutate(raw)
    with pytest.raises(MigrationError, match=message):
        schema.decode(raw)


def test_what_breaks_one_node_is_normalised() -> None:
    raw = raw_tables()
    inode(raw, 5).update(path="a str", handle=b"", key=[1, 2], lookups=-3)
    inode(raw, 6).update(parent=999, name=b"sibling.txt")
    inode(raw, 2).update(parent=4)  # a -> c -> b -> a: a cycle
    inode(raw, 7).update(name=["x"])
    state = schema.decode(raw)
    by_id = {i.id: i for i in state.inodes}
    five = by_id[5]
    assert (five.path, five.handle, five.key, five.lookups) == (None, None, None, 0)
    assert (by_id[6].parent, by_id[6].name) == (1, b"")
    assert (by_id[2].parent, by_id[2].name) == (1, b"")  # the first node of the cycle
    assert (by_id[3].parent, by_id[4].parent) == (2, 3)  # the rest hang off it again
    assert by_id[7].name == b""


def test_bad_locks_are_left_out_with_a_reason() -> None:
    raw = raw_tables()
    good = copy.deepcopy(raw["locks"])
    raw["locks"] += ["nope", {**good[0], "type": 7}, {**good[0], "start": 10, "end": 2}]
    raw["locks"].append({**good[0], "owner": "x"})
    state = schema.decode(raw)
    assert len(state.locks) == len(good)
    assert state.skipped_locks == (
        "lock: not a map",
        f"invalid lock on inode {good[0]['inode']}",
        f"invalid lock on inode {good[0]['inode']}",
        "lock: field 'owner' missing or of the wrong type",
    )


def test_fields_only_for_humans_or_counters_never_refuse() -> None:
    raw = raw_tables()
    raw.update(host=b"bytes", root_key="x", next_nodeid=None, next_fh=[1])
    raw.pop("locks")
    state = schema.decode(raw)
    assert (state.host, state.root_key, state.next_nodeid, state.next_fh) == (None, None, 0, 0)
    assert state.locks == ()
