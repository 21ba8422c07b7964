"""Events intake consumes:
- scheduling's published programs, the catalogue a patient can be enrolled in (DESIGN:
  a service learns of others only from their events);
- in a lane of its own ("feed"), the public events of the three producers a feed may
  carry (about a patient, or context), forwarded into the consent-gated feeds of outside
  systems (usecases.forward_to_feeds, issue 11); read only at the sites of consent-based
  integrations, and not at all without one (usecases.feed_interest);
- from the restricted account, notifications' DisclosureRecorded: a webhook delivered an
  event about a patient under their consent, for the patient's accounting of disclosures."""

from sqlalchemy.ext.asyncio import AsyncSession

from services.intake import usecases
from shared.contracts import EVENT_TYPES, Envelope, Event
from shared.contracts.events import DisclosureRecorded, ProgramPublished
from shared.messaging import Interest, Subscription
from shared.messaging.integrations import CONTEXT_EVENTS, PUBLIC_STREAMS


async def on_program_published(session: AsyncSession, envelope: Envelope, event: ProgramPublished) -> None:
    await usecases.project_program(session, event, envelope.site_id, envelope.occurred_at)


async def on_disclosure_recorded(session: AsyncSession, envelope: Envelope, event: DisclosureRecorded) -> None:
    await usecases.record_disclosure(session, envelope, event)


async def on_public_event(session: AsyncSession, envelope: Envelope, event: Event) -> None:
    await usecases.forward_to_feeds(session, envelope, event)


def _forwardable(producer: str) -> list[type[Event]]:
    """The public events of `producer` a feed may carry: about a patient, or context.
    The rest (NotificationSent, the most frequent of all) the lane does not even read."""
    return [
        cls
        for cls in EVENT_TYPES.values()
        if cls.producer == producer
        and not cls.restricted
        and ("patient_id" in cls.model_fields or cls.__name__ in CONTEXT_EVENTS)
    ]


def _feed_lane(stream: str, producer: str) -> Subscription:
    """Read only at the sites of consent-based integrations; dormant without one."""
    forwardable = _forwardable(producer)
    names = [cls.__name__ for cls in forwardable]

    async def interest(session: AsyncSession) -> Interest:
        return await usecases.feed_interest(session, names)

    return Subscription(
        stream,
        dict.fromkeys(forwardable, on_public_event),
        lane="feed",
        optional=frozenset(forwardable),
        interest=interest,
    )


SUBSCRIPTIONS = [
    Subscription("IOP_SCHEDULING", {ProgramPublished: on_program_published}),
    Subscription("IOP_RESTRICTED", {DisclosureRecorded: on_disclosure_recorded}),
    *(_feed_lane(stream, producer) for stream, producer in PUBLIC_STREAMS.items()),
]
