"""The man page docs/virtiofsd-py.1, generated from the options table.

OPTIONS and LEGACY -o OPTIONS come from ``options.table()`` and
``options.EXTRA``; the prose sections are the template below.  Regenerate
the committed page after changing either::

    python3 -m virtiofsd_py.app.manpage docs/virtiofsd-py.1

(tests/daemon/test_options.py fails while the committed page differs).
"""

from __future__ import annotations

import sys
from typing import Final

from virtiofsd_py import __version__
from virtiofsd_py.app import options
from virtiofsd_py.app.legacy_options import Switch
from virtiofsd_py.app.options import Entry, Opt

_TEMPLATE: Final = r""".TH VIRTIOFSD-PY 1 "2026" "virtiofsd-py {version}" "User Commands"
.SH NAME
virtiofsd\-py \- virtio\-fs vhost\-user back\-end daemon written in Python
.SH SYNOPSIS
.B virtiofsd\-py
\fB\-\-shared\-dir\fR \fIDIR\fR
(\fB\-\-socket\-path\fR \fIPATH\fR | \fB\-\-fd\fR \fIFD\fR) [\fIOPTIONS\fR]
.br
.B virtiofsd\-py mount
[\fISHARED_DIR\fR] \fIMOUNTPOINT\fR [\fIOPTIONS\fR]
.br
.B virtiofsd\-py \-\-print\-capabilities
.br
.B virtiofsd\-py inspect\-state
\fIFILE\fR
.SH DESCRIPTION
Shares a host directory with a virtual machine through a virtio\-fs device.
QEMU (or another VMM speaking vhost\-user) connects to the socket, hands the
daemon the guest's memory and virtqueues, and the daemon executes the
guest's FUSE requests on \fIDIR\fR.  The guest mounts the share with
\fBmount \-t virtiofs\fR \fITAG\fR \fIMOUNTPOINT\fR.
.PP
One daemon serves one front\-end connection and exits when it ends, on
SIGTERM or on SIGINT.  Options are named as the Rust virtiofsd names them,
so QEMU and libvirt command lines keep working; the legacy C virtiofsd
syntax (\fB\-o\fR, \fB\-d\fR) is accepted with a deprecation warning.
.PP
\fBvirtiofsd\-py mount\fR serves the same back\-end, with the same options,
through the host kernel's FUSE on \fIMOUNTPOINT\fR instead of a vhost\-user
socket.
.SH OPTIONS
{options}
.SH LEGACY \-o OPTIONS
\fB\-o\fR takes a comma\-separated list of the items below (a literal comma
in a value is written twice).  Each sets the option it is listed with.
Anything else is refused.
{legacy}
.SH SIGNALS
.TP
.B SIGTERM, SIGINT
Stop serving and exit with status 0.
.TP
.B SIGUSR1
Write the per\-opcode request and error counters (and latencies, with
\fB\-\-metrics\fR), the errors by errno, queue depths and open
inodes, handles and file descriptors to the log, one line each.
.SH METRICS
With \fB\-\-metrics\fR \fIADDR\fR the daemon answers HTTP GET /metrics in the
Prometheus text format on a unix socket (\fIPATH\fR or \fBunix:\fR\fIPATH\fR,
mode 0600) or a loopback TCP port (\fIPORT\fR, \fB127.0.0.1:\fR\fIPORT\fR,
\fB[::1]:\fR\fIPORT\fR).  Other addresses are refused.  Families:
virtiofsd_py_fuse_requests_total, _fuse_errors_total, _fuse_errno_total,
_fuse_request_duration_seconds (histogram), _queue_pending, _queue_inflight,
_open_inodes, _open_handles, _open_fds, _uptime_seconds.
.SH SYSTEMD
The daemon takes a listening socket from systemd (\fBLISTEN_FDS\fR, see
sd_listen_fds(3)) when neither \fB\-\-socket\-path\fR nor \fB\-\-fd\fR is
given, and reports READY=1, STATUS= and STOPPING=1 to \fB$NOTIFY_SOCKET\fR
(Type=notify).  contrib/systemd has socket\-activated template units.
.SH LIBVIRT
contrib/50\-virtiofsd\-py.json is a vhost\-user backend descriptor (QEMU
docs/interop/vhost\-user.json); installed in /usr/share/qemu/vhost\-user/ it
lets libvirt find the daemon, which it then starts with \fB\-\-fd\fR.
.SH EXIT STATUS
0 after a clean stop, 1 when the daemon cannot start (one line in the log
says why), 2 for a bad command line.
.SH SEE ALSO
.BR qemu (1),
.BR systemd.socket (5),
.BR sd_notify (3)
"""


def roff(text: str) -> str:
    """``text`` as roff prints it literally (hyphens, backslashes, a leading dot)."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _bold(text: str) -> str:
    return f"\\fB{roff(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{roff(text)}\\fR"


def _term(opt: Opt, choices: tuple[str, ...] = ()) -> str:
    """``--flag, --alias ARG``: the first line of a ``.TP`` entry."""
    term = ", ".join(_bold(f) for f in opt.flags)
    if choices:
        term += " " + "|".join(_bold(c) for c in choices)
    elif opt.metavar is not None:
        term += " " + _italic(opt.metavar)
    return term


def _entry(term: str, text: str) -> str:
    return f".TP\n{term}\n{roff(text)}"


def _options_section() -> str:
    rows: dict[str, list[str]] = {group: [] for group in options.GROUPS}
    for e in options.table():
        if e.opt.flags:
            rows[e.opt.group].append(_entry(_term(e.opt, e.choices), e.help))
    for x in options.EXTRA:
        rows[x.group].append(_entry(_term(x), x.help))
    return "\n".join(f".SS {roff(g)}\n" + "\n".join(r) for g, r in rows.items() if r)


def _legacy_row(e: Entry) -> str:
    """One ``.TP`` entry: the items that set option ``e``, and what each means."""
    flag = e.opt.flags[0] if e.opt.flags else None
    items, notes = [], []
    for item in e.opt.legacy:
        if isinstance(item, Switch):
            items.append(_bold(item.name))
            if flag is None:
                continue
            if e.base is not bool:
                notes.append(f"{item.name} is {flag} {item.value}")
            elif item.value == e.default:
                notes.append(f"{item.name} is the default")
            else:
                notes.append(f"{item.name} is {flag}")
        elif item.values is None:
            items.append(_bold(f"{item.name}=") + _italic(e.opt.metavar or "VALUE"))
        else:
            items.append(_bold(f"{item.name}=") + "|".join(_bold(v) for v in item.values))
            notes += [f"{old} is {new}" for old, new in item.values.items() if old != new]
    if flag is None:
        text = e.opt.help
    elif e.base is bool:
        text = "; ".join(notes)
    else:
        text = "; ".join([f"As {flag}", *dict.fromkeys(notes)])
    return _entry(", ".join(items), text)


def render() -> str:
    """The whole page."""
    return _TEMPLATE.format(
        version=__version__,
        options=_options_section(),
        legacy="\n".join(_legacy_row(e) for e in options.table() if e.opt.legacy),
    )


def main(argv: list[str] | None = None) -> int:
    """Write the page to the path given, else to stdout."""
    args = sys.argv[1:] if argv is None else argv
    page = render()
    if args:
        with open(args[0], "w") as f:
            f.write(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
