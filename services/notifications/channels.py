"""Delivery channels: console (development default), email over SMTP (aiosmtplib), SMS
through a provider's HTTP API, and webhooks (HTTP POST, JSON, HMAC-SHA256 signed).

Every channel returns the provider's message id or raises DeliveryError. An error's
text is what the delivery log keeps: an exception class, a status code or an SMTP
reply code, never an address, a body or a provider's reply text (which may quote them).
"""

import json
import logging
import time
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Protocol
from uuid import uuid4

import aiosmtplib
import httpx
from pydantic import BaseModel

from services.notifications.domain import webhook_signature
from shared.settings import Settings

log = logging.getLogger("iopnet.notifications.channels")

SIGNATURE_HEADER = "X-Iopnet-Signature"
TIMESTAMP_HEADER = "X-Iopnet-Timestamp"
DELIVERY_HEADER = "X-Iopnet-Delivery"


class OutboundMessage(BaseModel):
    notification_id: str
    patient_id: str | None
    channel: str
    template: str
    address: str | None
    subject: str = ""
    text: str
    # Webhooks: the JSON document to post and the subscription's signing secret.
    payload: str | None = None
    secret: str | None = None


class DeliveryError(Exception):
    """The channel refused or failed. `retryable` False: no later attempt can succeed
    (a rejected address, a refused credential), so the message fails at once."""

    def __init__(self, reason: str, *, retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason[:300]
        self.retryable = retryable


class ChannelAdapter(Protocol):
    async def send(self, message: OutboundMessage) -> str:
        """Deliver and return the provider's message id."""
        ...


class ConsoleChannel:
    """Logs that a message went out: ids only, never the address or the text."""

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


class EmailChannel:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def send(self, message: OutboundMessage) -> str:
        if not message.address:
            raise DeliveryError("no email address", retryable=False)
        mail = EmailMessage()
        mail["From"] = self.settings.smtp_from
        mail["To"] = message.address
        mail["Subject"] = message.subject
        message_id = make_msgid(idstring=message.notification_id, domain="iopnet.invalid")
        mail["Message-ID"] = message_id
        mail[DELIVERY_HEADER] = message.notification_id
        mail.set_content(message.text)
        try:
            await aiosmtplib.send(
                mail,
                hostname=self.settings.smtp_host,
                port=self.settings.smtp_port,
                username=self.settings.smtp_username,
                password=self.settings.smtp_password,
                use_tls=self.settings.smtp_use_tls,
                start_tls=self.settings.smtp_starttls,
                timeout=self.settings.notify_send_timeout_seconds,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = sorted({r.code for r in exc.recipients})
            reason = f"SMTPRecipientsRefused {','.join(str(c) for c in codes)}"
            raise DeliveryError(reason, retryable=all(c < 500 for c in codes)) from None
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(f"SMTPAuthenticationError {exc.code}", retryable=False) from None
        except aiosmtplib.SMTPResponseException as exc:
            # 5xx is a permanent refusal; 4xx asks to try again later.
            raise DeliveryError(f"{type(exc).__name__} {exc.code}", retryable=exc.code < 500) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryError(type(exc).__name__) from None
        return message_id


async def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> httpx.Response:
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            return await client.post(url, content=body, headers={"Content-Type": "application/json", **headers})
    except httpx.HTTPError as exc:
        raise DeliveryError(type(exc).__name__) from None


def _check_status(response: httpx.Response) -> None:
    if response.status_code >= 500 or response.status_code in (408, 425, 429):
        raise DeliveryError(f"HTTP {response.status_code}")
    if response.status_code >= 400:
        raise DeliveryError(f"HTTP {response.status_code}", retryable=False)


class SmsChannel:
    """A provider adapter: POST {to, body} (JSON) to the configured URL with the API key
    as a bearer token; the provider's message id comes back as `id`, `message_id` or
    `sid` in the JSON answer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def send(self, message: OutboundMessage) -> str:
        if not self.settings.sms_api_url:
            raise DeliveryError("SMS provider not configured", retryable=False)
        if not message.address:
            raise DeliveryError("no phone number", retryable=False)
        document: dict[str, str] = {"to": message.address, "body": message.text}
        if self.settings.sms_sender:
            document["from"] = self.settings.sms_sender
        headers = {"Idempotency-Key": message.notification_id}
        if self.settings.sms_api_key:
            headers["Authorization"] = f"Bearer {self.settings.sms_api_key}"
        response = await _post(
            self.settings.sms_api_url, json.dumps(document).encode(), headers, self.settings.notify_send_timeout_seconds
        )
        _check_status(response)
        try:
            answer = response.json()
        except ValueError:
            raise DeliveryError("provider answer is not JSON") from None
        provider_id = next((answer.get(k) for k in ("id", "message_id", "sid") if isinstance(answer, dict)), None)
        if not provider_id:
            raise DeliveryError("provider answer has no message id")
        return str(provider_id)[:120]


class WebhookChannel:
    """POST the JSON document, signed: X-Iopnet-Timestamp (unix seconds) and
    X-Iopnet-Signature = hex HMAC-SHA256(secret, f"{timestamp}.{body}"). The receiver
    recomputes it over the raw body and should refuse old timestamps (replays)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def send(self, message: OutboundMessage) -> str:
        if not message.address or message.secret is None:
            raise DeliveryError("webhook without url or secret", retryable=False)
        # Subscriptions post the event's envelope; a care-team member reached by webhook
        # (a paging system) gets the alert message itself.
        fallback = {"notification_id": message.notification_id, "template": message.template, "text": message.text}
        body = (message.payload or json.dumps(fallback)).encode()
        timestamp = str(int(time.time()))
        headers = {
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: webhook_signature(message.secret, timestamp, body),
            DELIVERY_HEADER: message.notification_id,
        }
        response = await _post(message.address, body, headers, self.settings.notify_send_timeout_seconds)
        _check_status(response)
        return (response.headers.get("X-Request-Id") or f"webhook-{message.notification_id}")[:120]


def build_channels(settings: Settings) -> dict[str, ChannelAdapter]:
    channels: dict[str, ChannelAdapter] = {"console": ConsoleChannel()}
    if settings.notify_live_channels:
        channels.update(email=EmailChannel(settings), sms=SmsChannel(settings), webhook=WebhookChannel(settings))
    return channels
