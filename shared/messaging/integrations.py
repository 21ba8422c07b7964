"""How an outside system (an integration, issue 11) reads iopnet's events: its NATS user,
inbox and durable consumers. The broker's allow-lists (iopnet/natsd.py) and intake's
answer to a new integration (the consumers it may create) both come from here.

An integration with basis `qsoa` (a qualified service organization agreement) reads the
public events of its sites directly: one durable per public stream and site, filtered to
that site. One with basis `consent` reads only its own feed, `iop.feed.<integration>.>`,
into which intake forwards an event about a patient only under that patient's consent.
Each durable has one filter subject: the form of CONSUMER.CREATE that carries the filter
in its subject, which the broker's allow-list can check."""

from dataclasses import dataclass
from typing import Literal

Basis = Literal["qsoa", "consent"]
PUBLIC_STREAMS = {"IOP_INTAKE": "intake", "IOP_SCHEDULING": "scheduling", "IOP_NOTIFICATIONS": "notifications"}
FEED_STREAM = "IOP_FEED"


@dataclass(frozen=True)
class IntegrationConsumer:
    stream: str
    durable: str
    filter_subject: str


def integration_user(integration_id: str) -> str:
    return f"integration-{integration_id}"


def integration_inbox(integration_id: str) -> str:
    """nats-py's `inbox_prefix` for the integration: the only one it may subscribe to."""
    return f"_INBOX.{integration_user(integration_id)}"


def integration_consumers(integration_id: str, sites: tuple[str, ...], basis: str) -> list[IntegrationConsumer]:
    if basis == "consent":
        return [IntegrationConsumer(FEED_STREAM, f"{integration_id}-{FEED_STREAM}", f"iop.feed.{integration_id}.>")]
    return [
        IntegrationConsumer(stream, f"{integration_id}-{stream}-{site}", f"iop.{producer}.*.{site}")
        for stream, producer in PUBLIC_STREAMS.items()
        for site in sites
    ]


# What an integration with basis `consent` receives beyond its patients' consented events:
# the context (sites, programs, sessions) those refer to, which names no patient. Nothing
# else without a patient: a NotificationSent names none but is about one. Intake's feed and
# notifications' webhooks apply the same rule.
CONTEXT_EVENTS = frozenset(
    {"SiteRegistered", "ProgramPublished", "SessionScheduled", "SessionCancelled", "SessionCompleted"}
)
