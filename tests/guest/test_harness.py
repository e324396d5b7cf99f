"""The guest harness itself: command channel framing, timeouts, failing fast."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from virtiofsd_py.testing.qemu.guest import Guest, GuestError

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def bare_guest(guest_support: None) -> Iterator[Guest]:
    """A guest without virtio-fs devices."""
    g = Guest.boot(vhost_sockets={})
    yield g
    g.shutdown()


def test_status_and_separate_streams(bare_guest: Guest) -> None:
    res = bare_guest.run("echo out; echo err >&2; exit 3")
    assert (res.rc, res.stdout, res.stderr) == (3, b"out\n", b"err\n")


def test_binary_and_multiline_output_is_exact(bare_guest: Guest) -> None:
    # Lines that look like frames, bytes that are not UTF-8, no final newline.
    script = b"printf 'a b END 0\\nOUT\\n\\377\\000x'"
    res = bare_guest.run(script).check()
    assert res.stdout == b"a b END 0\nOUT\n\xff\x00x"
    assert res.stderr == b""


def test_large_output(bare_guest: Guest) -> None:
    res = bare_guest.run("seq 1 100000").check()
    assert res.out.split() == [str(i) for i in range(1, 100001)]


def test_timeout_then_channel_recovers(bare_guest: Guest) -> None:
    with pytest.raises(GuestError, match="timed out"):
        bare_guest.run("sleep 1; echo late", timeout=0.2)
    # The late reply of the timed-out command must not be taken for this one.
    assert bare_guest.run("echo next").check().out == "next\n"


def test_kernel_panic_fails_fast_with_console(guest_support: None) -> None:
    start = time.monotonic()
    with pytest.raises(GuestError) as info:
        Guest.boot(vhost_sockets={}, qmp=False, kernel_args="rdinit=/does-not-exist", timeout=120)
    assert "exited with status" in str(info.value)
    assert "Kernel panic" in str(info.value)
    assert time.monotonic() - start < 60


def test_qemu_error_fails_fast(guest_support: None) -> None:
    with pytest.raises(GuestError, match="no-such-device"):
        Guest.boot(vhost_sockets={}, extra_args=["-device", "no-such-device"], timeout=120)
