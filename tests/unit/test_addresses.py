"""Which addresses a video link or webhook may lead to: IANA's special-purpose registries decide,
the same on every Python; IPv4 inside IPv6 is unwrapped and checked too."""

from __future__ import annotations

import ipaddress

import pytest
from seedance_archiver import errors, netguard

NOT_PUBLIC = [
    # plain IPv4
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback, top of 127/8"),
    ("10.0.0.1", "private 10/8"),
    ("172.16.0.1", "private 172.16/12"),
    ("192.168.1.1", "private 192.168/16"),
    ("169.254.169.254", "link-local, cloud metadata"),
    ("100.64.0.1", "CGNAT 100.64/10"),
    ("100.127.255.254", "CGNAT, top of the range"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("255.255.255.255", "broadcast"),
    # plain IPv6
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fc00::1", "ULA fc00::/7"),
    ("fd12:3456:789a::1", "ULA fd00::/8"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local with a zone"),
    ("ff02::1", "multicast"),
    # IPv4-mapped ::ffff:0:0/96
    ("::ffff:127.0.0.1", "mapped loopback"),
    ("::ffff:169.254.169.254", "mapped metadata"),
    ("::ffff:10.0.0.1", "mapped private"),
    # NAT64 64:ff9b::/96 (RFC 6052) and the local-use 64:ff9b:1::/48 (RFC 8215)
    ("64:ff9b::a9fe:a9fe", "NAT64 of 169.254.169.254"),
    ("64:ff9b::7f00:1", "NAT64 of 127.0.0.1"),
    ("64:ff9b::a00:1", "NAT64 of 10.0.0.1"),
    ("64:ff9b::6440:1", "NAT64 of 100.64.0.1"),
    ("64:ff9b:1::808:808", "local-use NAT64, whatever it carries"),
    # 6to4 2002::/16
    ("2002:a9fe:a9fe::", "6to4 of 169.254.169.254"),
    ("2002:7f00:1::1", "6to4 of 127.0.0.1"),
    ("2002:c0a8:101::1", "6to4 of 192.168.1.1"),
    # Teredo 2001::/32: server, then the client's address XOR 0xffffffff
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo, client 127.0.0.1"),
    ("2001:0:a9fe:a9fe:8000:63bf:f7f7:f7f7", "Teredo, server 169.254.169.254"),
    ("2001:0:808:808:8000:63bf:5601:5601", "Teredo, client 169.254.169.254"),
    # deprecated IPv4-compatible ::a.b.c.d
    ("::a9fe:a9fe", "IPv4-compatible 169.254.169.254"),
    ("::7f00:1", "IPv4-compatible 127.0.0.1"),
    # Teredo is refused whole, whatever it carries (its row says N/A)
    ("2001:0:808:808:8000:63bf:f7f7:f7f7", "Teredo, server and client 8.8.8.8"),
    # IPv6 outside 2000::/3 that no row calls reachable
    ("fec0::1", "deprecated site-local"),
    ("4000::1", "reserved by the IETF"),
]

PUBLIC = [
    ("8.8.8.8", "public IPv4"),
    ("1.1.1.1", "public IPv4"),
    ("100.128.0.1", "just above CGNAT"),
    ("2606:4700:4700::1111", "public IPv6"),
    ("2a00:1450:4001:80b::200e", "public IPv6"),
    ("64:ff9b::808:808", "NAT64 of 8.8.8.8"),
    ("2002:808:808::1", "6to4 of 8.8.8.8"),
    ("::ffff:8.8.8.8", "mapped 8.8.8.8"),
    ("::808:808", "IPv4-compatible 8.8.8.8"),
]

# One address per registry row, inside no more specific row, and what the row makes of it: the
# decisions are pinned here, so every interpreter must give the same ones.
ROWS = {
    "0.0.0.0/8": ("0.1.2.3", False),
    "0.0.0.0/32": ("0.0.0.0", False),
    "10.0.0.0/8": ("10.1.2.3", False),
    "100.64.0.0/10": ("100.100.100.100", False),
    "127.0.0.0/8": ("127.0.0.53", False),
    "169.254.0.0/16": ("169.254.0.1", False),
    "172.16.0.0/12": ("172.31.255.254", False),
    "192.0.0.0/24": ("192.0.0.100", False),
    "192.0.0.0/29": ("192.0.0.1", False),
    "192.0.0.8/32": ("192.0.0.8", False),
    "192.0.0.9/32": ("192.0.0.9", True),
    "192.0.0.10/32": ("192.0.0.10", True),
    "192.0.0.170/32": ("192.0.0.170", False),
    "192.0.0.171/32": ("192.0.0.171", False),
    "192.0.2.0/24": ("192.0.2.1", False),
    "192.31.196.0/24": ("192.31.196.1", True),
    "192.52.193.0/24": ("192.52.193.1", True),
    "192.88.99.0/24": ("192.88.99.1", False),
    "192.88.99.2/32": ("192.88.99.2", False),
    "192.168.0.0/16": ("192.168.0.1", False),
    "192.175.48.0/24": ("192.175.48.1", True),
    "198.18.0.0/15": ("198.19.0.1", False),
    "198.51.100.0/24": ("198.51.100.1", False),
    "203.0.113.0/24": ("203.0.113.1", False),
    "240.0.0.0/4": ("240.0.0.1", False),
    "255.255.255.255/32": ("255.255.255.255", False),
    "::1/128": ("::1", False),
    "::/128": ("::", False),
    "::ffff:0:0/96": ("::ffff:10.1.2.3", False),
    "64:ff9b::/96": ("64:ff9b::101:101", True),
    "64:ff9b:1::/48": ("64:ff9b:1::101:101", False),
    "100::/64": ("100::1", False),
    "100:0:0:1::/64": ("100:0:0:1::1", False),
    "2001::/23": ("2001:100::1", False),
    "2001::/32": ("2001:0:101:101:8000:63bf:fefe:fefe", False),
    "2001:1::1/128": ("2001:1::1", True),
    "2001:1::2/128": ("2001:1::2", True),
    "2001:1::3/128": ("2001:1::3", True),
    "2001:2::/48": ("2001:2::1", False),
    "2001:3::/32": ("2001:3::1", True),
    "2001:4:112::/48": ("2001:4:112::1", True),
    "2001:10::/28": ("2001:10::1", False),
    "2001:20::/28": ("2001:20::1", True),
    "2001:30::/28": ("2001:30::1", True),
    "2001:db8::/32": ("2001:db8::1", False),
    "2002::/16": ("2002:a01:203::1", False),
    "2620:4f:8000::/48": ("2620:4f:8000::1", True),
    "3fff::/20": ("3fff::1", False),
    "5f00::/16": ("5f00::1", False),
    "fc00::/7": ("fc00::1", False),
    "fe80::/10": ("fe80::1", False),
}
# Every decision this module pins, for the tests that run them all.
EVERY_DECISION = [
    *((address, False) for address, _ in NOT_PUBLIC),
    *((address, True) for address, _ in PUBLIC),
    *ROWS.values(),
]
# ipaddress's own verdicts, whose table changes between Python releases.
LIBRARY_VERDICTS = (
    "is_global",
    "is_private",
    "is_multicast",
    "is_reserved",
    "is_loopback",
    "is_link_local",
    "is_site_local",
    "is_unspecified",
)


class TestIsPublic:
    """Every non-public range is refused, also when an IPv6 address carries an IPv4 one."""

    @pytest.mark.parametrize(("address", "why"), NOT_PUBLIC, ids=[a for a, _ in NOT_PUBLIC])
    def test_refused(self, address: str, why: str) -> None:
        assert not netguard.is_public_address(address), why

    @pytest.mark.parametrize(("address", "why"), PUBLIC, ids=[a for a, _ in PUBLIC])
    def test_allowed(self, address: str, why: str) -> None:
        assert netguard.is_public_address(address), why


class TestRegistryRows:
    """Each row of IANA's registries decides its addresses as its "Globally Reachable" says."""

    def test_every_row_has_a_pinned_decision(self) -> None:
        # Compared as networks: str() of an IPv4-mapped block differs by Python (3.13 writes
        # ::ffff:0.0.0.0/96).
        rows = [entry.network for entry in (*netguard.IPV4_SPECIAL, *netguard.IPV6_SPECIAL)]
        assert len(set(rows)) == len(rows)
        assert set(rows) == {ipaddress.ip_network(row) for row in ROWS}

    @pytest.mark.parametrize(("row", "address", "public"), [(r, *d) for r, d in ROWS.items()])
    def test_row_decides(self, row: str, address: str, public: bool) -> None:
        entry = netguard.entry_for(ipaddress.ip_address(address))
        assert entry is not None
        assert entry.network == ipaddress.ip_network(row)
        assert netguard.is_public_address(address) is public


class TestSameOnEveryPython:
    """The decision comes from our tables alone, never from ipaddress's is_global and kin."""

    def test_ipaddress_verdicts_are_never_read(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def refuse(ip: object) -> bool:
            raise AssertionError("ipaddress's own verdict was read")

        for cls in (ipaddress.IPv4Address, ipaddress.IPv6Address):
            for name in LIBRARY_VERDICTS:
                if hasattr(cls, name):
                    monkeypatch.setattr(cls, name, property(refuse))
        for address, public in EVERY_DECISION:
            assert netguard.is_public_address(address) is public, address

    def test_provider_and_webhooks_use_the_same_rule(self) -> None:
        assert netguard.is_public_address is netguard.is_public_address


class TestCheckVideoUrlLiterals:
    """A link whose host is an IPv6 literal carrying a private IPv4 address is refused."""

    @pytest.mark.parametrize(
        "host", ["[64:ff9b::a9fe:a9fe]", "[2002:a9fe:a9fe::]", "[::ffff:7f00:1]", "[::a9fe:a9fe]"]
    )
    async def test_refused(self, host: str) -> None:
        rules = netguard.UrlRules(schemes=frozenset({"https"}), allow_private_hosts=False)
        with pytest.raises(errors.UnsafeVideoUrl, match="loopback, private or link-local"):
            await netguard.check_video_url(f"https://{host}/latest/meta-data", rules)
