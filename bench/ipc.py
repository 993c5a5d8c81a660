"""Bytes from one process to another: a Unix socket pair against a pipe (1 MiB buffer).

The folder store sends each video to its writer process (``archive/writer.py``); this measures
what the channel costs, per MB, on each side: CPU-s (user and system) of the sender and of the
reader, and the sender's wall time, for ``--mb`` MB sent in 1 MiB writes, each kind twice,
alternating. Nothing touches the network or the disk.

    .venv/bin/python -m bench.ipc [--mb 2000]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import time
from collections.abc import Callable

CHUNK = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _read_all(read_into: Callable[[memoryview], int]) -> None:
    view = memoryview(bytearray(CHUNK))
    while read_into(view):
        pass


def measure(kind: str, megabytes: int) -> str:
    if kind == "socket":
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHUNK)
        send_fd, read_fd = ours.detach(), theirs.detach()
        sender = socket.socket(fileno=send_fd)
        send: Callable[[memoryview], int] = sender.send
    else:
        read_fd, send_fd = os.pipe()
        fcntl.fcntl(send_fd, F_SETPIPE_SZ, CHUNK)
        send = lambda view: os.write(send_fd, view)  # noqa: E731
    pid = os.fork()
    if pid == 0:  # the reader
        os.close(send_fd)
        start = os.times()
        if kind == "socket":
            _read_all(socket.socket(fileno=read_fd).recv_into)
        else:
            _read_all(lambda view: os.readv(read_fd, [view]))
        end = os.times()
        print(
            f"  {kind} reader: user {(end.user - start.user) * 1e3 / megabytes:.3f}, "
            f"system {(end.system - start.system) * 1e3 / megabytes:.3f} ms per MB",
            flush=True,
        )
        os._exit(0)
    os.close(read_fd)
    data = os.urandom(CHUNK)
    start, began = os.times(), time.perf_counter()
    for _ in range(megabytes):
        view = memoryview(data)
        while view:
            view = view[send(view) :]
    if kind == "socket":
        sender.close()
    else:
        os.close(send_fd)
    os.waitpid(pid, 0)
    end, wall = os.times(), time.perf_counter() - began
    return (
        f"{kind} sender: user {(end.user - start.user) * 1e3 / megabytes:.3f}, "
        f"system {(end.system - start.system) * 1e3 / megabytes:.3f} ms per MB, "
        f"wall {wall * 1e3 / megabytes:.3f} ms per MB"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--mb", type=int, default=2000, help="MB sent per measurement")
    args = parser.parse_args(argv)
    for kind in ("socket", "pipe", "socket", "pipe"):
        print(measure(kind, args.mb), flush=True)


if __name__ == "__main__":
    main()
