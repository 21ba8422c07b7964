"""NATS connection details shared by the services' brokers (shared/messaging/broker.py),
the command-line tools and the tests."""

import re
from typing import Any

import nats
from nats.aio.client import Client


def inbox_prefix(url: str) -> str:
    """`_INBOX.<user>` for a URL that names a user, else nats-py's `_INBOX`: the broker
    lets each user subscribe to its own inbox prefix only (iopnet/natsd.py), so no user
    receives another's JetStream replies."""
    match = re.match(r"^[a-z]+://([^:@/]+)(:[^@/]*)?@", url)
    return f"_INBOX.{match.group(1)}" if match else "_INBOX"


def without_credentials(url: str) -> str:
    return re.sub(r"^([a-z]+://)?[^@/]*@", r"\1", url)


async def connect_once(url: str, **options: Any) -> Client:
    """One connection for a command-line tool or a test: no retry, and this user's inbox
    prefix (the only one the broker lets it subscribe to)."""
    return await nats.connect(url, inbox_prefix=inbox_prefix(url), **options)
