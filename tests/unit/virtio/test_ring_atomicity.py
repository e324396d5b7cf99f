"""Ring indices are stored and loaded whole while the other side runs.

Regression test for the soak test's EIO storm: ``struct.pack_into`` zeroes
its target before writing the value, so a driver reading ``used->idx`` at
that moment saw 0, took garbage for used elements ("id is not a head"),
marked the virtqueue broken and failed every later request with EIO.  Here
another process (the "driver") reads or writes the shared field in a tight
loop while this one (the device) does the opposite, and every value seen
must be one that was really stored.  Both values have two non-zero bytes, so
a transient zero or a torn half shows up.  With the old stores about one
read in twenty was 0.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator

import pytest
from test_virtqueue import Pair

VALUES = (0x0101, 0x0202)
SECONDS = 0.3
SIZE = 256


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair(size=SIZE)
    yield p
    p.close()


def race(
    writer: Callable[[int], None], reader: Callable[[], int], *, write_in_child: bool
) -> set[int]:
    """Run ``writer`` (alternating VALUES) and ``reader`` in two processes at once.

    Returns the values the reader saw that were never written (after the
    first written one appeared).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        code = 0
        try:
            if write_in_child:
                _write_for(writer, SECONDS * 2)
            else:
                os.write(w, _pack(_read_for(reader, SECONDS)))
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    try:
        if write_in_child:
            bad = _read_for(reader, SECONDS)
        else:
            _write_for(writer, SECONDS * 2)
            bad = _unpack(_read_all(r))
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return bad


def _write_for(writer: Callable[[int], None], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for v in VALUES * 100:
            writer(v)


def _read_for(reader: Callable[[], int], seconds: float) -> set[int]:
    deadline = time.monotonic() + 5
    while reader() not in VALUES:  # wait for the writer's first store
        if time.monotonic() > deadline:
            raise TimeoutError("the writer never stored a value")
    bad: set[int] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(200):
            v = reader()
            if v not in VALUES:
                bad.add(v)
    return bad


def _pack(values: set[int]) -> bytes:
    return struct.pack(f"<{len(values)}H", *sorted(values))


def _unpack(data: bytes) -> set[int]:
    return set(struct.unpack(f"<{len(data) // 2}H", data))


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_used_idx_never_seen_half_written(pair: Pair) -> None:
    q = pair.q

    def publish(v: int) -> None:
        q.used_idx = v
        q.publish(v)

    assert race(publish, lambda: pair.dq.used_idx, write_in_child=False) == set()


def test_avail_event_never_seen_half_written(pair: Pair) -> None:
    q = pair.q

    def ask_for_kick(v: int) -> None:
        q.last_avail_idx = v
        q.enable_notification()

    assert race(ask_for_kick, lambda: pair.dq.avail_event, write_in_child=False) == set()


def test_avail_idx_read_whole(pair: Pair) -> None:
    """The device reads the driver's avail index in one load (no torn value)."""

    def driver_publishes(v: int) -> None:
        pair.dq.avail_idx = v
        pair.dq.publish()

    assert race(driver_publishes, pair.q.avail_idx, write_in_child=True) == set()
