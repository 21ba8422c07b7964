"""Delivery channels. Console is the development default: it logs that a message went
out (ids only, never the address or the text) and keeps the text out of every log."""

import logging
from typing import Protocol
from uuid import uuid4

from pydantic import BaseModel

log = logging.getLogger("iopnet.notifications.console")


class OutboundMessage(BaseModel):
    notification_id: str
    patient_id: str | None
    channel: str
    template: str
    address: str | None
    text: str


class DeliveryError(Exception):
    """The channel refused or failed; the message is retried with backoff."""


class ChannelAdapter(Protocol):
    async def send(self, message: OutboundMessage) -> str:
        """Deliver and return the provider's message id."""
        ...


class ConsoleChannel:
    async def send(self, message: OutboundMessage) -> str:
        provider_id = f"console-{uuid4()}"
        log.info(
            "notification delivered",
            extra={
                "channel": "console",
                "notification_id": message.notification_id,
                "template": message.template,
                "patient_id": message.patient_id,
            },
        )
        return provider_id
