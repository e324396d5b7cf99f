"""The guest harness itself: command channel framing, timeouts, failing fast, QMP.

The QMP tests need no guest: one runs a QEMU without a machine (``-machine
none``, up in a second), connected the way ``Guest.boot`` connects it; one
runs a scripted monitor on a socket pair.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPError

from virtiofsd_py.testing.qemu.guest import QMP, Guest, GuestError
from virtiofsd_py.testing.qemu.image import qemu_binary, qemu_version


@pytest.fixture(scope="module")
def bare_guest(guest_support: None) -> Iterator[Guest]:
    """A guest without virtio-fs devices."""
    g = Guest.boot(vhost_sockets={})
    yield g
    g.shutdown()


@pytest.mark.guest
def test_status_and_separate_streams(bare_guest: Guest) -> None:
    res = bare_guest.run("echo out; echo err >&2; exit 3")
    assert (res.rc, res.stdout, res.stderr) == (3, b"out\n", b"err\n")


@pytest.mark.guest
def test_binary_and_multiline_output_is_exact(bare_guest: Guest) -> None:
    # Lines that look like frames, bytes that are not UTF-8, no final newline.
    script = b"printf 'a b END 0\\nOUT\\n\\377\\000x'"
    res = bare_guest.run(script).check()
    assert res.stdout == b"a b END 0\nOUT\n\xff\x00x"
    assert res.stderr == b""


@pytest.mark.guest
def test_large_output(bare_guest: Guest) -> None:
    res = bare_guest.run("seq 1 100000").check()
    assert res.out.split() == [str(i) for i in range(1, 100001)]


@pytest.mark.guest
def test_timeout_then_channel_recovers(bare_guest: Guest) -> None:
    with pytest.raises(GuestError, match="timed out"):
        bare_guest.run("sleep 1; echo late", timeout=0.2)
    # The late reply of the timed-out command must not be taken for this one.
    assert bare_guest.run("echo next").check().out == "next\n"


@pytest.mark.guest
def test_kernel_panic_fails_fast_with_console(guest_support: None) -> None:
    start = time.monotonic()
    with pytest.raises(GuestError) as info:
        Guest.boot(vhost_sockets={}, qmp=False, kernel_args="rdinit=/does-not-exist", timeout=120)
    assert "exited with status" in str(info.value)
    assert "Kernel panic" in str(info.value)
    assert time.monotonic() - start < 60


@pytest.mark.guest
def test_qemu_error_fails_fast(guest_support: None) -> None:
    with pytest.raises(GuestError, match="no-such-device"):
        Guest.boot(vhost_sockets={}, extra_args=["-device", "no-such-device"], timeout=120)


# -- QMP ---------------------------------------------------------------------------


@pytest.fixture
def machineless_qemu(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], QMP]]:
    """A QEMU without a machine, its monitor connected to us as ``Guest.boot`` has it."""
    if qemu_version(qemu_binary()) is None:
        pytest.skip(f"{qemu_binary()} not found or not runnable (run scripts/setup-test-env.sh)")
    path = tmp_path / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(30)
    argv = [qemu_binary(), "-machine", "none", "-nodefaults", "-display", "none"]
    argv += ["-chardev", f"socket,id=qmp,path={path}", "-mon", "chardev=qmp,mode=control"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        with listener:
            conn, _ = listener.accept()
        qmp = QMP(conn, timeout=30)
        try:
            yield proc, qmp
        finally:
            qmp.close()
    finally:
        proc.kill()
        proc.wait()


def test_qmp_against_qemu(machineless_qemu: tuple[subprocess.Popen[bytes], QMP]) -> None:
    proc, qmp = machineless_qemu
    assert qmp.execute("query-status")["running"] is True
    assert qmp.execute("qom-list", path="/machine") != []
    with pytest.raises(ExecuteError) as info:
        qmp.execute("no-such-command")
    assert info.value.error_class == "CommandNotFound"
    with pytest.raises(ExecuteError, match="/no/such/object") as info:
        qmp.execute("qom-list", path="/no/such/object")
    assert info.value.error_class == "DeviceNotFound"
    # Events of other names wait for their own wait_event.
    qmp.execute("stop")
    qmp.execute("cont")
    assert qmp.wait_event("RESUME", timeout=10)["event"] == "RESUME"
    assert qmp.wait_event("STOP", timeout=10)["event"] == "STOP"
    qmp.execute("stop")
    qmp.execute("query-status")  # the STOP event has been read by now
    qmp.clear_events()
    with pytest.raises(TimeoutError, match=r"no STOP event within 0\.2 s"):
        qmp.wait_event("STOP", timeout=0.2)
    # QEMU hangs up: a wait ends at once, commands fail with a QMPError.
    qmp.execute("quit")
    start = time.monotonic()
    with pytest.raises(ConnectionError):
        qmp.wait_event("NEVER", timeout=30)
    assert time.monotonic() - start < 10
    with pytest.raises(QMPError):
        qmp.execute("query-status")
    assert proc.wait(10) == 0
    qmp.close()
    qmp.close()


def serve_qmp(sock: socket.socket, log: list[dict[str, object]]) -> None:
    """A monitor that sends an event before each query-status reply.

    Clients need not end a command with a newline (qmp-spec.rst: a stream of
    JSON objects), so commands are parsed off the stream, not read as lines.
    """

    def send(msg: dict[str, object]) -> None:
        sock.sendall(json.dumps(msg).encode() + b"\r\n")

    send({"QMP": {"version": {"qemu": {"major": 10}}, "capabilities": []}})
    decoder, buf = json.JSONDecoder(), ""
    while chunk := sock.recv(4096):
        buf += chunk.decode()
        while buf.strip():
            try:
                req, end = decoder.raw_decode(buf.lstrip())
            except json.JSONDecodeError:
                break
            buf = buf.lstrip()[end:]
            log.append(req)
            tag = {"id": req["id"]} if "id" in req else {}
            if req["execute"] == "query-status":
                send({"event": "STOP", "timestamp": {}})
                send({"return": {"status": "paused"}, **tag})
            elif req["execute"] == "qmp_capabilities":
                send({"return": {}, **tag})
            else:
                send({"error": {"class": "GenericError", "desc": "nope"}, **tag})


def test_qmp_against_a_scripted_monitor() -> None:
    ours, theirs = socket.socketpair()
    log: list[dict[str, object]] = []
    server = threading.Thread(target=serve_qmp, args=(theirs, log), daemon=True)
    server.start()
    client = QMP(ours, timeout=10)
    assert client.execute("query-status") == {"status": "paused"}
    assert client.wait_event("STOP", timeout=10)["event"] == "STOP"
    with pytest.raises(ExecuteError, match="nope") as info:
        client.execute("migrate-incoming", uri="tcp:0:4444")
    assert info.value.error_class == "GenericError"
    assert log[0]["execute"] == "qmp_capabilities"
    assert log[-1]["arguments"] == {"uri": "tcp:0:4444"}
    client.close()
    theirs.close()
    server.join(10)
