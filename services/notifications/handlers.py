"""Events notifications consumes: contacts (restricted stream) and enrollments."""

from uuid import UUID, uuid4

from sqlalchemy.ext.asyncio import AsyncSession

from services.notifications import domain, store
from services.notifications.delivery import dispatcher
from shared.contracts import Envelope
from shared.contracts.events import Event, PatientContactChanged, PatientEnrolled
from shared.messaging import Subscription


async def on_contact_changed(session: AsyncSession, envelope: Envelope, event: Event) -> None:
    assert isinstance(event, PatientContactChanged)
    await store.lock_patient(session, str(event.patient_id))
    await store.upsert_contact(
        session,
        str(event.patient_id),
        envelope.occurred_at,
        site_id=envelope.site_id,
        phone=event.phone,
        email=event.email,
        preferred_channel=event.preferred_channel,
        language=event.language,
    )
    await plan_welcome(session, event.patient_id)


async def on_patient_enrolled(session: AsyncSession, envelope: Envelope, event: Event) -> None:
    assert isinstance(event, PatientEnrolled)
    await store.lock_patient(session, str(event.patient_id))
    await store.add_enrollment(
        session,
        enrollment_id=str(event.enrollment_id),
        patient_id=str(event.patient_id),
        site_id=envelope.site_id,
        start_date=event.start_date,
        enrolled_event_id=str(envelope.event_id),
        correlation_id=str(envelope.correlation_id),
    )
    await plan_welcome(session, event.patient_id)


async def plan_welcome(session: AsyncSession, patient_id: UUID) -> None:
    """Queue a welcome per enrollment once both the enrollment and the contact are known.

    The two arrive on different streams in either order; whichever comes second
    queues the message, and the unique (cause, template, recipient) keeps it to one.
    """
    contact = await store.get_contact(session, str(patient_id))
    if contact is None:
        return
    channel = domain.patient_channel(contact["preferred_channel"], live_channels=False)
    recipient = domain.recipient_key("patient", str(patient_id))
    for episode in await store.patient_enrollments(session, str(patient_id)):
        if await store.notification_exists(session, episode["enrolled_event_id"], "welcome", recipient):
            continue
        await store.add_notification(
            session,
            notification_id=str(uuid4()),
            site_id=episode["site_id"],
            patient_id=str(patient_id),
            recipient_kind="patient",
            recipient=recipient,
            channel=channel or "console",
            template="welcome",
            language=contact["language"],
            cause_event_id=episode["enrolled_event_id"],
            correlation_id=episode["correlation_id"],
            # The patient asked for no messages: recorded, never sent.
            status="pending" if channel else "suppressed",
        )
        dispatcher.wake_after_commit(session)


SUBSCRIPTIONS = [
    Subscription("IOP_RESTRICTED", {"PatientContactChanged": on_contact_changed}),
    Subscription("IOP_INTAKE", {"PatientEnrolled": on_patient_enrolled}),
]
