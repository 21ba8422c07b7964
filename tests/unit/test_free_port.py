"""free_port: the ports the tests give their servers never collide with a connection's
local port, nor with each other."""

import socket

from iopnet.natsd import _ephemeral_range, free_port


def test_free_ports_are_below_the_ephemeral_range_and_never_repeat() -> None:
    low, _ = _ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < low for port in ports)


def test_a_free_port_can_be_listened_on() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert sock.getsockname()[1] == port
