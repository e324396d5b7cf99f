"""``virtiofsd-py`` entry point: parse options, set up logging, run the daemon."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time

from virtiofsd_py.app.options import OptionError, Options, parse_args

_LEVELS = {
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
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["inspect-state"]:
        from virtiofsd_py.migration.inspect import main as inspect_main

        return inspect_main(args[1:])
    if args[:1] == ["mount"]:
        from virtiofsd_py.app.mount import run as mount_run

        return mount_run(args[1:])
    try:
        opts = parse_args(argv)
    except OptionError as e:
        print(f"virtiofsd-py: {e}", file=sys.stderr)
        return 2
    if opts.print_capabilities:
        print(json.dumps(capabilities(), indent=2))
        return 0
    setup_logging(opts)
    for note in opts.deprecations:
        logging.getLogger("virtiofsd_py").warning("%s", note)
    from virtiofsd_py.app.daemon import StartupError, run

    try:
        return run(opts)
    except StartupError as e:
        logging.getLogger("virtiofsd_py").error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
