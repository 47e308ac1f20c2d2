"""The API alone on a loopback port (no workers): what these tests talk to."""

import pytest

from tests.stack import ApiServer


@pytest.fixture(scope="module")
def api_url(settings):
    server = ApiServer(settings).start()
    yield server.url
    server.stop()
