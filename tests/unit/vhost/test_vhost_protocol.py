"""The sans-IO vhost-user codec: framing and payload decoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtiofsd_py.vhost import protocol as p
from virtiofsd_py.virtio.types import MemoryRegion, VringAddr


def frame(request: int, payload: bytes = b"", flags: int = p.VERSION) -> bytes:
    return p.HEADER.pack(request, flags, len(payload)) + payload


def test_whole_messages_in_one_feed() -> None:
    data = frame(p.MessageType.SET_FEATURES, p.U64.pack(5)) + frame(p.MessageType.GET_FEATURES)
    parser = p.FrameParser()
    msgs = parser.feed(data, [7])
    assert [(m.request, m.payload) for m in msgs] == [
        (p.MessageType.SET_FEATURES, p.U64.pack(5)),
        (p.MessageType.GET_FEATURES, b""),
    ]
    assert msgs[0].fds == [7] and msgs[1].fds == []
    assert parser.next_read_size() == p.HEADER_SIZE


@given(st.data())
def test_any_split_gives_the_same_messages(data: st.DataObject) -> None:
    stream = (
        frame(
            p.MessageType.SET_VRING_NUM, p.VRING_STATE.pack(1, 256), p.VERSION | p.FLAG_NEED_REPLY
        )
        + frame(p.MessageType.GET_QUEUE_NUM)
        + frame(p.MessageType.SET_VRING_ADDR, p.VRING_ADDR.pack(0, 0, 1, 2, 3, 4))
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = p.FrameParser()
    msgs: list[p.Message] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        msgs += parser.feed(stream[prev:cut])
        prev = cut
    assert [m.name for m in msgs] == ["SET_VRING_NUM", "GET_QUEUE_NUM", "SET_VRING_ADDR"]
    assert msgs[0].need_reply and not msgs[1].need_reply
    assert p.decode_vring_addr(msgs[2]) == VringAddr(0, 0, 1, 2, 3, 4)


def test_next_read_size_tracks_header_and_payload() -> None:
    parser = p.FrameParser()
    assert parser.next_read_size() == 12
    parser.feed(frame(p.MessageType.SET_FEATURES, p.U64.pack(1))[:12])
    assert parser.next_read_size() == 8
    parser.feed(b"\0" * 3)
    assert parser.next_read_size() == 5


def test_bad_version_is_a_protocol_error() -> None:
    with pytest.raises(p.ProtocolError, match="version"):
        p.FrameParser().feed(frame(1, b"", flags=2))


def test_oversized_payload_is_a_protocol_error() -> None:
    with pytest.raises(p.ProtocolError, match="exceeds"):
        p.FrameParser().feed(p.HEADER.pack(5, 1, 1 << 20))


def test_pending_fds_are_handed_back() -> None:
    parser = p.FrameParser()
    parser.feed(frame(p.MessageType.SET_VRING_KICK, p.U64.pack(0))[:5], [9, 10])
    assert parser.pending_fds() == [9, 10]


def msg(request: int, payload: bytes, fds: list[int] | None = None) -> p.Message:
    return p.Message(request, p.VERSION, payload, fds or [])


def test_short_payloads_are_refused() -> None:
    with pytest.raises(p.ProtocolError, match="need 8"):
        p.decode_u64(msg(p.MessageType.SET_FEATURES, b"\0" * 4))
    with pytest.raises(p.ProtocolError, match="need 40"):
        p.decode_vring_addr(msg(p.MessageType.SET_VRING_ADDR, b"\0" * 39))
    with pytest.raises(p.ProtocolError, match="need 40"):
        p.decode_single_region(msg(p.MessageType.ADD_MEM_REG, b"\0" * 32))


def test_mem_table() -> None:
    regions = [MemoryRegion(0, 1 << 20, 0x7000_0000, 0), MemoryRegion(1 << 32, 4096, 1, 2)]
    payload = p.MEM_TABLE_HEAD.pack(2, 0) + b"".join(
        p.MEM_REGION.pack(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)
        for r in regions
    )
    assert p.decode_mem_table(msg(p.MessageType.SET_MEM_TABLE, payload)) == regions
    with pytest.raises(p.ProtocolError, match="regions need"):
        p.decode_mem_table(msg(p.MessageType.SET_MEM_TABLE, payload[:-1]))
    with pytest.raises(p.ProtocolError, match="at most 8"):
        p.decode_mem_table(msg(p.MessageType.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(9, 0)))


def test_single_region_round_trip() -> None:
    r = MemoryRegion(0x1000, 0x2000, 0x3000, 0x4000)
    assert p.decode_single_region(msg(p.MessageType.ADD_MEM_REG, p.encode_single_region(r))) == r


def test_vring_fd_payload() -> None:
    assert p.decode_vring_fd(msg(p.MessageType.SET_VRING_KICK, p.U64.pack(3))) == (3, True)
    assert p.decode_vring_fd(msg(p.MessageType.SET_VRING_CALL, p.U64.pack(0x102))) == (2, False)
    with pytest.raises(p.ProtocolError, match="reserved"):
        p.decode_vring_fd(msg(p.MessageType.SET_VRING_CALL, p.U64.pack(0x200)))


def test_config_round_trip() -> None:
    space = p.ConfigSpace(4, 8, 0, b"abcdefgh")
    assert p.decode_config(msg(p.MessageType.GET_CONFIG, p.encode_config(space))) == space


def test_reply_encoding() -> None:
    data = p.encode_u64_reply(p.MessageType.GET_FEATURES, 42)
    assert p.HEADER.unpack_from(data) == (1, p.VERSION | p.FLAG_REPLY, 8)
    assert p.U64.unpack_from(data, 12) == (42,)


def test_request_names() -> None:
    assert p.request_name(42) == "SET_DEVICE_STATE_FD"
    assert p.request_name(43) == "CHECK_DEVICE_STATE"
    assert p.request_name(999) == "UNKNOWN(999)"
    assert p.ProtocolFeature.DEVICE_STATE == 19


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_streams_only_raise_protocol_errors(data: bytes) -> None:
    parser = p.FrameParser()
    try:
        for m in parser.feed(data):
            assert len(m.payload) <= p.MAX_PAYLOAD
    except p.ProtocolError:
        pass
