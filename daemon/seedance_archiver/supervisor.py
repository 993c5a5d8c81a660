"""``run --processes N``: N daemon processes on one machine, kept running by a small supervisor.

One Python process polls on one core. On PostgreSQL several daemons already share a table safely
(leases, SKIP LOCKED), so using every core is a matter of starting more of them: each child is a
plain ``seedance-archiver run`` with its own lease owner and heartbeat. The supervisor restarts a child
that dies (with a back-off when it dies young), and on SIGTERM or SIGINT passes the signal on and
waits for every child's graceful stop.

Under systemd (``Type=notify``) the supervisor is the unit's main process, so it speaks for its
children: each child reports to a notify socket of the supervisor's own
(:class:`systemd.NotifyReceiver`) as a single daemon reports to systemd. The supervisor says READY=1
once every child has said it, and WATCHDOG=1 only while every running child has pinged within
WatchdogSec: a child that stalls (its tick stuck, or the process stopped) withholds the unit's ping,
and systemd restarts the unit. A child that dies is the supervisor's to restart, not a stall.

Child ``i`` (from 0) serves /healthz, /readyz and /metrics on ``SEEDANCE_HTTP_PORT + i`` (port 0 keeps
them off). systemd users may prefer the template unit, one process per instance
(``deploy/seedance-archiver@.service``).
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import structlog

from seedance_archiver import systemd

log = structlog.get_logger(__name__)

# A child that dies within this long of its start is restarted after a growing delay.
YOUNG_SECONDS = 10.0
RESTART_MIN_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
WATCH_SECONDS = 0.5  # how often children are looked at (a restart waits at most this long more)
# Beyond the children's own grace period: how long their stop may take before they are killed.
STOP_MARGIN_SECONDS = 10.0
# systemd's variables are the supervisor's: it is the unit's main process. The children get their
# own, pointing at the supervisor's notify socket.
_PARENT_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclasses.dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float = 0.0
    delay: float = RESTART_MIN_SECONDS
    ready: bool = False  # this process said READY=1
    alive_at: float = 0.0  # its start, or its last WATCHDOG=1: when it last showed it ticks


class Supervisor:
    """Starts ``processes`` children running ``argv`` and keeps them running until told to stop."""

    def __init__(
        self,
        argv: Sequence[str],
        processes: int,
        *,
        env: Mapping[str, str],
        http_port: int,
        grace_seconds: float,
        watchdog_seconds: float | None = None,
    ) -> None:
        self.argv = list(argv)
        self.env = {k: v for k, v in env.items() if k not in _PARENT_ONLY}
        self.http_port = http_port
        self.stop_timeout = grace_seconds + STOP_MARGIN_SECONDS
        self.children = [_Child(i) for i in range(processes)]
        self.stop_requested = threading.Event()
        self.restarts = 0
        # Only under systemd (or whoever set NOTIFY_SOCKET) do the children report to us.
        self.receiver = systemd.NotifyReceiver() if env.get("NOTIFY_SOCKET") else None
        self.watchdog_seconds = watchdog_seconds if self.receiver else None
        self.ready_sent = False
        self.ping_at = 0.0
        self._poller = select.poll()  # not select(): no FD_SETSIZE limit under a high LimitNOFILE
        if self.receiver is not None:
            self._poller.register(self.receiver, select.POLLIN)

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; 0 when every child stopped cleanly."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        log.info(
            "supervisor_starting",
            processes=len(self.children),
            notify=self.receiver is not None,
            watchdog_s=self.watchdog_seconds,
        )
        try:
            while not self.stop_requested.is_set():
                now = time.monotonic()
                self._hear(now)
                for child in self.children:
                    self._look_after(child, now)
                self._report(now)
                self._wait()
            return self._stop_all()
        finally:
            if self.receiver is not None:
                self.receiver.close()

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        self.stop_requested.set()

    def _wait(self) -> None:
        """WATCH_SECONDS, or less when a child speaks (a signal is seen within WATCH_SECONDS)."""
        if self.receiver is None:
            self.stop_requested.wait(WATCH_SECONDS)
            return
        self._poller.poll(WATCH_SECONDS * 1000)

    def _hear(self, now: float) -> None:
        """Take in what the children said: READY=1 once, WATCHDOG=1 while they tick."""
        if self.receiver is None:
            return
        by_pid = {c.process.pid: c for c in self.children if c.process is not None}
        for pid, fields in self.receiver.receive():
            child = by_pid.get(pid)
            if child is None:
                continue  # a process gone since, or not ours
            if fields.get("READY") == "1" and not child.ready:
                child.ready = True
                log.info("daemon_process_ready", process=child.index, pid=pid)
            if fields.get("WATCHDOG") == "1":
                child.alive_at = now

    def _report(self, now: float) -> None:
        """READY=1 once every child is ready; WATCHDOG=1 while every running child ticks."""
        if self.receiver is None:
            return
        if not self.ready_sent and all(c.ready for c in self.children):
            systemd.notify(f"READY=1\nSTATUS={len(self.children)} daemon processes archiving")
            self.ready_sent = True
            log.info("supervisor_ready", processes=len(self.children))
        if self.watchdog_seconds is None or now < self.ping_at:
            return
        self.ping_at = now + max(0.5, self.watchdog_seconds / 2)
        # A dead child is not a stalled one: the supervisor restarts it.
        stalled = [
            c
            for c in self.children
            if c.process is not None and now - c.alive_at >= self.watchdog_seconds
        ]
        if not stalled:
            systemd.notify("WATCHDOG=1")
            return
        log.warning(
            "watchdog_withheld",
            stalled=[c.index for c in stalled],
            pids=[c.process.pid for c in stalled if c.process is not None],
            silent_s=[round(now - c.alive_at, 1) for c in stalled],
        )

    def _look_after(self, child: _Child, now: float) -> None:
        if child.process is not None:
            code = child.process.poll()
            if code is None:
                return
            lived = now - child.started
            child.delay = (
                min(child.delay * 2, RESTART_MAX_SECONDS)
                if lived < YOUNG_SECONDS
                else RESTART_MIN_SECONDS
            )
            child.restart_at = now + child.delay
            child.process = None
            log.error(
                "daemon_process_died",
                process=child.index,
                exit_code=code,
                lived_s=round(lived, 1),
                restart_in_s=child.delay,
            )
        if now >= child.restart_at:
            self._start(child, now)

    def _start(self, child: _Child, now: float) -> None:
        env = dict(self.env)
        if self.http_port:
            env["SEEDANCE_HTTP_PORT"] = str(self.http_port + child.index)
        if self.receiver is not None:
            env["NOTIFY_SOCKET"] = self.receiver.address
            if self.watchdog_seconds is not None:
                env["WATCHDOG_USEC"] = str(round(self.watchdog_seconds * 1_000_000))
        if child.started:
            self.restarts += 1
        # Its own process group: a terminal's Ctrl-C reaches the supervisor alone, which passes
        # it on once, so no child sees a second signal (that one means "exit now").
        child.process = subprocess.Popen(self.argv, env=env, process_group=0)
        child.started = now
        child.ready = False
        child.alive_at = now  # its start counts as a sign of life, for one watchdog interval
        log.info("daemon_process_started", process=child.index, pid=child.process.pid)

    def _stop_all(self) -> int:
        if self.receiver is not None:
            systemd.notify("STOPPING=1")
        running = [c.process for c in self.children if c.process is not None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        codes = []
        for process in running:
            try:
                codes.append(process.wait(timeout=max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                log.error("daemon_process_killed", pid=process.pid, after_s=self.stop_timeout)
                process.kill()
                codes.append(process.wait())
        log.info("supervisor_stopped", exit_codes=codes, restarts=self.restarts)
        return 0 if all(code == 0 for code in codes) else 1


def child_argv() -> list[str]:
    """The command of one child: this interpreter running the daemon, one process."""
    return [sys.executable, "-m", "seedance_archiver", "run"]


def run(processes: int, *, http_port: int, grace_seconds: float) -> int:
    return Supervisor(
        child_argv(),
        processes,
        env=os.environ,
        http_port=http_port,
        grace_seconds=grace_seconds,
        watchdog_seconds=systemd.watchdog_timeout(),
    ).run()
