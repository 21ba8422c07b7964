"""NATS connection details shared by the services' brokers (shared/messaging/broker.py),
the command-line tools and the tests."""

import re
from typing import Any

import nats
from nats.aio.client import Client


def servers(url: str) -> list[str]:
    """The servers of `url`: one URL, or several separated by commas (the nodes of a
    cluster, each with the user and password: a client fails over to any of them)."""
    return [part.strip() for part in url.split(",") if part.strip()]


def inbox_prefix(url: str) -> str:
    """`_INBOX.<user>` for a URL that names a user, else nats-py's `_INBOX`: the broker
    lets each user subscribe to its own inbox prefix only (iopnet/natsd.py), so no user
    receives another's JetStream replies."""
    match = re.match(r"^[a-z]+://([^:@/]+)(:[^@/]*)?@", url)
    return f"_INBOX.{match.group(1)}" if match else "_INBOX"


def without_credentials(url: str) -> str:
    return ",".join(re.sub(r"^([a-z]+://)?[^@/]*@", r"\1", server) for server in servers(url))


async def connect_once(url: str, **options: Any) -> Client:
    """One connection for a command-line tool or a test: no retry, and this user's inbox
    prefix (the only one the broker lets it subscribe to)."""
    return await nats.connect(servers(url), inbox_prefix=inbox_prefix(url), **options)
