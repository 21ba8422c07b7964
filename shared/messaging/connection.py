"""One NATS connection per service process, retried until the broker is there."""

import asyncio
import logging
import re
from typing import Any

import nats
from nats.aio.client import Client

log = logging.getLogger("iopnet.nats")


def inbox_prefix(url: str) -> str:
    """`_INBOX.<user>` for a URL that names a user, else nats-py's `_INBOX`: the broker
    lets each user subscribe to its own inbox prefix only (iopnet/natsd.py), so no user
    receives another's JetStream replies."""
    match = re.match(r"^[a-z]+://([^:@/]+)(:[^@/]*)?@", url)
    return f"_INBOX.{match.group(1)}" if match else "_INBOX"


async def connect(url: str, name: str) -> Client:
    """Connect, retrying forever: a service starts (and answers /healthz) before NATS does."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", extra={"error": type(exc).__name__})

    async def on_disconnect() -> None:
        log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    delay = 0.1
    while True:
        try:
            return await nats.connect(
                url,
                name=name,
                inbox_prefix=inbox_prefix(url),
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            )
        except (OSError, TimeoutError, nats.errors.NoServersError) as exc:
            # The URL may carry this service's NATS password: log it without.
            log.info("nats not reachable yet", extra={"url": _without_credentials(url), "error": type(exc).__name__})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def _without_credentials(url: str) -> str:
    return re.sub(r"^([a-z]+://)?[^@/]*@", r"\1", url)


async def connect_once(url: str, **options: Any) -> Client:
    """One connection for a command-line tool or a test: no retry, and this user's inbox
    prefix (the only one the broker lets it subscribe to)."""
    return await nats.connect(url, inbox_prefix=inbox_prefix(url), **options)
