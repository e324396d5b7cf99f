"""``virtiofsd-py`` entry point: parse options, set up logging, run the daemon or the mount."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from typing import Final

from virtiofsd_py.app.daemon import run as daemon_run
from virtiofsd_py.app.errors import StartupError
from virtiofsd_py.app.mount import run as mount_run
from virtiofsd_py.app.options import LogLevel, OptionError, Options, parse_args
from virtiofsd_py.migration.inspect import main as inspect_main

_LEVELS: Final[dict[LogLevel, int]] = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
    "off": logging.CRITICAL + 10,
}


def capabilities() -> dict[str, object]:
    """QEMU docs/interop/vhost-user.json: a "fs" back-end and its features."""
    return {"type": "fs", "features": ["migrate-precopy", "separate-options"]}


def setup_logging(opts: Options) -> None:
    handler: logging.Handler
    if opts.syslog:
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(
            logging.Formatter("virtiofsd-py[%(process)d]: %(levelname)s %(message)s")
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(
                "[%(asctime)s.%(msecs)03dZ %(levelname)-5s %(name)s] %(message)s",
                datefmt="%Y-%m-%dT%H:%M:%S",
            )
        )
        logging.Formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[opts.log_level])


def main(argv: list[str] | None = None) -> int:
    """The command line: ``inspect-state``, ``mount`` or the daemon; its exit status
    (2: bad command line, 1: start-up failed, said in one log line)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["inspect-state"]:
        return inspect_main(args[1:])
    mount = args[:1] == ["mount"]
    prog = "virtiofsd-py mount" if mount else "virtiofsd-py"
    try:
        opts = parse_args(args[1:] if mount else args, mount=mount)
    except OptionError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if opts.print_capabilities:
        print(json.dumps(capabilities(), indent=2))
        return 0
    setup_logging(opts)
    log = logging.getLogger("virtiofsd_py")
    for note in opts.deprecations:
        log.warning("%s", note)
    try:
        return mount_run(opts) if mount else daemon_run(opts)
    except StartupError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
