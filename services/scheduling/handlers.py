"""Events scheduling consumes. Plain async functions (session, envelope, event), each
typed by its event class, which the consumer dispatches on; it runs each in one
transaction with the inbox row, so each is applied once.
Each hands its event to a use case; the use cases are state-based, so a late, repeated
or re-applied event (`iopnet events reapply`) converges instead of doubling effects."""

from sqlalchemy.ext.asyncio import AsyncSession

from services.scheduling import domain, store, usecases
from shared import clock
from shared.contracts import Envelope
from shared.contracts.events import PatientDischarged, PatientEnrolled, PatientTransferred, SiteRegistered
from shared.messaging import Subscription


async def on_site_registered(session: AsyncSession, envelope: Envelope, event: SiteRegistered) -> None:
    await store.upsert_site(session, envelope.site_id, event.name, event.timezone)


async def on_patient_enrolled(session: AsyncSession, envelope: Envelope, event: PatientEnrolled) -> None:
    await usecases.open_enrollment(session, envelope, event, clock.now())


async def on_patient_discharged(session: AsyncSession, envelope: Envelope, event: PatientDischarged) -> None:
    end = domain.EpisodeEnd("discharged", event.discharged_on)
    await usecases.end_enrollment(session, envelope, str(event.enrollment_id), str(event.patient_id), end, clock.now())


async def on_patient_transferred(session: AsyncSession, envelope: Envelope, event: PatientTransferred) -> None:
    """The episode ends at the sending site: its future bookings are cancelled (and
    backfilled). Intake opens the new episode with PatientEnrolled at the receiving
    site, which books it there. Published under both sites' subjects: the second copy
    finds the episode already closed."""
    end = domain.EpisodeEnd("transferred", event.effective_on)
    await usecases.end_enrollment(session, envelope, str(event.enrollment_id), str(event.patient_id), end, clock.now())


SUBSCRIPTIONS = [
    Subscription(
        "IOP_INTAKE",
        {
            SiteRegistered: on_site_registered,
            PatientEnrolled: on_patient_enrolled,
            PatientDischarged: on_patient_discharged,
            PatientTransferred: on_patient_transferred,
        },
        read_ahead=usecases.read_batch_ahead,
    )
]
