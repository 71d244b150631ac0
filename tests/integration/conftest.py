"""Fixtures shared by the integration modules; each module's `setup` fixture starts its own TorchServe."""

from __future__ import annotations

import pytest

from epee_core.ops.torchserve import TorchServe


@pytest.fixture(scope="module")
def server(setup) -> TorchServe:
    """The running server of the requesting module's `setup`."""
    return setup["server"]
