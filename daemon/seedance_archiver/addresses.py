"""Which IP addresses are public: the rule for video links and webhook hosts (the SSRF guard).

The answer comes from IANA's Special-Purpose Address Registries, written down below with their
"Globally Reachable" column, and from nothing else: ``ipaddress`` parses addresses and tests
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

import dataclasses
import ipaddress

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
