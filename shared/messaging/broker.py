"""One FastStream NatsBroker per NATS account a service uses: its connection, its
publishers, its subscribers and their middlewares (Prometheus), the AsyncAPI document
generated from them.

Settings chosen on purpose (DESIGN B7): this user's inbox prefix (the broker lets each
user subscribe to its own only), reconnect forever, and no FastStream logger: its
exception logging prints whatever an exception says, and a driver error may quote SQL
parameters (PHI). The consumers log failures themselves with safe fields."""

import asyncio
import logging

import nats.errors
from faststream.nats import NatsBroker
from faststream.nats.prometheus import NatsPrometheusMiddleware
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from shared.messaging.connection import inbox_prefix, servers, without_credentials

log = logging.getLogger("iopnet.nats")


def new_broker(url: str, name: str, *, registry: CollectorRegistry | None = None, description: str = "") -> NatsBroker:
    """A broker for `url` (which may carry this service's NATS user and password; a
    cluster's nodes separated by commas, each with them); not connected yet. With a
    registry, FastStream's Prometheus middleware counts what its subscribers receive and
    process and what it publishes."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", extra={"error": type(exc).__name__})

    async def on_disconnect() -> None:
        log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    middlewares = (
        [NatsPrometheusMiddleware(registry=registry, app_name=name, metrics_prefix="iopnet_bus")] if registry else []
    )
    return NatsBroker(
        servers(url),
        name=name,
        inbox_prefix=inbox_prefix(url),
        connect_timeout=2,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py takes seconds as a float
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        middlewares=middlewares,
        logger=None,
        specification_url=without_credentials(url).split(","),
        description=description or None,
    )


async def connect(broker: NatsBroker) -> Client:
    """Connect, retrying forever: a service starts (and answers /healthz) before NATS does."""
    delay = 0.1
    while True:
        try:
            return await broker.connect()
        except (OSError, TimeoutError, nats.errors.NoServersError) as exc:
            log.info("nats not reachable yet", extra={"error": type(exc).__name__})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def client(broker: NatsBroker) -> Client:
    """The connected nats-py client (for what FastStream does not wrap: stream
    management, direct gets, the control plane's request/reply)."""
    return broker.config.connection_state.connection


def jetstream(broker: NatsBroker) -> JetStreamContext:
    return broker.config.connection_state.stream


async def close(broker: NatsBroker) -> None:
    """Close the connection without draining: drain() waits out pull subscriptions'
    pending requests (up to 30 s). By then every publish was acknowledged and the
    consumers have handed back what they held."""
    if not broker.config.connection_state:
        return
    connection = broker.config.connection_state.connection
    if not connection.is_closed:
        await connection.close()
    broker._connection = None  # FastStream's broker would drain it again on stop
    broker.config.disconnect()
