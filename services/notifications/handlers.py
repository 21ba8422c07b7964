"""Events notifications consumes. Each handler runs in one transaction with the inbox
row (so it is applied once), keeps this service's projections, and plans or cancels
messages through the use cases. Every public event handled is also offered to the
webhook subscriptions that asked for its type.

- IOP_RESTRICTED: PatientContactChanged (contact details; only this service reads them)
- IOP_INTAKE: SiteRegistered, PatientEnrolled, PatientDischarged, PatientTransferred, ConsentGranted,
  ConsentRevoked, TreatmentPlanUpdated (webhooks only), CheckInSubmitted (its own lane)
- IOP_SCHEDULING: ProgramPublished, PatientWaitlisted and SessionCompleted (webhooks only),
  SessionScheduled, SessionCancelled, PatientBooked, BookingCancelled, AttendanceRecorded,
  HoursAtRisk, WeeklyHoursShortfall

Every public event type a webhook may subscribe to (usecases.WEBHOOK_EVENTS: the whole
public catalog) is consumed here or produced by this service; tests check it. A type
added to a stream's map below only adds a filter subject to that stream's existing
durable (shared/messaging/consumer.py derives them from the map, and the durable's config
is updated in place at start): no new durable, no new broker permission. A type read
for webhooks only is in the filter only for the sites whose subscriptions ask for it
(the subscription routes re-bind the durable after their commit).
"""

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.notifications import domain, store, usecases
from services.notifications.delivery import Dispatcher
from shared import clock
from shared.contracts import Envelope
from shared.contracts.events import (
    AttendanceRecorded,
    BookingCancelled,
    CheckInSubmitted,
    ConsentGranted,
    ConsentRevoked,
    Event,
    HoursAtRisk,
    IntegrationRegistered,
    IntegrationRevoked,
    PatientBooked,
    PatientContactChanged,
    PatientDischarged,
    PatientEnrolled,
    PatientTransferred,
    PatientWaitlisted,
    ProgramPublished,
    SessionCancelled,
    SessionCompleted,
    SessionScheduled,
    SiteRegistered,
    TreatmentPlanUpdated,
    WeeklyHoursShortfall,
)
from shared.messaging import Subscription
from shared.messaging.consumer import Handler
from shared.settings import Settings

# The check-ins that alert the care team, and why.
ALERTS = {"urgent": "urgent_check_in", "elevated": "elevated_check_in"}


def _alerting(envelope: Envelope) -> bool:
    """A check-in the care team is alerted to: the safety lane's work that goes first."""
    return envelope.data.get("risk") in ALERTS


class Handlers:
    def __init__(self, policy: usecases.Policy, dispatcher: Dispatcher | None = None) -> None:
        self.policy = policy
        self.dispatcher = dispatcher

    def subscriptions(self) -> list[Subscription]:
        streams: dict[str, dict[type[Event], Handler]] = {
            "IOP_RESTRICTED": {PatientContactChanged: self.on_contact_changed},
            "IOP_INTAKE": {
                SiteRegistered: self.on_site_registered,
                PatientEnrolled: self.on_patient_enrolled,
                PatientDischarged: self.on_patient_discharged,
                PatientTransferred: self.on_patient_transferred,
                ConsentGranted: self.on_consent_granted,
                ConsentRevoked: self.on_consent_revoked,
                TreatmentPlanUpdated: self.for_webhooks_only,
                IntegrationRegistered: self.on_integration_registered,
                IntegrationRevoked: self.on_integration_revoked,
            },
            "IOP_SCHEDULING": {
                SessionScheduled: self.on_session_scheduled,
                SessionCancelled: self.on_session_cancelled,
                PatientBooked: self.on_patient_booked,
                BookingCancelled: self.on_booking_cancelled,
                AttendanceRecorded: self.on_attendance,
                HoursAtRisk: self.on_hours_alert,
                WeeklyHoursShortfall: self.on_hours_alert,
                ProgramPublished: self.for_webhooks_only,
                PatientWaitlisted: self.for_webhooks_only,
                SessionCompleted: self.for_webhooks_only,
            },
        }
        # Types read for webhooks only, and only at the sites where a subscription asked
        # for them (usecases.webhook_interest): nobody subscribing, they cost nothing.
        routine = [
            Subscription(
                stream,
                {cls: self._wrap(handler) for cls, handler in handlers.items()},
                optional=frozenset(cls for cls, handler in handlers.items() if handler == self.for_webhooks_only),
                interest=usecases.webhook_interest,
                read_ahead=usecases.read_batch_ahead,
                # Scheduling's events plan reminders a day ahead: on SQLite's one
                # connection, the contacts and enrollments that plan a welcome go first.
                later=stream == "IOP_SCHEDULING",
            )
            for stream, handlers in streams.items()
        ]
        # Check-ins in a lane of their own (durable notifications-IOP_INTAKE-safety): an
        # urgent one never waits behind a wave of enrollments on IOP_INTAKE. It needs
        # only the site's roster, not the patient's enrollment, so the lanes' relative
        # order does not matter.
        safety = Subscription(
            "IOP_INTAKE", {CheckInSubmitted: self._wrap(self.on_check_in)}, lane="safety", presses=_alerting
        )
        return [*routine, safety]

    def _wrap(self, handler: Handler) -> Handler:
        async def handle(session: AsyncSession, envelope: Envelope, event: Event) -> None:
            await handler(session, envelope, event)
            await usecases.fan_out_event(session, envelope)
            if self.dispatcher is not None:
                self.dispatcher.wake_after_commit(session)

        handle.__name__ = getattr(handler, "__name__", "handle")
        return handle

    async def for_webhooks_only(self, session: AsyncSession, envelope: Envelope, event: Event) -> None:
        """Nothing of ours depends on it; `_wrap` queues it for the subscriptions that want it."""

    # --- intake ---------------------------------------------------------------------------

    async def on_integration_registered(
        self, session: AsyncSession, envelope: Envelope, event: IntegrationRegistered
    ) -> None:
        await usecases.integration_registered(session, event)

    async def on_integration_revoked(
        self, session: AsyncSession, envelope: Envelope, event: IntegrationRevoked
    ) -> None:
        await usecases.integration_revoked(session, event)

    async def on_contact_changed(self, session: AsyncSession, envelope: Envelope, event: PatientContactChanged) -> None:
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
        now = clock.now()
        await usecases.release_held(session, self.policy, str(event.patient_id), now, reason="awaiting_contact")
        await usecases.plan_welcome(session, self.policy, str(event.patient_id), now)

    async def on_site_registered(self, session: AsyncSession, envelope: Envelope, event: SiteRegistered) -> None:
        await store.upsert_site(session, envelope.site_id, event.name, event.timezone)

    async def on_patient_enrolled(self, session: AsyncSession, envelope: Envelope, event: PatientEnrolled) -> None:
        await store.lock_patient(session, str(event.patient_id))
        await usecases.open_enrollment(session, self.policy, envelope, event, clock.now())

    async def on_patient_discharged(self, session: AsyncSession, envelope: Envelope, event: PatientDischarged) -> None:
        patient_id = str(event.patient_id)
        await store.lock_patient(session, patient_id)
        end = domain.EpisodeEnd("discharged", event.discharged_on)
        await usecases.end_enrollment(
            session, envelope, enrollment_id=str(event.enrollment_id), patient_id=patient_id,
            site_id=envelope.site_id, end=end,
        )  # fmt: skip
        await store.cancel_open(session, "discharged", patient_id=patient_id, site_id=envelope.site_id)
        await store.end_treatment_consents(session, patient_id, event.discharged_on)

    async def on_patient_transferred(
        self, session: AsyncSession, envelope: Envelope, event: PatientTransferred
    ) -> None:
        """The patient now belongs to the receiving site (its staff see their messages);
        the episode at the sending site ends and its pending messages are cancelled.
        Published under both sites' subjects: the second copy changes nothing."""
        patient_id = str(event.patient_id)
        await store.lock_patient(session, patient_id)
        await store.move_contact(session, patient_id, event.to_site_id)
        end = domain.EpisodeEnd("transferred", event.effective_on)
        await usecases.end_enrollment(
            session, envelope, enrollment_id=str(event.enrollment_id), patient_id=patient_id,
            site_id=event.from_site_id, end=end,
        )  # fmt: skip
        await store.cancel_open(session, "transferred", patient_id=patient_id, site_id=event.from_site_id)

    async def on_consent_granted(self, session: AsyncSession, envelope: Envelope, event: ConsentGranted) -> None:
        patient_id = str(event.patient_id)
        await store.lock_patient(session, patient_id)
        await store.upsert_consent(
            session,
            str(event.consent_id),
            patient_id=patient_id,
            site_id=envelope.site_id,
            recipient=event.recipient[:200],
            purpose=event.purpose[:100],
            expires_on=event.expires_on,
            expires_event=event.expires_event,
            revoked=False,
            granted_at=envelope.occurred_at,
        )
        await usecases.consent_given(session, self.policy, patient_id, envelope.site_id, clock.now())

    async def on_consent_revoked(self, session: AsyncSession, envelope: Envelope, event: ConsentRevoked) -> None:
        patient_id = str(event.patient_id)
        await store.lock_patient(session, patient_id)
        await store.upsert_consent(
            session,
            str(event.consent_id),
            patient_id=patient_id,
            site_id=envelope.site_id,
            recipient=event.recipient[:200],
            purpose=event.purpose[:100],
            expires_on=event.expires_on,
            revoked=True,
            revoked_at=envelope.occurred_at,
        )
        await usecases.consent_withdrawn(session, self.policy, patient_id, envelope.site_id, clock.now())

    async def on_check_in(self, session: AsyncSession, envelope: Envelope, event: CheckInSubmitted) -> None:
        reason = ALERTS.get(event.risk)
        if reason is None:
            return
        await usecases.raise_alert(
            session,
            self.policy,
            reason=reason,
            site_id=envelope.site_id,
            patient_id=str(event.patient_id),
            cause=envelope,
            dedupe_key=f"check_in:{event.check_in_id}",
            now=clock.now(),
        )

    # --- scheduling -----------------------------------------------------------------------

    async def on_session_scheduled(self, session: AsyncSession, envelope: Envelope, event: SessionScheduled) -> None:
        await usecases.record_session(session, envelope, event, "scheduled")

    async def on_session_cancelled(self, session: AsyncSession, envelope: Envelope, event: SessionCancelled) -> None:
        await usecases.record_session(session, envelope, event, "cancelled")
        await store.cancel_open(session, "session_cancelled", session_id=str(event.session_id))

    async def on_patient_booked(self, session: AsyncSession, envelope: Envelope, event: PatientBooked) -> None:
        await store.lock_patient(session, str(event.patient_id))
        await usecases.booking_announced(session, self.policy, envelope, event, clock.now())

    async def on_booking_cancelled(self, session: AsyncSession, envelope: Envelope, event: BookingCancelled) -> None:
        await store.lock_patient(session, str(event.patient_id))
        await usecases.booking_withdrawn(session, envelope, event)

    async def on_attendance(self, session: AsyncSession, envelope: Envelope, event: AttendanceRecorded) -> None:
        patient_id, session_id = str(event.patient_id), str(event.session_id)
        await store.lock_patient(session, patient_id)
        target = await store.get_session(session, session_id)
        booking = await store.patient_booking_for_session(session, patient_id, session_id)
        starts_at = (target or booking or {"starts_at": envelope.occurred_at})["starts_at"]
        episodes = [e for e in await store.patient_enrollments(session, patient_id) if e["site_id"] == envelope.site_id]
        active = [e for e in episodes if e["status"] == "active"]
        candidates = active or episodes
        enrollment = candidates[-1] if candidates else None
        streak_key = enrollment["enrollment_id"] if enrollment else f"patient:{patient_id}"
        await store.upsert_attendance(
            session, session_id, patient_id, streak_key=streak_key, site_id=envelope.site_id,
            starts_at=starts_at, status=event.status, recorded_at=envelope.occurred_at,
        )  # fmt: skip
        if event.status != "absent" or (enrollment is not None and enrollment["status"] != "active"):
            return
        now = clock.now()
        missed_you = usecases.PatientMessage(
            "missed_you", str(envelope.event_id), str(envelope.correlation_id),
            expires_at=now + domain.MISSED_YOU_VALID, session_id=session_id,
        )  # fmt: skip
        await usecases.plan_patient_message(
            session, self.policy, missed_you, patient_id=patient_id, site_id=envelope.site_id, now=now
        )
        marks = [
            domain.AttendanceMark(r["session_id"], r["starts_at"], r["status"])
            for r in await store.streak_attendance(session, streak_key)
        ]
        for run in domain.absence_streaks(marks):
            if session_id in run:
                await usecases.raise_alert(
                    session,
                    self.policy,
                    reason="two_absences",
                    site_id=envelope.site_id,
                    patient_id=patient_id,
                    cause=envelope,
                    dedupe_key=f"two_absences:{streak_key}:{run[0]}",
                    now=now,
                )

    async def on_hours_alert(
        self, session: AsyncSession, envelope: Envelope, event: HoursAtRisk | WeeklyHoursShortfall
    ) -> None:
        details: dict[str, Any] = {
            "iso_week": event.iso_week,
            "attended_hours": event.attended_hours,
            "target_hours": event.target_hours,
        }
        if isinstance(event, HoursAtRisk):
            reason = "hours_at_risk"
            details["remaining_hours"] = event.remaining_booked_hours
        else:
            reason = "weekly_hours_shortfall"
        await usecases.raise_alert(
            session,
            self.policy,
            reason=reason,
            site_id=envelope.site_id,
            patient_id=str(event.patient_id),
            cause=envelope,
            dedupe_key=f"{reason}:{event.enrollment_id}:{event.iso_week}",
            now=clock.now(),
            details=details,
        )


# The subscriptions' shape (streams and filter subjects) with the default policy, for
# tools that only read it; create_app builds the service's own from its settings.
SUBSCRIPTIONS = Handlers(usecases.Policy.from_settings(Settings())).subscriptions()
