"""Live alerts: the console listens on the bus for CareTeamAlerted (its subject names
the site, its payload no name or free text) and tells the browsers of that site's
clinicians over server-sent events. The browser then asks notifications for the alert
list with its own token: what it shows is scoped and audited there, never by the push."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared.messaging.connection import inbox_prefix, servers

log = logging.getLogger("iopnet.console.live")

ALERT_SUBJECT = "iop.notifications.care_team_alerted.*"
# A quiet stream still sends a comment now and then, so proxies keep it open.
KEEPALIVE_SECONDS = 15.0


class AlertFeed:
    """Fans each CareTeamAlerted out to the browsers listening for its site."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self._client: Client | None = None
        self._listeners: set[tuple[frozenset[str] | None, asyncio.Queue[str]]] = set()

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    async def start(self) -> None:
        # As NATS user `console` (iopnet/natsd.py): this subject and its own inbox prefix
        # are all it may subscribe to. Every node of a cluster (a URL per node, commas).
        self._client = await nats.connect(
            servers(self.nats_url),
            inbox_prefix=inbox_prefix(self.nats_url),
            name="iopnet-console",
            max_reconnect_attempts=-1,
            connect_timeout=5,
        )
        await self._client.subscribe(ALERT_SUBJECT, cb=self._on_alert)

    async def stop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.drain()

    async def _on_alert(self, message: Msg) -> None:
        site = message.subject.rsplit(".", 1)[-1]
        for sites, queue in list(self._listeners):
            if sites is None or site in sites:
                queue.put_nowait(site)

    async def listen(self, sites: frozenset[str] | None) -> AsyncIterator[str]:
        """The sites of new alerts, as they come (None: every site, a network admin)."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        entry = (sites, queue)
        self._listeners.add(entry)
        try:
            while True:
                yield await queue.get()
        finally:
            self._listeners.discard(entry)
