"""Events intake consumes: scheduling's published programs, the catalogue a patient
can be enrolled in (DESIGN: a service learns of others only from their events)."""

from sqlalchemy.ext.asyncio import AsyncSession

from services.intake import store
from shared.contracts import Envelope
from shared.contracts.events import Event, ProgramPublished
from shared.messaging import Subscription


async def on_program_published(session: AsyncSession, envelope: Envelope, event: Event) -> None:
    assert isinstance(event, ProgramPublished)
    await store.upsert_program(
        session,
        event.program_id,
        site_id=envelope.site_id,
        name=event.name,
        cohort=event.cohort,
        level_of_care=event.level_of_care,
        published_at=envelope.occurred_at,
    )


SUBSCRIPTIONS = [Subscription("IOP_SCHEDULING", {"ProgramPublished": on_program_published})]
