"""PostgreSQL's LISTEN: wake the daemon at once when a feeder inserts rows.

Polling the table stays the fallback (and SQLite's only way); this only makes new rows start sooner.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import structlog

from seedance_archiver import db, errors

log = structlog.get_logger(__name__)

# The insert trigger's channel (migration 0001).
LISTEN_CHANNEL = "video_tasks"
# Every move into a terminal state is announced here (migration 0006), for feeding applications.
DONE_CHANNEL = "video_tasks_done"


class Listener:
    """Wakes the daemon when a feeder inserts rows (PostgreSQL LISTEN/NOTIFY), reconnecting forever.

    Runs in its own thread with its own connection; polling the table stays the fallback while it is
    disconnected.
    """

    POLL_SECONDS = 1.0
    RECONNECT_MIN_SECONDS = 1.0
    RECONNECT_MAX_SECONDS = 30.0
    # A connection that silently stopped delivering would leave us deaf: ping it this often.
    PING_SECONDS = 30.0

    def __init__(
        self,
        url: str,
        on_notify: Callable[[], None],
        statement_timeout_seconds: float = db.STATEMENT_TIMEOUT_SECONDS,
    ) -> None:
        parsed = db.engine_url(url).set(drivername="postgresql")
        self._dsn = parsed.render_as_string(hide_password=False)
        self._timeout = statement_timeout_seconds
        self._on_notify = on_notify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-listener", daemon=True)
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        delay = self.RECONNECT_MIN_SECONDS
        while not self._stop.is_set():
            try:
                with (
                    db.translated(),
                    psycopg.connect(
                        self._dsn,
                        autocommit=True,
                        connect_timeout=db.connect_timeout(self._timeout),
                        **db.PG_KEEPALIVES,
                    ) as conn,
                ):
                    self._guarded(conn, db.set_statement_timeout, conn, self._timeout)
                    self._guarded(conn, conn.execute, f"LISTEN {LISTEN_CHANNEL}")
                    self.connected.set()
                    log.info("listen_connected", channel=LISTEN_CHANNEL)
                    delay = self.RECONNECT_MIN_SECONDS
                    # Rows inserted while we were away are found by the table poll; wake once anyway.
                    self._on_notify()
                    pinged = time.monotonic()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=self.POLL_SECONDS):
                            self._on_notify()
                        if time.monotonic() - pinged >= self.PING_SECONDS:
                            self._guarded(conn, conn.execute, "SELECT 1")
                            pinged = time.monotonic()
            except errors.StoreError as exc:
                self.connected.clear()
                log.warning("listen_disconnected", error=str(exc), retry_in_s=delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.RECONNECT_MAX_SECONDS)
        self.connected.clear()

    def _guarded(
        self, conn: psycopg.Connection[Any], call: Callable[..., object], *args: Any
    ) -> None:
        """Run one statement on the LISTEN connection under the watchdog's deadline."""
        db.WATCHDOG.guard(id(conn), conn.fileno(), self._timeout + db.WATCHDOG_MARGIN_SECONDS)
        try:
            call(*args)
        finally:
            db.WATCHDOG.release(id(conn))
