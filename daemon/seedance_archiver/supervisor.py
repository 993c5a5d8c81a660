"""``run --processes N``: N daemon processes on one machine, kept running by a small supervisor.

One Python process polls on one core. On PostgreSQL several daemons already share a table safely
(leases, SKIP LOCKED), so using every core is a matter of starting more of them: each child is a
plain ``seedance-archiver run`` with its own lease owner and heartbeat. The supervisor restarts a child
that dies (with a back-off when it dies young), and on SIGTERM or SIGINT passes the signal on and
waits for every child's graceful stop.

Child ``i`` (from 0) serves /healthz, /readyz and /metrics on ``SEEDANCE_HTTP_PORT + i`` (port 0 keeps
them off). systemd users may prefer the template unit, one process per instance
(``deploy/seedance-archiver@.service``).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import structlog

log = structlog.get_logger(__name__)

# A child that dies within this long of its start is restarted after a growing delay.
YOUNG_SECONDS = 10.0
RESTART_MIN_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
WATCH_SECONDS = 0.5  # how often children are looked at (a restart waits at most this long more)
# Beyond the children's own grace period: how long their stop may take before they are killed.
STOP_MARGIN_SECONDS = 10.0
# The children report to nobody's systemd: only the supervisor is the unit's main process.
_PARENT_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclasses.dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float = 0.0
    delay: float = RESTART_MIN_SECONDS


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
    ) -> None:
        self.argv = list(argv)
        self.env = {k: v for k, v in env.items() if k not in _PARENT_ONLY}
        self.http_port = http_port
        self.stop_timeout = grace_seconds + STOP_MARGIN_SECONDS
        self.children = [_Child(i) for i in range(processes)]
        self.stop_requested = threading.Event()
        self.restarts = 0

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; 0 when every child stopped cleanly."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        log.info("supervisor_starting", processes=len(self.children))
        while not self.stop_requested.is_set():
            now = time.monotonic()
            for child in self.children:
                self._look_after(child, now)
            self.stop_requested.wait(WATCH_SECONDS)
        return self._stop_all()

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        self.stop_requested.set()

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
        if child.started:
            self.restarts += 1
        # Its own process group: a terminal's Ctrl-C reaches the supervisor alone, which passes
        # it on once, so no child sees a second signal (that one means "exit now").
        child.process = subprocess.Popen(self.argv, env=env, process_group=0)
        child.started = now
        log.info("daemon_process_started", process=child.index, pid=child.process.pid)

    def _stop_all(self) -> int:
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
    ).run()
