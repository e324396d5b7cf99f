"""Guest-free microbenchmark: FUSE requests straight onto the virtqueues of a daemon.

The test front-end (``virtiofsd_py.testing``) plays QEMU and the guest
driver: memfd guest memory, split rings, eventfd kicks and calls, requests
laid out as Linux's virtio-fs driver lays them out. Each workload sends one
kind of request, ``qd`` at a time, for a fixed time or count, against each
daemon in turn (same invocation, same host directory), and reports:

- ``req/s`` and ``us/req`` (wall time per request; at qd 1 a full round trip,
  including this Python front-end's own cost, which is large: compare
  daemons by ratio, or use ``d_us/req``);
- ``d_us/req``: the daemon's CPU per request (utime+stime of the process
  tree, /proc/PID/stat) - the fairest comparison;
- the daemon's peak RSS.

``--profile`` samples our daemon with py-spy (``record --format raw``)
during extra runs of the chosen workloads and prints the hottest functions
and the split by layer; without py-spy it runs the daemon under cProfile
(``bench/cprofile_run.py``) instead.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import procstat
from bench.daemons import DaemonSpec
from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess
from virtiofsd_py.testing.frontend.fuse_client import FuseClient, FuseReply, Pending
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend

ROOT = abi.FUSE_ROOT_ID
DATA_FILE = "data.bin"
SCRATCH_FILE = "scratch.bin"
DATA_SIZE = 64 << 20
WRITE_SPAN = 16 << 20
KIB4 = 4096
MIB1 = 1 << 20
WORKLOADS = ("getattr", "lookup", "read4k", "read1m", "write4k")


@dataclass
class MicroResult:
    """One (daemon, workload, qd) run."""

    daemon: str
    workload: str
    qd: int
    requests: int
    seconds: float
    cpu_s: float
    user_s: float
    sys_s: float
    peak_rss_kib: int

    @property
    def req_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def us_per_req(self) -> float:
        return 1e6 * self.seconds / self.requests if self.requests else 0.0

    @property
    def d_us_per_req(self) -> float:
        return 1e6 * self.cpu_s / self.requests if self.requests else 0.0

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(req_per_s=self.req_per_s, us_per_req=self.us_per_req)
        d.update(d_us_per_req=self.d_us_per_req)
        return d


class BenchError(Exception):
    """A daemon answered a benchmark request with an error or a wrong size."""


@dataclass
class Request:
    """One request to repeat: what to submit and the payload length to expect."""

    opcode: int
    nodeid: int
    args: bytes | list[bytes]
    reply_size: int
    expect_len: int


def make_share(root: Path) -> Path:
    """The shared directory: a data file for reads, a scratch file for writes."""
    share = root / "share"
    share.mkdir(parents=True, exist_ok=True)
    data = share / DATA_FILE
    if not data.exists() or data.stat().st_size != DATA_SIZE:
        block = random.Random(7).randbytes(MIB1)
        with open(data, "wb") as f:
            for _ in range(DATA_SIZE // MIB1):
                f.write(block)
    with open(share / SCRATCH_FILE, "wb") as f:
        f.truncate(WRITE_SPAN)
    return share


class Session:
    """One daemon process, one vhost-user connection, one FUSE session."""

    def __init__(self, spec: DaemonSpec, share: Path, workdir: Path) -> None:
        self.spec = spec
        self.daemon = DaemonProcess(share, workdir, template=spec.template).start(timeout=30)
        try:
            self.fe = VhostUserFrontend.connect(self.daemon.socket_path, timeout=30)
            # 16 x 1 MiB in flight plus rings fits with room to spare.
            self.fe.connect_and_start(queues=2, queue_size=1024, mem_size=64 << 20)
            self.fuse = FuseClient(self.fe, timeout=30)
            self.fuse.init()
        except BaseException:
            self.daemon.kill()
            raise
        self.rng = random.Random(1)
        self.nodes: dict[str, int] = {}
        self.handles: dict[str, int] = {}

    @property
    def pid(self) -> int:
        return self.daemon.pid

    def node(self, name: str) -> int:
        if name not in self.nodes:
            self.nodes[name] = self.fuse.lookup(ROOT, name).nodeid
        return self.nodes[name]

    def handle(self, name: str, flags: int) -> int:
        if name not in self.handles:
            self.handles[name] = self.fuse.open(self.node(name), flags).fh
        return self.handles[name]

    def close(self) -> int:
        """Disconnect and wait for the daemon to exit; its exit status."""
        try:
            self.fe.close()
        finally:
            status = self.daemon.stop(timeout=10)
        return status


def _factory(s: Session, workload: str) -> Callable[[], Request]:
    """A function producing the next request of ``workload`` (setup done here)."""
    fc = s.fuse
    if workload == "getattr":
        args = abi.GETATTR_IN.pack(0, 0, 0)
        return lambda: Request(abi.FUSE_GETATTR, ROOT, args, abi.ATTR_OUT.size, abi.ATTR_OUT.size)
    if workload == "lookup":
        name = DATA_FILE.encode() + b"\0"
        size = abi.ENTRY_OUT.size
        return lambda: Request(abi.FUSE_LOOKUP, ROOT, name, size, size)
    if workload in ("read4k", "read1m"):
        node, fh = s.node(DATA_FILE), s.handle(DATA_FILE, os.O_RDONLY)
        size = KIB4 if workload == "read4k" else MIB1
        blocks = DATA_SIZE // size
        pos = iter(range(1 << 62))

        def read() -> Request:
            # 4 KiB: random blocks; 1 MiB: sequential, wrapping at the end.
            block = s.rng.randrange(blocks) if size == KIB4 else next(pos) % blocks
            off = block * size
            return Request(abi.FUSE_READ, node, fc.read_args(fh, off, size), size, size)

        return read
    if workload == "write4k":
        node, fh = s.node(SCRATCH_FILE), s.handle(SCRATCH_FILE, os.O_RDWR)
        payload = bytes(range(256)) * (KIB4 // 256)
        blocks = WRITE_SPAN // KIB4

        def write() -> Request:
            off = s.rng.randrange(blocks) * KIB4
            args = abi.WRITE_IN.pack(fh, off, KIB4, 0, 0, os.O_RDWR, 0)
            return Request(abi.FUSE_WRITE, node, [args, payload], abi.WRITE_OUT.size, 8)

        return write
    raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")


def _check(req: Request, reply: FuseReply) -> None:
    if reply.error:
        raise BenchError(f"{abi.opcode_name(req.opcode)}: error {reply.error}")
    if len(reply.payload) != req.expect_len:
        raise BenchError(
            f"{abi.opcode_name(req.opcode)}: {len(reply.payload)} bytes, want {req.expect_len}"
        )


def _batch(s: Session, make: Callable[[], Request], qd: int) -> None:
    """``qd`` requests in flight at once, then all their replies checked."""
    fc = s.fuse
    sent: list[tuple[Request, Pending]] = []
    for i in range(qd):
        req = make()
        p = fc.submit(req.opcode, req.nodeid, req.args, req.reply_size, kick=i == qd - 1)
        sent.append((req, p))
    fc.wait([p for _, p in sent])
    for req, p in sent:
        _check(req, fc.reply(p))


def run_workload(
    s: Session,
    workload: str,
    *,
    qd: int = 1,
    seconds: float = 2.0,
    count: int | None = None,
    warmup: float = 0.3,
) -> MicroResult:
    """Warm up, then run for ``seconds`` (or ``count`` requests) and account the daemon's CPU."""
    make = _factory(s, workload)
    end = time.monotonic() + warmup
    while time.monotonic() < end:
        _batch(s, make, qd)
    before = procstat.sample(s.pid)
    t0 = time.monotonic()
    n = 0
    while (n < count) if count is not None else (time.monotonic() - t0 < seconds):
        _batch(s, make, qd)
        n += qd
    elapsed = time.monotonic() - t0
    used = procstat.sample(s.pid) - before
    if workload == "lookup":
        # Give back the lookups so the daemon's table stays as it was.
        s.fuse.forget(s.node(DATA_FILE), n + 1)
        s.nodes.pop(DATA_FILE, None)
    return MicroResult(
        s.spec.name, workload, qd, n, elapsed, used.cpu, used.user, used.system, used.peak_rss_kib
    )


# -- profiling --------------------------------------------------------------------
def pyspy_binary() -> str | None:
    return shutil.which("py-spy")


def profile_workload(
    s: Session, workload: str, out: Path, *, qd: int = 1, seconds: float = 5.0, rate: int = 2000
) -> Path:
    """Sample the daemon with py-spy (raw collapsed stacks) while ``workload`` runs."""
    spy = pyspy_binary()
    if spy is None:
        raise FileNotFoundError("py-spy is not installed")
    # --native shows the C frames too: syscalls, and epoll (idle) told apart from work.
    cmd = [
        spy,
        "record",
        "-p",
        str(s.pid),
        "-r",
        str(rate),
        "-f",
        "raw",
        "-o",
        str(out),
        "--native",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    # py-spy prints this line once it is attached and sampling.
    line = ""
    while "Sampling process" not in line:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"py-spy failed: exit status {proc.wait()}")
    run_workload(s, workload, qd=qd, seconds=seconds, warmup=0)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    return out


def main_profile_cprofile(out: Path) -> str:
    """The daemon command prefix that runs it under cProfile (see cprofile_run.py)."""
    return f"{sys.executable} -m bench.cprofile_run {out} --"


def new_workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("VIRTIOFSD_PY_BENCH_TMP")))


# -- the suite --------------------------------------------------------------------
def run_micro(
    specs: list[DaemonSpec],
    workloads: Sequence[str] = WORKLOADS,
    *,
    qds: Sequence[int] = (1,),
    seconds: float = 2.0,
    count: int | None = None,
    warmup: float = 0.3,
    log: Callable[[str], None] = print,
) -> list[MicroResult]:
    """Every workload x qd against every daemon, one daemon session each."""
    results: list[MicroResult] = []
    root = new_workdir("vfb-micro-")
    try:
        share = make_share(root)
        for spec in specs:
            s = Session(spec, share, root / spec.name)
            try:
                for w in workloads:
                    for qd in qds:
                        r = run_workload(s, w, qd=qd, seconds=seconds, count=count, warmup=warmup)
                        log(f"  micro {spec.name} {w} qd{qd}: {r.req_per_s:.0f} req/s")
                        results.append(r)
            finally:
                status = s.close()
            if status != 0:
                raise BenchError(f"{spec.name} exited with status {status}:\n{s.daemon.log()}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def micro_table(results: list[MicroResult]) -> tuple[list[str], list[list[object]]]:
    """Rows of the report, with ours/ref ratios of req/s and of daemon CPU per request."""
    from bench.daemons import OURS, OURS_PURE, REF
    from bench.report import ratio

    by = {(r.daemon, r.workload, r.qd): r for r in results}
    headers = [
        "workload", "qd", "daemon", "req/s", "us/req", "d_us/req", "d_usr/req", "peakMiB",
        "py/rs req/s", "py/rs d_us", "pure/compiled req/s",
    ]  # fmt: skip
    rows: list[list[object]] = []
    for r in results:
        other = by.get((REF, r.workload, r.qd)) if r.daemon in (OURS, OURS_PURE) else None
        compiled = by.get((OURS, r.workload, r.qd)) if r.daemon == OURS_PURE else None
        rows.append([
            r.workload, r.qd, r.daemon, r.req_per_s, r.us_per_req, r.d_us_per_req,
            1e6 * r.user_s / r.requests if r.requests else None, r.peak_rss_kib / 1024,
            ratio(r.req_per_s, other.req_per_s) if other else None,
            ratio(r.d_us_per_req, other.d_us_per_req) if other else None,
            ratio(r.req_per_s, compiled.req_per_s) if compiled else None,
        ])  # fmt: skip
    return headers, rows


def run_profiles(
    workloads: Sequence[str],
    out_dir: Path,
    *,
    seconds: float = 5.0,
    qd: int = 1,
    cpu_per_req: dict[str, tuple[float, float]] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Profile our daemon per workload (py-spy, else cProfile); the text reports.

    ``cpu_per_req`` (workload -> daemon CPU µs per request, total and user,
    from unprofiled runs) turns the stage percentages into µs.
    """
    from bench.daemons import ours
    from bench.profile_report import parse_cprofile, parse_pyspy_raw

    reports: dict[str, str] = {}
    root = new_workdir("vfb-prof-")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        share = make_share(root)
        for w in workloads:
            if pyspy_binary() is not None:
                s = Session(ours(), share, root / f"d-{w}")
                try:
                    raw = profile_workload(s, w, out_dir / f"pyspy-{w}.txt", qd=qd, seconds=seconds)
                finally:
                    s.close()
                prof = parse_pyspy_raw(raw.read_text())
                tool = "py-spy"
            else:
                stats = out_dir / f"cprofile-{w}.prof"
                spec = ours()
                spec = DaemonSpec(spec.name, spec.template.replace(
                    f"{sys.executable} -m virtiofsd_py",
                    f"{main_profile_cprofile(stats)} -m virtiofsd_py", 1))  # fmt: skip
                s = Session(spec, share, root / f"d-{w}")
                try:
                    run_workload(s, w, qd=qd, seconds=seconds, warmup=0)
                finally:
                    s.close()
                prof = parse_cprofile(stats)
                tool = "cProfile"
            us = (cpu_per_req or {}).get(w)
            reports[w] = (
                f"== profile of virtiofsd-py, {w} qd{qd} ({tool}) ==\n"
                + prof.stages(us)
                + prof.top()
            )
            log(reports[w])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return reports


def new_workdir_in(parent: Path, prefix: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
