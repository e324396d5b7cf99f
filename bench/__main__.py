"""``python3 -m bench``: run the benchmark suites, print one report, write JSON.

Suites: ``micro`` (guest-free, through the test front-end), ``guest`` (fio,
metadata and a real workload in a QEMU guest, against the upper bounds),
``migration`` (device-state size and save/load time). docs/benchmarks.md
explains the rows and how to read them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import guest as guest_mod
from bench import micro, migstate
from bench.daemons import CORES, OURS, OURS_PURE, REF, reference_command, selected
from bench.report import environment, table, write_json

SUITES = ("micro", "guest", "migration")
MIGRATION_ROWS = {"migstate-10k": 10_000, "migstate-100k": 100_000}
#: Files the guest looks up before the second migration of the switch-over row.
SWITCH_FILES = {False: 10_000, True: 1000}
PROFILE_DEFAULT = ("getattr", "read4k", "read1m")


def _selected(names: Sequence[str], only: list[str] | None) -> list[str]:
    """Rows named by ``--only`` (a row's exact name, else a prefix), else all of them."""
    if not only:
        return list(names)
    known = set(names)
    return [n for n in names if any(n == o or (o not in known and n.startswith(o)) for o in only)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__)
    p.add_argument("suites", nargs="*", choices=[*SUITES, []], help="default: all of them")
    p.add_argument("--quick", action="store_true", help="short runs and small sizes (~3 min)")
    p.add_argument(
        "--only",
        action="append",
        metavar="ROW",
        help="only rows with this name or prefix (repeatable, or comma-separated)",
    )
    p.add_argument("--daemons", help=f"comma-separated subset of {OURS},{OURS_PURE},{REF}")
    p.add_argument(
        "--core",
        choices=CORES,
        default="both",
        help="our daemon's core: compiled, pure Python (VIRTIOFSD_PY_PUREPYTHON=1), or both"
        " side by side (default)",
    )
    p.add_argument("--cache", default="auto", help="cache mode for both daemons (default auto)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="guest: run every row N times (targets interleaved); switchover: migrate N"
        " times; the median is reported",
    )
    p.add_argument(
        "--queues",
        type=int,
        default=1,
        help="guest: request queues per virtio-fs device (the Rust daemon serves one:"
        " left out when N > 1)",
    )
    p.add_argument("--seconds", type=float, help="micro: seconds per run")
    p.add_argument("--count", type=int, help="micro: requests per run instead of a duration")
    p.add_argument("--qd", default=None, help="micro: queue depths, e.g. 1,16")
    p.add_argument(
        "--profile",
        nargs="?",
        const=",".join(PROFILE_DEFAULT),
        metavar="WORKLOADS",
        help="profile our daemon on these micro workloads (py-spy, else cProfile)",
    )
    p.add_argument("--out-dir", type=Path, help="where the JSON goes (default bench/results)")
    p.add_argument("--no-json", action="store_true", help="print only")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="guest suite: where shares and the disk image live (default /var/tmp)",
    )
    args = p.parse_args(argv)
    if args.only:
        args.only = [o for item in args.only for o in item.split(",") if o]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    suites = args.suites or list(SUITES)
    specs = selected(args.daemons.split(",") if args.daemons else None, args.cache, args.core)
    if not specs:
        print("no daemon selected", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    ref = reference_command()
    missing = "" if ref else " (no Rust virtiofsd: set VIRTIOFSD_REF or install virtiofsd)"
    log(f"bench: daemons {', '.join(s.name for s in specs)}{missing}")
    out: dict[str, Any] = {
        "environment": environment(),
        "daemons": {s.name: s.template for s in specs},
    }
    report: list[str] = []
    t0 = time.monotonic()

    if "micro" in suites:
        workloads = _selected(micro.WORKLOADS, args.only)
        if workloads:
            qds = (
                [int(q) for q in args.qd.split(",")]
                if args.qd
                else ([1] if args.quick else [1, 16])
            )
            seconds = args.seconds or (0.5 if args.quick else 2.0)
            res = micro.run_micro(
                specs,
                workloads,
                qds=qds,
                seconds=seconds,
                count=args.count,
                warmup=0 if args.count else 0.3,
                log=log,
            )
            out["micro"] = [r.as_json() for r in res]
            report.append(
                "== microbenchmark (guest-free, test front-end) ==\n"
                + table(*micro.micro_table(res))
            )
    if args.profile:
        wl = [w for w in args.profile.split(",") if w]
        measured = {
            r["workload"]: (r["d_us_per_req"], 1e6 * r["user_s"] / max(1, r["requests"]))
            for r in out.get("micro", [])
            if r["daemon"] == OURS and r["qd"] == 1
        }
        reports = micro.run_profiles(
            wl,
            (args.out_dir or Path("/tmp")) / "vfb-profiles",
            seconds=2.0 if args.quick else 5.0,
            cpu_per_req=measured,
            log=log,
        )
        out["profiles"] = reports
        report += list(reports.values())
    if "guest" in suites:
        rows = _selected(guest_mod.ROWS, args.only)
        if rows:
            from bench.guestimage import unavailable_reason as image_reason
            from virtiofsd_py.testing.qemu.guest import unavailable_reason

            reason = unavailable_reason() or image_reason()
            if reason:
                log(f"guest suite skipped: {reason}")
                report.append(f"== in-guest benchmark: skipped ({reason}) ==\n")
            else:
                params = guest_mod.Params.quick() if args.quick else guest_mod.Params.full()
                work = micro.new_workdir_in(args.workdir, "vfb-guest-")
                try:
                    res_g = guest_mod.run_guest(
                        specs,
                        work,
                        params,
                        rows,
                        repeat=args.repeat,
                        queues=args.queues,
                        log=log,
                    )
                finally:
                    micro.remove_tree(work)
                out["guest"] = {"params": params.__dict__, "rows": guest_mod.cells_json(res_g)}
                report.append(
                    f"== in-guest benchmark ({params}) ==\n"
                    "values: higher is better except unit s; ratios: py's speed / the other's"
                    " (> 1: virtiofsd-py faster)\n" + table(*guest_mod.guest_table(res_g))
                )
    if "migration" in suites and _selected(["switchover"], args.only):
        from bench import migswitch
        from virtiofsd_py.testing.qemu.guest import unavailable_reason as guest_reason

        reason = guest_reason()
        if reason:
            report.append(f"== migration switch-over: skipped ({reason}) ==\n")
        else:
            work = micro.new_workdir_in(args.workdir, "vfb-switch-")
            try:
                res_s = migswitch.run_switch(
                    specs, SWITCH_FILES[args.quick], work, repeat=args.repeat, log=log
                )
            finally:
                micro.remove_tree(work)
            done = [r for r in res_s if isinstance(r, migswitch.SwitchResult)]
            out["switchover"] = [r.as_json() if not isinstance(r, str) else r for r in res_s]
            report.append(
                "== migration switch-over seen from QEMU (query-migrate), guest holding"
                " the inodes; 'empty': the same guest before the lookups ==\n"
                + table(*migswitch.switch_table(done))
                + "".join(f"{r}\n" for r in res_s if isinstance(r, str))
            )
    if "migration" in suites:
        names = _selected(list(MIGRATION_ROWS), args.only)
        sizes = [MIGRATION_ROWS[n] for n in names if not (args.quick and n == "migstate-100k")]
        if sizes:
            res_m = migstate.run_migstate(sizes, log=log)
            out["migration"] = [r.as_json() for r in res_m]
            report.append(
                "== migration state (passthrough tables, StateProvider save/load) ==\n"
                + table(*migstate.mig_table(res_m))
            )
    out["elapsed_s"] = time.monotonic() - t0
    print("\n".join(report), end="")
    if not args.no_json:
        path = write_json(out, "bench-quick" if args.quick else "bench", args.out_dir)
        log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
