"""One-command demo: the daemon, a small QEMU guest, and the share seen from inside it.

    python3 -m virtiofsd_py.app.demo [DIR] [--backend memory] [--shell] [--cmd CMD]

Starts ``virtiofsd-py`` on DIR (a fresh directory with a README when DIR is
not given), boots the test harness's guest (Debian kernel + busybox; set up
by scripts/setup-test-env.sh) with a vhost-user-fs device, mounts the share
at /mnt and prints what ``ls -la /mnt; cat /mnt/README*; df -h /mnt`` show
there.  ``--shell`` then reads commands line by line and runs each in the
guest (over the harness's control channel, so no job control or TTY).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from virtiofsd_py.testing.daemon_proc import DaemonProcess
from virtiofsd_py.testing.qemu.guest import Guest, GuestError, unavailable_reason

TAG = "share"
SHOW = "ls -la /mnt; echo; cat /mnt/README* 2>/dev/null; echo; df -h /mnt; mount | grep virtiofs"
README = """Hello from the host!

This directory is served by virtiofsd-py, a virtio-fs back-end in Python,
and mounted by the guest with:  mount -t virtiofs share /mnt
"""


def _daemon_template(backend: str, log_level: str) -> str:
    share = "" if backend == "memory" else " --shared-dir {shared_dir}"
    return (
        f"{shlex.quote(sys.executable)} -m virtiofsd_py --socket-path {{socket}}{share}"
        f" --backend {backend} --sandbox none --cache auto --xattr --log-level {log_level}"
    )


def _shell(guest: Guest) -> None:
    print("guest shell: one command per line, 'exit' or EOF to quit")
    while True:
        try:
            line = input("guest# ")
        except EOFError:
            print()
            return
        if line.strip() in ("exit", "quit"):
            return
        if not line.strip():
            continue
        try:
            res = guest.run(line, timeout=300)
        except (GuestError, TimeoutError) as e:
            print(f"demo: {e}", file=sys.stderr)
            continue
        sys.stdout.write(res.out)
        sys.stderr.write(res.err)
        if res.rc:
            print(f"[exit {res.rc}]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m virtiofsd_py.app.demo", description=__doc__)
    ap.add_argument("dir", nargs="?", help="directory to share (default: a fresh one)")
    ap.add_argument("--backend", choices=("passthrough", "memory"), default="passthrough")
    ap.add_argument("--shell", action="store_true", help="then run commands in the guest")
    ap.add_argument("--cmd", default=SHOW, help="what to run in the guest first")
    ap.add_argument("--log-level", default="warn", help="the daemon's --log-level")
    args = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"demo: cannot boot a guest here: {reason}", file=sys.stderr)
        print("demo: run scripts/setup-test-env.sh (as root) first", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="vfsd-demo-") as tmp:
        work = Path(tmp)
        if args.backend == "memory":
            if args.dir:
                ap.error("DIR makes no sense with --backend memory")
            share = work / "unused"
        elif args.dir:
            share = Path(args.dir).resolve()
        else:
            share = work / "share"
            share.mkdir()
            (share / "README").write_text(README)
        template = _daemon_template(args.backend, args.log_level)
        daemon = DaemonProcess(share, work, template=template).start(timeout=30)
        print(f"demo: daemon pid {daemon.pid} serving {args.backend}"
              f"{'' if args.backend == 'memory' else ' ' + str(share)}; booting the guest...",
              flush=True)  # fmt: skip
        try:
            with Guest.boot(vhost_sockets={TAG: str(daemon.socket_path)}) as guest:
                guest.run(f"mkdir -p /mnt && mount -t virtiofs {TAG} /mnt").check()
                if args.backend == "memory":
                    guest.run(f"printf %s {shlex.quote(README)} > /mnt/README").check()
                print(f"demo: guest kernel {guest.release or '?'}; in the guest: {args.cmd}\n")
                res = guest.run(args.cmd, timeout=120)
                sys.stdout.write(res.out)
                sys.stderr.write(res.err)
                if args.shell:
                    _shell(guest)
                guest.run("umount /mnt")
        finally:
            status = daemon.stop(timeout=10)
        print(f"\ndemo: guest powered off, daemon exited with status {status}")
        if status != 0:
            print(daemon.log()[-4000:], file=sys.stderr)
        return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
