"""Events intake consumes: scheduling's published programs, the catalogue a patient
can be enrolled in (DESIGN: a service learns of others only from their events)."""

from sqlalchemy.ext.asyncio import AsyncSession

from services.intake import usecases
from shared.contracts import Envelope
from shared.contracts.events import ProgramPublished
from shared.messaging import Subscription


async def on_program_published(session: AsyncSession, envelope: Envelope, event: ProgramPublished) -> None:
    await usecases.project_program(session, event, envelope.site_id, envelope.occurred_at)


SUBSCRIPTIONS = [Subscription("IOP_SCHEDULING", {ProgramPublished: on_program_published})]
