"""``--seccomp none|kill|log|trap``: an allow-list of the system calls the daemon makes.

No maintained libseccomp binding imports in this Python (Debian's
python3-seccomp is built for the system interpreter), so the filter is
assembled here (``bpf.py``) and installed with ``prctl(PR_SET_SECCOMP,
SECCOMP_MODE_FILTER)`` after ``PR_SET_NO_NEW_PRIVS`` (seccomp(2)).

The filter first checks ``seccomp_data.arch`` (AUDIT_ARCH_X86_64 or
AUDIT_ARCH_AARCH64: a syscall of another ABI, e.g. i386 through int 0x80,
is killed whatever the action, since its numbers mean other calls), refuses
x32 numbers on x86_64, then allows the listed calls; anything else gets the
action: ``kill`` ends the process (SECCOMP_RET_KILL_PROCESS, SIGSYS), ``log``
lets it through and the kernel logs it (audit type 1326: how the list was
derived), ``trap`` sends SIGSYS to the thread, whose handler logs the call
and makes it fail with ENOSYS.

The list covers CPython, uvloop/libuv, the worker threads, the ctypes calls
(credentials, capabilities, file handles, renameat2, ...), migration and
locks.  It was derived by running the whole suite (daemon tests and real
guests, migration included) with ``--seccomp log`` and collecting the
kernel's log; ``tests/test_seccomp.py`` runs the daemon under ``kill``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import signal
import struct
from typing import Final

from virtiofsd_py.host import syscalls
from virtiofsd_py.host.bpf import OFFSET_ARCH, OFFSET_NR, Program
from virtiofsd_py.host.syscall_table import BY_MACHINE

ACTIONS: Final = ("none", "kill", "log", "trap")

# linux/seccomp.h return values
RET_KILL_PROCESS: Final = 0x80000000
RET_TRAP: Final = 0x00030000
RET_ERRNO: Final = 0x00050000
RET_LOG: Final = 0x7FFC0000
RET_ALLOW: Final = 0x7FFF0000
ACTION_RET: Final[dict[str, int]] = {"kill": RET_KILL_PROCESS, "log": RET_LOG, "trap": RET_TRAP}

# linux/audit.h
AUDIT_ARCH_X86_64: Final = 0xC000003E
AUDIT_ARCH_AARCH64: Final = 0xC00000B7
AUDIT_ARCH: Final[dict[str, int]] = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}
X32_SYSCALL_BIT: Final = 0x40000000

#: Calls the daemon makes, by name.  Names an architecture lacks (legacy
#: calls such as ``open`` on aarch64) are skipped there.
ALLOWED: Final = frozenset(
    {
        # I/O on guest requests and the vhost-user socket (most frequent first is
        # irrelevant: the kernel JITs the filter)
        "read",
        "write",
        "readv",
        "writev",
        "pread64",
        "pwrite64",
        "preadv",
        "pwritev",
        "preadv2",
        "pwritev2",
        "lseek",
        "sendfile",
        "copy_file_range",
        "recvmsg",
        "sendmsg",
        "recvfrom",
        "sendto",
        "accept",
        "accept4",
        "shutdown",
        "getsockopt",
        "setsockopt",
        "getsockname",
        "getpeername",
        "socket",
        "socketpair",
        "bind",
        "listen",
        "connect",
        # event loop
        "epoll_create",
        "epoll_create1",
        "epoll_ctl",
        "epoll_wait",
        "epoll_pwait",
        "epoll_pwait2",
        "eventfd2",
        "pipe",
        "pipe2",
        "poll",
        "ppoll",
        "select",
        "pselect6",
        "timerfd_create",
        "timerfd_settime",
        "timerfd_gettime",
        # file system operations (passthrough, migration, locks)
        "open",
        "openat",
        "openat2",
        "close",
        "close_range",
        "dup",
        "dup2",
        "dup3",
        "fcntl",
        "flock",
        "ioctl",
        "stat",
        "fstat",
        "lstat",
        "newfstatat",
        "statx",
        "statfs",
        "fstatfs",
        "getdents64",
        "readlink",
        "readlinkat",
        "access",
        "faccessat",
        "faccessat2",
        "mkdirat",
        "mknodat",
        "symlinkat",
        "linkat",
        "unlinkat",
        "renameat",
        "renameat2",
        "ftruncate",
        "fallocate",
        "fsync",
        "fdatasync",
        "syncfs",
        "sync_file_range",
        "utimensat",
        "fchmod",
        "fchmodat",
        "fchmodat2",
        "fchown",
        "fchownat",
        "getxattr",
        "lgetxattr",
        "fgetxattr",
        "setxattr",
        "lsetxattr",
        "fsetxattr",
        "listxattr",
        "llistxattr",
        "flistxattr",
        "removexattr",
        "lremovexattr",
        "fremovexattr",
        "name_to_handle_at",
        "open_by_handle_at",
        "unlink",
        "rmdir",
        "mkdir",
        "rename",
        "chmod",
        # path forms CPython's os module uses when no dir_fd is given (the
        # passthrough passes /proc/self/fd paths): truncate(path), chown(path)...
        "chown",
        "lchown",
        "truncate",
        "link",
        "symlink",
        "mknod",
        "fchdir",
        "getcwd",
        "umask",
        # memory (guest RAM mappings, the allocator)
        "mmap",
        "munmap",
        "mremap",
        "mprotect",
        "madvise",
        "brk",
        "membarrier",
        # threads, signals, time
        "clone",
        "clone3",
        "futex",
        "futex_waitv",
        "set_robust_list",
        "get_robust_list",
        "set_tid_address",
        "rseq",
        "exit",
        "exit_group",
        "gettid",
        "getpid",
        "getppid",
        "tgkill",
        "kill",
        "rt_sigaction",
        "rt_sigprocmask",
        "rt_sigreturn",
        "rt_sigtimedwait",
        "sigaltstack",
        "sched_yield",
        "sched_getaffinity",
        "nanosleep",
        "clock_nanosleep",
        "clock_gettime",
        "clock_getres",
        "gettimeofday",
        "getrandom",
        "uname",
        "sysinfo",
        "getrlimit",
        "prlimit64",
        "getrusage",
        # per-thread credentials and umask (fs/creds.py)
        "getuid",
        "geteuid",
        "getgid",
        "getegid",
        "getresuid",
        "getresgid",
        "getgroups",
        "setresuid",
        "setresgid",
        "setgroups",
        "setfsuid",
        "setfsgid",
        "capget",
        "capset",
        "unshare",
        "prctl",
    }
)


#: Calls refused with an errno instead of the action: callers fall back.
#: libuv probes io_uring at loop start whatever UV_USE_IO_URING says, and
#: uses epoll when it is refused; io_uring is a large kernel surface.
REFUSED: Final[dict[str, int]] = {"io_uring_setup": errno.ENOSYS}


class SeccompError(Exception):
    """The filter cannot be installed; the message is for the operator."""


def syscall_numbers(machine: str | None = None) -> dict[str, int]:
    return BY_MACHINE.get(machine or platform.machine(), {})


def build_filter(
    action: str,
    machine: str | None = None,
    allowed: frozenset[str] = ALLOWED,
    refused: dict[str, int] | None = None,
) -> bytes:
    """The filter program for ``action`` on ``machine`` (default: this one)."""
    machine = machine or platform.machine()
    if machine not in AUDIT_ARCH:
        raise SeccompError(f"--seccomp: no syscall table for {machine}")
    table = syscall_numbers(machine)
    numbers = sorted({table[name] for name in allowed if name in table})
    p = Program()
    p.load_word(OFFSET_ARCH)
    p.jump_eq(AUDIT_ARCH[machine], None, "foreign")
    p.load_word(OFFSET_NR)
    if machine == "x86_64":
        p.jump_ge(X32_SYSCALL_BIT, "deny")
    for name, err in sorted((REFUSED if refused is None else refused).items()):
        if name in table:
            p.jump_eq(table[name], None, f"not_{name}")
            p.ret(RET_ERRNO | err)
            p.label(f"not_{name}")
    # Compare-and-jump in runs: a jump reaches at most 255 instructions ahead.
    for start in range(0, len(numbers), 200):
        chunk = numbers[start : start + 200]
        for nr in chunk:
            p.jump_eq(nr, f"allow{start}")
        p.jump_eq(0xFFFFFFFF, "deny", f"next{start}")  # never equal: a plain goto
        p.label(f"allow{start}")
        p.ret(RET_ALLOW)
        p.label(f"next{start}")
    p.label("deny")
    p.ret(ACTION_RET[action])
    p.label("foreign")
    p.ret(RET_KILL_PROCESS)
    return p.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


# The trap handler: SA_SIGINFO, so it can name the call (siginfo_t.si_syscall).
_SA_SIGINFO: Final = 4
_SA_RESTORER: Final = 0x04000000
_SIGINFO_SYSCALL_OFFSET: Final = 24  # si_signo, si_errno, si_code, pad; si_call_addr; si_syscall
#: ucontext_t.uc_mcontext.gregs[REG_RAX] on x86_64 (8 + 8 + 24 + 13 * 8).
_X86_64_RAX_OFFSET: Final = 144
_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_trap_handler_ref: list[object] = []


def _on_sigsys(_sig: int, info: int, ucontext: int) -> None:
    (nr,) = struct.unpack("=i", ctypes.string_at(info + _SIGINFO_SYSCALL_OFFSET, 4))
    names = {v: k for k, v in syscall_numbers().items()}
    msg = f"virtiofsd-py: seccomp: forbidden system call {nr} ({names.get(nr, '?')})\n"
    os.write(2, msg.encode())
    if platform.machine() == "x86_64" and ucontext:
        ctypes.c_int64.from_address(ucontext + _X86_64_RAX_OFFSET).value = -errno.ENOSYS


def _install_trap_handler() -> None:
    """sigaction(SIGSYS) with SA_SIGINFO through libc's signal()-free path."""
    handler = _HANDLER_TYPE(_on_sigsys)
    _trap_handler_ref.append(handler)  # the callback must outlive the filter

    class _Sigaction(ctypes.Structure):
        # glibc's struct sigaction: handler, sa_mask (1024 bits), sa_flags, restorer
        _fields_ = (
            ("handler", ctypes.c_void_p),
            ("mask", ctypes.c_ulong * 16),
            ("flags", ctypes.c_int),
            ("restorer", ctypes.c_void_p),
        )

    act = _Sigaction()
    act.handler = ctypes.cast(handler, ctypes.c_void_p).value
    act.flags = _SA_SIGINFO
    try:
        syscalls.sigaction(signal.SIGSYS, act)
    except OSError as e:
        raise SeccompError(f"sigaction(SIGSYS): {e.strerror}") from None


def install(action: str, extra: frozenset[str] = frozenset()) -> None:
    """Install the filter on the calling thread; threads created later inherit it.

    ``extra``: calls allowed on top of :data:`ALLOWED` (host mount mode's).
    """
    if action == "none":
        return
    if action not in ACTION_RET:
        raise SeccompError(f"--seccomp {action}: expected one of {', '.join(ACTIONS)}")
    program = build_filter(action, allowed=ALLOWED | extra)
    if action == "trap":
        _install_trap_handler()
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p).value)
    try:
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
        syscalls.prctl_ptr(
            syscalls.PR_SET_SECCOMP, syscalls.SECCOMP_MODE_FILTER, ctypes.addressof(prog)
        )
    except OSError as e:
        raise SeccompError(f"--seccomp {action}: cannot install the filter: {e}") from None
