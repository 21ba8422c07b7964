"""Streams, the transactional outbox, idempotent consumers and the dead-letter path."""

from shared.messaging.consumer import Consumer, Handler, HandlerError, Interest, Poison, Subscription, named_ids
from shared.messaging.inbox import Inbox
from shared.messaging.outbox import Outbox, OutboxRelay
from shared.messaging.streams import STREAMS, ensure_streams, owned_streams

__all__ = [
    "STREAMS",
    "Consumer",
    "Handler",
    "HandlerError",
    "Inbox",
    "Interest",
    "Outbox",
    "OutboxRelay",
    "Poison",
    "Subscription",
    "ensure_streams",
    "named_ids",
    "owned_streams",
]
