"""Fixtures shared by the runtime's server tests."""

import pytest

from tests.runtime.test_server import start


@pytest.fixture()
def serving():
    """Started servers (a scripted RetimingService, SERVING; `start`'s options), stopped after the test."""
    servers = []

    def make(servicer=None, **config):
        server, port = start(servicer, **config)
        server.load_and_mark_serving()
        servers.append(server)
        return server, port

    yield make
    for server in servers:
        server.stop(0).wait()
