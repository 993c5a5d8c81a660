"""Polls per CPU-second of each HTTP client the daemon could use, against the provider simulator.

Each client makes ``--requests`` GETs of ``{simulator}/v1/result/video_{i}`` with the Bearer header, from
``--concurrency`` workers (default: 32, then 64), and parses each JSON body. The simulator runs in its own
process, so only the client's CPU is counted: ``time.process_time()`` of this process over the run.
Clients: httpx with its default transport, httpx over ``httpx_aiohttp.AiohttpTransport``, httpcore's
connection pool alone (httpx's default transport without httpx), a bare ``aiohttp.ClientSession`` (the
floor), and the daemon's own ``providers.http.HttpProvider.fetch``, on its transport (``wire.ApiTransport``)
and on httpx-aiohttp's.

Every client gets a connection pool as large as the concurrency (httpx's default keeps only 20 idle
connections, which would make it reconnect at 32 workers and measure that instead).

Run from the repository root: ``.venv/bin/python -m bench.transport [--requests 20000] [--concurrency 32 64]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import httpcore
import httpx
import httpx_aiohttp
from seedance_archiver.providers import http as providers_http
from seedance_archiver.providers import reseller

from bench import common

Fetch = Callable[[int], Awaitable[None]]
ClientFactory = Callable[[str, int], contextlib.AbstractAsyncContextManager[Fetch]]

WARMUP_REQUESTS = 500
RUN_TIMEOUT_SECONDS = 300.0


def _path(i: int) -> str:
    return f"/v1/result/video_{i}"


def _check(status: int, body: bytes) -> None:
    if status != 200:
        raise RuntimeError(f"the simulator answered HTTP {status}")
    json.loads(body)


@contextlib.asynccontextmanager
async def httpx_default(base: str, concurrency: int) -> AsyncIterator[Fetch]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {common.API_KEY}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits) as client:

        async def fetch(i: int) -> None:
            response = await client.get(_path(i))
            _check(response.status_code, response.content)

        yield fetch


@contextlib.asynccontextmanager
async def httpx_aiohttp_transport(base: str, concurrency: int) -> AsyncIterator[Fetch]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    transport = httpx_aiohttp.AiohttpTransport(limits=limits)
    headers = {"Authorization": f"Bearer {common.API_KEY}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, transport=transport) as client:

        async def fetch(i: int) -> None:
            response = await client.get(_path(i))
            _check(response.status_code, response.content)

        yield fetch


@contextlib.asynccontextmanager
async def httpcore_pool(base: str, concurrency: int) -> AsyncIterator[Fetch]:
    headers = [(b"Authorization", f"Bearer {common.API_KEY}".encode())]
    async with httpcore.AsyncConnectionPool(
        max_connections=concurrency, max_keepalive_connections=concurrency
    ) as pool:

        async def fetch(i: int) -> None:
            response = await pool.request("GET", base + _path(i), headers=headers)
            _check(response.status, response.content)

        yield fetch


@contextlib.asynccontextmanager
async def aiohttp_bare(base: str, concurrency: int) -> AsyncIterator[Fetch]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": f"Bearer {common.API_KEY}"}
    async with aiohttp.ClientSession(base, connector=connector, headers=headers) as session:

        async def fetch(i: int) -> None:
            async with session.get(_path(i)) as response:
                _check(response.status, await response.read())

        yield fetch


@contextlib.asynccontextmanager
async def daemon_provider(base: str, concurrency: int) -> AsyncIterator[Fetch]:
    client = providers_http.HttpProvider(base, common.API_KEY, dialect=reseller.DIALECT)
    try:

        async def fetch(i: int) -> None:
            await client.fetch(f"video_{i}")

        yield fetch
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def daemon_provider_aiohttp(base: str, concurrency: int) -> AsyncIterator[Fetch]:
    client = providers_http.HttpProvider(
        base, common.API_KEY, transport=httpx_aiohttp.AiohttpTransport(), dialect=reseller.DIALECT
    )
    try:

        async def fetch(i: int) -> None:
            await client.fetch(f"video_{i}")

        yield fetch
    finally:
        await client.aclose()


CLIENTS: dict[str, ClientFactory] = {
    "aiohttp.ClientSession (floor)": aiohttp_bare,
    "httpx.AsyncClient (default transport)": httpx_default,
    "httpx.AsyncClient + AiohttpTransport": httpx_aiohttp_transport,
    "httpcore.AsyncConnectionPool (no httpx)": httpcore_pool,
    "HttpProvider.fetch (wire.ApiTransport)": daemon_provider,
    "HttpProvider.fetch + AiohttpTransport": daemon_provider_aiohttp,
}
FLOOR = "aiohttp.ClientSession (floor)"


@dataclasses.dataclass
class Result:
    client: str
    concurrency: int
    requests: int
    wall_seconds: float
    cpu_seconds: float
    simulator_cpu_seconds: float

    @property
    def per_second(self) -> float:
        return self.requests / self.wall_seconds

    @property
    def per_cpu_second(self) -> float:
        return self.requests / self.cpu_seconds

    @property
    def cpu_per_thousand(self) -> float:
        return self.cpu_seconds / self.requests * 1000


async def drive(fetch: Fetch, start: int, count: int, concurrency: int) -> None:
    """``fetch`` for each of ``count`` indexes from ``start``, ``concurrency`` at once."""
    next_index = start
    end = start + count

    async def worker() -> None:
        nonlocal next_index
        while next_index < end:
            i = next_index
            next_index += 1
            await fetch(i)

    async with asyncio.timeout(RUN_TIMEOUT_SECONDS):
        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(
    name: str, factory: ClientFactory, base: str, sim_pid: int, requests: int, concurrency: int
) -> Result:
    """One client, one concurrency: warm the pool up, then time ``requests`` polls."""
    async with factory(base, concurrency) as fetch:
        await drive(fetch, 0, WARMUP_REQUESTS, concurrency)
        sim0 = common.process_cpu_seconds(sim_pid)
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        await drive(fetch, 0, requests, concurrency)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        sim = common.process_cpu_seconds(sim_pid) - sim0
    return Result(name, concurrency, requests, wall, cpu, sim)


def report(results: list[Result]) -> str:
    floors = {
        r.concurrency: r.cpu_per_thousand for r in results if r.client == FLOOR and r.cpu_seconds
    }
    rows = []
    for r in results:
        floor = floors.get(r.concurrency)
        rows.append(
            (
                r.client,
                r.concurrency,
                r.requests,
                f"{r.wall_seconds:.2f}",
                f"{r.per_second:,.0f}",
                f"{r.cpu_seconds:.2f}",
                f"{r.per_cpu_second:,.0f}",
                f"{r.cpu_per_thousand:.3f}",
                f"{r.cpu_per_thousand / floor:.2f}x" if floor else "-",
                f"{100 * r.simulator_cpu_seconds / r.wall_seconds:.0f}%",
            )
        )
    return common.markdown_table(
        (
            "client",
            "conc.",
            "requests",
            "wall s",
            "req/s",
            "CPU s",
            "polls per CPU-s",
            "CPU-s per 1,000",
            "vs floor",
            "simulator CPU",
        ),
        rows,
    )


def _median_results(runs: list[Result]) -> Result:
    """Of repeated runs of one client, the one with the median CPU per request."""
    ordered = sorted(runs, key=lambda r: r.cpu_per_thousand)
    return ordered[len(ordered) // 2]


async def main_async(args: argparse.Namespace) -> None:
    names = [n for n in CLIENTS if not args.only or any(o in n for o in args.only)]
    with common.simulator() as (base, sim_pid):
        runs: dict[tuple[str, int], list[Result]] = {}
        for concurrency in args.concurrency:
            for round_ in range(args.rounds):
                for name in names:
                    result = await measure(
                        name, CLIENTS[name], base, sim_pid, args.requests, concurrency
                    )
                    runs.setdefault((name, concurrency), []).append(result)
                    print(
                        f"# round {round_ + 1} {name} c={concurrency}: "
                        f"{result.per_second:,.0f} req/s, "
                        f"{result.cpu_per_thousand:.3f} CPU-s/1000",
                        flush=True,
                    )
    print()
    print(report([_median_results(v) for v in runs.values()]))
    print()
    print(
        "CPU is time.process_time() of this process only; the simulator runs in its own process. "
        f"Median of {args.rounds} round(s) by CPU per request."
    )
    if args.rounds > 1:
        spread = {
            f"{name} c={c}": f"{statistics.pstdev(r.cpu_per_thousand for r in v):.3f}"
            for (name, c), v in runs.items()
        }
        print("stdev of CPU-s per 1,000 across rounds:", json.dumps(spread))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="polls per client and run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--rounds", type=int, default=1, help="repeat every client this often")
    parser.add_argument("--only", nargs="*", help="run only clients whose name contains one of")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
