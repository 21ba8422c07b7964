"""Delivery channels: console (development default), email over SMTP (aiosmtplib), SMS
through a provider's HTTP API, and webhooks (HTTP POST, JSON, HMAC-SHA256 signed).

Every channel returns the provider's message id or raises DeliveryError. An error's
text is what the delivery log keeps: an exception class, a status code or an SMTP
reply code, never an address, a body or a provider's reply text (which may quote them).

Delivery is at least once: a process killed between a send and its record sends again
when the message's lease ends. Every message therefore carries one identity across all
its attempts, derived from its notification id, for the receiver to drop a copy: the
email's Message-ID (`<notification_id@iopnet.invalid>`), and `Idempotency-Key` and
`X-Iopnet-Delivery-Id` on SMS and webhook requests.
"""

import asyncio
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from ipaddress import ip_address
from typing import Protocol
from uuid import uuid4

import aiosmtplib
import httpx
from pydantic import BaseModel

from services.notifications import domain
from services.notifications.domain import webhook_signature
from shared.settings import Settings

log = logging.getLogger("iopnet.notifications.channels")

SIGNATURE_HEADER = "X-Iopnet-Signature"
TIMESTAMP_HEADER = "X-Iopnet-Timestamp"
DELIVERY_HEADER = "X-Iopnet-Delivery"  # kept for receivers that read it already
DELIVERY_ID_HEADER = "X-Iopnet-Delivery-Id"
IDEMPOTENCY_HEADER = "Idempotency-Key"
MESSAGE_ID_DOMAIN = "iopnet.invalid"


def message_id(notification_id: str) -> str:
    """The email Message-ID of a notification: the same on every attempt (make_msgid
    would add a time and a random part), so a mail system can drop a resent copy."""
    return f"<{notification_id}@{MESSAGE_ID_DOMAIN}>"


def delivery_headers(notification_id: str) -> dict[str, str]:
    """What an HTTP receiver (SMS provider, webhook) dedupes a resent request on."""
    return {IDEMPOTENCY_HEADER: notification_id, DELIVERY_ID_HEADER: notification_id}


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

    def __init__(self, reason: str, *, retryable: bool = True, status_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason[:300]
        self.retryable = retryable
        self.status_code = status_code  # the receiver's HTTP answer, if one came


@dataclass(frozen=True)
class Delivered:
    """What a webhook POST came to: the receiver's request id (or ours) and its status."""

    provider_id: str
    status_code: int


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
        mail["Message-ID"] = message_id(message.notification_id)
        mail[DELIVERY_HEADER] = message.notification_id
        mail[DELIVERY_ID_HEADER] = message.notification_id
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
        return message_id(message.notification_id)


# --- HTTP: one way to POST, for the SMS provider and webhooks --------------------------------------

Resolver = Callable[[str, int], Awaitable[list[domain.IPAddress]]]


async def system_resolver(host: str, port: int) -> list[domain.IPAddress]:
    """Every address the operating system resolves `host` to (getaddrinfo, off the loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[domain.IPAddress] = []
    for *_, sockaddr in infos:
        address = ip_address(str(sockaddr[0]))
        if address not in found:
            found.append(address)
    return found


class TargetRefused(DeliveryError):
    """The webhook target is outside the policy (domain.target_refusal): no request was
    made. Final at once: a retry would meet the same policy. The reason is a fixed code."""

    def __init__(self, refusal: domain.TargetRefusal) -> None:
        super().__init__(f"target refused: {refusal}", retryable=False)
        self.refusal = refusal


class PinnedTransport(httpx.AsyncBaseTransport):
    """Sends a request only to an address checked against the webhook policy.

    Why a transport and not a check before `client.post`: httpcore resolves the host
    again when it connects, a second lookup that the name's DNS server may answer
    differently (DNS rebinding: a public address when checked, 127.0.0.1 when used).
    Here the name is resolved once, every address is checked (a name with one public and
    one private address is refused), and the request goes to the first of them literally:
    the URL's host becomes that IP, the Host header keeps the name, and TLS gets the name
    through httpcore's `sni_hostname` request extension, so SNI and certificate
    verification still prove it is the named server. The client never follows redirects
    (a redirect would be a second, unchecked target).
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, resolve: Resolver, *, allow_local: bool) -> None:
        self.inner = inner
        self.resolve = resolve
        self.allow_local = allow_local

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        host = url.raw_host.decode("ascii")  # the IDNA form the connection would use
        refusal = domain.target_refusal(
            url.scheme, host, has_userinfo=bool(url.userinfo), allow_insecure=self.allow_local
        )
        if refusal is not None:
            raise TargetRefused(refusal)
        address = await self._checked_address(host, url.port or (443 if url.scheme == "https" else 80))
        extensions = dict(request.extensions)
        if domain.parse_ip(host) is None:
            extensions["sni_hostname"] = host
        pinned = httpx.Request(
            request.method,
            url.copy_with(host=str(address)),
            headers=request.headers,  # carries Host: the name, set when the request was built
            stream=request.stream,
            extensions=extensions,
        )
        return await self.inner.handle_async_request(pinned)

    async def _checked_address(self, host: str, port: int) -> domain.IPAddress:
        literal = domain.parse_ip(host)
        if literal is not None:
            return literal  # already judged by target_refusal
        try:
            addresses = await self.resolve(host, port)
        except OSError:
            raise DeliveryError("name not resolved") from None  # DNS may be back on the next try
        refusal = domain.addresses_refusal(addresses, allow_local=self.allow_local)
        if refusal is not None:
            raise TargetRefused(refusal)
        return addresses[0]

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes
    complete: bool  # False: the body was longer than the cap; the rest was never read


async def _read_capped(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes of the body, raw: decompressing (a small gzip can expand to
    gigabytes) or reading on would let a receiver fill our memory."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        if size + len(chunk) > limit:
            chunks.append(chunk[: limit - size])
            return b"".join(chunks), False
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), True


async def _post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    settings: Settings,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Answer:
    """POST without following redirects, reading at most notify_response_max_bytes of the
    answer. `transport` (webhooks: PinnedTransport) also turns off the environment's
    proxy and .netrc settings: the request goes where the policy checked, with nothing
    added. Without one (the operator's SMS provider) they apply as for any client."""
    timeout = settings.notify_send_timeout_seconds
    request_headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", **headers}
    client = httpx.AsyncClient(
        transport=transport, timeout=timeout, follow_redirects=False, trust_env=transport is None
    )
    try:
        # httpx's timeouts are per operation; one deadline over the whole exchange (resolve,
        # connect, send, read) keeps a receiver that drips bytes from holding the send past
        # its lease (3 x the timeout, delivery.py).
        async with (
            asyncio.timeout(2 * timeout),
            client,
            client.stream("POST", url, content=body, headers=request_headers) as response,
        ):
            data, complete = await _read_capped(response, settings.notify_response_max_bytes)
    except httpx.HTTPError as exc:
        raise DeliveryError(type(exc).__name__) from None
    except TimeoutError:
        raise DeliveryError("TimeoutError") from None
    return Answer(response.status_code, response.headers, data, complete)


def _check_status(status: int) -> None:
    if status >= 500 or status in (408, 425, 429):
        raise DeliveryError(f"HTTP {status}", status_code=status)
    if status >= 400:
        raise DeliveryError(f"HTTP {status}", retryable=False, status_code=status)
    if status >= 300:
        # Not delivered, and never followed: its Location is a target nobody checked.
        raise DeliveryError(f"HTTP {status} redirect not followed", retryable=False, status_code=status)


class SmsChannel:
    """A provider adapter: POST {to, body} (JSON) to the configured URL with the API key
    as a bearer token; the provider's message id comes back as `id`, `message_id` or
    `sid` in the JSON answer. The URL is the operator's setting, not user input: no
    target policy, but the same client rules (no redirects, capped answer, deadline)."""

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
        headers = delivery_headers(message.notification_id)
        if self.settings.sms_api_key:
            headers["Authorization"] = f"Bearer {self.settings.sms_api_key}"
        answer = await _post(self.settings.sms_api_url, json.dumps(document).encode(), headers, self.settings)
        _check_status(answer.status)
        if not answer.complete:
            raise DeliveryError("provider answer too large", retryable=False)
        try:
            parsed = json.loads(answer.body)
        except ValueError:
            raise DeliveryError("provider answer is not JSON") from None
        provider_id = next((parsed.get(k) for k in ("id", "message_id", "sid") if isinstance(parsed, dict)), None)
        if not provider_id:
            raise DeliveryError("provider answer has no message id")
        return str(provider_id)[:120]


class WebhookChannel:
    """POST the JSON document, signed: X-Iopnet-Timestamp (unix seconds) and
    X-Iopnet-Signature = hex HMAC-SHA256(secret, f"{timestamp}.{body}"). The receiver
    recomputes it over the raw body and should refuse old timestamps (replays).

    The target is user input: it goes through PinnedTransport (the webhook policy at
    send time). `resolve` and `verify` are there for tests (a resolver that answers a
    test name, a test CA); production uses the system's resolver and trust store."""

    def __init__(
        self, settings: Settings, *, resolve: Resolver = system_resolver, verify: ssl.SSLContext | bool = True
    ) -> None:
        self.settings = settings
        self.resolve = resolve
        self.ssl_context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify)

    def transport(self) -> PinnedTransport:
        inner = httpx.AsyncHTTPTransport(verify=self.ssl_context)
        return PinnedTransport(inner, self.resolve, allow_local=self.settings.notify_allow_insecure_targets)

    async def send(self, message: OutboundMessage) -> str:
        return (await self.post(message)).provider_id

    async def post(self, message: OutboundMessage) -> Delivered:
        """Send, and say with which HTTP status the receiver accepted it (the delivery log)."""
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
            **delivery_headers(message.notification_id),
        }
        try:
            url = httpx.URL(message.address)
        except httpx.InvalidURL:
            raise DeliveryError("webhook url is not valid", retryable=False) from None
        answer = await _post(str(url), body, headers, self.settings, transport=self.transport())
        _check_status(answer.status)
        provider_id = (answer.headers.get("X-Request-Id") or f"webhook-{message.notification_id}")[:120]
        return Delivered(provider_id, answer.status)


def build_channels(settings: Settings) -> dict[str, ChannelAdapter]:
    channels: dict[str, ChannelAdapter] = {"console": ConsoleChannel()}
    if settings.notify_live_channels:
        channels.update(email=EmailChannel(settings), sms=SmsChannel(settings), webhook=WebhookChannel(settings))
    return channels
