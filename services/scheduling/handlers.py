"""Events scheduling consumes. Plain async functions (session, envelope, event); the
consumer runs each in one transaction with the inbox row, so each is applied once."""

from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from services.scheduling import domain, store, usecases
from shared.contracts import Envelope
from shared.contracts.events import Event, PatientDischarged, PatientEnrolled, PatientTransferred, SiteRegistered
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
        correlation_id=str(envelope.correlation_id),
    )
    program = await store.get_program(session, event.program_id)
    if program is not None:
        await store.update_enrollment(
            session, str(event.enrollment_id), weekly_hours_target=program["weekly_hours_target"]
        )
    enrollment = await store.get_enrollment(session, str(event.enrollment_id))
    assert enrollment is not None
    await usecases.book_enrollment(session, enrollment, envelope, datetime.now(UTC))


async def on_patient_discharged(session: AsyncSession, envelope: Envelope, event: Event) -> None:
    assert isinstance(event, PatientDischarged)
    enrollment = await store.get_enrollment(session, str(event.enrollment_id))
    if enrollment is None or enrollment["status"] != "active":
        return
    await store.update_enrollment(
        session, enrollment["enrollment_id"], status="discharged", ended_on=event.discharged_on
    )
    await usecases.cancel_future_bookings(
        session, enrollment["enrollment_id"], datetime.now(UTC), "discharged", envelope
    )


async def on_patient_transferred(session: AsyncSession, envelope: Envelope, event: Event) -> None:
    """The episode ends at the sending site: its future bookings are cancelled (and
    backfilled). Intake opens the new episode with PatientEnrolled at the receiving
    site, which books it there. Published under both sites' subjects: the second copy
    finds the episode already closed."""
    assert isinstance(event, PatientTransferred)
    enrollment = await store.get_enrollment(session, str(event.enrollment_id))
    if enrollment is None or enrollment["status"] != "active":
        return
    await store.update_enrollment(
        session, enrollment["enrollment_id"], status="transferred", ended_on=event.effective_on
    )
    await usecases.cancel_future_bookings(
        session, enrollment["enrollment_id"], datetime.now(UTC), "transferred", envelope
    )


SUBSCRIPTIONS = [
    Subscription(
        "IOP_INTAKE",
        {
            "SiteRegistered": on_site_registered,
            "PatientEnrolled": on_patient_enrolled,
            "PatientDischarged": on_patient_discharged,
            "PatientTransferred": on_patient_transferred,
        },
    )
]
