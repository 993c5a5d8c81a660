"""systemd's notify protocol (``Type=notify``): READY, WATCHDOG and STOPPING datagrams.

Socket code instead of a dependency: systemd sets ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC``; outside
systemd both are unset and every call is a no-op. :class:`NotifyReceiver` is the other end of the
same protocol, for ``run --processes N``: its children report to the supervisor as a single daemon
reports to systemd.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct

# struct ucred (pid, uid, gid), which the kernel attaches to every datagram when SO_PASSCRED is on.
_UCRED = struct.Struct("3i")
_MAX_DATAGRAM_BYTES = 4096


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to systemd; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract-namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def watchdog_timeout() -> float | None:
    """WatchdogSec in seconds, or None without a watchdog (or one meant for another process)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1_000_000
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None without a watchdog."""
    timeout = watchdog_timeout()
    return None if timeout is None else max(0.5, timeout / 2)


class NotifyReceiver:
    """A notify socket of our own: what processes we started say with :func:`notify`.

    One datagram socket in the abstract namespace (no file to create, clean up or protect), with
    SO_PASSCRED: the kernel stamps each datagram with its sender's pid, so the receiver knows which
    child spoke, and a stranger that finds the address speaks for no one. Linux only, as systemd is.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        name = f"seedance-archiver/{os.getpid()}/{secrets.token_hex(8)}"
        self.sock.bind("\0" + name)
        self.address = "@" + name  # the value of NOTIFY_SOCKET for the senders

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[tuple[int, dict[str, str]]]:
        """Every datagram waiting, as (sender's pid, its KEY=value fields); never blocks."""
        received: list[tuple[int, dict[str, str]]] = []
        while True:
            try:
                data, ancillary, _flags, _address = self.sock.recvmsg(
                    _MAX_DATAGRAM_BYTES, socket.CMSG_SPACE(_UCRED.size)
                )
            except (BlockingIOError, InterruptedError):
                return received
            pid = next(
                (
                    _UCRED.unpack_from(cdata)[0]
                    for level, kind, cdata in ancillary
                    if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
                    and len(cdata) >= _UCRED.size
                ),
                None,
            )
            if pid is None:
                continue
            lines = data.decode(errors="replace").splitlines()
            received.append((pid, dict(line.partition("=")[::2] for line in lines if "=" in line)))

    def close(self) -> None:
        self.sock.close()
