import sys
from pathlib import Path

import pytest

# the harness is imported by name from the e2e tests
sys.path.insert(0, str(Path(__file__).parent))

import harness  # noqa: E402


@pytest.fixture(scope="module", params=["epoll", "select+listenTCP"])
def each_reactor(request):
    """A test (or a module's proxy) run twice: on twistproxy's epoll reactor with
    adopted sockets, and as on Windows, on Twisted's select reactor with ports the
    reactor binds itself (harness.PORTABLE_RUN)."""
    harness.Proxy.portable = request.param != "epoll"
    yield request.param
    harness.Proxy.portable = False
