"""Parsers of --xattrmap and --translate-uid/-gid (Rust virtiofsd syntax)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtiofsd_py.fs.passthrough.idmap import IdMap, IdMapError
from virtiofsd_py.fs.passthrough.xattrmap import Rule, XattrMap, XattrMapError, parse

# -- xattrmap ----------------------------------------------------------------------------------


def test_single_rule_and_any_separator() -> None:
    assert parse(":prefix:client:trusted.:user.virtiofs.:") == (
        Rule("prefix", True, False, b"trusted.", b"user.virtiofs."),
    )
    assert parse("/ok/server//security./") == (Rule("ok", False, True, b"", b"security."),)


def test_several_rules_with_white_space_between() -> None:
    rules = parse(
        """/prefix/all/trusted./user.virtiofs./
           /bad/server//trusted./
           /bad/client/user.virtiofs.//
           /ok/all///"""
    )
    assert [r.type for r in rules] == ["prefix", "bad", "bad", "ok"]
    assert [(r.client, r.server) for r in rules] == [
        (True, True),
        (False, True),
        (True, False),
        (True, True),
    ]


def test_map_expands() -> None:
    assert parse(":map:trusted.:user.virtiofs.:") == (
        Rule("prefix", True, True, b"trusted.", b"user.virtiofs."),
        Rule("bad", True, True, b"user.virtiofs.", b"trusted."),
        Rule("ok", True, True, b"", b""),
    )
    assert parse(":ok:client:user.:: :map::user.virtiofs.:")[1:] == (
        Rule("prefix", True, True, b"", b"user.virtiofs."),
        Rule("bad", True, True, b"", b""),
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "no rules"),
        ("   ", "no rules"),
        (":prefix:client:trusted.:", "incomplete"),
        (":nope:all:::", "type 'nope'"),
        (":ok:everyone:::", "scope 'everyone'"),
        (":map::user.:  :ok:all:::", "last rule"),
        (":ok:all::: ok:all:::", "separator"),
    ],
)
def test_bad_maps_are_refused(text: str, needle: str) -> None:
    with pytest.raises(XattrMapError, match=needle):
        parse(text)


def test_client_and_server_directions() -> None:
    m = XattrMap(
        ":prefix:all:trusted.:user.virtiofs.: :bad:server::trusted.:"
        " :bad:client:user.virtiofs.:: :unsupported:all:security.selinux:security.selinux:"
        " :ok:all:::"
    )
    assert m.to_host(b"trusted.overlay.x") == b"user.virtiofs.trusted.overlay.x"
    assert m.to_host(b"user.foo") == b"user.foo"
    with pytest.raises(OSError) as ei:
        m.to_host(b"user.virtiofs.trusted.x")
    assert ei.value.errno == errno.EPERM
    with pytest.raises(OSError) as ei:
        m.to_host(b"security.selinux")
    assert ei.value.errno == errno.ENOTSUP
    assert m.to_guest(b"user.virtiofs.trusted.overlay.x") == b"trusted.overlay.x"
    assert m.to_guest(b"trusted.host") is None  # hidden
    assert m.to_guest(b"security.selinux") is None
    assert m.to_guest(b"user.foo") == b"user.foo"


def test_no_matching_rule_refuses_and_hides() -> None:
    m = XattrMap(":ok:client:user.:: :ok:server::user.:")
    with pytest.raises(OSError) as ei:
        m.to_host(b"trusted.x")
    assert ei.value.errno == errno.EPERM
    assert m.to_guest(b"trusted.x") is None


@given(st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b))
def test_map_all_round_trips(name: bytes) -> None:
    m = XattrMap(":map::user.virtiofs.:")
    host = m.to_host(name)
    assert host == b"user.virtiofs." + name
    assert m.to_guest(host) == name


# -- id maps -------------------------------------------------------------------------------------


def test_identity_when_empty() -> None:
    m = IdMap()
    assert not m and m.to_host(1234) == 1234 and m.to_guest(0) == 0


def test_every_type() -> None:
    m = IdMap(
        [
            "guest:1000:5000:10",
            "host:7000:2000:5",
            "squash-guest:100:99:10",
            "squash-host:0:65534:1",
            "forbid-guest:666:2",
        ]
    )
    assert m.to_host(1000) == 5000 and m.to_host(1009) == 5009 and m.to_host(1010) == 1010
    assert m.to_guest(5000) == 5000  # guest: only guest -> host
    assert m.to_guest(7004) == 2004 and m.to_guest(7005) == 7005
    assert m.to_host(105) == 99 and m.to_host(110) == 110
    assert m.to_guest(0) == 65534 and m.to_guest(1) == 1
    for forbidden in (666, 667):
        with pytest.raises(OSError) as ei:
            m.to_host(forbidden)
        assert ei.value.errno == errno.EPERM
    assert m.to_host(668) == 668


def test_map_is_bidirectional_and_separator_is_free() -> None:
    m = IdMap(["map/1000/100000/65536"])
    assert m.to_host(1001) == 100001 and m.to_guest(100001) == 1001


@pytest.mark.parametrize(
    "spec",
    [
        "guest:1:2",
        "guest:1:2:3:4",
        "forbid-guest:1:2:3",
        "bogus:1:2:3",
        "guest:a:2:3",
        "guest",
        "guest:1:2:0",
        "guest:4294967295:0:2",
        "guest:-1:2:3",
    ],
)
def test_malformed_specs(spec: str) -> None:
    with pytest.raises(IdMapError):
        IdMap([spec])


def test_overlapping_ranges_are_refused() -> None:
    with pytest.raises(IdMapError, match="overlaps"):
        IdMap(["guest:0:1000:10", "squash-guest:5:1:1"])
    IdMap(["guest:0:1000:10", "host:0:1000:10"])  # other direction: fine
    with pytest.raises(IdMapError, match="overlaps"):
        IdMap(["map:0:1000:10", "host:1005:0:1"])


# -- file handle syscalls (groundwork for --inode-file-handles) --------------------------------


def test_name_to_handle_and_back(tmp_path: Path) -> None:
    import os

    from virtiofsd_py.host.syscalls import name_to_handle, open_by_handle

    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path / "f", os.O_PATH)
    try:
        try:
            handle, _mnt_id = name_to_handle(fd)
        except OSError as e:
            pytest.skip(f"no file handles here: {e}")
        mount_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            again = open_by_handle(mount_fd, handle, os.O_PATH)
        except PermissionError:
            pytest.skip("open_by_handle_at needs CAP_DAC_READ_SEARCH")
        finally:
            os.close(mount_fd)
        assert os.fstat(again).st_ino == os.fstat(fd).st_ino
        os.close(again)
    finally:
        os.close(fd)
