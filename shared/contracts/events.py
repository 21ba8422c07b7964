"""Event catalog (DESIGN A5): the `data` of every event as a pydantic model.

These models are the contract other systems rely on. Change them additively only:
`tests/contract` compares them with the JSON Schemas committed under `schemas/`.
Nothing here may carry a name, birth date, free text or contact detail unless the
event is `restricted` (it then travels on `iop.restricted.>` only).
"""

from datetime import date, datetime
from typing import Annotated, ClassVar, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

Producer = Literal["intake", "scheduling", "notifications"]
Cohort = Literal["adult", "adolescent"]
LevelOfCare = Literal["1.0", "2.1", "2.5"]
Risk = Literal["low", "elevated", "urgent"]
SessionKind = Literal["check_in_group", "individual_therapy", "group_therapy", "workshop", "wrap_up"]
AttendanceStatus = Literal["present", "late", "absent", "excused"]
Channel = Literal["console", "email", "sms", "webhook"]
PreferredChannel = Literal["sms", "email", "none"]
# A closed list on purpose: a free-text referral would put PHI on the bus.
ReferralSource = Literal["self", "family", "physician", "hospital", "court", "employer", "school", "other"]
DischargeReason = Literal["completed", "step_down", "step_up", "left_against_advice", "administrative"]
SiteId = Annotated[str, Field(pattern=r"^[a-z0-9-]{2,40}$")]
IsoWeek = Annotated[str, Field(pattern=r"^\d{4}-W\d{2}$")]


class Event(BaseModel):
    """Base of every event's `data`. Unknown fields are ignored so producers may add."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    producer: ClassVar[Producer]
    restricted: ClassVar[bool] = False


# --- intake ------------------------------------------------------------------


class IntakeEvent(Event):
    producer: ClassVar[Producer] = "intake"


class SiteRegistered(IntakeEvent):
    """Published on registration and again on every change of name or timezone."""

    name: str
    timezone: str


class PatientEnrolled(IntakeEvent):
    patient_id: UUID
    enrollment_id: UUID
    program_id: str
    level_of_care: LevelOfCare
    cohort: Cohort
    start_date: date
    referral_source: ReferralSource


class PatientContactChanged(IntakeEvent):
    restricted: ClassVar[bool] = True

    patient_id: UUID
    phone: str | None
    email: str | None
    preferred_channel: PreferredChannel
    language: str


class ConsentGranted(IntakeEvent):
    consent_id: UUID
    patient_id: UUID
    recipient: str
    purpose: str
    expires_on: date | None
    # An expiring event instead of a date (42 CFR 2.31), e.g. "end_of_treatment".
    expires_event: str | None = None


class ConsentRevoked(IntakeEvent):
    consent_id: UUID
    patient_id: UUID
    recipient: str
    purpose: str
    expires_on: date | None
    expires_event: str | None = None


class CheckInSubmitted(IntakeEvent):
    check_in_id: UUID
    patient_id: UUID
    enrollment_id: UUID
    submitted_at: datetime
    mood: Annotated[int, Field(ge=1, le=10)]
    craving: Annotated[int, Field(ge=0, le=10)]
    used_since_last: bool
    safety_concern: bool
    risk: Risk


class GoalStatus(BaseModel):
    goal_id: UUID
    status: Literal["active", "met", "dropped"]


class TreatmentPlanUpdated(IntakeEvent):
    patient_id: UUID
    enrollment_id: UUID
    plan_id: UUID
    goals: list[GoalStatus]


class PatientTransferred(IntakeEvent):
    patient_id: UUID
    enrollment_id: UUID
    from_site_id: SiteId
    to_site_id: SiteId
    to_program_id: str
    effective_on: date


class PatientDischarged(IntakeEvent):
    patient_id: UUID
    enrollment_id: UUID
    reason: DischargeReason
    discharged_on: date


class IntegrationRegistered(IntakeEvent):
    """An outside system was given the events of its sites (one envelope per site):
    `qsoa` (a qualified service organization agreement) or `consent` (an event about a
    patient only under that patient's consent naming it, for `purpose`). Its webhooks in
    notifications follow the same basis."""

    integration_id: str
    sites: list[SiteId]
    basis: Literal["qsoa", "consent"]
    purpose: str | None = None


class IntegrationRevoked(IntakeEvent):
    """Its access ended: no more feed, webhooks stopped (one envelope per site)."""

    integration_id: str


# --- scheduling --------------------------------------------------------------


class SchedulingEvent(Event):
    producer: ClassVar[Producer] = "scheduling"


class TemplateBlock(BaseModel):
    weekday: Annotated[int, Field(ge=1, le=7)]
    start: Annotated[str, Field(pattern=r"^\d{2}:\d{2}$")]
    minutes: Annotated[int, Field(gt=0)]
    kind: SessionKind
    title: str
    capacity: Annotated[int, Field(ge=1)]


class ProgramPublished(SchedulingEvent):
    program_id: str
    name: str
    level_of_care: LevelOfCare
    cohort: Cohort
    weekly_hours_target: float
    template: list[TemplateBlock]


class SessionScheduled(SchedulingEvent):
    session_id: UUID
    program_id: str
    kind: SessionKind
    title: str
    starts_at: datetime
    ends_at: datetime
    capacity: int


class SessionCancelled(SchedulingEvent):
    session_id: UUID
    program_id: str
    kind: SessionKind
    title: str
    starts_at: datetime
    ends_at: datetime
    capacity: int


class PatientBooked(SchedulingEvent):
    booking_id: UUID
    session_id: UUID
    patient_id: UUID
    starts_at: datetime
    reason: str | None = None


class BookingCancelled(SchedulingEvent):
    booking_id: UUID
    session_id: UUID
    patient_id: UUID
    starts_at: datetime
    reason: str | None = None


class PatientWaitlisted(SchedulingEvent):
    session_id: UUID
    patient_id: UUID
    position: int


class AttendanceRecorded(SchedulingEvent):
    session_id: UUID
    patient_id: UUID
    status: AttendanceStatus
    minutes: int


class SessionCompleted(SchedulingEvent):
    session_id: UUID
    kind: SessionKind
    started_at: datetime
    ended_at: datetime
    present_count: int
    absent_count: int


class HoursAtRisk(SchedulingEvent):
    patient_id: UUID
    enrollment_id: UUID
    iso_week: IsoWeek
    attended_hours: float
    remaining_booked_hours: float
    target_hours: float


class WeeklyHoursShortfall(SchedulingEvent):
    patient_id: UUID
    enrollment_id: UUID
    iso_week: IsoWeek
    attended_hours: float
    target_hours: float


# --- notifications -----------------------------------------------------------


class NotificationsEvent(Event):
    producer: ClassVar[Producer] = "notifications"


class NotificationSent(NotificationsEvent):
    notification_id: UUID
    recipient_kind: Literal["patient", "care_team", "integration"]
    channel: Channel
    template: str
    cause_event_id: UUID
    attempts: int


class NotificationFailed(NotificationsEvent):
    notification_id: UUID
    recipient_kind: Literal["patient", "care_team", "integration"]
    channel: Channel
    template: str
    cause_event_id: UUID
    attempts: int
    # Additive: why it failed, as a fixed text (a status code, "target refused: loopback"),
    # never a provider's words or the address.
    reason: str | None = None


class DisclosureRecorded(NotificationsEvent):
    """A webhook delivered an event about a patient to an outside system under the
    patient's consent: an entry for the patient's accounting of disclosures, which intake
    keeps. Restricted: who receives a patient's records under their consent is itself
    sensitive, so it travels in the restricted account, from notifications to intake."""

    restricted: ClassVar[bool] = True

    patient_id: UUID
    recipient: str
    purpose: str
    channel: Literal["webhook"]
    event_type: str
    event_id: UUID
    disclosed_at: datetime


class CareTeamAlerted(NotificationsEvent):
    alert_id: UUID
    patient_id: UUID
    reason: str
    severity: Literal["info", "warning", "urgent"]
    cause_event_id: UUID


def _catalog() -> dict[str, type[Event]]:
    leaves: dict[str, type[Event]] = {}
    for base in (IntakeEvent, SchedulingEvent, NotificationsEvent):
        for cls in base.__subclasses__():
            leaves[cls.__name__] = cls
    return leaves


EVENT_TYPES: dict[str, type[Event]] = _catalog()
