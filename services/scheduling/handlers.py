"""Events scheduling consumes. Plain async functions (session, envelope, event); the
consumer runs each in one transaction with the inbox row, so each is applied once."""

from sqlalchemy.ext.asyncio import AsyncSession

from services.scheduling import domain, store
from shared.contracts import Envelope
from shared.contracts.events import Event, PatientEnrolled, SiteRegistered
from shared.messaging import Subscription


async def on_site_registered(session: AsyncSession, envelope: Envelope, event: Event) -> None:
    assert isinstance(event, SiteRegistered)
    await store.upsert_site(session, envelope.site_id, event.name, event.timezone)


async def on_patient_enrolled(session: AsyncSession, envelope: Envelope, event: Event) -> None:
    assert isinstance(event, PatientEnrolled)
    if await store.get_enrollment(session, str(event.enrollment_id)):
        return  # the same enrollment re-published under a new event id
    await store.add_enrollment(
        session,
        enrollment_id=str(event.enrollment_id),
        patient_id=str(event.patient_id),
        site_id=envelope.site_id,
        program_id=event.program_id,
        level_of_care=event.level_of_care,
        cohort=event.cohort,
        start_date=event.start_date,
        weekly_hours_target=domain.weekly_hours_target(event.cohort),
        status="active",
        enrolled_event_id=str(envelope.event_id),
    )


SUBSCRIPTIONS = [
    Subscription(
        "IOP_INTAKE",
        {"SiteRegistered": on_site_registered, "PatientEnrolled": on_patient_enrolled},
    )
]
