"""Live migration between two QEMUs, each with its own daemon on the same host directory.

One guest program (``HOLDER``) is started in the background before the first
migration and keeps, across every migration of the module:

* fd 3 reading ``work/read.bin`` (64 KiB per round, the rest at the end:
  every byte of the file is read through the one fd, hashes compared here),
* fd 4 writing ``work/write.bin`` and fd 5 appending to ``work/append.log``
  (each round adds bytes; the host appends its own lines between rounds, so
  O_APPEND must still hold after a switch), verified byte for byte on the host,
* its working directory ``work/dir/sub`` (relative reads and creates),
* a POSIX record lock and a BSD flock held by helper processes
  (``vfsprobe``): a host process must not be able to take them until the
  guest releases them,
* for one migration, an unlinked-but-open file, read back through its fd.

It is stepped through FIFOs in the guest's /tmp: the test writes a command to
``/tmp/go``, the program answers on ``/tmp/ack``. Migrations: three idle hops
(A -> B -> A -> B), one whose destination cannot load the state (the guest
must keep running on the source with its files intact), one while a guest
loop writes and reads files (the daemon writes into guest memory while the
dirty log is on), and one with the unlinked file open.

The module shares one pair of QEMUs (a fresh incoming QEMU and daemon per
hop); tests run in file order and build on each other.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from virtiofsd_py.testing.daemon_proc import is_own_daemon
from virtiofsd_py.testing.qemu.guest import Guest, GuestError
from virtiofsd_py.testing.qemu.image import cache_dir
from virtiofsd_py.testing.qemu.migration import MigrationError, MigrationPair, Side

pytestmark = pytest.mark.guest

TAG = "share"
MEM_MIB = 256
CHUNK = 65536
READ_SIZE = 12 * CHUNK + 1234
UNLINKED_SIZE = 3 * CHUNK + 77
IO_SOURCES = 4
IO_SOURCE_SIZE = 96 * 1024
CACHE_SIZE = 4 * 1024 * 1024
#: Page-cache pages are zeroed on allocation by default (init_on_alloc): a
#: CPU write that would make QEMU resend them and hide a missing dirty log.
KERNEL_ARGS = "init_on_alloc=0"
#: Host-side timeout for stepping the guest program (seconds).
STEP_TIMEOUT = 30

RUST_NO_HOST_LOCKS = (
    "the Rust virtiofsd keeps guest locks guest-local (no POSIX_LOCKS/FLOCK_LOCKS): "
    "a host process can always take them"
)
RUST_NO_UNLINKED = (
    "the Rust virtiofsd cannot migrate an unlinked-but-open file in find-paths mode "
    "(no path left to send)"
)

#: The guest program; ``$1`` is the directory it works in (cwd), files in ``/mnt/work``.
HOLDER = r"""
exec 3< /mnt/work/read.bin 4> /mnt/work/write.bin 5>> /mnt/work/append.log || exit 1
cd "$1" || exit 1
round() {
    echo "pwd $(/bin/pwd)"
    echo "read $(dd bs=65536 count=1 iflag=fullblock <&3 2>/dev/null | sha256sum)"
    head -c $((20000 + $1 * 3001)) /dev/urandom > /tmp/chunk
    cat /tmp/chunk >&4 || echo "error write"
    echo "write $(wc -c < /tmp/chunk) $(sha256sum < /tmp/chunk)"
    echo "guest line $1" >&5 || echo "error append"
    echo "rel $(cat rel.txt)"
    echo "made in round $1" > "made-$1.txt" || echo "error create"
    echo "ls $(ls | sort | tr '\n' ' ')"
}
hold() {  # $1 = name; the remaining arguments are a vfsprobe command
    name=$1; shift
    rm -f "/tmp/release-$name"; mkfifo "/tmp/$name.fifo"
    /tmp/vfsprobe "$@" "/tmp/release-$name" > "/tmp/$name.fifo" 2> "/tmp/$name.err" &
    eval "pid_$name=$!"
    echo "$name $(head -n 1 "/tmp/$name.fifo")"
}
release() {
    touch "/tmp/release-$1"
    eval "wait \$pid_$1"
    echo "$1 exit $?"
}
while read -r cmd arg < /tmp/go; do
    case $cmd in
    round) round "$arg" ;;
    lock)
        hold posix lock /mnt/work/posix.dat w setlk 0 0
        hold flock flock /mnt/work/flock.dat ex nb ;;
    unlock) release posix; release flock ;;
    open-unlinked)
        exec 6< /mnt/work/unlinked.bin && rm /mnt/work/unlinked.bin &&
        echo "head $(dd bs=65536 count=1 iflag=fullblock <&6 2>/dev/null | sha256sum)" ;;
    read-unlinked)
        echo "rest $(cat <&6 | sha256sum)"
        echo "stat $(stat -L -c '%s %h' /proc/self/fd/6)" ;;
    close-unlinked) exec 6<&-; echo closed ;;
    finish)
        echo "rest $(cat <&3 | sha256sum)"
        exec 3<&- 4>&- 5>&-
        echo finished
        break ;;
    *) echo "unknown $cmd" ;;
    esac > /tmp/ack 2>&1
done
"""

#: Writes and reads files in a loop until /tmp/io.stop exists. Each read
#: opens the file anew (cache=auto drops its cached pages on open), so the
#: daemon writes replies into guest memory all the time.
IO_LOOP = r"""
i=0
while [ ! -e /tmp/io.stop ]; do
    head -c $((4096 * (i % 5 + 1) + i)) /dev/urandom > /tmp/io.chunk
    cp /tmp/io.chunk "/mnt/io/out-$i" || echo "error write $i"
    echo "$i $(wc -c < /tmp/io.chunk) $(sha256sum < /tmp/io.chunk)" >> /tmp/io.written
    for f in /mnt/io/src-*; do echo "$i $(sha256sum < "$f") $f"; done >> /tmp/io.read
    i=$((i + 1))
    echo "$i" > /tmp/io.count.new && mv /tmp/io.count.new /tmp/io.count  # never seen half-written
done
echo "stopped $i" > /tmp/io.fifo
"""

#: Fills the page cache through fd 7 when told to, and hashes it through fd 8
#: (same file, opened before the fill, so no open drops the cache) when told
#: again: the second time it reads pages the daemon wrote, not the daemon.
CACHE_KEEPER = r"""
exec 7< /mnt/io/cache.bin 8< /mnt/io/cache.bin || exit 1
read -r x < /tmp/fill
cat <&7 > /dev/null && echo filled > /tmp/filled
read -r x < /tmp/fill
echo "cache $(sha256sum <&8)" > /tmp/filled
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fields(out: str) -> dict[str, list[str]]:
    """``key value...`` lines of the program's answer, by key (hash lines drop ``-``)."""
    result: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, *rest = line.split()
        result[key] = [w for w in rest if w != "-"]
    return result


def host_lock_taken(path: Path, kind: str) -> bool:
    """Whether a host process can NOT take an exclusive ``kind`` lock on ``path`` now."""
    fd = os.open(path, os.O_RDWR)
    try:
        if kind == "posix":
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # releases a lock we took (POSIX: any close does)
    return False


@dataclass
class Scenario:
    """The pair, the guest program and what the host expects to find."""

    pair: MigrationPair
    shared: Path
    read_data: bytes
    unlinked_data: bytes
    io_sources: dict[str, bytes]
    has_vfsprobe: bool
    rounds: int = 0
    written: list[tuple[int, str]] = field(default_factory=list)
    appended: list[bytes] = field(default_factory=list)
    #: (after what, posix lock held, flock held) as probed from the host.
    lock_probes: list[tuple[str, bool, bool]] = field(default_factory=list)
    locked: bool = False
    #: The guest program stopped answering: later tests would only time out.
    hung: bool = False

    @property
    def guest(self) -> Guest:
        return self.pair.guest

    @property
    def work(self) -> Path:
        return self.shared / "work"

    def step(self, command: str) -> str:
        """Send one command to the guest program; its answer."""
        try:
            res = self.guest.run(
                f"timeout {STEP_TIMEOUT} sh -c 'echo {command} > /tmp/go' || exit 90\n"
                f"timeout {STEP_TIMEOUT} cat /tmp/ack",
                timeout=2 * STEP_TIMEOUT + 10,
            )
        except GuestError:
            self.hung = True
            raise
        if res.rc != 0:
            self.hung = True
        assert res.rc == 0, f"guest program did not answer {command!r}: {res}"
        return res.out

    def round(self) -> None:
        """One round of I/O through the held fds, checked here and on the host."""
        n = self.rounds
        self.rounds += 1
        host_line = b"host line %d\n" % n
        with open(self.work / "append.log", "ab") as f:
            f.write(host_line)
        self.appended.append(host_line)
        out = self.step(f"round {n}")
        got = fields(out)
        assert "error" not in got, out
        assert got["pwd"] == ["/mnt/work/dir/sub"], out
        assert got["read"] == [sha(self.read_data[n * CHUNK : (n + 1) * CHUNK])], out
        size, digest = got["write"]
        self.written.append((int(size), digest))
        self.appended.append(b"guest line %d\n" % n)
        assert got["rel"] == ["relative", "content"], out
        made = sorted(f"made-{i}.txt" for i in range(n + 1))
        assert got["ls"] == sorted(["rel.txt", *made]), out
        self.check_host()
        self.probe_locks(f"round {n}")

    def check_host(self) -> None:
        """Everything the program wrote so far is on the host, byte for byte."""
        data = (self.work / "write.bin").read_bytes()
        assert len(data) == sum(size for size, _ in self.written)
        pos = 0
        for i, (size, digest) in enumerate(self.written):
            assert sha(data[pos : pos + size]) == digest, f"write.bin chunk {i} differs"
            pos += size
        assert (self.work / "append.log").read_bytes() == b"".join(self.appended)
        sub = self.work / "dir" / "sub"
        for i in range(self.rounds):
            assert (sub / f"made-{i}.txt").read_bytes() == b"made in round %d\n" % i

    def unexpected_entries(self) -> list[str]:
        """Paths in the share that neither the host nor the guest program made."""
        expected = {
            "work", "io", "tools", "tools/vfsprobe", "work/dir", "work/dir/sub",
            "work/dir/sub/rel.txt", "work/read.bin", "work/write.bin",
            "work/append.log", "work/posix.dat", "work/flock.dat",
        }  # fmt: skip
        expected.update(f"work/dir/sub/made-{i}.txt" for i in range(self.rounds))
        expected.update(f"io/src-{i}" for i in range(IO_SOURCES))
        expected.add("io/cache.bin")
        return sorted(
            rel
            for p in self.shared.rglob("*")
            if (rel := str(p.relative_to(self.shared))) not in expected
            and not (rel.startswith("io/out-") and rel[7:].isdigit())
        )

    def probe_locks(self, when: str) -> None:
        """Record whether the host can take the held locks; the guest must not."""
        if self.locked:
            # Another guest process conflicts with the holders wherever the
            # locks live (guest kernel or host): this holds for every daemon.
            res = self.guest.run(
                "/tmp/vfsprobe lock /mnt/work/posix.dat w setlk 0 0;"
                " /tmp/vfsprobe flock /mnt/work/flock.dat ex nb"
            )
            assert res.out.split() == ["EAGAIN", "EAGAIN"], f"{when}: {res}"
            self.lock_probes.append(
                (
                    when,
                    host_lock_taken(self.work / "posix.dat", "posix"),
                    host_lock_taken(self.work / "flock.dat", "flock"),
                )
            )

    def migrate(self, while_active: Callable[[Side], None] | None = None) -> Side:
        """Migrate to a fresh destination; check the guest runs there and only there."""
        old = self.pair.source
        result = self.pair.migrate(while_active=while_active)
        new = self.pair.source
        assert (result.source, result.destination) == (old.label, new.label)
        assert new is not old
        assert old.guest.proc.poll() is not None, "the old source QEMU is still running"
        assert new.guest.qmp("query-status")["status"] == "running"
        return new


@pytest.fixture(scope="module")
def shared_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("migshare")
    rng = random.Random(4)
    work = root / "work"
    (work / "dir" / "sub").mkdir(parents=True)
    (work / "read.bin").write_bytes(rng.randbytes(READ_SIZE))
    (work / "unlinked.bin").write_bytes(rng.randbytes(UNLINKED_SIZE))
    (work / "dir" / "sub" / "rel.txt").write_bytes(b"relative content\n")
    for name in ("posix.dat", "flock.dat"):
        (work / name).write_bytes(b"locked file\n")
    (root / "io").mkdir()
    for i in range(IO_SOURCES):
        (root / "io" / f"src-{i}").write_bytes(rng.randbytes(IO_SOURCE_SIZE + i))
    (root / "io" / "cache.bin").write_bytes(rng.randbytes(CACHE_SIZE))
    return root


def _vfsprobe() -> Path | None:
    """The static guest syscall helper, built on the host (None without a compiler)."""
    try:
        from virtiofsd_py.testing.qemu.progimage import ProgramsUnavailable, build_vfsprobe
    except ImportError:
        return None
    try:
        return build_vfsprobe(cache_dir())
    except ProgramsUnavailable:
        return None


@pytest.fixture(scope="module")
def scenario(
    guest_support: None, shared_tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    probe = _vfsprobe()
    if probe is not None:
        (shared_tree / "tools").mkdir()
        shutil.copy(probe, shared_tree / "tools" / "vfsprobe")
    pair = MigrationPair(
        shared_tree,
        tmp_path_factory.mktemp("migwork"),
        tag=TAG,
        mem_mib=MEM_MIB,
        kernel_args=KERNEL_ARGS,
    )
    sc = Scenario(
        pair=pair,
        shared=shared_tree,
        read_data=(shared_tree / "work" / "read.bin").read_bytes(),
        unlinked_data=(shared_tree / "work" / "unlinked.bin").read_bytes(),
        io_sources={
            f"/mnt/io/src-{i}": (shared_tree / "io" / f"src-{i}").read_bytes()
            for i in range(IO_SOURCES)
        },
        has_vfsprobe=probe is not None,
    )
    with pair:
        yield sc
    for r in pair.retired:
        print(f"--- daemon {r.label} (exit status {r.daemon_status}) ---\n{r.daemon_log[-5000:]}")
    assert pair.problems() == []


@pytest.fixture(autouse=True)
def skip_after_hang(scenario: Scenario) -> None:
    """The tests build on each other: once the program hangs, stop waiting on it."""
    if scenario.hung:
        pytest.skip("the guest program stopped answering in an earlier test")


def test_program_holds_files_before_migration(scenario: Scenario) -> None:
    g = scenario.guest
    g.run(f"mount -t virtiofs {TAG} /mnt && mkfifo /tmp/go /tmp/ack /tmp/io.fifo").check()
    # Scripts go in through quoted here-documents: no shell quoting to get wrong.
    g.run(f"cat > /tmp/holder.sh <<'EOF'\n{HOLDER}\nEOF\n").check()
    if scenario.has_vfsprobe:
        g.run("cp /mnt/tools/vfsprobe /tmp/vfsprobe && chmod 755 /tmp/vfsprobe").check()
    g.run(
        "sh /tmp/holder.sh /mnt/work/dir/sub > /tmp/holder.log 2>&1 & echo $! > /tmp/holder.pid"
    ).check()
    if scenario.has_vfsprobe:
        got = fields(scenario.step("lock"))
        assert got == {"posix": ["locked"], "flock": ["locked"]}
        scenario.locked = True
    scenario.round()
    fds = g.run("ls -l /proc/$(cat /tmp/holder.pid)/fd /proc/$(cat /tmp/holder.pid)/cwd").check()
    for name in ("read.bin", "write.bin", "append.log", "dir/sub"):
        assert f"/mnt/work/{name}" in fds.out, fds.out


@pytest.mark.parametrize("hop", [1, 2, 3])
def test_idle_migration_keeps_open_files(scenario: Scenario, hop: int) -> None:
    """A -> B -> A -> B with the program idle; each time, every fd still works.

    Hop 2's destination runs with ``--migration-on-error guest-error``: it
    finds the nodes without open files (the program's cwd among them) after
    the switch-over, on first use or in the background (deferred_nodes.py).
    """
    pair = scenario.pair
    before = pair.source.label
    if hop == 2:
        pair.prepare_destination(
            daemon_args=[*pair.daemon_args, "--migration-on-error", "guest-error"]
        )
    new = scenario.migrate()
    assert new.label != before
    scenario.round()
    if hop == 2:
        deadline = time.monotonic() + 60
        while not re.search(r"placeholders found in .*, 0 unusable", new.daemon.log()):
            assert time.monotonic() < deadline, new.daemon.log()
            time.sleep(0.1)  # the line is written once the background pass ends
        log = new.daemon.log()
        assert re.search(r"restored \(0 unusable, [1-9]\d* to find after the load\)", log), log


def test_refused_state_keeps_guest_on_source(
    scenario: Scenario, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The destination's daemon cannot load the state: the guest stays on the source.

    The destination shares an empty directory (on another file system where
    possible), so none of the source's open files can be found there, by path
    or by file handle; the daemon must refuse the state (the Rust daemon's
    ``--migration-on-error abort``, its default), which fails the migration.
    """
    source = scenario.pair.source
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    wrong = Path(tempfile.mkdtemp(prefix="vfs-wrong-share-", dir=base))
    try:
        scenario.pair.prepare_destination(shared_dir=wrong)
        with pytest.raises(MigrationError) as info:
            scenario.pair.migrate(timeout=60)
    finally:
        shutil.rmtree(wrong, ignore_errors=True)
    assert info.value.status == "failed", str(info.value)
    assert info.value.source_running, str(info.value)
    assert scenario.pair.source is source
    assert scenario.pair.destination is None
    assert source.guest.qmp("query-status")["status"] == "running"
    scenario.round()
    # And the next migration from this source works.
    scenario.migrate()
    scenario.round()


def test_migration_while_guest_does_io(scenario: Scenario) -> None:
    """A loop writes and reads files while the migration runs and at the switch.

    The overlap is made certain, not left to timing. A guest process keeps
    rewriting 16 MiB (``dd`` from /dev/zero), so when the first pass over
    RAM ends (MIGRATION_PASS 2, at 32 MiB/s) the second pass has at least
    that much to send; the test then throttles the source to a trickle,
    which holds the migration in the active phase for as long as it likes.
    Meanwhile the guest fills its page cache from ``io/cache.bin``: the
    daemon writes that data into pages QEMU has already sent, and only the
    dirty log makes QEMU send them again. Once the I/O loop has made
    progress too, the hog stops, the limits are restored and the migration
    completes. After the switch the guest hashes the cached pages through a
    second fd opened earlier (so nothing is re-read from the daemon), and
    the host checks every file the loop wrote and every hash it computed.
    """
    g = scenario.guest
    g.run(f"cat > /tmp/ioloop.sh <<'EOF'\n{IO_LOOP}\nEOF\n").check()
    g.run(f"cat > /tmp/cachekeeper.sh <<'EOF'\n{CACHE_KEEPER}\nEOF\n").check()
    g.run(
        "rm -f /tmp/io.stop /tmp/io.count; mkfifo /tmp/fill /tmp/filled;"
        " sh /tmp/ioloop.sh > /tmp/ioloop.log 2>&1 &"
        " sh /tmp/cachekeeper.sh > /tmp/cachekeeper.log 2>&1 &"
        " dd if=/dev/zero of=/dev/null bs=16M count=1000000 2>/dev/null &"
        " echo $! > /tmp/hog.pid"
    ).check()
    before = wait_count_reaches(g, 2)
    source = scenario.pair.source
    params = source.guest.qmp("query-migrate-parameters")
    source.guest.qmp("migrate-set-parameters", **{"downtime-limit": 1, "max-bandwidth": 32 << 20})
    during: list[int] = []

    def while_active(side: Side) -> None:
        client = side.guest.qmp_client
        while client.wait_event("MIGRATION_PASS", timeout=STEP_TIMEOUT)["data"]["pass"] < 2:
            pass
        side.guest.qmp("migrate-set-parameters", **{"max-bandwidth": 1024})
        info = side.guest.qmp("query-migrate")
        assert info["status"] == "active", f"migration left the active phase early: {info}"
        assert fields(fill(side.guest)) == {"filled": []}
        during.append(count_now(side.guest))
        during.append(wait_count_reaches(side.guest, during[0] + 2))
        assert side.guest.qmp("query-migrate")["status"] == "active"
        side.guest.run("kill $(cat /tmp/hog.pid)").check()
        side.guest.qmp(
            "migrate-set-parameters",
            **{k: params[k] for k in ("downtime-limit", "max-bandwidth")},
        )

    new = scenario.migrate(while_active=while_active)
    assert during[1] >= during[0] + 2 > before
    got = fields(fill(new.guest))
    assert got["cache"] == [sha((scenario.shared / "io" / "cache.bin").read_bytes())]
    # The loop goes on at the destination; then stop it and collect its record.
    wait_count_reaches(new.guest, during[1] + 2)
    res = new.guest.run(
        f"touch /tmp/io.stop && timeout {STEP_TIMEOUT} cat /tmp/io.fifo"
        " && cat /tmp/ioloop.log /tmp/cachekeeper.log",
        timeout=STEP_TIMEOUT + 10,
    ).check()
    assert res.out.startswith("stopped "), res.out
    assert "error" not in res.out, res.out
    iterations = int(res.out.split()[1])
    written = new.guest.run("cat /tmp/io.written").check().out.splitlines()
    assert len(written) == iterations
    for line in written:
        i, size, digest, _ = line.split()
        data = (scenario.shared / "io" / f"out-{i}").read_bytes()
        assert (len(data), sha(data)) == (int(size), digest), f"io/out-{i} differs"
    reads = new.guest.run("cat /tmp/io.read").check().out.splitlines()
    assert len(reads) == iterations * IO_SOURCES
    bad = [line for line in reads if line.split()[1] != sha(scenario.io_sources[line.split()[3]])]
    assert bad == [], f"{len(bad)} reads returned wrong data, e.g. {bad[:3]}"
    scenario.round()


def fill(g: Guest) -> str:
    """Step the cache keeper once; its answer."""
    return (
        g.run(
            f"timeout {STEP_TIMEOUT} sh -c 'echo go > /tmp/fill' && timeout {STEP_TIMEOUT}"
            " cat /tmp/filled",
            timeout=2 * STEP_TIMEOUT + 10,
        )
        .check()
        .out
    )


@pytest.mark.xfail(not is_own_daemon(), reason=RUST_NO_UNLINKED, raises=MigrationError)
def test_unlinked_open_file_survives_migration(scenario: Scenario) -> None:
    got = fields(scenario.step("open-unlinked"))
    assert got["head"] == [sha(scenario.unlinked_data[:CHUNK])]
    assert not (scenario.work / "unlinked.bin").exists()
    try:
        scenario.migrate()
        got = fields(scenario.step("read-unlinked"))
        assert got["rest"] == [sha(scenario.unlinked_data[CHUNK:])]
        assert got["stat"] == [str(UNLINKED_SIZE), "0"]
        scenario.round()
    finally:
        assert fields(scenario.step("close-unlinked")) == {"closed": []}
    # Nothing is left behind on the host for it (no hidden link, no copy).
    assert scenario.unexpected_entries() == []


@pytest.mark.xfail(not is_own_daemon(), reason=RUST_NO_HOST_LOCKS, strict=True)
def test_locks_held_across_migrations_until_released(scenario: Scenario) -> None:
    if not scenario.has_vfsprobe:
        pytest.skip("no vfsprobe (needs gcc and libc6-dev) to hold locks in the guest")
    probes = scenario.lock_probes
    assert len(probes) >= 5  # before migrating, after every hop, after the failure
    assert [p for p in probes if not (p[1] and p[2])] == [], "a host process took a lock"
    got = fields(scenario.step("unlock"))
    scenario.locked = False
    assert got == {"posix": ["exit", "0"], "flock": ["exit", "0"]}
    assert not host_lock_taken(scenario.work / "posix.dat", "posix")
    assert not host_lock_taken(scenario.work / "flock.dat", "flock")


def test_program_finishes_with_every_byte_on_host(scenario: Scenario) -> None:
    if scenario.locked:
        scenario.step("unlock")
        scenario.locked = False
    scenario.round()
    got = fields(scenario.step("finish"))
    assert got["rest"] == [sha(scenario.read_data[scenario.rounds * CHUNK :])]
    # The program exited: its fds are closed, so the host sees final content.
    res = scenario.guest.run(
        f"timeout {STEP_TIMEOUT} sh -c 'while kill -0 $(cat /tmp/holder.pid) 2>/dev/null;"
        " do sleep 0.05; done'; cat /tmp/holder.log"
    ).check()
    assert res.out == "", res.out
    scenario.check_host()
    assert scenario.unexpected_entries() == []
    assert len(scenario.pair.results) >= 5


def count_now(g: Guest) -> int:
    return int(g.run("cat /tmp/io.count 2>/dev/null || echo 0").check().out)


def wait_count_reaches(g: Guest, target: int) -> int:
    """Wait (bounded) until the I/O loop has finished ``target`` iterations."""
    res = g.run(
        f"i=0; while [ $(cat /tmp/io.count 2>/dev/null || echo 0) -lt {target} ]; do"
        f" i=$((i + 1)); [ $i -gt {STEP_TIMEOUT * 20} ] && exit 1; sleep 0.05; done;"
        " cat /tmp/io.count",
        timeout=STEP_TIMEOUT + 10,
    )
    assert res.rc == 0, f"I/O loop stuck below {target} iterations: {res}"
    return int(res.out)
