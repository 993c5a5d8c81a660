"""Fixtures of the contract suites."""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture
def disagrees(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """``disagrees(implementation, reason)``: this behaviour is known to fail on that implementation
    (the parameter's id, e.g. ``"postgresql"``), for ``reason``. The test runs there as a strict
    xfail: it says so in every run, and turns red once the implementation is fixed."""

    def known(implementation: str, reason: str) -> None:
        if implementation in request.node.callspec.params.values():
            request.applymarker(pytest.mark.xfail(strict=True, reason=reason))

    return known
