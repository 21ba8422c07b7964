"""Fault tests kill and restart the broker: they always run their own nats-server,
even when IOPNET_TEST_NATS_URL points the other tests at an existing one."""

import pytest


@pytest.fixture
def nats_server(own_nats_server):
    return own_nats_server
