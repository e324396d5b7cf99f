"""--seccomp: the filter program's decisions, and each action in a real process.

The filter is checked two ways: interpreted here (``bpf.run``) for every
class of call, and installed in a child Python process that then makes a
forbidden call (chroot(2), which the daemon never needs).  The rest of the
suite runs the daemon under the default ``kill`` filter, so a call missing
from the allow-list shows up there as a daemon killed by SIGSYS.
"""

from __future__ import annotations

import errno
import platform
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtiofsd_py.host import bpf
from virtiofsd_py.host.seccomp import (
    ACTION_RET,
    ALLOWED,
    AUDIT_ARCH,
    REFUSED,
    RET_ALLOW,
    RET_ERRNO,
    RET_KILL_PROCESS,
    X32_SYSCALL_BIT,
    build_filter,
    syscall_numbers,
)

MACHINES = sorted(AUDIT_ARCH)


@pytest.mark.parametrize("machine", MACHINES)
@pytest.mark.parametrize("action", sorted(ACTION_RET))
def test_allowed_calls_pass_and_others_get_the_action(machine: str, action: str) -> None:
    prog = build_filter(action, machine)
    table = syscall_numbers(machine)
    arch = AUDIT_ARCH[machine]
    # aarch64 has aliases (sync_file_range2 is sync_file_range): decide by number.
    allowed = {table[n] for n in ALLOWED if n in table}
    for name, nr in table.items():
        got = bpf.run(prog, nr, arch)
        if name in REFUSED:
            assert got == RET_ERRNO | REFUSED[name], name
        elif nr in allowed:
            assert got == RET_ALLOW, name
        else:
            assert got == ACTION_RET[action], name


@pytest.mark.parametrize("machine", MACHINES)
def test_every_core_call_is_known_on_each_machine(machine: str) -> None:
    table = syscall_numbers(machine)
    for name in ("read", "write", "openat", "close", "futex", "mmap", "epoll_pwait", "recvmsg"):
        assert name in table and name in ALLOWED


@pytest.mark.parametrize("machine", MACHINES)
def test_foreign_architecture_is_killed(machine: str) -> None:
    prog = build_filter("log", machine)
    other = next(a for m, a in AUDIT_ARCH.items() if m != machine)
    read = syscall_numbers(machine)["read"]
    assert bpf.run(prog, read, other) == RET_KILL_PROCESS
    assert bpf.run(prog, read, 0x40000003) == RET_KILL_PROCESS  # i386


def test_x32_numbers_get_the_action() -> None:
    prog = build_filter("trap", "x86_64")
    read = syscall_numbers("x86_64")["read"]
    assert bpf.run(prog, read | X32_SYSCALL_BIT, AUDIT_ARCH["x86_64"]) == ACTION_RET["trap"]


@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_any_number_gets_a_decision(nr: int) -> None:
    prog = build_filter("kill", "x86_64")
    got = bpf.run(prog, nr, AUDIT_ARCH["x86_64"])
    table = syscall_numbers("x86_64")
    allowed = nr in {table[n] for n in ALLOWED if n in table}
    assert got in (RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO | errno.ENOSYS)
    assert (got == RET_ALLOW) == allowed


def test_assembler_rejects_bad_programs() -> None:
    p = bpf.Program()
    p.load_word(0)
    with pytest.raises(bpf.BpfError):
        p.assemble()  # no return at the end
    p.jump_eq(1, "nowhere")
    p.ret(0)
    with pytest.raises(bpf.BpfError):
        p.assemble()


# -- installed in a real process -------------------------------------------------
CHILD = textwrap.dedent(
    """
    import os, sys, threading
    from virtiofsd_py.host import seccomp
    seccomp.install(sys.argv[1])
    out = []
    def worker():  # a thread created after the filter inherits it
        try:
            os.chroot("/")
            out.append("chroot ran")
        except OSError as e:
            out.append(f"chroot failed: {e.errno}")
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    print(out[0], flush=True)
    """
)


def run_child(action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, action], capture_output=True, text=True, timeout=60
    )


def test_kill_ends_the_process_with_sigsys() -> None:
    r = run_child("kill")
    assert r.returncode == -signal.SIGSYS
    assert "chroot" not in r.stdout


def test_log_lets_the_call_through() -> None:
    r = run_child("log")
    assert r.returncode == 0, r.stderr
    # As root the call itself succeeds; otherwise it fails for the usual reason.
    assert r.stdout.strip() in ("chroot ran", f"chroot failed: {errno.EPERM}")


def test_trap_logs_the_call_and_fails_it() -> None:
    r = run_child("trap")
    assert r.returncode == 0, r.stderr
    assert "forbidden system call" in r.stderr and "(chroot)" in r.stderr
    if platform.machine() == "x86_64":  # the handler sets the return value there
        assert r.stdout.strip() == f"chroot failed: {errno.ENOSYS}"


def test_none_installs_nothing() -> None:
    r = run_child("none")
    assert r.returncode == 0
    assert "forbidden" not in r.stderr
