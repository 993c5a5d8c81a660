"""A small TCP proxy on 127.0.0.1 whose misbehaviour a test switches at runtime.

It sits between the daemon and a real server (moto's S3, PostgreSQL) and, on command: forwards bytes
untouched, refuses connections (its listening socket is closed, so a connect fails at once), answers
every new connection with a fixed HTTP error, holds all traffic for a while (a slow or stalled server),
or cuts every connection once a number of bytes has gone upstream (a failure in the middle of a
transfer). It runs its own event loop in a thread, so a blocking client in the test's thread (psycopg,
boto3) and the daemon's event loop are both served while the test waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Coroutine
from typing import Any

from tests.helpers import free_port

PIPE_READ_BYTES = 64 * 1024
HEAD_LIMIT_BYTES = 64 * 1024
HOLD_STEP_SECONDS = 0.05


class FaultProxy:
    """Forwards ``127.0.0.1:{port}`` to ``{upstream_host}:{upstream_port}`` until told otherwise."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = free_port()
        self.connections = 0  # connections accepted since start
        self.bytes_up = 0  # bytes forwarded client -> upstream since start
        self._mode = "forward"  # forward | answer
        self._answer = b""
        self._hold_until = 0.0  # time.monotonic() before which no byte moves
        self._cut_at: int | None = None  # bytes_up at which every connection is cut
        self._then_refuse = True
        self.cut_fired = False  # a cut_after() has fired
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="faultproxy", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- life -------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- switches (from any thread) -----------------------------------------------------------------

    def forward(self) -> None:
        """Behave: listen again if refusing, forward every byte, hold nothing."""
        self._call(self._forward())

    def refuse(self) -> None:
        """Close the listening socket and cut every live connection: connects are refused."""
        self._call(self._close(cut=True))

    def answer(self, status: int, reason: str, body: bytes = b"") -> None:
        """Answer every new request with this HTTP status and close; live connections are cut."""
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        self._answer = head.encode() + body
        self._call(self._switch("answer"))

    def stall(self, seconds: float) -> None:
        """Hold every byte, both ways, on live and new connections, for ``seconds`` from now."""
        self._hold_until = time.monotonic() + seconds

    def cut_after(self, nbytes: int, *, then_refuse: bool = True) -> None:
        """Once ``nbytes`` more have gone upstream, cut every connection (and refuse, by default)."""
        self._then_refuse = then_refuse
        self._cut_at = self.bytes_up + nbytes

    # --- on the proxy's loop ----------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, "127.0.0.1", self.port, reuse_address=True
            )

    async def _close(self, cut: bool) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if cut:
            self._cut_all()

    async def _shutdown(self) -> None:
        await self._close(cut=True)
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _cut_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _forward(self) -> None:
        self._mode = "forward"
        self._hold_until = 0.0
        self._cut_at = None
        await self._listen()

    async def _switch(self, mode: str) -> None:
        self._mode = mode
        self._cut_all()
        await self._listen()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            if self._mode == "answer":
                await self._reply(reader, writer)
                return
            await self._hold()
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                return
            self._writers.add(up_writer)
            try:
                await asyncio.gather(
                    self._pipe(reader, up_writer, upstream=True),
                    self._pipe(up_reader, writer, upstream=False),
                )
            finally:
                self._writers.discard(up_writer)
                up_writer.transport.abort()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _reply(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read one request (its body too, so closing sends no reset), answer it, close."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        headers = head.decode("latin-1").lower()
        length = re.search(r"\r\ncontent-length:\s*(\d+)", headers)
        if length and "\r\nexpect:" not in headers:
            with contextlib.suppress(asyncio.IncompleteReadError, TimeoutError):
                await asyncio.wait_for(reader.readexactly(int(length.group(1))), timeout=5)
        writer.write(self._answer)
        await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()

    async def _hold(self) -> None:
        # In short steps, so forward() lets held traffic go at once. (ASYNC110: the deadline is
        # set from other threads; polling it beats an Event handed across loops.)
        while (left := self._hold_until - time.monotonic()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(min(left, HOLD_STEP_SECONDS))

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        try:
            while data := await source.read(PIPE_READ_BYTES):
                await self._hold()
                if upstream:
                    if self._cut_at is not None and self.bytes_up + len(data) >= self._cut_at:
                        self._cut_at = None
                        self.cut_fired = True
                        if self._then_refuse:
                            await self._close(cut=True)
                        else:
                            self._cut_all()
                        return
                    self.bytes_up += len(data)
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side ended: end the other, as a real peer closing would.
            sink.transport.abort()
