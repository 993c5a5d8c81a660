"""The network rules of every outbound request: which links may be requested, which hosts reached.

One module for the provider client, the video downloads and the webhooks alike (the SSRF guard):

- :func:`parse_url`: a link as httpx will request it, or why no request could use it;
- :class:`UrlRules` and :func:`check_video_url`: the schemes allowed, and by default public hosts only;
  :func:`redirect_target` holds a redirect to the same rules;
- :class:`PublicResolver`: a name's addresses are checked where it resolves, at connect time;
- :func:`is_public_address` and :func:`is_private_literal`: the public-address rule itself.

Which IP addresses are public comes from IANA's Special-Purpose Address Registries, written down below
with their "Globally Reachable" column, and from nothing else: ``ipaddress`` parses addresses and tests
membership, but its ``is_global``/``is_private`` carry a copy of the registries that moves between
Python releases (3.13 changed it: ``2002:808:808::1`` stopped being global), so the same daemon would
decide differently by interpreter.

Sources (this machine cannot reach iana.org: the rows were copied from a transcription of IANA's
CSV files, ``...-1.csv`` beside each page, as fetched on 2026-07-18, and checked row by row against
other copies of the registries):

- https://www.iana.org/assignments/iana-ipv4-special-registry/ (Last Updated 2020-09-04)
- https://www.iana.org/assignments/iana-ipv6-special-registry/ (Last Updated 2024-10-22, with the
  row allocated since, 100:0:0:1::/64, RFC 9780, 2025-04)

To update: read both CSV files again, change :data:`IPV4_SPECIAL` and :data:`IPV6_SPECIAL` row for
row, and give every new row its representative in ``tests/unit/test_addresses.py`` (a test fails
until it has one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import re
import socket
import urllib.parse

import aiohttp
import aiohttp.abc
import httpx

from seedance_archiver import errors

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of a special-purpose registry: its block, name, RFC and "Globally Reachable".

    ``globally_reachable`` is None where the registry says N/A (Teredo, 6to4) or leaves it blank
    (a deprecated block).
    """

    network: Network
    name: str
    rfc: str
    globally_reachable: bool | None


def _v4(block: str, name: str, rfc: str, reachable: bool | None) -> Entry:
    return Entry(ipaddress.IPv4Network(block), name, rfc, reachable)


def _v6(block: str, name: str, rfc: str, reachable: bool | None) -> Entry:
    return Entry(ipaddress.IPv6Network(block), name, rfc, reachable)


# The registries' rows, in their order. A block inside another one overrides it (192.0.0.9/32 is
# reachable inside 192.0.0.0/24, which is not): the most specific row containing an address decides.
IPV4_SPECIAL: tuple[Entry, ...] = (
    _v4("0.0.0.0/8", '"This network"', "RFC 791", False),
    _v4("0.0.0.0/32", '"This host on this network"', "RFC 1122", False),
    _v4("10.0.0.0/8", "Private-Use", "RFC 1918", False),
    _v4("100.64.0.0/10", "Shared Address Space", "RFC 6598", False),
    _v4("127.0.0.0/8", "Loopback", "RFC 1122", False),
    _v4("169.254.0.0/16", "Link Local", "RFC 3927", False),
    _v4("172.16.0.0/12", "Private-Use", "RFC 1918", False),
    _v4("192.0.0.0/24", "IETF Protocol Assignments", "RFC 6890", False),
    _v4("192.0.0.0/29", "IPv4 Service Continuity Prefix", "RFC 7335", False),
    _v4("192.0.0.8/32", "IPv4 dummy address", "RFC 7600", False),
    _v4("192.0.0.9/32", "Port Control Protocol Anycast", "RFC 7723", True),
    _v4("192.0.0.10/32", "Traversal Using Relays around NAT Anycast", "RFC 8155", True),
    _v4("192.0.0.170/32", "NAT64/DNS64 Discovery", "RFC 8880, RFC 7050", False),
    _v4("192.0.0.171/32", "NAT64/DNS64 Discovery", "RFC 8880, RFC 7050", False),
    _v4("192.0.2.0/24", "Documentation (TEST-NET-1)", "RFC 5737", False),
    _v4("192.31.196.0/24", "AS112-v4", "RFC 7535", True),
    _v4("192.52.193.0/24", "AMT", "RFC 7450", True),
    _v4("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", "RFC 7526", None),
    _v4("192.88.99.2/32", "6a44-relay anycast address", "RFC 6751", False),
    _v4("192.168.0.0/16", "Private-Use", "RFC 1918", False),
    _v4("192.175.48.0/24", "Direct Delegation AS112 Service", "RFC 7534", True),
    _v4("198.18.0.0/15", "Benchmarking", "RFC 2544", False),
    _v4("198.51.100.0/24", "Documentation (TEST-NET-2)", "RFC 5737", False),
    _v4("203.0.113.0/24", "Documentation (TEST-NET-3)", "RFC 5737", False),
    _v4("240.0.0.0/4", "Reserved", "RFC 1112", False),
    _v4("255.255.255.255/32", "Limited Broadcast", "RFC 8190, RFC 919", False),
)

IPV6_SPECIAL: tuple[Entry, ...] = (
    _v6("::1/128", "Loopback Address", "RFC 4291", False),
    _v6("::/128", "Unspecified Address", "RFC 4291", False),
    _v6("::ffff:0:0/96", "IPv4-mapped Address", "RFC 4291", False),
    _v6("64:ff9b::/96", "IPv4-IPv6 Translat.", "RFC 6052", True),
    _v6("64:ff9b:1::/48", "IPv4-IPv6 Translat.", "RFC 8215", False),
    _v6("100::/64", "Discard-Only Address Block", "RFC 6666", False),
    _v6("100:0:0:1::/64", "Dummy IPv6 Prefix", "RFC 9780", False),
    _v6("2001::/23", "IETF Protocol Assignments", "RFC 2928", False),
    _v6("2001::/32", "TEREDO", "RFC 4380, RFC 8190", None),
    _v6("2001:1::1/128", "Port Control Protocol Anycast", "RFC 7723", True),
    _v6("2001:1::2/128", "Traversal Using Relays around NAT Anycast", "RFC 8155", True),
    _v6("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast", "RFC 9665", True),
    _v6("2001:2::/48", "Benchmarking", "RFC 5180", False),
    _v6("2001:3::/32", "AMT", "RFC 7450", True),
    _v6("2001:4:112::/48", "AS112-v6", "RFC 7535", True),
    _v6("2001:10::/28", "Deprecated (previously ORCHID)", "RFC 4843", None),
    _v6("2001:20::/28", "ORCHIDv2", "RFC 7343", True),
    _v6("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs) Prefix", "RFC 9374", True),
    _v6("2001:db8::/32", "Documentation", "RFC 3849", False),
    _v6("2002::/16", "6to4", "RFC 3056", None),
    _v6("2620:4f:8000::/48", "Direct Delegation AS112 Service", "RFC 7534", True),
    _v6("3fff::/20", "Documentation", "RFC 9637", False),
    _v6("5f00::/16", "Segment Routing (SRv6) SIDs", "RFC 9602", False),
    _v6("fc00::/7", "Unique-Local", "RFC 4193, RFC 8190", False),
    _v6("fe80::/10", "Link-Local Unicast", "RFC 4291", False),
)

# Outside the special-purpose rows, the address-space registries decide: IPv4 multicast
# (https://www.iana.org/assignments/multicast-addresses/, RFC 5771) is no unicast destination, and
# of IPv6 only 2000::/3 is global unicast (https://www.iana.org/assignments/ipv6-address-space/);
# the rest is multicast (ff00::/8), reserved by the IETF, or a special-purpose row above.
IPV4_MULTICAST = ipaddress.IPv4Network("224.0.0.0/4")
IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")

# The IPv6 forms that carry an IPv4 address, which a router or translator on the path delivers to:
# for these the IPv4 address inside decides, whatever the row of the carrier says.
IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # RFC 4291: the last 32 bits
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the last 32 bits
# RFC 3056: bits 16-47. The registry says N/A: a 6to4 address reaches, through a relay, the IPv4
# address it carries, so it is as public as that address (2002:808:808::1 is 8.8.8.8's).
SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
# RFC 4291 2.5.5.1, deprecated ::a.b.c.d (no registry row): ``::`` and ``::1`` keep their own rows.
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")

# Most specific first, so the first row containing an address is the one that decides.
_V4_ROWS = sorted(IPV4_SPECIAL, key=lambda entry: -entry.network.prefixlen)
_V6_ROWS = sorted(IPV6_SPECIAL, key=lambda entry: -entry.network.prefixlen)


def entry_for(ip: Address) -> Entry | None:
    """The most specific registry row holding ``ip``, or None when no row does."""
    rows = _V4_ROWS if isinstance(ip, ipaddress.IPv4Address) else _V6_ROWS
    for entry in rows:
        if ip in entry.network:
            return entry
    return None


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4, compatible), if any.

    Teredo (2001::/32) also carries two, but its row is N/A and every Python so far refused it:
    it stays refused whole rather than trusting a tunnel to a host behind someone's NAT.
    """
    value = int(ip)
    if ip in IPV4_MAPPED or ip in NAT64 or (ip in IPV4_COMPATIBLE and value > 1):
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if ip in SIX_TO_FOUR:
        return ipaddress.IPv4Address((value >> 80) & 0xFFFFFFFF)
    return None


def _is_public(ip: Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            return _is_public(inner)
    entry = entry_for(ip)
    if entry is not None:
        return entry.globally_reachable is True
    if isinstance(ip, ipaddress.IPv4Address):
        return ip not in IPV4_MULTICAST
    return ip in IPV6_GLOBAL_UNICAST


def is_public_address(address: str) -> bool:
    """Whether ``address`` (and any IPv4 address it carries) is public unicast, by the tables above.

    A zone (``fe80::1%eth0``) is ignored; a string that is no IP address raises ValueError.
    """
    return _is_public(ipaddress.ip_address(address.split("%", 1)[0]))


def is_private_literal(host: str) -> bool:
    """Whether ``host`` is an IP address that is not public; False for a name, whose addresses
    :class:`PublicResolver` checks where it resolves, at connect time (no DNS rebinding)."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return not is_public_address(host)


# --- links: what a URL must be before any request is built ------------------------------------

# DNS limits (RFC 1035): a whole name, and each dot-separated label.
HOST_MAX_CHARS = 253
HOST_LABEL_MAX_CHARS = 63


def printable(text: str, limit: int = 120) -> str:
    """``text`` for one line of a message: escapes for what is not printable, cut at ``limit``."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit * 2])
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Links parse_url keeps parsed: more than the downloads a daemon has under way or queued.
PARSED_URLS_KEPT = 256

# C0 and C1 control characters and surrogates: never in a link anyone can follow.
_URL_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_HOST_LABEL = re.compile("[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?", re.IGNORECASE)


@functools.lru_cache(maxsize=PARSED_URLS_KEPT)
def parse_url(url: str) -> httpx.URL:
    """``url`` as httpx will request it; ValueError, with the reason, if no request could use it.

    httpx refuses some links only when a request is built (an invalid IDNA label, ``xn--a``) and takes
    others no resolver will (``a..b``, ``exa mple.com``, a 64-character label): both are caught here.

    The last PARSED_URLS_KEPT links that parsed are kept (an httpx.URL is immutable): a finished
    task's link is parsed when its answer is read and again before its download, and a parse
    costs 23 us for a short link, 55 us for a signed one of 437 characters, since httpx looks at
    every character in Python (timeit, on the machine of bench/README.md). A link that raises is
    parsed again each time.
    """
    bad = _URL_UNSAFE.search(url)
    if bad is not None:
        raise ValueError(f"control character {bad.group()!r} at position {bad.start()}")
    try:
        parsed = httpx.URL(url)
        host = parsed.host  # decodes xn-- labels: an invalid one raises here, not in httpx.URL()
        port = parsed.port
    except httpx.InvalidURL as exc:
        raise ValueError(printable(str(exc))) from None
    except UnicodeError as exc:  # idna.IDNAError among them
        raise ValueError(f"invalid IDNA host: {printable(str(exc))}") from None
    except ValueError as exc:
        raise ValueError(printable(str(exc))) from None
    if not parsed.scheme or not host:
        raise ValueError("not an absolute URL with a host")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    _check_host(parsed.raw_host.decode("ascii", "replace"))
    return parsed


def _check_host(host: str) -> None:
    """ValueError unless ``host`` (IDNA-encoded, as httpx sends it) is an IP address or a DNS name."""
    if ":" in host:
        return  # an IPv6 literal: httpx has checked it
    with contextlib.suppress(ValueError):
        ipaddress.IPv4Address(host)
        return
    name = host.removesuffix(".")
    if len(name) > HOST_MAX_CHARS:
        raise ValueError(f"host name longer than {HOST_MAX_CHARS} characters")
    for label in name.split("."):
        if not label:
            raise ValueError("empty label in the host name")
        if len(label) > HOST_LABEL_MAX_CHARS:
            raise ValueError(f"host name label longer than {HOST_LABEL_MAX_CHARS} characters")
        if not _HOST_LABEL.fullmatch(label):
            raise ValueError(f"invalid host name label '{printable(label, 70)}'")


# --- video links and webhook hosts ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UrlRules:
    """Which video links we may follow (SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES, ..._PRIVATE_VIDEO_HOSTS)."""

    schemes: frozenset[str] = frozenset({"https"})
    allow_private_hosts: bool = False


PRIVATE_HOST_MESSAGE = (
    "unsafe video_url: its host resolves to a loopback, private or link-local address "
    "(set SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS=true to allow)"
)


async def check_video_url(url: str, rules: UrlRules, parsed: httpx.URL | None = None) -> None:
    """Raise UnsafeVideoUrl unless ``url`` has an allowed scheme and, by default, a public host.
    ``parsed``: ``url`` as :func:`parse_url` gave it already, if it did (not parsed again).

    The host checked is the one httpx will connect to (IDNA-encoded, as httpx parses the link): another
    parser's idea of the host could differ (``ß.de`` resolves as ``ss.de`` but is sent as ``xn--zca.de``).
    An IP literal is checked here; a name is not looked up here but by :class:`PublicResolver` when the
    download connects, so the address checked is the address connected to (no DNS rebinding).
    """
    try:
        parts = parsed or parse_url(url)
    except ValueError as exc:
        raise errors.UnsafeVideoUrl(f"unsafe video_url: it cannot be parsed ({exc})") from None
    host = parts.host
    if parts.scheme not in rules.schemes:
        raise errors.UnsafeVideoUrl(
            f"unsafe video_url: scheme {parts.scheme!r} is not in SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES"
        )
    if not host:
        raise errors.UnsafeVideoUrl("unsafe video_url: no host")
    if not rules.allow_private_hosts and is_private_literal(host):
        raise errors.UnsafeVideoUrl(PRIVATE_HOST_MESSAGE)


class _PrivateAnswer(OSError):
    """A DNS answer held an address a video download must not connect to."""


class PublicResolver(aiohttp.abc.AbstractResolver):
    """Resolves with ``inner`` and refuses any answer holding a non-public address.

    The download's connector asks this resolver for every connection (first hop and redirects alike)
    and connects only to what it returns, so the address checked is the one connected to: a DNS
    server that answers publicly once and privately the next time gains nothing. An answer mixing
    public and private addresses is refused whole (the connector would fall back to the next one).
    """

    def __init__(self, inner: aiohttp.abc.AbstractResolver) -> None:
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        if not answers or not all(is_public_address(answer["host"]) for answer in answers):
            raise _PrivateAnswer(PRIVATE_HOST_MESSAGE)
        return answers

    async def close(self) -> None:
        await self._inner.close()


def private_answer(exc: BaseException) -> bool:
    """Whether ``exc`` was caused, somewhere down its chain, by a refused DNS answer."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _PrivateAnswer):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def check_scheme(url: str, rules: UrlRules) -> None:
    """Raise UnsafeVideoUrl unless ``url``'s scheme is allowed (a redirect to ``file:`` is unsafe,
    not malformed)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in rules.schemes:
        raise errors.UnsafeVideoUrl(
            f"unsafe video_url: scheme {scheme!r} is not in SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES"
        )


def redirect_target(url: str, location: str) -> str:
    """Where a redirect from ``url`` leads; DownloadError if no request could use it.

    A target of another scheme (``file:``, ``ftp:``) is returned as it is, for the scheme rule to
    refuse as unsafe.
    """
    try:
        target = urllib.parse.urljoin(url, location)
        if target.split(":", 1)[0].lower() not in ("http", "https"):
            return target
        parse_url(target)
    except ValueError as exc:
        raise errors.DownloadError(
            f"the video host's redirect is not a valid URL ({exc})"
        ) from None
    return target
