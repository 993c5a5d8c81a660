"""The container's HEALTHCHECK: GET /healthz where the daemon listens, exit 0 if it answers 200.

It follows the daemon's own settings: SEEDANCE_HTTP_PORT (9710 by default) and SEEDANCE_HTTP_HOST
(127.0.0.1 by default; 0.0.0.0 and :: listen on every address, so it asks loopback). With
SEEDANCE_HTTP_PORT=0 the daemon serves no HTTP and there is nothing to ask: it says so and fails
(run such a container with --no-healthcheck, or compose's `healthcheck: {disable: true}`).

Docker keeps the line it prints in `docker inspect`'s .State.Health.Log. The standard library only,
so it runs in the image's Python without the package; http.client, not urllib.request, which would
send the request through an HTTP_PROXY set for the daemon.
"""

from __future__ import annotations

import http.client
import os
from collections.abc import Mapping

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = "9710"
TIMEOUT_SECONDS = 4.0  # below the HEALTHCHECK's --timeout=5s: a hung daemon is reported, not killed
# Where the daemon listens on every address, it is asked on loopback.
LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def check(environ: Mapping[str, str]) -> tuple[bool, str]:
    """Whether the daemon that ``environ`` configures is healthy, and a line that says why."""
    raw_port = environ.get("SEEDANCE_HTTP_PORT", DEFAULT_PORT).strip()
    try:
        port = int(raw_port)
    except ValueError:
        return False, f"SEEDANCE_HTTP_PORT={raw_port!r} is not a port number"
    if port == 0:
        return False, (
            "SEEDANCE_HTTP_PORT=0 turns the daemon's HTTP port off: there is no /healthz to ask. "
            "Set a port, or run this container without a health check (--no-healthcheck)."
        )
    host = environ.get("SEEDANCE_HTTP_HOST", DEFAULT_HOST).strip().strip("[]")
    host = LOOPBACK.get(host, host)
    where = f"http://[{host}]:{port}/healthz" if ":" in host else f"http://{host}:{port}/healthz"
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_SECONDS)
    try:
        conn.request("GET", "/healthz")
        status = conn.getresponse().status
    except OSError as exc:
        return False, f"{where} does not answer: {exc}"
    finally:
        conn.close()
    return status == 200, f"{where} answered {status}"


def main() -> int:
    healthy, why = check(os.environ)
    print(("healthy: " if healthy else "unhealthy: ") + why)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
