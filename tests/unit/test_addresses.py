"""Which addresses a video link may lead to: IPv4 inside IPv6 is unwrapped and checked too."""

from __future__ import annotations

import pytest
from seedance_archiver import errors, provider

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
]

PUBLIC = [
    ("8.8.8.8", "public IPv4"),
    ("1.1.1.1", "public IPv4"),
    ("100.128.0.1", "just above CGNAT"),
    ("2606:4700:4700::1111", "public IPv6"),
    ("2a00:1450:4001:80b::200e", "public IPv6"),
    ("64:ff9b::808:808", "NAT64 of 8.8.8.8"),
    ("2002:808:808::1", "6to4 of 8.8.8.8"),
]


class TestIsPublic:
    """Every non-public range is refused, also when an IPv6 address carries an IPv4 one."""

    @pytest.mark.parametrize(("address", "why"), NOT_PUBLIC, ids=[a for a, _ in NOT_PUBLIC])
    def test_refused(self, address: str, why: str) -> None:
        assert not provider._is_public(address), why

    @pytest.mark.parametrize(("address", "why"), PUBLIC, ids=[a for a, _ in PUBLIC])
    def test_allowed(self, address: str, why: str) -> None:
        assert provider._is_public(address), why


class TestCheckVideoUrlLiterals:
    """A link whose host is an IPv6 literal carrying a private IPv4 address is refused."""

    @pytest.mark.parametrize(
        "host", ["[64:ff9b::a9fe:a9fe]", "[2002:a9fe:a9fe::]", "[::ffff:7f00:1]", "[::a9fe:a9fe]"]
    )
    async def test_refused(self, host: str) -> None:
        rules = provider.UrlRules(schemes=frozenset({"https"}), allow_private_hosts=False)
        with pytest.raises(errors.UnsafeVideoUrl, match="loopback, private or link-local"):
            await provider.check_video_url(f"https://{host}/latest/meta-data", rules)
