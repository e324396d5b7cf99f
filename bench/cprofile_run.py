"""Run the daemon under cProfile (the fallback when py-spy is not installed).

``python3 -m bench.cprofile_run OUT.prof -- -m virtiofsd_py ARGS...`` runs
the module as ``python3 -m`` would and writes the stats to OUT.prof when it
exits (the daemon exits by itself when the front-end disconnects). Only the
event-loop thread is profiled, which is where requests run by default.
"""

from __future__ import annotations

import cProfile
import runpy
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[1] != "--" or argv[2] != "-m":
        print("usage: python3 -m bench.cprofile_run OUT.prof -- -m MODULE [ARGS...]")
        return 2
    out, module, args = argv[0], argv[3], argv[4:]
    sys.argv = [module, *args]
    prof = cProfile.Profile()
    status: int | str | None = 0
    try:
        prof.runcall(runpy.run_module, module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        status = e.code
    finally:
        prof.dump_stats(out)
    return status if isinstance(status, int) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
